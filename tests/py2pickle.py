"""Write pickles the way Python 2's cPickle + numpy wrote Detectron's ``R-50.pkl`` (protocol 2).

Written opcode by opcode from the pickle protocol (``Lib/pickletools.py`` documents each
opcode) and numpy's ``ndarray.__reduce__`` layout, not with Python 3's pickler, because
Python 3 writes ``bytes`` differently (``_codecs.encode``) and never emits the Python 2
``str`` opcodes (SHORT_BINSTRING / BINSTRING) that make ``encoding="latin1"`` necessary.
"""

from __future__ import annotations

import struct

import numpy as np


def _string(data: bytes) -> bytes:
    """A Python 2 ``str``: SHORT_BINSTRING ('U') below 256 bytes, else BINSTRING ('T')."""
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data
    return b"T" + struct.pack("<i", len(data)) + data


def _int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])  # BININT1
    return b"J" + struct.pack("<i", value)  # BININT


def _tuple(items: list[bytes]) -> bytes:
    if not items:
        return b")"  # EMPTY_TUPLE
    if len(items) <= 3:
        return b"".join(items) + {1: b"\x85", 2: b"\x86", 3: b"\x87"}[len(items)]  # TUPLE1..3
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _dtype(dtype: np.dtype) -> bytes:
    """numpy.dtype('f4', 0, 1) with state (3, '<', None, None, None, -1, -1, 0), as numpy 1.x pickles it."""
    code = f"{dtype.kind}{dtype.itemsize}".encode()
    order = b"|" if dtype.itemsize == 1 else b"<"
    state = [_int(3), _string(order), b"N", b"N", b"N", _int(-1), _int(-1), _int(0)]
    return _global("numpy", "dtype") + _tuple([_string(code), _int(0), _int(1)]) + b"R" + _tuple(state) + b"b"


def _array(array: np.ndarray) -> bytes:
    """_reconstruct(ndarray, (0,), 'b') then BUILD with (1, shape, dtype, fortran, raw bytes as a py2 str)."""
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    head = _global("numpy.core.multiarray", "_reconstruct") + _tuple(
        [_global("numpy", "ndarray"), _tuple([_int(0)]), _string(b"b")]) + b"R"
    state = _tuple([_int(1), _tuple([_int(d) for d in array.shape]), _dtype(array.dtype), b"\x89",
                    _string(array.tobytes())])  # NEWFALSE: C order
    return head + state + b"b"


def _value(value) -> bytes:
    if isinstance(value, np.ndarray):
        return _array(value)
    if isinstance(value, dict):
        return _dict(value)
    if isinstance(value, str):
        return _string(value.encode("latin-1"))
    raise TypeError(type(value))


def _dict(d: dict) -> bytes:
    body = b"".join(_string(k.encode("latin-1")) + _value(v) for k, v in d.items())
    return b"}(" + body + b"u"  # EMPTY_DICT, MARK, key/value pairs, SETITEMS


def dumps(obj: dict) -> bytes:
    """A protocol-2 pickle of a dict of (dicts of) numpy arrays, byte-for-byte in Python 2's style."""
    return b"\x80\x02" + _dict(obj) + b"."
