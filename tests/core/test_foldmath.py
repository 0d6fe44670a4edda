"""Every fold formula and its inverse, checked against the layers they stand for, written out in float64 numpy."""

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from bbadapt.core import foldmath
from bbadapt.core.spec import PRESETS, affine_map, apply_map

RNG = np.random.default_rng(7)
PERMS = [(0, 1, 2), (2, 1, 0)]


def batchnorm(x, gamma, beta, mean, var, eps, fix_gamma=False):
    """A BatchNorm in inference, NCHW, as its definition reads (fix_gamma: gamma is 1)."""
    c = (1, -1, 1, 1)
    gamma = np.ones_like(gamma) if fix_gamma else gamma
    return gamma.reshape(c) * (x - mean.reshape(c)) / np.sqrt(var.reshape(c) + eps) + beta.reshape(c)


def conv2d(x, weight, bias=None, pad=0):
    """A stride-1 convolution (cross-correlation), zero padding ``pad``."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k = weight.shape[2:]
    windows = sliding_window_view(x, k, axis=(2, 3))  # n, c, h, w, kh, kw
    out = np.einsum("nchwij,ocij->nohw", windows, weight)
    return out if bias is None else out + bias.reshape(1, -1, 1, 1)


def affine(x, scale, shift):
    return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


def random_bn(channels=6, zero_var=False):
    var = RNG.uniform(0.1, 3.0, channels)
    if zero_var:
        var[::2] = 0.0
    return RNG.normal(size=channels), RNG.normal(size=channels), RNG.normal(size=channels), var


@pytest.mark.parametrize("fix_gamma", [False, True])
@pytest.mark.parametrize("zero_var", [False, True])
def test_a_batchnorm_is_the_affine_map_bn_affine_gives(fix_gamma, zero_var):
    gamma, beta, mean, var = random_bn(zero_var=zero_var)
    x = RNG.normal(size=(2, 6, 5, 4))
    s, t = foldmath.bn_affine(gamma, beta, mean, var, 1e-5, fix_gamma=fix_gamma)
    np.testing.assert_allclose(affine(x, s, t), batchnorm(x, gamma, beta, mean, var, 1e-5, fix_gamma), rtol=1e-12, atol=1e-9)
    if fix_gamma:  # the stored gamma plays no part, whatever it holds
        assert np.array_equal(s, foldmath.bn_affine(None, beta, mean, var, 1e-5, fix_gamma=True)[0])


def test_zero_variance_leaves_the_scale_to_eps_alone():
    s, t = foldmath.bn_affine(np.ones(2), np.zeros(2), np.array([1.0, -2.0]), np.zeros(2), 1e-5)
    np.testing.assert_allclose(s, 1 / np.sqrt(1e-5))
    np.testing.assert_allclose(t, -np.array([1.0, -2.0]) / np.sqrt(1e-5))


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 2e-5, 1.001e-5])
def test_batchnorm_for_affine_is_bit_exact_in_float32(eps):
    scale, shift = RNG.normal(size=8), RNG.normal(size=8)
    bn = foldmath.batchnorm_for_affine(scale, shift, eps)
    assert np.float32(bn["running_var"][0]) + np.float32(eps) == np.float32(1.0)
    x = RNG.normal(size=(3, 8, 4, 4)).astype(np.float32)
    c = (1, -1, 1, 1)
    got = (bn["gamma"].reshape(c) * (x - bn["running_mean"].reshape(c))
           / np.sqrt(bn["running_var"].reshape(c) + np.float32(eps)) + bn["beta"].reshape(c))
    want = x * bn["gamma"].reshape(c) + bn["beta"].reshape(c)
    assert got.dtype == np.float32 and np.array_equal(got, want)
    # and back: the BN's affine is the one asked for, to float32 precision
    s, t = foldmath.bn_affine(*(bn[k].astype(np.float64) for k in ("gamma", "beta", "running_mean", "running_var")), eps)
    np.testing.assert_allclose(s, scale, rtol=1e-6)
    np.testing.assert_allclose(t, shift, rtol=1e-6, atol=1e-7)


def test_unit_variance_grows_as_eps_shrinks():
    assert foldmath.unit_variance(1e-3) < foldmath.unit_variance(1e-5) < np.float32(1.0)


@pytest.mark.parametrize("fix_gamma", [True, False])
def test_global_stats_bn_for_affine_computes_the_affine_and_keeps_beta(fix_gamma):
    eps = 1e-5
    scale, shift = RNG.uniform(0.01, 3.0, 6), RNG.normal(size=6)  # positive and <= 1/sqrt(eps): fix_gamma possible
    scale[1] = 0.0 if not fix_gamma else scale[1]  # a dead channel (only without fix_gamma: it needs scale > 0)
    beta, var = RNG.normal(size=6), RNG.uniform(0.1, 2, 6) * np.where(np.arange(6) == 2, -1, 1)
    assert foldmath.can_fix_gamma(scale, eps) is fix_gamma
    gamma, beta_out, mean, var_out = foldmath.global_stats_bn_for_affine(scale, shift, beta, var, eps, fix_gamma)
    x = RNG.normal(size=(2, 6, 3, 3))
    np.testing.assert_allclose(batchnorm(x, gamma, beta_out, mean, var_out, eps, fix_gamma), affine(x, scale, shift),
                               rtol=1e-10, atol=1e-10)
    assert np.all(var_out >= 0)
    live = scale != 0
    assert np.array_equal(beta_out[live], beta[live])
    if not fix_gamma:
        assert np.array_equal(var_out, np.abs(var))


@pytest.mark.parametrize("scale", [np.array([-1.0, 1.0]), np.array([1.0, 1e4])], ids=["negative", "above-1/sqrt(eps)"])
def test_fix_gamma_cannot_express_a_negative_or_too_large_scale(scale):
    assert not foldmath.can_fix_gamma(scale, 1e-5)


@pytest.mark.parametrize("with_bias", [True, False])
def test_fusing_a_bn_into_its_conv_is_the_conv_then_the_bn(with_bias):
    weight, bias = RNG.normal(size=(6, 4, 3, 3)), RNG.normal(size=6) if with_bias else None
    gamma, beta, mean, var = random_bn()
    s, t = foldmath.bn_affine(gamma, beta, mean, var, 1e-5)
    x = RNG.normal(size=(2, 4, 7, 6))
    fused_w, fused_b = foldmath.fuse_conv_bn(weight, bias, s, t)
    np.testing.assert_allclose(conv2d(x, fused_w, fused_b, pad=1),
                               batchnorm(conv2d(x, weight, bias, pad=1), gamma, beta, mean, var, 1e-5), rtol=1e-10, atol=1e-10)
    back_w, back_b = foldmath.unfuse_conv_bn(fused_w, fused_b, s, t)
    np.testing.assert_allclose(back_w, weight, rtol=1e-12)
    np.testing.assert_allclose(back_b, bias if with_bias else np.zeros(6), atol=1e-12)


def test_fused_bias_carries_a_conv_bias_through_the_affine():
    bias, s, t = RNG.normal(size=5), RNG.normal(size=5), RNG.normal(size=5)
    x = RNG.normal(size=(1, 5, 2, 2))
    np.testing.assert_allclose(affine(x + bias.reshape(1, -1, 1, 1), s, t), affine(x, s, np.zeros(5)) + foldmath.fused_bias(bias, s, t).reshape(1, -1, 1, 1))


@pytest.mark.parametrize("perm", PERMS)
def test_target_sources_inverts_the_permutation(perm):
    inv = foldmath.target_sources(perm)
    assert [perm[c] for c in inv] == [0, 1, 2]
    values = RNG.normal(size=3)
    assert np.array_equal(foldmath.to_target_order(values, perm)[list(perm)], values)


def _input_map(source, target):
    perm, a, b = affine_map(PRESETS[source], PRESETS[target])
    return perm, a, b


@pytest.mark.parametrize("source, target", [("imagenet", "rgb255"), ("caffe", "rgb255"), ("imagenet", "bgr255")])
def test_an_input_map_through_a_data_bn_composes(source, target):
    perm, a, b = _input_map(source, target)
    gamma, beta, mean, var = random_bn(3)
    s_d, t_d = foldmath.bn_affine(gamma, beta, mean, var, 2e-5)
    scale, shift = foldmath.through_data_bn(a, b, s_d, t_d)
    x_t = RNG.uniform(0, 255, size=(2, 3, 4, 4))
    np.testing.assert_allclose(affine(x_t[:, list(perm)], scale, shift),
                               batchnorm(apply_map(x_t, perm, a, b), gamma, beta, mean, var, 2e-5), rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("source, target", [("imagenet", "rgb255"), ("caffe", "rgb255"), ("caffe", "tf")])
def test_an_input_affine_in_target_order_before_the_permuted_conv_is_exact_with_padding(source, target):
    perm, a, b = _input_map(source, target)
    weight = RNG.normal(size=(4, 3, 3, 3))
    x_t = RNG.uniform(0, 255, size=(2, 3, 6, 5))
    want = conv2d(apply_map(x_t, perm, a, b), weight, pad=1)
    got = conv2d(affine(x_t, foldmath.to_target_order(a, perm), foldmath.to_target_order(b, perm)),
                 foldmath.permute_conv_input(weight, perm), pad=1)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-9)
    assert np.array_equal(foldmath.unpermute_conv_input(foldmath.permute_conv_input(weight, perm), perm), weight)


@pytest.mark.parametrize("source, target", [("imagenet", "rgb255"), ("caffe", "rgb255"), ("rgb01", "bgr255")])
@pytest.mark.parametrize("with_bias", [True, False])
def test_folding_the_input_into_the_conv_is_exact_away_from_the_padding_and_undoes(source, target, with_bias):
    perm, a, b = _input_map(source, target)
    weight, bias = RNG.normal(size=(4, 3, 3, 3)), RNG.normal(size=4) if with_bias else None
    x_t = RNG.uniform(0, 255, size=(2, 3, 7, 6))
    folded_w, folded_b = foldmath.fold_input_into_conv(weight, bias, a, b, perm)
    np.testing.assert_allclose(conv2d(x_t, folded_w, folded_b), conv2d(apply_map(x_t, perm, a, b), weight, bias),
                               rtol=1e-10, atol=1e-8)
    padded_err = np.abs(conv2d(x_t, folded_w, folded_b, pad=1) - conv2d(apply_map(x_t, perm, a, b), weight, bias, pad=1))
    assert (padded_err[:, :, 1:-1, 1:-1].max() < 1e-8) and (padded_err.max() > 1e-3) == bool(np.any(b != 0))
    back_w, back_b = foldmath.unfold_input_from_conv(folded_w, folded_b, a, b, perm)
    np.testing.assert_allclose(back_w, weight, rtol=1e-12)
    np.testing.assert_allclose(back_b, bias if with_bias else np.zeros(4), atol=1e-9)
