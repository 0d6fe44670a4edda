"""A bundle's backbone: the adapted parameters saved, and the network rebuilt from them.

A bundle stores the adapted parameters (``save_parameters`` form) and the *plan* that
produced its structure. :func:`load_backbone` rebuilds the architecture, replays the plan
to get the same block tree, then loads the parameters strictly, so a reloaded backbone keeps
its stages addressable (the detector builder needs them).
"""

from __future__ import annotations

import os
from pathlib import Path

from bbadapt.bundle.manifest import read_manifest
from bbadapt.bundle.schema import BACKBONE_PARAMS, BundleManifest
from bbadapt.platform.errors import ModelError, OutputError


def save_backbone(adapted, directory: Path) -> str:
    """Write the adapted parameters; returns their sha256."""
    from bbadapt.core.weights import sha256_of

    path = directory / BACKBONE_PARAMS
    adapted.net.save_parameters(str(path))
    return sha256_of(path)


def stored_plan(manifest: BundleManifest) -> tuple[list, list]:
    """The typed steps and recorded results of a manifest's plan; a step bbadapt does not write is a damaged bundle."""
    from bbadapt.core.plan import PlanStepError, from_records

    try:
        return from_records(list(manifest.plan))
    except PlanStepError as exc:
        raise OutputError(f"bundle manifest has a damaged plan: {exc}") from None


def backbone_structure(manifest: BundleManifest, net=None):
    """The adapted backbone's block tree (values not meaningful): the architecture with the plan replayed.

    Lets a caller that brings its own parameters (a detector checkpoint) rebuild the
    structure without the bundle's ``backbone.params``.
    """
    from bbadapt.core.architectures import rebuild
    from bbadapt.core.rewrite import apply_plan

    if net is None:
        try:
            net = rebuild(manifest.arch_record)
        except ModelError as exc:  # the manifest names an architecture this bbadapt cannot build
            raise OutputError(f"bundle manifest: {exc}") from None
    steps, _ = stored_plan(manifest)
    try:
        apply_plan(net, steps, manifest.source_spec(), manifest.target_spec())
    except ModelError as exc:  # a step the architecture does not have: the bundle is damaged, not the arguments
        raise OutputError(f"bundle manifest: its plan does not fit the architecture: {exc}") from None
    return net


def load_backbone(directory: str | os.PathLike | BundleManifest, ctx=None, net=None):
    """Rebuild an adapted backbone: a HybridBlock taking the bundle's target-spec input.

    ``directory``: the bundle, or its manifest as :func:`read_manifest` returned it (read once).
    The architecture comes from the manifest's ``arch`` record (a zoo name, or a builder a
    converter provides); ``net`` overrides it with an architecture built by the caller.
    """
    from bbadapt.bundle.manifest import check_params
    from bbadapt.core.weights import load_into

    manifest = check_params(directory) if isinstance(directory, BundleManifest) else read_manifest(directory)
    net = backbone_structure(manifest, net)
    load_into(net, manifest.backbone_params_path)
    if ctx is not None:
        net.collect_params().reset_ctx(ctx)
    return net


def load_adapted(bundle: str | os.PathLike | BundleManifest, net=None):
    """A bundle as the :class:`~bbadapt.core.rewrite.Adapted` that was saved (graph not traced).

    The one way back from disk to the object the check and the writers work on. ``bundle``: its
    directory or its manifest (read once). ``net``: a backbone already rebuilt by the caller (a
    detector's), instead of ``backbone.params``.
    """
    from bbadapt.core.rewrite import Adapted

    manifest = bundle if isinstance(bundle, BundleManifest) else read_manifest(bundle)
    steps, results = stored_plan(manifest)  # as recorded: a replay on fresh values cannot tell what was exact
    net = net if net is not None else load_backbone(manifest)
    return Adapted(net, manifest.source_spec(), manifest.target_spec(), manifest.bn, steps, results, None,
                   [dict(h) for h in manifest.health])
