"""Gluon export() pairs are identified from their graph alone; bare .params need the model named.

Real files: the official pretrained gluoncv CIFAR ResNet-20 exports (packaged, see
bbadapt/data/NOTICE) and files written by real ``HybridBlock.export()`` /
``save_parameters()`` of zoo models here. MXNet's own loader (``SymbolBlock.imports``)
is the reference for what an export pair computes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

import bbadapt
from bbadapt.core import zoo
from bbadapt.core.weights import structural_params
from bbadapt.platform.errors import ModelError, WeightsError
from bbadapt.verify import images
from converters import readers
from converters.readers import gluon_params, ndarray_file
from tests.conftest import SMALL_SIZES, calibrated

ACCURACY = {"cifar_resnet20_v1": 0.98, "cifar_resnet20_v2": 0.94}  # the provenance README of the data (bbadapt/data/NOTICE): 98 and 94 of the 100 tiles


def mxnet_imports(json_path: Path, params_path: Path, x: np.ndarray) -> np.ndarray:
    """What MXNet itself computes with an export pair."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = mx.gluon.SymbolBlock.imports(str(json_path), ["data"], str(params_path))
    return net(mx.nd.array(x)).asnumpy()


def max_rel(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def export(name: str, directory: Path) -> Path:
    """A real export() of a zoo model with calibrated random weights; returns the json path."""
    net = calibrated(name)
    twin = zoo.build(name)
    for key, param in structural_params(twin).items():
        param.set_data(structural_params(net)[key].data())
    twin.hybridize()
    twin(mx.nd.zeros((1, 3, 32, 32)))
    twin.export(str(directory / name))
    return directory / f"{name}-symbol.json"


@pytest.mark.parametrize("name", sorted(ACCURACY))
def test_the_real_cifar_exports_are_identified_from_the_graph_and_keep_their_accuracy(name):
    json_path = images.data_dir() / f"{name}-symbol.json"
    converted = readers.read(json_path)
    assert converted.arch == {"zoo": name} and converted.provenance["format"] == "gluon-export"
    assert converted.provenance["candidates"] == [name] and converted.source_spec == "cifar"
    tiles, labels = images.cifar_tiles()
    x = bbadapt.parse_spec("cifar").normalize(tiles)
    ours = converted.net(mx.nd.array(x)).asnumpy()
    reference = mxnet_imports(json_path, json_path.with_name(f"{name}-0000.params"), x)
    error = max_rel(ours, reference)
    print(f"{name}: max rel error vs SymbolBlock.imports {error:.2e}")
    assert error < 1e-5
    assert np.mean(ours.argmax(1) == labels) == ACCURACY[name]
    adapted = bbadapt.adapt(converted.net, converted.source_spec, "rgb255", bn="fused")
    report = bbadapt.check(converted.net, "cifar", adapted, options=bbadapt.CheckOptions(cifar=True, labelled=(tiles, labels)))
    assert report["passed"], report["reasons"]
    assert report["classification"]["labelled"]["accuracy_adapted"] == ACCURACY[name]


def test_a_fix_gamma_spelling_difference_is_accepted_only_where_gamma_is_one(tmp_path):
    """The gluoncv v2 export says fix_gamma=False on its data BN (today's gluoncv: True); gamma there is 1."""
    notes = readers.read(images.data_dir() / "cifar_resnet20_v2-symbol.json").provenance["fix_gamma_notes"]
    assert notes == ["features.0.gamma: graph fix_gamma=False, zoo model fix_gamma=True; same function (gamma is 1)"]
    for suffix in ("-symbol.json", "-0000.params"):
        shutil.copy(images.data_dir() / f"cifar_resnet20_v2{suffix}", tmp_path / f"cifar_resnet20_v2{suffix}")
    params = tmp_path / "cifar_resnet20_v2-0000.params"
    arrays = mx.nd.load(str(params))
    arrays["arg:cifarresnetv20_batchnorm0_gamma"] *= 1.5
    mx.nd.save(str(params), arrays)
    with pytest.raises(WeightsError, match="disagree on fix_gamma.*features.0.gamma"):
        readers.read(params)


@pytest.mark.parametrize("name", ["resnet18_v1", "resnet18_v2", "resnet18_v1b"])
def test_real_exports_of_zoo_models_convert_exactly(name, tmp_path):
    json_path = export(name, tmp_path)
    converted = readers.read(json_path)
    assert converted.arch == {"zoo": name}
    raw, _ = images.photos((64, 64), limit=2)
    x = bbadapt.parse_spec(converted.source_spec).normalize(raw)
    reference = mxnet_imports(json_path, tmp_path / f"{name}-0000.params", x)
    assert max_rel(converted.net(mx.nd.array(x)).asnumpy(), reference) < 1e-5
    adapted = bbadapt.adapt(converted.net, converted.source_spec, "rgb255", bn="fused")
    report = bbadapt.check(converted.net, converted.source_spec, adapted, options=bbadapt.CheckOptions(sizes=SMALL_SIZES[:1], n_photos=1))
    assert report["passed"], report["reasons"]


def test_relatives_with_identical_parameters_are_told_apart_by_their_graph(tmp_path):
    """resnet50_v1c and _v1d have the same parameter names and shapes; v1d's shortcut average-pools."""
    for name in ("resnet50_v1c", "resnet50_v1d"):
        net = zoo.build(name)
        net.hybridize()
        net(mx.nd.zeros((1, 3, 32, 32)))
        net.export(str(tmp_path / name))
        graph = ndarray_file.symbol_json(tmp_path / f"{name}-symbol.json")
        assert gluon_params.candidates(graph) == [name]
    shapes = [{k.split("_", 1)[1]: v.shape for k, v in ndarray_file.load(tmp_path / f"{n}-0000.params").items()}
              for n in ("resnet50_v1c", "resnet50_v1d")]
    assert shapes[0] == shapes[1]  # nothing but the graph tells them apart


def test_a_named_model_is_confirmed_against_the_graph_without_building_the_zoo():
    """Naming the model (the CLI's MODEL argument) checks that one model; the zoo is built only to refuse."""
    gluon_params._zoo_names.cache_clear()
    json_path = images.data_dir() / "cifar_resnet20_v1-symbol.json"
    converted = readers.read(json_path, arch="cifar_resnet20_v1")
    assert converted.arch == {"zoo": "cifar_resnet20_v1"} and converted.provenance["candidates"] == ["cifar_resnet20_v1"]
    assert gluon_params._zoo_names.cache_info().currsize == 0
    with pytest.raises(ModelError, match="--arch cifar_resnet20_v2 contradicts .* matches cifar_resnet20_v1"):
        readers.read(json_path, arch="cifar_resnet20_v2")
    assert gluon_params._zoo_names.cache_info().currsize == 1


def test_ambiguity_is_an_error_listing_the_candidates_and_arch_picks():
    with pytest.raises(ModelError, match="fits several zoo models \\(resnet50_v1c, resnet50_v1d\\); pick one with --arch"):
        gluon_params._choose(["resnet50_v1c", "resnet50_v1d"], None, "x-symbol.json")
    assert gluon_params._choose(["resnet50_v1c", "resnet50_v1d"], "resnet50_v1d", "x") == "resnet50_v1d"


def test_an_arch_that_contradicts_the_graph_is_refused():
    with pytest.raises(ModelError, match="--arch cifar_resnet20_v2 contradicts .* matches cifar_resnet20_v1"):
        readers.read(images.data_dir() / "cifar_resnet20_v1-symbol.json", arch="cifar_resnet20_v2")
    with pytest.raises(ModelError, match="unknown model 'cifar_resnet21_v1'"):
        readers.read(images.data_dir() / "cifar_resnet20_v1-symbol.json", arch="cifar_resnet21_v1")


# --- bare .params ---------------------------------------------------------------------------

def test_a_bare_save_parameters_file_needs_the_model_named(tmp_path):
    net = calibrated("resnet18_v1")
    path = tmp_path / "weights.params"
    net.save_parameters(str(path))
    assert readers.detect(path).name == "gluon-params"
    with pytest.raises(ModelError, match="bare .params file, which does not say its architecture"):
        readers.read(path)
    converted = readers.read(path, arch="resnet18_v1")
    assert converted.provenance["naming"] == "structural" and converted.arch == {"zoo": "resnet18_v1"}
    x = mx.nd.array(np.random.RandomState(0).normal(size=(1, 3, 48, 48)))
    assert np.array_equal(converted.net(x).asnumpy(), net(x).asnumpy())


def test_export_params_without_their_graph_are_bare_and_the_error_suggests_the_model(tmp_path):
    path = tmp_path / "cifar_resnet20_v1-0000.params"
    shutil.copy(images.data_dir() / path.name, path)
    assert readers.detect(path).name == "gluon-params"
    with pytest.raises(ModelError, match="by its parameter names it could be cifar_resnet20_v1$"):
        readers.read(path)
    assert readers.read(path, arch="cifar_resnet20_v1").provenance["naming"] == "export"
    with pytest.raises(WeightsError, match="does not fit this model"):
        readers.read(path, arch="cifar_resnet20_v2")


# --- bad input -------------------------------------------------------------------------------

@pytest.fixture
def cifar_pair(tmp_path):
    for suffix in ("-symbol.json", "-0000.params"):
        shutil.copy(images.data_dir() / f"cifar_resnet20_v1{suffix}", tmp_path / f"cifar_resnet20_v1{suffix}")
    return tmp_path / "cifar_resnet20_v1-symbol.json", tmp_path / "cifar_resnet20_v1-0000.params"


def _one_line(exc) -> str:
    assert "\n" not in str(exc)
    return str(exc)


def test_truncated_files_are_one_line(cifar_pair):
    json_path, params_path = cifar_pair
    data = params_path.read_bytes()
    params_path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError, match="truncated") as err:
        readers.read(json_path)
    _one_line(err.value)
    params_path.write_bytes(data)
    json_path.write_text(json_path.read_text()[:-200])
    with pytest.raises(WeightsError, match="not valid JSON") as err:
        gluon_params.read_export(json_path)
    _one_line(err.value)


