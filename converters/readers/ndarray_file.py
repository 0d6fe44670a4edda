"""MXNet NDArray files (``.params``) and checkpoint pairs, read with numpy only.

Why not ``mx.nd.load``: ``bbadapt inspect`` must work where mxnet is not installed, and a
reader we own can name what is wrong with a damaged file instead of a C++ stack trace.

The layout, from ``NDArray::Save``/``NDArray::Load`` in mxnet's ``src/ndarray/ndarray.cc``
(all little-endian)::

    file   := uint64 0x112 (list magic), uint64 reserved,
              uint64 n, n x array, uint64 m, m x (uint64 len, len bytes of name)   # m is 0 or n
    array  := uint32 magic                       # 0xF993fac9 (V2) or 0xF993faca (V3, np shape)
              int32 storage type                 # 0 dense; 1 row_sparse, 2 csr (refused here)
              shape                              # int32 ndim, ndim x int64
              int32 dev_type, int32 dev_id       # the context it was saved from (ignored)
              int32 type flag                    # mshadow dtype code, see DTYPES
              raw data, C order
    legacy := a first uint32 that is no magic: 0xF993fac8 (V1) is followed by an int64 shape
              as above; anything else is the ndim of a uint32 shape (files from mxnet < 0.9.5)

An array with ndim 0 (ndim -1 in V3) is an uninitialized NDArray; it carries no data.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from bbadapt.platform.errors import WeightsError
from converters.readers import limits
from converters.readers.base import BFLOAT16, open_regular, require_file

LIST_MAGIC = 0x112
V1_MAGIC, V2_MAGIC, V3_MAGIC = 0xF993FAC8, 0xF993FAC9, 0xF993FACA
# mshadow type flags (mshadow/base.h): the dtypes an NDArray file can hold.
DTYPES = {0: "float32", 1: "float64", 2: "float16", 3: "uint8", 4: "int32", 5: "int8", 6: "int64",
          7: "bool", 8: "int16", 9: "uint16", 10: "uint32", 11: "uint64", 12: "bfloat16"}
STORAGE = {0: "dense", 1: "row_sparse", 2: "csr"}
MAX_NDIM = 32  # mxnet's own limit is far below; a larger ndim means garbage
MAX_NAME = 1 << 16
MAX_GRAPH_BYTES = 64 << 20  # symbol JSONs of the largest zoo nets are ~1 MB


@dataclass(frozen=True)
class Entry:
    """One array of an NDArray file, located but not read."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int  # where the raw data starts
    nbytes: int


class _Truncated(Exception):
    pass


def is_ndarray_file(head: bytes) -> bool:
    """Does a file starting with ``head`` look like an NDArray list file (magic + reserved)?"""
    return len(head) >= 16 and struct.unpack_from("<QQ", head) == (LIST_MAGIC, 0)


class _Reader:
    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size = f, size

    def take(self, fmt: str) -> tuple:
        n = struct.calcsize(fmt)
        data = self.f.read(n)
        if len(data) != n:
            raise _Truncated
        return struct.unpack(fmt, data)

    def skip(self, n: int) -> None:
        if self.f.tell() + n > self.size:
            raise _Truncated
        self.f.seek(n, os.SEEK_CUR)


def _shape(r: _Reader, ndim: int, fmt: str, where: str) -> tuple[int, ...] | None:
    if ndim <= 0:
        return None  # an uninitialized NDArray (V2: 0, V3: -1)
    if ndim > MAX_NDIM:
        raise WeightsError(f"{where}: corrupt array header (ndim {ndim})")
    dims = r.take(f"<{ndim}{fmt}")
    if any(d < 0 for d in dims):
        raise WeightsError(f"{where}: corrupt array header (shape {dims})")
    return tuple(int(d) for d in dims)


