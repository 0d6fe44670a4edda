"""Input specs and the one affine map between them."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bbadapt.core.spec import PRESETS, InputSpec, affine_map, apply_map, parse_spec
from bbadapt.platform.errors import SpecError


def raw_images(seed=0, n=2):
    return np.random.RandomState(seed).uniform(0, 255, (n, 3, 5, 7))


positive = st.floats(0.01, 300, allow_nan=False)
specs = st.builds(
    InputSpec,
    order=st.sampled_from(["rgb", "bgr"]),
    scale=st.floats(1e-3, 10),
    mean=st.tuples(*[st.floats(-200, 200)] * 3),
    std=st.tuples(*[positive] * 3),
)


@settings(max_examples=200, deadline=None)
@given(source=specs, target=specs)
def test_the_map_turns_target_input_into_source_input(source, target):
    raw = raw_images()
    perm, a, b = affine_map(source, target)
    got = apply_map(target.normalize(raw, "float64"), perm, a, b)
    want = source.normalize(raw, "float64")
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())


@settings(max_examples=100, deadline=None)
@given(s=specs, t=specs, u=specs)
def test_maps_compose(s, t, u):
    raw = raw_images(1)
    x_u = u.normalize(raw, "float64")
    via_t = apply_map(apply_map(x_u, *affine_map(t, u)), *affine_map(s, t))
    direct = apply_map(x_u, *affine_map(s, u))
    np.testing.assert_allclose(via_t, direct, rtol=1e-8, atol=1e-8 * np.abs(direct).max())


@given(s=specs)
def test_a_spec_maps_to_itself_by_the_identity(s):
    perm, a, b = affine_map(s, s)
    assert perm == (0, 1, 2)
    np.testing.assert_allclose(a, 1, rtol=1e-12)
    np.testing.assert_allclose(b, 0, atol=1e-9)


def test_presets_match_the_conventions_of_their_zoos():
    raw = np.full((1, 3, 1, 1), 255.0)
    raw[0, 0] = 0  # red 0, green and blue 255
    assert PRESETS["rgb01"].normalize(raw)[0, :, 0, 0].tolist() == [0, 1, 1]
    assert PRESETS["bgr255"].normalize(raw)[0, :, 0, 0].tolist() == [255, 255, 0]
    np.testing.assert_allclose(PRESETS["tf"].normalize(raw)[0, :, 0, 0], [-1, 1, 1])
    np.testing.assert_allclose(PRESETS["imagenet"].normalize(raw)[0, :, 0, 0],
                               [-0.485 / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225], rtol=1e-6)
    np.testing.assert_allclose(PRESETS["caffe"].normalize(raw)[0, :, 0, 0], [255 - 103.939, 255 - 116.779, -123.68], rtol=1e-6)
    assert PRESETS["cifar"].std == (0.2023, 0.1994, 0.2010)


def test_caffe_to_rgb255_swaps_channels_and_shifts():
    perm, a, b = affine_map("caffe", "rgb255")
    assert perm == (2, 1, 0)
    np.testing.assert_allclose(a, 1)
    np.testing.assert_allclose(b, [-103.939, -116.779, -123.68])


def test_custom_specs_parse_and_print_back():
    spec = parse_spec("order=bgr,scale=1,mean=103.9/116.8/123.7,std=1/1/1")
    assert (spec.order, spec.scale, spec.mean, spec.std) == ("bgr", 1.0, (103.9, 116.8, 123.7), (1.0, 1.0, 1.0))
    assert parse_spec(spec.to_string()) == spec
    assert parse_spec("scale=1/255").same_function(PRESETS["rgb01"])
    assert parse_spec("mean=5").mean == (5.0, 5.0, 5.0)
    assert InputSpec.from_dict(PRESETS["caffe"].to_dict()) == PRESETS["caffe"]


@pytest.mark.parametrize("text, fragment", [
    ("imagenett", "unknown input spec"),
    ("order=xyz", "unknown channel order"),
    ("std=0/1/1", "std must be positive"),
    ("std=-1/1/1", "std must be positive"),
    ("mean=1/2", "3 values"),
    ("std=1/2/3/4", "3 values"),
    ("scale=0", "scale must be positive"),
    ("scale=abc", "numbers"),
    ("mean=1/2/3,mean=1/2/3", "twice"),
    ("colour=red", "bad spec field"),
    ("mean=nan/1/1", "finite"),
])
def test_invalid_specs_are_rejected_with_one_line(text, fragment):
    with pytest.raises(SpecError) as err:
        parse_spec(text)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)
