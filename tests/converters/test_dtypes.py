"""Every weight dtype, in every reader: float16/bfloat16/float64 become float32 with one note; integers are refused.

Each file is written by the library that writes that format for real (``mx.nd.save``, ``torch.save``,
``safetensors``, h5py as Keras lays files out, a Python 2 style pickle as Detectron's), holding the
same weights as a float32 file of the same network, stored in another dtype. The converted network
must hold those weights as float32 (exactly for float16/bfloat16, within float32 rounding for
float64), and the reader's provenance carries the one note the report shows.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from bbadapt.core.weights import structural_params
from bbadapt.platform.errors import WeightsError
from converters import readers
from converters.readers.base import BFLOAT16, float32_tensors

DATA = Path(__file__).resolve().parents[2] / "bbadapt" / "data"
CIFAR_PARAMS = DATA / "cifar_resnet20_v1-0000.params"
CIFAR_GRAPH = DATA / "cifar_resnet20_v1-symbol.json"
# how far a stored value may be from the float32 one, relative to the tensor's largest value
PRECISION = {"float16": 1e-3, "bfloat16": 1e-2, "float64": 1e-7}


def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounded to nearest even (what torch and MXNet do)."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def off_float32(x: np.ndarray) -> np.ndarray:
    """float64 values that are not float32 values (so the conversion must round them)."""
    return x.astype(np.float64) * (1 + 2.0**-40)


def assert_holds(net, reference, dtype: str) -> None:
    """``net`` holds float32 weights equal to ``reference``'s up to the stored dtype's precision, and not all equal
    when that dtype cannot hold them (the file really was read in that dtype)."""
    ours, theirs = structural_params(net), structural_params(reference)
    assert set(ours) == set(theirs)
    differs = False
    for key, param in ours.items():
        got, want = param.data().asnumpy(), theirs[key].data().asnumpy()
        assert got.dtype == np.float32
        scale = max(float(np.abs(want).max()), 1e-30)
        assert float(np.abs(got.astype(np.float64) - want).max()) <= PRECISION[dtype] * scale, key
        differs |= not np.array_equal(got, want)
    assert differs or dtype == "float64"


def assert_note(converted, dtype: str, exact: bool) -> None:
    note = converted.provenance["dtype_note"]
    assert f"stored as {dtype}" in note and "float32" in note
    assert ("exactly" in note) == exact and (("largest relative rounding" in note) == (not exact))


# ------------------------------------------------------------------ MXNet NDArray files (mx.nd.save)


def mx_cast(value, dtype: str):
    import mxnet as mx

    if dtype == "bfloat16":
        return mx.nd.amp_cast(value, dtype=BFLOAT16)  # MXNet's own bfloat16 (it spells it this structured dtype)
    if dtype == "float64":
        return mx.nd.array(off_float32(value.asnumpy()), dtype="float64")
    return value.astype(dtype)


def cifar_files(tmp_path: Path, dtype: str, pair: bool) -> Path:
    import mxnet as mx

    arrays = {k: mx_cast(v, dtype) for k, v in mx.nd.load(str(CIFAR_PARAMS)).items()}
    mx.nd.save(str(tmp_path / CIFAR_PARAMS.name), arrays)
    if pair:
        shutil.copy(CIFAR_GRAPH, tmp_path / CIFAR_GRAPH.name)
        return tmp_path / CIFAR_GRAPH.name
    return tmp_path / CIFAR_PARAMS.name


@pytest.fixture(scope="module")
def cifar_reference():
    return readers.read(CIFAR_PARAMS, arch="cifar_resnet20_v1").net


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
@pytest.mark.parametrize("pair", [False, True], ids=["gluon-params", "gluon-export"])
def test_ndarray_files_in_any_float_dtype_convert_with_one_note(tmp_path, cifar_reference, dtype, pair):
    converted = readers.read(cifar_files(tmp_path, dtype, pair), arch="cifar_resnet20_v1")
    assert_holds(converted.net, cifar_reference, dtype)
    assert_note(converted, dtype, exact=dtype != "float64")


@pytest.mark.parametrize("dtype", ["int32", "bool", "uint8"])
def test_integer_and_boolean_ndarray_files_are_one_line_naming_tensor_and_dtype(tmp_path, dtype):
    with pytest.raises(WeightsError) as err:
        readers.read(cifar_files(tmp_path, dtype, pair=True))
    message = str(err.value)
    assert "\n" not in message and re.search(rf"tensor features\.\S+ is {dtype} \(and 106 more", message)


def test_the_symbolic_zoo_reader_converts_float16(tmp_path):
    import mxnet as mx

    from tests.converters.test_mxnet_symbol import write_checkpoint

    json_path, params_path = write_checkpoint(tmp_path / "f32", "resnet-18")
    reference = readers.read(json_path).net
    half = tmp_path / "f16"
    half.mkdir()
    shutil.copy(json_path, half / json_path.name)
    mx.nd.save(str(half / params_path.name), {k: v.astype("float16") for k, v in mx.nd.load(str(params_path)).items()})
    converted = readers.read(half / json_path.name)
    assert_holds(converted.net, reference, "float16")
    assert_note(converted, "float16", exact=True)
    mx.nd.save(str(half / params_path.name), {k: v.astype("int32") for k, v in mx.nd.load(str(params_path)).items()})
    with pytest.raises(WeightsError, match=r"tensor arg:\S+ is int32"):
        readers.read(half / json_path.name)


# ------------------------------------------------------------------ torch and safetensors


@pytest.fixture(scope="module")
def r18():
    from tests.conftest import calibrated

    return calibrated("resnet18_v1b")


def torch_state(net, dtype: str) -> dict:
    import torch

    from tests.converters.test_torchvision import torchvision_state

    state = {}
    for key, value in torchvision_state(net).items():
        if value.dtype != np.float32:
            state[key] = torch.from_numpy(value)  # num_batches_tracked stays int64, as torch saves it
        elif dtype == "float64":
            state[key] = torch.from_numpy(off_float32(value))
        else:
            state[key] = torch.from_numpy(value).to(getattr(torch, dtype))
    return state


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
@pytest.mark.parametrize("container", ["pth", "safetensors"])
def test_torch_and_safetensors_files_in_any_float_dtype_convert_with_one_note(tmp_path, r18, dtype, container):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / f"r18.{container}"
    state = torch_state(r18, dtype)
    torch.save(state, str(path)) if container == "pth" else save_file(state, str(path))
    converted = readers.read(path)
    assert_holds(converted.net, r18, dtype)
    assert_note(converted, dtype, exact=dtype != "float64")
    state["layer3.1.conv2.weight"] = state["layer3.1.conv2.weight"].to(torch.int32)
    torch.save(state, str(path)) if container == "pth" else save_file(state, str(path))
    with pytest.raises(WeightsError, match="tensor layer3.1.conv2.weight is int32;"):
        readers.read(path)


# ------------------------------------------------------------------ Keras HDF5


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_keras_files_in_any_float_dtype_convert_with_one_note(tmp_path, dtype):
    import h5py

    from tests import keras_reference as kr

    specs = kr.layer_specs(2, kr.BLOCKS[50], 10)
    weights = kr.random_weights(specs, seed=0)
    reference_path = tmp_path / "f32.h5"
    kr.write_keras3(reference_path, specs, weights)
    reference = readers.read(reference_path).net
    path = tmp_path / f"{dtype}.weights.h5"
    if dtype == "bfloat16":  # Keras 3 stores a bfloat16 variable's bits, marked with a dtype attribute
        kr.write_keras3(path, specs, {k: [to_bfloat16_bits(t) for t in v] for k, v in weights.items()})
        with h5py.File(path, "a") as f:
            f.visititems(lambda _name, obj: obj.attrs.__setitem__("dtype", "bfloat16")
                         if isinstance(obj, h5py.Dataset) else None)
    else:
        cast = off_float32 if dtype == "float64" else (lambda t: t.astype(dtype))
        kr.write_keras3(path, specs, {k: [cast(t) for t in v] for k, v in weights.items()})
    converted = readers.read(path)
    assert_holds(converted.net, reference, dtype)
    assert_note(converted, dtype, exact=dtype != "float64")


def test_keras_integer_tensors_are_refused_naming_the_layer(tmp_path):
    from tests import keras_reference as kr

    specs = kr.layer_specs(2, kr.BLOCKS[50], 10)
    weights = {s.name: [np.zeros((1,) * len(shape), np.float32) for shape in s.shapes] for s in specs}
    weights["conv1_conv"] = [np.zeros((7, 7, 3, 64), np.int32), weights["conv1_conv"][1]]
    path = tmp_path / "int.weights.h5"
    kr.write_keras3(path, specs, weights)
    with pytest.raises(WeightsError, match=r"tensor \S+ is int32;"):
        readers.read(path)


# ------------------------------------------------------------------ Detectron pickles


@pytest.fixture(scope="module")
def r18_blobs(tmp_path_factory):
    """Detectron blobs of a calibrated ResNet-18, and the network a float32 pickle of them converts to."""
    from tests import py2pickle
    from tests.conftest import calibrated
    from tests.converters.test_detectron import blobs_from_gluon

    blobs = blobs_from_gluon(calibrated("resnet18_v1"), 18)
    path = tmp_path_factory.mktemp("detectron") / "R-18.pkl"
    path.write_bytes(py2pickle.dumps({"blobs": blobs}))
    return blobs, readers.read(path).net


@pytest.mark.parametrize("dtype", ["float16", "float64"])  # numpy pickles have no bfloat16
def test_detectron_pickles_in_float16_and_float64_convert_with_one_note(tmp_path, r18_blobs, dtype):
    from tests import py2pickle

    blobs, reference = dict(r18_blobs[0]), r18_blobs[1]
    cast = off_float32 if dtype == "float64" else (lambda t: t.astype(dtype))
    path = tmp_path / f"R-18-{dtype}.pkl"
    path.write_bytes(py2pickle.dumps({"blobs": {k: cast(v) for k, v in blobs.items()}}))
    converted = readers.read(path)
    assert_holds(converted.net, reference, dtype)
    assert_note(converted, dtype, exact=dtype != "float64")
    blobs["res2_0_branch2a_w"] = blobs["res2_0_branch2a_w"].astype(np.int64)
    path.write_bytes(py2pickle.dumps({"blobs": blobs}))
    with pytest.raises(WeightsError, match="tensor res2_0_branch2a_w is int64;"):
        readers.read(path)


# ------------------------------------------------------------------ the one function behind every reader


def test_the_note_gives_the_largest_relative_rounding_of_float64_and_names_its_tensor():
    exact = np.array([1.0, 0.5], np.float64)
    rounded = np.array([1.0 + 2.0**-30, 3.0], np.float64)  # 2**-30 is below float32's resolution at 1
    tensors = float32_tensors({"a": exact, "b": rounded, "c": np.ones(2, np.float32)}, "w.params")
    assert tensors.arrays["b"].dtype == np.float32 and tensors.arrays["b"][0] == np.float32(1.0)
    assert "float64 (2 tensors)" in tensors.note and "rounding 9.3e-10 (in b)" in tensors.note


def test_float64_beyond_float32_range_and_nan_are_refused_without_a_numpy_warning(recwarn):
    for value in (1e300, np.nan, -np.inf):
        with pytest.raises(WeightsError, match="NaN/Inf"):
            float32_tensors({"w": np.array([1.0, value])}, "w.params")
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_float32_weights_get_no_note():
    assert float32_tensors({"w": np.ones(3, np.float32)}, "w.params").note is None



def test_inspect_names_bfloat16_and_judges_its_values_but_flags_integer_files(tmp_path):
    from converters.readers.inspection import inspect_file

    (tmp_path / "bf16").mkdir()
    bf16 = inspect_file(cifar_files(tmp_path / "bf16", "bfloat16", pair=False))
    assert bf16["tensors"]["dtypes"] == {"bfloat16": 107} and bf16["status"] == "ok", bf16.get("problems")
    assert bf16["batchnorm"]["count"] == 21 and not bf16["batchnorm"]["negative_var"]
    (tmp_path / "int").mkdir()
    integer = inspect_file(cifar_files(tmp_path / "int", "int32", pair=False))
    assert any("int32 tensors: weights must be floating point" in p for p in integer["problems"])