def test_missing_params_next_to_the_graph(cifar_pair):
    cifar_pair[1].unlink()
    with pytest.raises(WeightsError, match="no parameters next to"):
        readers.read(cifar_pair[0])


def test_extra_and_missing_tensors_are_named(cifar_pair):
    json_path, params_path = cifar_pair
    arrays = mx.nd.load(str(params_path))
    del arrays["arg:cifarresnetv10_dense0_bias"]
    arrays["arg:cifarresnetv10_dense1_weight"] = mx.nd.ones((2, 2))
    mx.nd.save(str(params_path), arrays)
    with pytest.raises(WeightsError) as err:
        readers.read(json_path)
    text = _one_line(err.value)
    assert "output.bias" in text and "dense1_weight" in text


def test_nan_is_refused(cifar_pair):
    json_path, params_path = cifar_pair
    arrays = mx.nd.load(str(params_path))
    arrays["aux:cifarresnetv10_stage2_batchnorm3_running_var"][2] = np.inf
    mx.nd.save(str(params_path), arrays)
    with pytest.raises(WeightsError, match=r"NaN/Inf.*features\.3\.\d\.body\.\d\.running_var"):
        readers.read(json_path)


def test_a_format_flag_that_does_not_match_the_content(cifar_pair, tmp_path):
    with pytest.raises(WeightsError, match="does not look like gluon-params.*detected: gluon-export"):
        readers.read(cifar_pair[0], fmt="gluon-params")
    bare = tmp_path / "bare.params"
    calibrated("resnet18_v1").save_parameters(str(bare))
    with pytest.raises(WeightsError, match="does not look like mxnet-symbol.*detected: gluon-params"):
        readers.read(bare, fmt="mxnet-symbol")
    garbage = tmp_path / "garbage.params"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="cannot tell the format"):
        readers.read(garbage)
