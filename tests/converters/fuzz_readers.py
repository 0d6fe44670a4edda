"""Mutation fuzzing of every weights reader and of ``inspect``: clean one-line errors or success, nothing else.

``python -m tests.converters.fuzz_readers TARGET [--examples N] [--derandomize]`` (TARGET: a name
from :data:`TARGETS` or ``all``). ``tests/converters/test_fuzz.py`` runs a short, deterministic
budget inside the test suite; ``make fuzz`` a long, random one. A run fails on the first input
that makes a reader raise anything but a one-line :class:`~bbadapt.platform.errors.BbadaptError`;
Hypothesis then shrinks it to the smallest mutation that still fails and prints it.

Seeds are real files: the packaged gluoncv CIFAR ResNet-20 export (``bbadapt/data``) and the
MXNet model-zoo graphs (``tests/data/mxnet-symbols``); formats with no file in the repository
(safetensors, Keras HDF5 and ``.keras``, Detectron pickles) get small seeds written here in their
real layouts from those same CIFAR weights. Each target runs in its own process (the test
launches it), so a native crash in a library fails the test instead of the test session.

Besides byte mutations, graphs are mutated as graphs (:data:`GRAPH_TARGETS`: attribute values MXNet
must reject or must not allocate, ops, edges), and checkpoint pairs as pairs (``pair-partners``: the
file named and its partner each real, mutated, empty, missing, a FIFO, a directory or a dangling
link), so that what reaches MXNet's shape inference and every partner a reader opens is fuzzed too.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import struct
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bbadapt.platform.errors import BbadaptError

ROOT = Path(__file__).resolve().parents[2]
CIFAR_PARAMS = ROOT / "bbadapt" / "data" / "cifar_resnet20_v1-0000.params"
CIFAR_GRAPH = ROOT / "bbadapt" / "data" / "cifar_resnet20_v1-symbol.json"
ZOO_GRAPH = ROOT / "tests" / "data" / "mxnet-symbols" / "resnet-18-symbol.json"
INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1)


# --------------------------------------------------------------------------- seeds


def stem() -> dict[str, np.ndarray]:
    """The real stem conv + BatchNorm of the packaged CIFAR ResNet-20 (weight, gamma, beta, mean, var)."""
    from converters.readers import ndarray_file

    arrays = ndarray_file.load(CIFAR_PARAMS)
    prefix = "cifarresnetv10_"
    return {"weight": arrays[f"arg:{prefix}conv0_weight"], "gamma": arrays[f"arg:{prefix}batchnorm0_gamma"],
            "beta": arrays[f"arg:{prefix}batchnorm0_beta"], "mean": arrays[f"aux:{prefix}batchnorm0_running_mean"],
            "var": arrays[f"aux:{prefix}batchnorm0_running_var"]}


def safetensors_seed() -> bytes:
    """A torchvision-named state dict of the stem (what torchvision's conv1/bn1 hold)."""
    from converters.readers import safetensors_io

    a = stem()
    return safetensors_io.dumps({"conv1.weight": a["weight"], "bn1.weight": a["gamma"], "bn1.bias": a["beta"],
                                 "bn1.running_mean": a["mean"], "bn1.running_var": a["var"],
                                 "bn1.num_batches_tracked": np.array(0, np.int64)}, {"format": "pt"})


def keras_h5_seed() -> bytes:
    """A Keras 2 weights file (layer_names / weight_names) holding the stem as conv1_conv and conv1_bn."""
    import h5py

    a = stem()
    layers = {"conv1_conv": {"kernel:0": a["weight"].transpose(2, 3, 1, 0)},  # OIHW -> Keras HWIO
              "conv1_bn": {"gamma:0": a["gamma"], "beta:0": a["beta"], "moving_mean:0": a["mean"],
                           "moving_variance:0": a["var"]}}
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f.attrs["layer_names"] = [name.encode() for name in layers]
        f.attrs["keras_version"] = b"2.4.0"
        for layer, tensors in layers.items():
            group = f.create_group(layer)
            group.attrs["weight_names"] = [f"{layer}/{n}".encode() for n in tensors]
            for name, tensor in tensors.items():
                group.create_dataset(f"{layer}/{name}", data=tensor)
    return buffer.getvalue()


def keras_zip_seed() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("metadata.json", json.dumps({"keras_version": "3.3.3"}))
        z.writestr("model.weights.h5", keras_h5_seed())
    return buffer.getvalue()


def detectron_seed() -> bytes:
    """A Python 2 style Detectron pickle holding the stem as conv1_w + res_conv1_bn_s/_b."""
    from tests.py2pickle import dumps

    a = stem()
    return dumps({"blobs": {"conv1_w": a["weight"], "res_conv1_bn_s": a["gamma"], "res_conv1_bn_b": a["beta"]}})


# --------------------------------------------------------------------------- targets


def _read(path: Path, arch: str | None = None) -> None:
    from converters import readers as converters

    converters.read(path, arch=arch)


def _inspect(path: Path) -> None:
    from converters.readers.inspection import inspect_file

    inspect_file(path)


def _graph(path: Path) -> None:
    from converters.readers import mxnet_symbol, ndarray_file

    graph = ndarray_file.symbol_json(path)
    mxnet_symbol.read_graph(graph, str(path))
    mxnet_symbol.graph_shapes(graph, str(path))  # MXNet's own shape inference: rejections are one line


Target = tuple[str, Callable[[], bytes], tuple[Callable[[Path], None], ...], dict[str, Path]]
TARGETS: dict[str, Target] = {  # name: (file name, seed, calls on the mutated file, real files copied beside it)
    "ndarray-params": ("cifar_resnet20_v1-0000.params", CIFAR_PARAMS.read_bytes,
                       (_inspect, lambda p: _read(p, "cifar_resnet20_v1")), {}),
    "gluon-export-graph": ("cifar_resnet20_v1-symbol.json", CIFAR_GRAPH.read_bytes, (_inspect, _read),
                           {"cifar_resnet20_v1-0000.params": CIFAR_PARAMS}),
    "zoo-graph": ("resnet-18-symbol.json", ZOO_GRAPH.read_bytes, (_inspect, _graph), {}),
    "safetensors": ("model.safetensors", safetensors_seed, (_inspect, _read), {}),
    "keras-h5": ("model.h5", keras_h5_seed, (_inspect, _read), {}),
    "keras-zip": ("model.keras", keras_zip_seed, (_inspect, _read), {}),
    "detectron": ("R-50.pkl", detectron_seed, (_inspect, _read), {}),
}


# --------------------------------------------------------------------------- graph mutations

GRAPH_KEYS = ("num_filter", "kernel", "stride", "pad", "dilate", "num_group", "num_hidden", "no_bias", "eps",
              "fix_gamma", "pool_type", "global_pool", "pooling_convention", "act_type")
GRAPH_VALUES = ("0", "-1", "1", "3", "(0, 0)", "(1,)", "(3, 3, 3)", "(100000, 100000)", "(-1, -1)", str(2**31),
                str(2**40), "200000", "", "nan", "True", "False", "avg", "sum", "[]", "1e9", "relu", "full")
GRAPH_OPS = ("Convolution", "FullyConnected", "Pooling", "BatchNorm", "Activation", "elemwise_add", "Flatten",
             "null", "SoftmaxOutput", "NoSuchOp")


@st.composite
def graph_edits(draw) -> list[tuple]:
    """A few edits of a graph's nodes, positions as fractions of the node list."""
    where = st.floats(0, 1, allow_nan=False)
    edit = st.one_of(
        st.tuples(st.just("attr"), where, st.sampled_from(GRAPH_KEYS), st.sampled_from(GRAPH_VALUES)),
        st.tuples(st.just("op"), where, st.sampled_from(GRAPH_OPS)),
        st.tuples(st.just("input"), where, where, where),
        st.tuples(st.just("drop-attrs"), where),
    )
    return draw(st.lists(edit, min_size=1, max_size=3))


def edit_graph(data: bytes, edits: list[tuple]) -> bytes:
    graph = json.loads(data)
    nodes = graph["nodes"]
    for kind, where, *args in edits:
        node = nodes[min(int(where * len(nodes)), len(nodes) - 1)]
        if kind == "attr":
            node.setdefault("attrs", {})[args[0]] = args[1]
        elif kind == "op":
            node["op"] = args[0]
        elif kind == "input" and node["inputs"]:
            entry = node["inputs"][min(int(args[0] * len(node["inputs"])), len(node["inputs"]) - 1)]
            entry[0] = min(int(args[1] * len(nodes)), len(nodes) - 1)  # may point forward: a damaged graph
        elif kind == "drop-attrs":
            node.pop("attrs", None)
    return json.dumps(graph).encode()


GRAPH_TARGETS: dict[str, Target] = {  # as TARGETS, but the seed is edited as a graph (edit_graph)
    "zoo-graph-edits": ("resnet-18-symbol.json", ZOO_GRAPH.read_bytes, (_inspect, _graph, _read),
                        {"resnet-18-0000.params": CIFAR_PARAMS}),  # a partner far too small: never built
    "gluon-export-graph-edits": ("cifar_resnet20_v1-symbol.json", CIFAR_GRAPH.read_bytes, (_inspect, _read),
                                 {"cifar_resnet20_v1-0000.params": CIFAR_PARAMS}),
}


# --------------------------------------------------------------------------- pair mutations

PARTNER_KINDS = ("real", "mutated", "empty", "missing", "fifo", "directory", "dangling-link", "link-to-real")
PAIR = {"symbol": ("cifar_resnet20_v1-symbol.json", CIFAR_GRAPH), "params": ("cifar_resnet20_v1-0000.params",
                                                                              CIFAR_PARAMS)}


def place(path: Path, kind: str, source: Path, edits: list[tuple]) -> None:
    """Put at ``path`` the ``kind`` of thing a user might have there instead of ``source``."""
    if kind in ("real", "mutated"):
        path.write_bytes(source.read_bytes() if kind == "real" else mutate(source.read_bytes(), edits))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "dangling-link":
        path.symlink_to(path.with_name("nowhere"))
    elif kind == "link-to-real":
        path.symlink_to(source)


def run_pairs(examples: int, derandomize: bool) -> None:
    """Either file of a checkpoint pair named, the other (and the named one) any kind of thing: read and inspect
    end in success or one line, never a hang or an internal error."""
    import shutil

    with tempfile.TemporaryDirectory(prefix="fuzz-pairs-") as tmp:
        root = Path(tmp)

        @settings(max_examples=examples, derandomize=derandomize, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck), print_blob=True)
        @given(named=st.sampled_from(sorted(PAIR)), named_kind=st.sampled_from(("real", "mutated")),
               partner_kind=st.sampled_from(PARTNER_KINDS), edits=mutations())
        def fuzz(named, named_kind, partner_kind, edits):
            directory = root / "pair"
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            partner = next(k for k in PAIR if k != named)
            place(directory / PAIR[named][0], named_kind, PAIR[named][1], edits)
            place(directory / PAIR[partner][0], partner_kind, PAIR[partner][1], edits)
            for call in (_inspect, _read):
                check_clean(call, directory / PAIR[named][0])

        fuzz()
    print(f"pair-partners: {examples} mutated files, every reader and inspect ended cleanly")


