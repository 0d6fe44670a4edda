"""Folding and freezing: semantics every adapted network must keep."""

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd
from mxnet.gluon import nn

import bbadapt
from bbadapt.core.blocks import FrozenAffine, Identity
from bbadapt.core.plan import Affine, FoldIntoBN, Fuse
from bbadapt.core.rewrite import clone
from bbadapt.core.spec import parse_spec
from bbadapt.core.trace import block_paths
from bbadapt.platform.errors import WeightsError
from bbadapt.verify import images
from bbadapt.verify.equivalence import CheckOptions, check
from tests.conftest import SMALL_SIZES, calibrated


def _params(net):
    return {k: p.data().asnumpy().copy() for k, p in net._collect_params_with_prefix().items()}


def _raw(n=3, size=(40, 44)):
    photos, _ = images.photos(size, limit=n)
    return photos


def _max_rel(a_net, a_spec, b_net, b_spec, raw):
    a = a_net(mx.nd.array(parse_spec(a_spec).normalize(raw))).asnumpy()
    b = b_net(mx.nd.array(parse_spec(b_spec).normalize(raw))).asnumpy()
    return np.abs(a - b).max() / np.abs(b).max()


def test_adapt_leaves_the_original_network_untouched(net18v2):
    before = _params(net18v2)
    structure = [type(b).__name__ for b in block_paths(net18v2).values()]
    bbadapt.adapt(net18v2, "imagenet", "bgr255", bn="fused")
    after = _params(net18v2)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    assert structure == [type(b).__name__ for b in block_paths(net18v2).values()]


def test_fused_mode_leaves_no_batchnorm_and_only_preactivation_ones_become_affine(net18v2):
    adapted = bbadapt.adapt(net18v2, "imagenet", "rgb255", bn="fused")
    blocks = list(block_paths(adapted.net).values())
    assert not any(isinstance(b, nn.BatchNorm) for b in blocks)
    affine_steps = [s for s in adapted.steps if isinstance(s, Affine)]
    assert len(affine_steps) == 9 and all("pre-activation" in s.why or "elsewhere" in s.why for s in affine_steps)
    assert sum(isinstance(b, Identity) for b in blocks) == len([s for s in adapted.steps if isinstance(s, Fuse)])
    assert sum(isinstance(b, FrozenAffine) for b in blocks) == len(affine_steps) + 1  # + the data BN


def test_global_stats_mode_keeps_batchnorms_frozen_and_untrained(net18v1):
    adapted = bbadapt.adapt(net18v1, "imagenet", "rgb255", bn="global-stats")
    bns = [b for b in block_paths(adapted.net).values() if isinstance(b, nn.BatchNorm)]
    assert len(bns) == 20 and all(b._kwargs["use_global_stats"] for b in bns)
    assert all(p.grad_req == "null" for b in bns for p in b.params.values())


@pytest.mark.parametrize("bn", ["affine", "fused", "global-stats"])
def test_gradients_reach_the_input_and_every_trainable_weight_but_never_the_frozen_constants(net18v2, bn):
    adapted = bbadapt.adapt(net18v2, "imagenet", "rgb255", bn=bn).net
    x = mx.nd.array(_raw(1))
    x.attach_grad()
    with autograd.record():
        y = adapted(x).sum()
    y.backward()
    assert float(x.grad.abs().sum().asscalar()) > 0
    frozen = [p for b in block_paths(adapted).values() if isinstance(b, (FrozenAffine, nn.BatchNorm))
              for p in b.params.values()]
    assert frozen and all(p.grad_req == "null" for p in frozen)
    trainable = [p for p in adapted.collect_params().values() if p.grad_req != "null"]
    convs = [b for b in block_paths(adapted).values() if isinstance(b, nn.Conv2D)]
    assert all(c.weight.grad_req == "write" for c in convs)
    assert {id(c.weight) for c in convs} <= {id(p) for p in trainable}
    assert all(float(p.grad().abs().sum().asscalar()) > 0 for p in trainable)  # every trainable weight learns


def test_fix_gamma_ignores_a_stored_gamma_that_is_not_one():
    net = clone(calibrated("resnet18_v2"))
    data_bn = block_paths(net)["features.0"]
    data_bn.gamma.set_data(mx.nd.full(data_bn.gamma.shape, 7.0))  # ignored by MXNet: fix_gamma=True
    for bn in ("affine", "global-stats"):
        adapted = bbadapt.adapt(net, "imagenet", "rgb255", bn=bn)
        assert _max_rel(adapted.net, "rgb255", net, "imagenet", _raw()) < 1e-5


def test_global_stats_data_bn_switches_gamma_on_when_fix_gamma_cannot_express_the_scale():
    net = clone(calibrated("resnet18_v2"))
    data_bn = block_paths(net)["features.0"]
    data_bn.running_var.set_data(mx.nd.full((3,), 0.01))  # 1/sqrt(var) * a > 1/sqrt(eps)
    adapted = bbadapt.adapt(net, "rgb255", "imagenet", bn="global-stats")
    result = next(r for s, r in zip(adapted.steps, adapted.results, strict=True) if isinstance(s, FoldIntoBN))
    assert result.fix_gamma is False
    assert _max_rel(adapted.net, "imagenet", net, "rgb255", _raw()) < 1e-5