def _array_header(r: _Reader, where: str) -> tuple[tuple[int, ...] | None, str]:
    """Read one array's header; returns (shape or None, dtype name) with the file at its data."""
    (magic,) = r.take("<I")
    if magic in (V2_MAGIC, V3_MAGIC):
        (stype,) = r.take("<i")
        if stype != 0:
            kind = STORAGE.get(stype, f"unknown storage type {stype}")
            raise WeightsError(f"{where} is a {kind} array; only dense arrays are supported")
        (ndim,) = r.take("<i")
        shape = _shape(r, ndim, "q", where)
    elif magic == V1_MAGIC:
        (ndim,) = r.take("<i")
        shape = _shape(r, ndim, "q", where)
    else:  # legacy: the magic is the ndim of a uint32 shape
        shape = _shape(r, magic, "I", where)
    if shape is None:
        return None, ""
    r.take("<ii")  # context: dev_type, dev_id
    (flag,) = r.take("<i")
    if flag not in DTYPES:
        raise WeightsError(f"{where}: unknown dtype code {flag} (corrupt file?)")
    return shape, DTYPES[flag]


def scan(path: str | os.PathLike) -> list[Entry]:
    """Locate every array of an NDArray file (headers only: cheap even for large files)."""
    path = Path(path)
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            r = _Reader(f, size)
            if r.take("<QQ") != (LIST_MAGIC, 0):
                raise WeightsError(f"{path} is not an MXNet NDArray (.params) file: wrong magic number")
            (count,) = r.take("<Q")
            if count > size // 16:
                raise WeightsError(f"{path}: corrupt header (claims {count} arrays)")
            located = []
            for i in range(count):
                shape, dtype = _array_header(r, f"{path} array #{i}")
                if shape is None:
                    raise WeightsError(f"{path} array #{i} is an uninitialized NDArray (no data)")
                nbytes = limits.nbytes(shape, numpy_dtype(dtype).itemsize)  # no int64 wrap-around; skip() bounds it
                located.append((shape, dtype, f.tell(), nbytes))
                r.skip(nbytes)
            (n_names,) = r.take("<Q")
            if n_names not in (0, count):
                raise WeightsError(f"{path}: corrupt file ({count} arrays but {n_names} names)")
            names = []
            for _ in range(n_names):
                (length,) = r.take("<Q")
                if length > MAX_NAME:
                    raise WeightsError(f"{path}: corrupt name table")
                raw = f.read(length)
                if len(raw) != length:
                    raise _Truncated
                names.append(raw.decode("utf-8", errors="replace"))
            if f.tell() != size:
                raise WeightsError(f"{path}: {size - f.tell()} unexpected bytes after the name table (corrupt file?)")
    except _Truncated:
        raise WeightsError(f"{path} is truncated (ends inside the NDArray data)") from None
    if not names:
        raise WeightsError(f"{path} holds {count} unnamed arrays; bbadapt needs named parameters")
    if len(set(names)) != len(names):
        raise WeightsError(f"{path} names some arrays twice (corrupt file?)")
    return [Entry(n, s, d, o, b) for n, (s, d, o, b) in zip(names, located, strict=True)]


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype an NDArray file's dtype is read as (bfloat16: its bit patterns, see :data:`base.BFLOAT16`)."""
    return BFLOAT16 if name == "bfloat16" else np.dtype(name).newbyteorder("<")


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every named array of an NDArray file, as numpy arrays (bit-identical to ``mx.nd.load``; bfloat16 as
    :data:`~converters.readers.base.BFLOAT16` bit patterns, which :func:`~converters.readers.base.float32_tensors` widens)."""
    entries = scan(path)
    arrays = {}
    with open_regular(path) as f:
        for e in entries:
            f.seek(e.offset)
            dtype = numpy_dtype(e.dtype)
            arrays[e.name] = np.frombuffer(f.read(e.nbytes), dtype=dtype) \
                .astype(dtype if e.dtype == "bfloat16" else e.dtype, copy=False).reshape(e.shape)
    return arrays


def names_if_ndarray(path: Path, head: bytes) -> list[str] | None:
    """The array names of an NDArray file, or None if it is not a readable one (for sniffers)."""
    if not is_ndarray_file(head):
        return None
    try:
        return [e.name for e in scan(path)]
    except (WeightsError, OSError):
        return None


# --- checkpoint pairs: X-symbol.json + X-NNNN.params ---------------------------------------

_PARAMS_RE = re.compile(r"^(?P<stem>.+)-(?P<epoch>\d{4})\.params$")


def symbol_json(path: str | os.PathLike) -> dict:
    """An MXNet symbol graph (``-symbol.json``) as a dict; one-line errors for bad files."""
    path = Path(path)
    with open_regular(path, "MXNet graph", MAX_GRAPH_BYTES) as f:
        raw = f.read()
    try:
        graph = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise WeightsError(f"{path} is JSON nested too deeply for an MXNet graph; corrupt or hostile file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path} is not valid JSON ({type(exc).__name__}: {str(exc)[:80]}); truncated?") from None
    if not (isinstance(graph, dict) and isinstance(graph.get("nodes"), list) and "heads" in graph):
        raise WeightsError(f"{path} is JSON but not an MXNet symbol graph (no nodes/heads)")
    problem = _graph_problem(graph)
    if problem:
        raise WeightsError(f"{path}: damaged MXNet graph ({problem})")
    return graph


def _graph_problem(graph: dict) -> str | None:
    """What makes ``graph`` structurally unusable, or None: every node a named op whose inputs are
    earlier nodes (MXNet writes graphs in topological order), every head a node. Code that walks a
    graph relies on this instead of guarding each step."""
    nodes = graph["nodes"]

    def edge(entry, limit: int) -> bool:
        return isinstance(entry, list) and 1 <= len(entry) <= 3 and all(type(v) is int for v in entry) \
            and 0 <= entry[0] < limit

    for i, node in enumerate(nodes):
        if not (isinstance(node, dict) and isinstance(node.get("op"), str) and isinstance(node.get("name"), str)
                and isinstance(node.get("inputs"), list)):
            return f"node #{i} lacks op/name/inputs"
        if not all(edge(e, i) for e in node["inputs"]):
            return f"node {node['name']!r} reads a node that does not precede it"
    heads = graph["heads"]
    if not (isinstance(heads, list) and heads and all(edge(h, len(nodes)) for h in heads)):
        return "its heads name no node"
    return None


def looks_like_symbol_json(head: bytes) -> bool:
    """Cheap test on a file's first bytes: a JSON object with a ``nodes`` key."""
    return head.lstrip().startswith(b"{") and b'"nodes"' in head