# --------------------------------------------------------------------------- mutations


@st.composite
def mutations(draw) -> list[tuple]:
    """A few edits, positions as fractions of the file so they scale with any seed."""
    where = st.floats(0, 1, allow_nan=False)
    edit = st.one_of(
        st.tuples(st.just("flip"), where, st.integers(0, 7)),
        st.tuples(st.just("overwrite"), where, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("integer"), where, st.sampled_from(INTERESTING), st.sampled_from((1, 2, 4, 8))),
        st.tuples(st.just("truncate"), where),
        st.tuples(st.just("insert"), where, st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("duplicate"), where, st.integers(1, 4096)),
    )
    return draw(st.lists(edit, min_size=1, max_size=4))


def mutate(data: bytes, edits: list[tuple]) -> bytes:
    out = bytearray(data)
    for kind, where, *args in edits:
        at = min(int(where * len(out)), max(len(out) - 1, 0))
        if kind == "flip" and out:
            out[at] ^= 1 << args[0]
        elif kind == "overwrite":
            out[at:at + len(args[0])] = args[0]
        elif kind == "integer":
            value, width = args
            out[at:at + width] = struct.pack(f"<{ {1: 'B', 2: 'H', 4: 'I', 8: 'Q'}[width] }", value % (1 << (8 * width)))
        elif kind == "truncate":
            del out[max(at, 1):]
        elif kind == "insert":
            out[at:at] = args[0]
        elif kind == "duplicate":
            out[at:at] = out[at:at + args[0]]
    return bytes(out)


