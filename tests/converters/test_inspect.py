"""``bbadapt inspect``: the numpy NDArray reader equals mx.nd.load, and inspection needs no mxnet."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest

from bbadapt.platform.errors import WeightsError
from bbadapt.verify import images
from converters.readers import inspection, ndarray_file
from tests.converters.test_mxnet_symbol import write_checkpoint

CIFAR = [images.data_dir() / f"cifar_resnet20_{v}-0000.params" for v in ("v1", "v2")]
NO_MXNET = "import sys; sys.modules['mxnet'] = None; from bbadapt.cli import main; sys.argv = ['bbadapt'] + sys.argv[1:]; sys.exit(main())"


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("r18"), "resnet-18")


def _same_as_mxnet(path) -> None:
    ours = ndarray_file.load(path)
    theirs = {k: v.asnumpy() for k, v in mx.nd.load(str(path)).items()}
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape
        assert ours[key].tobytes() == value.tobytes(), key


def test_the_reader_is_bit_identical_to_mx_nd_load_on_real_files(r18):
    for path in [*CIFAR, r18[1]]:
        _same_as_mxnet(path)


def test_every_dense_dtype_mxnet_writes_is_read(tmp_path):
    rng = np.random.RandomState(0)
    arrays = {dtype: mx.nd.array(rng.uniform(-100, 100, (2, 3, 4)), dtype=dtype)
              for dtype in ("float32", "float64", "float16", "uint8", "int8", "int32", "int64")}
    arrays["bool"] = mx.nd.array(rng.uniform(size=5) > 0.5, dtype="bool")
    arrays["scalar-ish"] = mx.nd.array([3.25])
    mx.nd.save(str(tmp_path / "a.params"), arrays)
    _same_as_mxnet(tmp_path / "a.params")


def test_sparse_and_unnamed_files_are_refused_in_one_line(tmp_path):
    mx.nd.save(str(tmp_path / "sparse.params"), {"w": mx.nd.sparse.csr_matrix(np.eye(3, dtype="float32"))})
    with pytest.raises(WeightsError, match="array #0 is a csr array; only dense arrays are supported"):
        ndarray_file.load(tmp_path / "sparse.params")
    mx.nd.save(str(tmp_path / "list.params"), [mx.nd.ones(3)])
    with pytest.raises(WeightsError, match="1 unnamed arrays"):
        ndarray_file.load(tmp_path / "list.params")


def test_truncated_or_corrupt_files_give_one_line_wherever_they_are_cut(tmp_path):
    data = CIFAR[0].read_bytes()
    path = tmp_path / "cut.params"
    for cut in (8, 20, 30, 1000, len(data) // 2, len(data) - 3):
        path.write_bytes(data[:cut])
        with pytest.raises(WeightsError, match="truncated|corrupt|wrong magic") as err:
            ndarray_file.load(path)
        assert "\n" not in str(err.value)
    path.write_bytes(data + b"junk")
    with pytest.raises(WeightsError, match="unexpected bytes after the name table"):
        ndarray_file.load(path)
    corrupt = bytearray(data)
    corrupt[28:32] = (999).to_bytes(4, "little", signed=True)  # the first array's ndim
    path.write_bytes(bytes(corrupt))
    with pytest.raises(WeightsError, match="corrupt"):
        ndarray_file.load(path)


def test_the_tiny_variance_threshold_is_the_one_adapt_uses():
    from bbadapt.core.rewrite import TINY_VAR

    assert inspection.TINY_VAR == TINY_VAR


def test_a_symbolic_checkpoint_is_described_from_its_file_and_graph(r18):
    info = inspection.inspect_file(r18[1])
    assert info["format"] == "mxnet-symbol" and info["tensors"]["naming"] == "symbolic-zoo"
    assert info["tensors"]["count"] == len(mx.nd.load(str(r18[1])))
    assert info["tensors"]["parameters"] == sum(v.size for v in mx.nd.load(str(r18[1])).values())
    assert info["architecture"]["depth"] == 18 and info["architecture"]["classes"] == 1000
    bn = info["batchnorm"]
    assert bn["eps"] == {"2e-05": 19} and bn["fix_gamma"] == ["bn_data"]
    assert bn["fix_gamma_ignored_values"] == ["bn_data"]  # the random gamma there is stored but ignored
    assert inspection.inspect_file(r18[0])["inspected_from"] == str(r18[0])


def test_batchnorm_health_is_reported_per_layer(tmp_path):
    path = tmp_path / "cifar_resnet20_v1-0000.params"
    arrays = mx.nd.load(str(CIFAR[0]))
    var = "aux:cifarresnetv10_stage2_batchnorm1_running_var"
    values = arrays[var].asnumpy()
    values[:3] = 1e-9
    values[3] = 1e6
    values[4] = -0.5
    arrays[var] = mx.nd.array(values)
    mx.nd.save(str(path), arrays)
    info = inspection.inspect_file(path)
    assert info["format"] == "gluon-params"  # no graph beside it
    bn = info["batchnorm"]
    assert [(h["name"], h["channels"]) for h in bn["tiny_var"]] == [(var[4:], 3)]
    assert [(h["name"], h["channels"]) for h in bn["fp16_overflow_var"]] == [(var[4:], 1)]
    assert [(h["name"], h["channels"]) for h in bn["negative_var"]] == [(var[4:], 1)]
    assert len(info["problems"]) == 3 and all("stage2_batchnorm1_running_var" in p for p in info["problems"])


def _cli_without_mxnet(*args, cwd):
    return subprocess.run([sys.executable, "-c", NO_MXNET, *map(str, args)], check=False, capture_output=True, text=True, cwd=cwd)


def test_inspect_runs_where_mxnet_cannot_be_imported(r18, tmp_path):
    for path in (CIFAR[1], r18[0]):
        result = _cli_without_mxnet("inspect", path, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "no problems found" in result.stdout
    result = _cli_without_mxnet("inspect", r18[1], "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["format"] == "mxnet-symbol" and info["batchnorm"]["fix_gamma"] == ["bn_data"]
    assert info == json.loads(json.dumps(inspection.inspect_file(r18[1])))


def test_inspect_refuses_a_truncated_file_with_one_line(tmp_path):
    path = tmp_path / "cut.params"
    path.write_bytes(CIFAR[0].read_bytes()[:5000])
    result = _cli_without_mxnet("inspect", path, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"bbadapt: error: {path} is truncated (ends inside the NDArray data)"]
    shutil.copy(images.data_dir() / "photos" / "raccoon-1.jpg", tmp_path / "photo.jpg")
    result = _cli_without_mxnet("inspect", tmp_path / "photo.jpg", "--json", cwd=tmp_path)
    assert result.returncode == 0 and json.loads(result.stdout)["format"] is None


@pytest.mark.parametrize("layout", ["v1-int64-shape", "legacy-uint32-shape"])
def test_older_array_layouts_are_read_as_mxnet_reads_them(tmp_path, layout):
    """Files from older mxnet (written here byte by byte, following ndarray.cc's LegacyLoad)."""
    import struct

    values = np.arange(6, dtype=np.float32).reshape(2, 3) * 0.5
    if layout == "v1-int64-shape":
        header = struct.pack("<Ii2q", ndarray_file.V1_MAGIC, 2, 2, 3)
    else:
        header = struct.pack("<I2I", 2, 2, 3)  # no magic: the first word is ndim
    array = header + struct.pack("<iii", 1, 0, 0) + values.tobytes()  # cpu(0), float32
    name = b"w"
    blob = struct.pack("<QQQ", 0x112, 0, 1) + array + struct.pack("<QQ", 1, len(name)) + name
    (tmp_path / "old.params").write_bytes(blob)
    _same_as_mxnet(tmp_path / "old.params")
    assert np.array_equal(ndarray_file.load(tmp_path / "old.params")["w"], values)
