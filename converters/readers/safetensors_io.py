"""``.safetensors`` read and write with numpy alone (no torch, no safetensors package).

The format (huggingface/safetensors, "format" section of its README): an 8-byte
little-endian unsigned header length ``N``, then ``N`` bytes of UTF-8 JSON
``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the raw little-endian tensor bytes; offsets are relative to the end of the header.
A valid file has its tensors packed without overlap or holes and nothing after them.

Reading is strict: every way a file can be cut short or lie about itself is one
:class:`~bbadapt.platform.errors.WeightsError` line, because a quietly mis-read tensor would pass
through a conversion as wrong weights.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np

from bbadapt.platform.errors import WeightsError
from converters.readers import limits
from converters.readers.base import BFLOAT16, open_regular

MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit
DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"), "BF16": BFLOAT16,
}
NAMES = {dt: name for name, dt in DTYPES.items()}


def looks_like(head: bytes) -> bool:
    """Cheap content test: a plausible header length followed by the start of a JSON object."""
    if len(head) < 10:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= MAX_HEADER and head[8:9] == b"{"


def header_names(path: str | os.PathLike) -> set[str]:
    """Tensor names from the header alone (no size validation): for sniffing a possibly damaged file."""
    with open_regular(path) as f:
        raw = f.read(8)
        (n,) = struct.unpack("<Q", raw) if len(raw) == 8 else (0,)
        text = f.read(min(n, MAX_HEADER))
    try:
        header = json.loads(text.decode("utf-8"))
        return {k for k in header if k != "__metadata__"} if isinstance(header, dict) else set()
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # header cut short or absurd: whatever names are legible
        return set(re.findall(r'"([^"]+)":\s*\{\s*"dtype"', text.decode("utf-8", "replace")))


def read_header(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """(tensor entries, metadata, data start offset), validated against the file size."""
    path = Path(path)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightsError(f"{path}: truncated safetensors file (no header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise WeightsError(f"{path}: safetensors header length {n} runs past the end of the file ({size} bytes); truncated or not safetensors")
        text = f.read(n)
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise WeightsError(f"{path}: safetensors header is not valid UTF-8 JSON; corrupt file") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise WeightsError(f"{path}: safetensors __metadata__ is not an object")
    _check_entries(path, header, size - 8 - n)
    return header, metadata, 8 + n


def _check_entries(path: Path, header: dict, data_len: int) -> None:
    spans = []
    for name, entry in header.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("shape"), list)
                and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2):
            raise WeightsError(f"{path}: safetensors entry {name!r} lacks dtype/shape/data_offsets")
        if entry.get("dtype") not in DTYPES:
            raise WeightsError(f"{path}: tensor {name!r} has unknown dtype {entry.get('dtype')!r}")
        shape, (begin, end) = entry["shape"], entry["data_offsets"]
        if not all(type(v) is int and v >= 0 for v in [*shape, begin, end]) or begin > end:  # bool is an int
            raise WeightsError(f"{path}: tensor {name!r} has an invalid shape or offsets")
        expected = limits.nbytes(shape, DTYPES[entry["dtype"]].itemsize)  # Python ints: [2**61+1, 8] must not wrap
        if end - begin != expected:
            raise WeightsError(f"{path}: tensor {name!r} spans {end - begin} bytes but {entry['dtype']}{shape} needs "
                               f"{expected}; corrupt file")
        if end > data_len:
            raise WeightsError(f"{path}: tensor {name!r} ends at byte {end} of a {data_len}-byte data section; truncated file")
        spans.append((begin, end, name))
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin < position:
            raise WeightsError(f"{path}: tensor {name!r} overlaps another tensor's bytes; corrupt file")
        if begin > position:
            raise WeightsError(f"{path}: {begin - position} unclaimed bytes before tensor {name!r}; corrupt file")
        position = end
    if position != data_len:
        raise WeightsError(f"{path}: {data_len - position} bytes after the last tensor; corrupt or not safetensors")


def load(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Every tensor (native-endian numpy copies) and the string metadata."""
    header, metadata, start = read_header(path)
    arrays = {}
    with open_regular(path) as f:
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            f.seek(start + begin)
            data = f.read(end - begin)
            dtype = DTYPES[entry["dtype"]]
            native = dtype if dtype == BFLOAT16 else dtype.newbyteorder("=")  # bfloat16: bit patterns, widened later
            arrays[name] = np.frombuffer(data, dtype=dtype).reshape(entry["shape"]).astype(native)
    return arrays, metadata


def dumps(arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file holding ``arrays`` (names sorted, tensors packed)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks, offset = [], 0
    for name in sorted(arrays):
        array = np.asarray(arrays[name])
        dtype = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
        if dtype not in NAMES:
            raise WeightsError(f"cannot write tensor {name!r} of dtype {array.dtype} to safetensors")
        data = np.ascontiguousarray(array, dtype=dtype).tobytes()
        header[name] = {"dtype": NAMES[dtype], "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # align the data section, as the reference writer does
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def save(out: str | os.PathLike, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None,
         force: bool = False) -> None:
    """Write a safetensors file atomically (temp file + rename); refuse an existing ``out`` unless ``force``."""
    from bbadapt.platform.atomic import write_file

    payload = dumps(arrays, metadata)
    write_file(out, lambda tmp: tmp.write_bytes(payload), force)