def check_clean(call: Callable[[Path], None], path: Path) -> None:
    """Success, or a BbadaptError of one line; anything else propagates (a crash)."""
    try:
        call(path)
    except BbadaptError as exc:
        assert "\n" not in str(exc) and str(exc).strip(), f"not a one-line message: {str(exc)!r}"


def run(name: str, examples: int, derandomize: bool) -> None:
    if name == "pair-partners":
        run_pairs(examples, derandomize)
        return
    file_name, seed, calls, beside = TARGETS.get(name) or GRAPH_TARGETS[name]
    change = edit_graph if name in GRAPH_TARGETS else mutate
    data = seed()
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as tmp:
        directory = Path(tmp)
        for other, source in beside.items():
            (directory / other).write_bytes(source.read_bytes())
        path = directory / file_name
        for call in calls:  # the seed itself must read cleanly (else the target tests nothing)
            path.write_bytes(data)
            check_clean(call, path)

        @settings(max_examples=examples, derandomize=derandomize, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck), print_blob=True)
        @given(edits=graph_edits() if name in GRAPH_TARGETS else mutations())
        def fuzz(edits):
            path.write_bytes(change(data, edits))
            for call in calls:
                check_clean(call, path)

        fuzz()
    print(f"{name}: {examples} mutated files, every reader and inspect ended cleanly")


ALL_TARGETS = (*TARGETS, *GRAPH_TARGETS, "pair-partners")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=[*ALL_TARGETS, "all"])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--derandomize", action="store_true", help="the same inputs every run (the test suite)")
    args = parser.parse_args()
    for name in ALL_TARGETS if args.target == "all" else [args.target]:
        run(name, args.examples, args.derandomize)


if __name__ == "__main__":
    sys.exit(main())
