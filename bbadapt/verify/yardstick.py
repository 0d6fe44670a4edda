"""The one-ulp yardstick: what rounding every number the adaptation wrote can do to the adapted net.

An exact adaptation computes the original's function with other float32 numbers: folded
weights (``W * s``), fused biases (``beta - mean * s``), a rewritten data BatchNorm, a
FrozenAffine's scale and shift. Each was computed in float64 and rounded once to float32, so
each is off its exact value by at most half an ulp; every other parameter is a bit-identical
copy of the original's. Run in float64 (the *float64 twin*), the adapted net therefore
differs from the original's float64 run only by the effect of those roundings, while a
defect (a wrong eps, a swapped channel, a scale applied twice, a moved weight) differs by
its own, larger amount.

The yardstick measures what rounding of that size can do to *this* network: the float64 twin
again, with every number the adaptation wrote (each parameter that is not bit-identical to
the original's parameter of the same name) moved by one float32 ulp in seeded random
directions (two; the larger effect counts: ``bbadapt.verify.equivalence.YARDSTICK_DRAWS``).
Each rounding is matched by a perturbation of at least twice its size in the same place (per
element for a weight, per channel for a per-channel constant), so an exact adaptation stays
below the yardstick (measured 0.1-0.65x of it, by RMS), while a defect of a few ulps' worth
in a whole tensor stands above it. Copied numbers are not moved: their rounding cannot have happened,
and moving them would let a net with large stored statistics (means 300x their spread) hide a
defect behind the ulps of numbers nobody rounded.

Everything here runs in float64, where the kernels' own rounding (1e-16) is nine orders of
magnitude below the yardstick: the verdict built on it does not depend on which CPU kernels
(oneDNN's SSE4.1, AVX2, AVX-512 or AMX paths) computed the float32 runs.
"""

from __future__ import annotations

import numpy as np

SEED = 20261206  # fixed directions: the verdict is reproducible


def ulp(values: np.ndarray) -> np.ndarray:
    """The spacing of float32 numbers at ``values`` (0 where a value is 0), as float64."""
    return np.spacing(np.abs(np.asarray(values, dtype=np.float64)).astype(np.float32)).astype(np.float64)


def nudge(values: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """``values`` (float64) moved by one float32 ulp each, up or down at random."""
    values = np.asarray(values, dtype=np.float64)
    signs = rng.randint(0, 2, size=values.shape).astype(np.float64) * 2.0 - 1.0
    return values + signs * ulp(values)


def written_by_adaptation(adapted_net, original) -> set[str]:
    """Structural names of the adapted net's parameters that are not bit-identical copies of the original's."""
    originals = original._collect_params_with_prefix()
    written = set()
    for name, param in adapted_net._collect_params_with_prefix().items():
        same = originals.get(name)
        if same is None or same.shape != param.shape or not np.array_equal(
                same.data().asnumpy(), param.data().asnumpy().astype(same.dtype)):
            written.add(name)
    return written


def nudged_twin(adapted_net, original, seed: int = SEED):
    """The float64 twin of ``adapted_net`` with every number the adaptation wrote moved by one float32 ulp."""
    from bbadapt.core.rewrite import clone

    twin = clone(adapted_net, trainable=False, dtype="float64")
    return nudge_in_place(twin, written_by_adaptation(adapted_net, original), seed)


def nudge_in_place(twin, written: set[str], seed: int = SEED):
    """``twin`` (a float64 twin) with its ``written`` parameters moved by one float32 ulp, in place; returns it.

    The same numbers as :func:`nudged_twin` for the same seed: the parameters are visited in the
    same (sorted) order, so the random directions fall on the same elements."""
    import mxnet as mx

    rng = np.random.RandomState(seed)
    for name, param in sorted(twin._collect_params_with_prefix().items()):
        if name in written:
            param.set_data(mx.nd.array(nudge(param.data().asnumpy(), rng), dtype="float64"))
    return twin


def restore_twin(twin, adapted_net, written: set[str]):
    """Undo :func:`nudge_in_place`: the ``written`` parameters cast again from ``adapted_net``'s float32 ones.

    Exact: a float64 twin holds its float32 numbers cast, and casting them again gives the same bits."""
    params = adapted_net._collect_params_with_prefix()
    for name, param in twin._collect_params_with_prefix().items():
        if name in written:
            param.set_data(params[name].data().astype("float64"))
    return twin
