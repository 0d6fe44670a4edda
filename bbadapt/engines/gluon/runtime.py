"""Small things every user of a built detector needs: its manifest, loading it quietly, its context,
and the proposal-count check that turns a deep mxnet failure into one line.

Training and evaluation both use these; keeping them here (not in either) keeps the two
independent of each other.
"""

from __future__ import annotations

import os
import warnings

from bbadapt.bundle.schema import BundleManifest
from bbadapt.platform.devices import context_of
from bbadapt.platform.errors import OptionError


def detector_manifest(directory: str | os.PathLike) -> BundleManifest:
    """The manifest of a detector bundle or checkpoint, read once (one-line errors when unusable)."""
    from bbadapt.engines.gluon.detector_bundle import read_detector

    return read_detector(directory)


def load_quietly(bundle: str | os.PathLike | BundleManifest, ctx):
    """``load_detector`` (bundles written before the anchors were excluded from ``train_patterns``
    made mxnet warn that the anchors Constant ignores ``grad_req``; keep the CLI's stderr to our lines)."""
    from bbadapt.engines.gluon.detector_bundle import load_detector

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Constant parameter .* does not support grad_req")
        return load_detector(bundle, ctx=ctx)


def check_proposals(net, short_side: int, training: bool = True) -> None:
    """gluoncv keeps a fixed number of RPN proposals per image (``rpn_train_post_nms``, in
    inference ``rpn_test_post_nms``) and slices them out of all anchors: an image with fewer
    anchors fails deep inside mxnet. Say so up front, for the smallest image a run can see
    (short x short)."""
    import mxnet as mx

    if getattr(net, "num_stages", 1) != 1:
        return  # FPN: anchors on every level, far more than any proposal count
    _, _, h, w = net.features(mx.sym.var("data")).infer_shape(data=(1, 3, short_side, short_side))[1][0]
    anchors = net.rpn.anchor_generator(mx.nd.zeros((1, 1, h, w), ctx=context_of(net))).shape[1]
    wanted = max(net.rpn._train_post_nms, net.rpn._test_post_nms) if training else net.rpn._test_post_nms
    if wanted > anchors:
        raise OptionError(f"--short-side {short_side} gives a {h}x{w} feature map with {anchors} anchors, fewer than the "
                          f"detector's {wanted} RPN proposals per image; use a larger --short-side or build the "
                          "bundle with fewer proposals (rpn_train_post_nms / rpn_test_post_nms)")
