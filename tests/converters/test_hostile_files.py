"""Hostile weight files and bundles: one line on stderr, exit 1, and bounded memory.

Each file is built here, a few bytes or kilobytes that declare gigabytes (or sizes that
overflow int64). The real command line reads it in a subprocess; a small wrapper process
measures that subprocess's peak resident size (``getrusage(RUSAGE_CHILDREN)``, the wrapper's
only child) and caps its data segment (``RLIMIT_DATA``) so a regression fails the test
instead of exhausting a shared machine. The bound is the one readers promise
(:mod:`converters.limits`): below twice the file's real size plus 1 GB.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

GiB = 1 << 30
DATA_LIMIT = 3 * GiB
MEASURE = """
import json, resource, subprocess, sys
limit = int(sys.argv[2])
done = subprocess.run(sys.argv[3:], preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_DATA, (limit, limit)))
with open(sys.argv[1], "w") as f:
    json.dump({"rc": done.returncode, "peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}, f)
"""


def run_measured(tmp_path: Path, *args) -> tuple[subprocess.CompletedProcess, int, int]:
    """(result, exit code, peak RSS in bytes) of ``bbadapt ARGS`` run under the data limit."""
    env = {k: v for k, v in os.environ.items() if k != "BBADAPT_DEBUG"}
    env.update(COLUMNS="200", PYTHONDONTWRITEBYTECODE="1", MXNET_HOME=str(tmp_path / "mxnet-home"))
    record = tmp_path / "measure.json"
    result = subprocess.run([sys.executable, "-c", MEASURE, str(record), str(DATA_LIMIT), sys.executable, "-m",
                             "bbadapt.cli", *map(str, args)], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    measured = json.loads(record.read_text())
    return result, measured["rc"], measured["peak_kib"] * 1024


def assert_refused_cheaply(tmp_path: Path, path: Path, *args, mentions: tuple[str, ...]) -> str:
    result, code, peak = run_measured(tmp_path, *args)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("... ")]  # progress
    assert code == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("bbadapt: error: "), result.stderr
    assert "internal error" not in lines[0] and "Traceback" not in result.stderr
    for word in mentions:
        assert word in lines[0], lines[0]
    bound = 2 * path.stat().st_size + GiB
    assert peak < bound, f"peak RSS {peak / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"
    return lines[0]


# --------------------------------------------------------------------------- builders


def keras3_declaring(path: Path, shape: tuple[int, ...]) -> Path:
    """A Keras 3 ``.weights.h5`` whose first conv kernel declares ``shape`` and stores nothing."""
    import h5py

    with h5py.File(path, "w") as f:
        f.create_group("layers/conv2d/vars").create_dataset("0", shape=shape, dtype="f4")
    return path


def legacy_h5_declaring(path: Path, shape: tuple[int, ...]) -> Path:
    """A Keras 2 weights file (layer_names / weight_names) with one unwritten dataset of ``shape``."""
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"conv1_conv"]
        group = f.create_group("conv1_conv")
        group.attrs["weight_names"] = [b"conv1_conv/kernel:0"]
        group.create_dataset("conv1_conv/kernel:0", shape=shape, dtype="f4")
    return path


def keras_zip_bomb(path: Path, inflated: int) -> Path:
    """A ``.keras`` archive whose ``model.weights.h5`` inflates from ~1 MB to ``inflated`` bytes."""
    zeros = bytes(16 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("metadata.json", json.dumps({"keras_version": "3.3.3"}))
        with z.open("model.weights.h5", "w", force_zip64=True) as member:
            for _ in range(inflated // len(zeros)):
                member.write(zeros)
    return path


def detectron_pickle_allocating(path: Path, shape: tuple[int, ...]) -> Path:
    """A Detectron-style pickle whose array is rebuilt with ``shape`` before any data (numpy writes (0,))."""
    class Hostile:
        def __reduce__(self):
            return np.core.multiarray._reconstruct, (np.ndarray, shape, np.dtype("f4"))

    payload = pickle.dumps({"blobs": {"conv1_w": Hostile(), "res2_0_branch2a_w": Hostile()}}, protocol=2)
    path.write_bytes(payload)
    return path


def safetensors_with_shape(path: Path, shape: list[int], data: bytes) -> Path:
    header = json.dumps({"conv1.weight": {"dtype": "F32", "shape": shape, "data_offsets": [0, len(data)]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def ndarray_file_with_shape(path: Path, shape: tuple[int, ...], data: bytes) -> Path:
    """An MXNet NDArray file (V2 array header) holding one array that declares ``shape``."""
    body = struct.pack("<QQQ", 0x112, 0, 1)
    body += struct.pack("<Iii", 0xF993FAC9, 0, len(shape)) + struct.pack(f"<{len(shape)}q", *shape)
    body += struct.pack("<iii", 1, 0, 0) + data
    name = b"arg:conv0_weight"
    body += struct.pack("<QQ", 1, len(name)) + name
    path.write_bytes(body)
    return path


# --------------------------------------------------------------------------- weights files


def test_a_weights_h5_declaring_a_32768_square_dataset_is_refused_before_reading(tmp_path):
    path = keras3_declaring(tmp_path / "hostile.weights.h5", (32768, 32768))
    assert_refused_cheaply(tmp_path, path, "convert", "--weights", path, "-o", tmp_path / "out",
                           mentions=("layers/conv2d", "declares 4,294,967,296 bytes", "refused"))


def test_a_legacy_h5_declaring_1e5_square_is_refused_not_a_memory_error(tmp_path):
    path = legacy_h5_declaring(tmp_path / "hostile.h5", (100000, 100000))
    assert_refused_cheaply(tmp_path, path, "convert", "--weights", path, "-o", tmp_path / "out",
                           mentions=("conv1_conv/kernel:0", "refused"))


def test_a_keras_archive_whose_weights_inflate_to_a_gigabyte_is_refused_before_inflating(tmp_path):
    path = keras_zip_bomb(tmp_path / "bomb.keras", GiB)
    assert path.stat().st_size < 4 << 20
    assert_refused_cheaply(tmp_path, path, "convert", "--weights", path, "-o", tmp_path / "out",
                           mentions=("model.weights.h5", "declares 1,073,741,824 bytes", "refused"))


def test_a_detectron_pickle_allocating_before_its_data_is_refused(tmp_path):
    path = detectron_pickle_allocating(tmp_path / "R-50.pkl", (30000, 30000))
    assert path.stat().st_size < 400
    assert_refused_cheaply(tmp_path, path, "convert", "--weights", path, "-o", tmp_path / "out",
                           mentions=("(30000, 30000)", "refused"))


@pytest.mark.parametrize("shape", [[2**61 + 1, 8], [2**70], [2**62, 2**62, 0, 5]],
                         ids=["wraps-to-8", "beyond-int64", "zero-with-huge-dims"])
def test_safetensors_shapes_overflowing_int64_are_a_corrupt_file(tmp_path, shape):
    path = safetensors_with_shape(tmp_path / "model.safetensors", shape, bytes(32))
    assert_refused_cheaply(tmp_path, path, "convert", "--weights", path, "-o", tmp_path / "out",
                           mentions=("conv1.weight", "corrupt file"))


def test_an_ndarray_file_whose_shape_wraps_int64_is_truncated_not_an_internal_error(tmp_path):
    path = ndarray_file_with_shape(tmp_path / "hostile-0000.params", (2**62, 4), bytes(16))
    assert_refused_cheaply(tmp_path, path, "convert", "--weights", path, "-o", tmp_path / "out",
                           mentions=("truncated",))


def test_a_symbol_json_nested_absurdly_deep_is_one_line(tmp_path):
    graph = tmp_path / "deep-symbol.json"
    graph.write_text('{"nodes": ' + "[" * 100000 + "]" * 100000 + ', "heads": []}')
    ndarray_file_with_shape(tmp_path / "deep-0000.params", (1,), bytes(4))
    assert_refused_cheaply(tmp_path, graph, "convert", "--weights", graph, "-o", tmp_path / "out",
                           mentions=("nested too deeply",))


# --------------------------------------------------------------------------- partners and graphs

DATA = Path(__file__).resolve().parents[2] / "bbadapt" / "data"
ZOO_GRAPH = Path(__file__).resolve().parents[2] / "tests" / "data" / "mxnet-symbols" / "resnet-18-symbol.json"


def assert_nothing_written(tmp_path: Path) -> None:
    """No output, no staging directory: only what the test itself put there (and the measuring record)."""
    assert not (tmp_path / "out").exists()
    assert not [p.name for p in tmp_path.iterdir() if ".partial-" in p.name or p.name.startswith(".out")]


def make_partner(path: Path, kind: str) -> None:
    """``path`` as something that is not a readable file: a FIFO (a plain open blocks forever), a directory,
    a symbolic link to nothing."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(path.with_name("nowhere"))


PARTNER_WORDS = {"fifo": "is not a regular file (a FIFO)", "directory": "is not a regular file (a directory)",
                 "dangling-link": "is a symbolic link to nothing"}


@pytest.mark.parametrize("kind", list(PARTNER_WORDS))
def test_a_graphs_parameters_partner_that_is_no_file_is_one_line_and_never_blocks(tmp_path, kind):
    graph = tmp_path / "net-symbol.json"
    graph.write_bytes((DATA / "cifar_resnet20_v1-symbol.json").read_bytes())
    make_partner(tmp_path / "net-0000.params", kind)
    assert_refused_cheaply(tmp_path, graph, "convert", "--weights", graph, "-o", tmp_path / "out",
                           mentions=("net-0000.params", PARTNER_WORDS[kind]))
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("kind", list(PARTNER_WORDS))
def test_a_parameters_files_graph_partner_that_is_no_file_is_one_line_and_never_blocks(tmp_path, kind):
    params = tmp_path / "net-0000.params"
    params.write_bytes((DATA / "cifar_resnet20_v1-0000.params").read_bytes())
    make_partner(tmp_path / "net-symbol.json", kind)
    assert_refused_cheaply(tmp_path, params, "convert", "--weights", params, "-o", tmp_path / "out",
                           mentions=("net-symbol.json", PARTNER_WORDS[kind]))
    assert_nothing_written(tmp_path)


def test_a_fifo_named_as_the_weights_is_one_line_and_never_blocks(tmp_path):
    fifo = tmp_path / "weights.params"
    os.mkfifo(fifo)
    assert_refused_cheaply(tmp_path, fifo, "convert", "cifar_resnet20_v1", "--weights", fifo, "-o", tmp_path / "out",
                           mentions=("a FIFO",))
    assert_nothing_written(tmp_path)


def zoo_graph_with(tmp_path: Path, layer: str, **attrs) -> Path:
    """The real ResNet-18 symbolic-zoo graph with ``attrs`` changed on node ``layer``, and a parameters partner."""
    graph = json.loads(ZOO_GRAPH.read_text())
    next(n for n in graph["nodes"] if n["name"] == layer)["attrs"].update(attrs)
    path = tmp_path / "resnet-18-symbol.json"
    path.write_text(json.dumps(graph))
    (tmp_path / "resnet-18-0000.params").write_bytes((DATA / "cifar_resnet20_v1-0000.params").read_bytes())
    return path


@pytest.mark.parametrize("layer, attrs, reason", [
    ("conv0", {"num_filter": str(2**40)}, "num_filter"),
    ("conv0", {"kernel": "(100000, 100000)"}, "kernel size exceed input"),
    ("conv0", {"kernel": "(0, 0)"}, "has kernel (0, 0) (each value must be at least 1)"),
    ("fc1", {"num_hidden": "0"}, "has num_hidden 0"),
    ("conv0", {"num_group": "0"}, "has num_group 0 (each value must be at least 1)"),  # SIGFPE inside MXNet
    ("pooling0", {"stride": "(0, 0)"}, "has stride (0, 0)"),  # passes MXNet's shape inference
], ids=["absurd-num-filter", "absurd-kernel", "zero-kernel", "zero-num-hidden", "zero-groups", "zero-pool-stride"])
def test_a_graph_mxnet_rejects_at_shape_inference_is_one_damaged_graph_line_naming_the_node(tmp_path, layer, attrs,
                                                                                           reason):
    graph = zoo_graph_with(tmp_path, layer, **attrs)
    assert_refused_cheaply(tmp_path, graph, "convert", "--weights", graph, "-o", tmp_path / "out",  # one line:
                           mentions=("damaged MXNet graph", f"node {layer!r}", reason))  # no MXNet log or print
    assert_nothing_written(tmp_path)


def test_a_graph_declaring_far_more_weights_than_its_partner_holds_is_refused_before_building(tmp_path):
    graph = zoo_graph_with(tmp_path, "stage4_unit1_conv1", num_filter="200000")
    graph_dict = json.loads(graph.read_text())
    for node in graph_dict["nodes"]:
        if node["op"] == "Convolution" and node["name"].startswith("stage4_"):
            node["attrs"]["num_filter"] = "200000"
    graph.write_text(json.dumps(graph_dict))
    assert_refused_cheaply(tmp_path, graph, "convert", "--weights", graph, "-o", tmp_path / "out",
                           mentions=("the graph declares weights of", "resnet-18-0000.params holds 1,105,597 bytes"))
    assert_nothing_written(tmp_path)


# --------------------------------------------------------------------------- bundles


def bundle_with_manifest(directory: Path, text: str) -> Path:
    directory.mkdir()
    (directory / "manifest.json").write_text(text)
    (directory / "backbone.params").write_bytes(b"")
    return directory


def test_a_manifest_nested_absurdly_deep_is_a_damaged_bundle(tmp_path):
    bundle = bundle_with_manifest(tmp_path / "bundle", "[" * 100000 + "]" * 100000)
    line = assert_refused_cheaply(tmp_path, bundle / "manifest.json", "check", bundle,
                                  mentions=("manifest.json", "damaged bundle"))
    assert "RecursionError" not in line


@pytest.mark.parametrize("section, name", [
    ("top", "/etc/passwd"), ("top", "../../outside.params"), ("detector", "../detector.params"), ("top", ".."),
])
def test_manifest_file_names_must_stay_inside_the_bundle(tmp_path, section, name):
    manifest = {"schema_version": 1, "model": "resnet18_v1", "plan": [],
                "source": {"preset": "imagenet"}, "target": {"preset": "rgb255"}}
    from bbadapt.core.spec import parse_spec

    manifest["source"], manifest["target"] = parse_spec("imagenet").to_dict(), parse_spec("rgb255").to_dict()
    if section == "top":
        manifest["params_file"] = name
    else:
        manifest["detector"] = {"params_file": name}
    bundle = bundle_with_manifest(tmp_path / "bundle", json.dumps(manifest))
    assert_refused_cheaply(tmp_path, bundle / "manifest.json", "check", bundle,
                           mentions=("not a file name inside the bundle", repr(name)))