def test_zero_and_tiny_variances_stay_finite_and_are_reported():
    net = clone(calibrated("resnet18_v1"))
    bn = block_paths(net)["features.1"]
    var = bn.running_var.data().asnumpy()
    var[:3] = [0.0, 1e-12, 1e-8]
    bn.running_var.set_data(mx.nd.array(var))
    for mode in ("fused", "affine"):
        adapted = bbadapt.adapt(net, "imagenet", "rgb255", bn=mode)
        assert adapted.health and adapted.health[0]["tiny_var_channels"] == 3
        report = check(net, "imagenet", adapted, options=CheckOptions(sizes=SMALL_SIZES, n_photos=1))
        assert report["passed"], report["reasons"]


def test_negative_running_variance_is_refused():
    net = clone(calibrated("resnet18_v1"))
    bn = block_paths(net)["features.1"]
    bn.running_var.set_data(mx.nd.full(bn.running_var.shape, -1.0))
    with pytest.raises(WeightsError, match="running_var"):
        bbadapt.adapt(net, "imagenet", "rgb255")


@pytest.mark.parametrize("source, target", [("caffe", "rgb255"), ("imagenet", "bgr255"), ("imagenet", "tf"), ("imagenet", "imagenet")])
def test_channel_order_and_scale_changes_are_exact(net18v1, source, target):
    adapted = bbadapt.adapt(net18v1, source, target, fold="bn", bn="fused")
    assert adapted.exact
    assert _max_rel(adapted.net, target, net18v1, source, _raw()) < 1e-5


def test_conv_fold_is_exact_when_there_is_no_shift(net18v1):
    adapted = bbadapt.adapt(net18v1, "rgb01", "bgr255", fold="conv")
    assert adapted.fold == "conv" and adapted.exact
    assert _max_rel(adapted.net, "bgr255", net18v1, "rgb01", _raw()) < 1e-5


def test_conv_fold_with_a_shift_is_flagged_approximate_and_wrong_only_at_the_border(net18v1):
    adapted = bbadapt.adapt(net18v1, "imagenet", "rgb255", fold="conv")
    assert not adapted.exact
    report = check(net18v1, "imagenet", adapted, options=CheckOptions(sizes=[(64, 64)], n_photos=2))
    stem = report["probes"][0]
    assert report["exact"] is False and report["passed"]
    assert stem["border"]["max_rel"] > 1e-3  # padding means "black" now, "mean colour" before
    assert stem["interior"]["max_rel"] < 1e-5
    assert any("approximate" in n for n in report["notes"])


def test_an_adapted_backbone_stays_symbol_traceable_and_hybridizable(net18v2):
    adapted = bbadapt.adapt(net18v2, "imagenet", "rgb255", bn="fused").net
    sym = adapted(mx.sym.var("data"))
    assert sym.list_outputs()
    raw = _raw()
    eager = adapted(mx.nd.array(raw)).asnumpy()
    adapted.hybridize(static_alloc=True)
    hybrid = adapted(mx.nd.array(raw)).asnumpy()  # MKLDNN may fuse ops here: equal to fp32 rounding
    assert np.abs(hybrid - eager).max() <= 1e-5 * np.abs(eager).max()


def test_parameter_names_keep_the_prefixes_of_the_blocks_they_replace(net18v1):
    original = {p.name for p in net18v1.collect_params().values()}
    adapted = bbadapt.adapt(net18v1, "imagenet", "rgb255", bn="affine").net
    names = {p.name for p in adapted.collect_params().values()}
    convs = {n for n in original if "conv" in n and n.endswith("weight")}
    assert convs <= names
    bn_prefixes = {n[: -len("running_mean")] for n in original if n.endswith("running_mean")}
    inserted = {block_paths(net18v1)["features.0"].prefix + "input_affine_"}  # v1 has no data BN: one is inserted
    assert {n[: -len("scale")] for n in names if n.endswith("_scale")} == bn_prefixes | inserted


def test_a_hybridized_network_that_already_ran_adapts_and_checks(net18v2):
    net = clone(net18v2)
    net.hybridize(static_alloc=True)
    net(mx.nd.array(_raw(1)))  # compiled graph exists now
    adapted = bbadapt.adapt(net, "imagenet", "rgb255")
    report = check(net, "imagenet", adapted, options=CheckOptions(sizes=SMALL_SIZES, n_photos=1))
    assert report["passed"], report["reasons"]


def test_adapting_an_adapted_network_is_refused_in_one_line(net18v1):
    from bbadapt.platform.errors import ModelError

    adapted = bbadapt.adapt(net18v1, "imagenet", "rgb255")
    with pytest.raises(ModelError, match="already adapted"):
        bbadapt.adapt(adapted.net, "rgb255", "bgr255")


def test_conv_fold_absorbs_the_v2_data_batchnorm_with_a_channel_swap(net18v2):
    adapted = bbadapt.adapt(net18v2, "imagenet", "bgr255", fold="conv", bn="fused")
    assert not any(isinstance(b, nn.BatchNorm) for b in block_paths(adapted.net).values())
    report = check(net18v2, "imagenet", adapted, options=CheckOptions(sizes=[(64, 64)], n_photos=2))
    assert report["passed"] and report["probes"][0]["interior"]["max_rel"] < 1e-5
