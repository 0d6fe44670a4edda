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


# Elements moved per step: the scratch arrays stay in cache and are reused, so nudging the 60M numbers of a
# ResNet-152 makes no fresh array per operation (under a low mmap threshold each one was faulted in anew).
CHUNK = 1 << 16


class _Scratch:
    """Reusable work arrays for :func:`_step_into` and :func:`_move`, at most ``CHUNK`` elements each."""

    def __init__(self, size: int):
        size = max(1, min(size, CHUNK))
        self.magnitude = np.empty(size, np.float32)
        self.up = np.empty(size, np.float32)
        self.step = np.empty(size, np.float64)
        self.sign = np.empty(size, np.float64)


def _step_into(values: np.ndarray, scratch: _Scratch) -> np.ndarray:
    """One float32 ulp at ``|values|`` (at most ``CHUNK`` float64 numbers), in ``scratch.step``; returns that view.

    ``np.spacing`` on float32, computed from the bit pattern instead (the next float32 up is the
    pattern plus one) and subtracted in float64, where it is exact and no flush-to-zero mode can
    touch a subnormal: the same bits as ``np.spacing(np.float32(abs(v)))``."""
    k = values.size
    magnitude, up, step = scratch.magnitude[:k], scratch.up[:k], scratch.step[:k]
    np.abs(values, out=step)
    np.copyto(magnitude, step, casting="same_kind")  # rounded to float32 as astype rounds
    np.add(magnitude.view(np.int32), 1, out=up.view(np.int32))
    np.copyto(step, up)
    step -= magnitude
    return step


def ulp(values: np.ndarray) -> np.ndarray:
    """The spacing of float32 numbers at ``|values|`` (the next float32 up, minus the value), as float64."""
    values = np.asarray(values, dtype=np.float64)
    flat = values.reshape(-1)
    out = np.empty(flat.size, np.float64)
    scratch = _Scratch(flat.size)
    for start in range(0, flat.size, CHUNK):
        out[start:start + CHUNK] = _step_into(flat[start:start + CHUNK], scratch)
    return out.reshape(values.shape)


def _move(flat: np.ndarray, rng: np.random.RandomState, scratch: _Scratch) -> None:
    """Move every number of ``flat`` (1-D, float64, writable) by one float32 ulp, up or down at random, in place.

    One 32-bit draw per element decides its direction, chunk after chunk: the stream a single
    ``rng.randint(0, 2, size)`` over the whole array draws, so a seed gives the same directions."""
    for start in range(0, flat.size, CHUNK):
        chunk = flat[start:start + CHUNK]
        step = _step_into(chunk, scratch)
        sign = scratch.sign[:chunk.size]
        np.multiply(rng.randint(0, 2, size=chunk.size, dtype=np.int32), 2.0, out=sign)
        sign -= 1.0  # -1 or +1 (a masked negation was 4 ns a number, 20x this)
        step *= sign
        chunk += step


def nudge(values: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """``values`` (float64) moved by one float32 ulp each, up or down at random (a new array)."""
    moved = np.array(values, dtype=np.float64, order="C")  # C order: reshape(-1) is a view, and draws go in C order
    _move(moved.reshape(-1), rng, _Scratch(moved.size))
    return moved


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
    rng = np.random.RandomState(seed)
    scratch = _Scratch(CHUNK)
    for name, param in sorted(twin._collect_params_with_prefix().items()):
        if name in written:
            values = param.data().asnumpy().astype(np.float64, copy=False)  # our own copy: moved in place
            _move(values.reshape(-1), rng, scratch)
            param.set_data(values)  # copied once into the twin's own array (float64: never in a oneDNN layout)
    return twin


def restore_twin(twin, adapted_net, written: set[str]):
    """Undo :func:`nudge_in_place`: the ``written`` parameters cast again from ``adapted_net``'s float32 ones.

    Exact: a float64 twin holds its float32 numbers cast, and casting them again gives the same bits."""
    params = adapted_net._collect_params_with_prefix()
    for name, param in twin._collect_params_with_prefix().items():
        if name in written:
            param.set_data(params[name].data().astype("float64"))
    return twin