def sniff_graph(path: str | os.PathLike, head: bytes, accepts) -> bool | None:
    """A sniffer's answer for an MXNet graph JSON: ``accepts(graph)``, or True for a damaged
    graph (the reader then says what is wrong with it); None when ``head`` is not a graph."""
    if not looks_like_symbol_json(head):
        return None
    try:
        graph = symbol_json(path)
    except WeightsError:
        return True
    return accepts(graph)


def node_attrs(node: dict) -> dict:
    """A node's attributes under whichever key its mxnet version used (attrs, attr, param)."""
    for key in ("attrs", "attr", "param"):
        if isinstance(node.get(key), dict):
            return node[key]
    return {}


def graph_partner(path: Path) -> Path | None:
    """Where the graph of the checkpoint parameters ``path`` would be (``X-0000.params`` -> ``X-symbol.json``)."""
    match = _PARAMS_RE.match(path.name)
    return path.with_name(f"{match['stem']}-symbol.json") if match else None


def pair(path: Path) -> tuple[Path, Path, str]:
    """(symbol json, params file, note) of the checkpoint ``path`` belongs to.

    ``path`` may name either file. Given the json, the params next to it with the highest
    epoch are taken (the note says which, and how many there were).
    """
    name = path.name
    if name.endswith("-symbol.json"):
        stem = name[: -len("-symbol.json")]
        found = sorted(p for p in path.parent.glob(f"{glob_escape(stem)}-[0-9][0-9][0-9][0-9].params")
                       if _PARAMS_RE.match(p.name))
        if not found:
            raise WeightsError(f"no parameters next to {path}: expected {stem}-0000.params (or another epoch) "
                               "in the same directory")
        note = f"took {found[-1].name}" + (f", the highest of {len(found)} epochs" if len(found) > 1 else "")
        require_file(found[-1], "the parameters beside the graph")  # a FIFO, directory or dangling link: one line
        return path, found[-1], note
    graph = graph_partner(path)
    if graph is not None:
        if not os.path.lexists(graph):
            raise WeightsError(f"no graph next to {path}: expected {graph.name} in the same directory")
        require_file(graph, "the graph beside the parameters", MAX_GRAPH_BYTES)
        return graph, path, f"graph from {graph.name}"
    raise WeightsError(f"{path}: a checkpoint is NAME-symbol.json + NAME-NNNN.params; cannot tell the other file")


def glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)
