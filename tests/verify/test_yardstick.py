"""The yardstick's step is one float32 ulp per number, in the directions the seed has always drawn.

``ulp`` and ``nudge`` work chunk by chunk in reused scratch arrays (issue 22: nudging a ResNet-152
twice per check was a third of a zoo-matrix case). They must give what the plain formulas give,
bit for bit: ``np.spacing`` of the float32 magnitude, and one ``randint(0, 2)`` over the whole
array for the directions, so a verdict does not change with the speed-up.
"""

import numpy as np

from bbadapt.verify.yardstick import CHUNK, SEED, nudge, ulp


def spacing(values: np.ndarray) -> np.ndarray:
    """The definition: numpy's own float32 spacing at |values|, as float64."""
    return np.spacing(np.abs(np.asarray(values, np.float64)).astype(np.float32)).astype(np.float64)


def moved(values: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """The definition: each number up or down by its ulp, one draw over the whole array."""
    signs = rng.randint(0, 2, size=values.shape).astype(np.float64) * 2.0 - 1.0
    return values + signs * spacing(values)


def awkward(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Float32 numbers of a conv weight's scale, with zeros, subnormals, the largest float32, negatives and
    float64 numbers that float32 cannot hold (the torch twin passes those through ``nudge`` too)."""
    rng = np.random.RandomState(seed)
    values = (rng.standard_normal(shape) * 0.05).astype(np.float32).astype(np.float64)
    flat = values.reshape(-1)
    if flat.size < 300:
        return values
    flat[:50] = 0.0
    flat[50:100] = np.float32(1e-40)
    flat[100:105] = np.finfo(np.float32).max
    flat[105:200] *= -1
    flat[200:300] = rng.standard_normal(100)
    return values


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.int64), b.view(np.int64))


def test_a_step_is_numpys_float32_spacing_bit_for_bit_across_chunks_and_special_values():
    for values in (awkward((3 * CHUNK + 17,)), awkward((64, 3, 7, 7)), awkward((1,)), np.zeros((0, 4))):
        assert same_bits(ulp(values), spacing(values))
    assert ulp(np.array([0.0]))[0] == np.float64(np.finfo(np.float32).smallest_subnormal)


def test_a_nudge_moves_each_number_by_its_ulp_in_the_directions_one_draw_over_the_whole_array_gives():
    channels_last = awkward((64, 3, 7, 7), 4).transpose(0, 2, 3, 1).copy().transpose(0, 3, 1, 2)  # torch's strides
    arrays = [awkward((2 * CHUNK + 5,), 1), awkward((512, 256, 3, 3), 2), awkward((7,), 3), channels_last,
              np.asfortranarray(awkward((300, 401), 5))]
    ours, definition = np.random.RandomState(SEED), np.random.RandomState(SEED)
    for values in arrays:  # one generator across arrays, as the check walks a net's parameters
        before = values.copy()
        got = nudge(values, ours)
        assert same_bits(got, moved(values, definition))
        assert same_bits(values, before)  # the input is left alone
        assert np.array_equal(np.abs(got - values), spacing(values))
    # both generators are at the same place afterwards: nothing drew more or fewer numbers
    assert ours.randint(0, 2**31) == definition.randint(0, 2**31)
