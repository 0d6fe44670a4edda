"""A restricted unpickler for weight pickles: numpy arrays and plain containers, nothing else.

``pickle.load`` calls whatever global a file names (``os.system``, ``builtins.eval`` ...):
loading a ``.pkl`` from the internet is running its author's code. This unpickler
resolves only the few globals that rebuilding numpy arrays needs; any other global is
refused *before* it is called, with a :class:`~bbadapt.platform.errors.WeightsError` that names it.

Plain containers (dict, list, tuple, str, bytes, numbers, bool, None) need no global at
all: pickle has opcodes for them. What needs a global, and is allowed:

* ``numpy.core.multiarray._reconstruct`` + ``numpy.ndarray`` + ``numpy.dtype``: how numpy
  pickles arrays with protocols 0-4 (and how Python 2's numpy did: Detectron's files);
* ``numpy.core.numeric._frombuffer``: numpy's protocol-5 form;
* ``numpy.core.multiarray.scalar``: numpy scalars;
* ``collections.OrderedDict``: ordered state dicts;
* ``_codecs.encode`` with a latin-1 codec only: how Python 3 writes ``bytes`` at protocol 2.

``numpy._core`` (numpy 2) names are accepted as the same functions. Object-dtype arrays
are refused: their elements would be arbitrary objects.

Python 2 pickles store byte strings as ``str``; read them with ``encoding="latin1"``
(the default here), which maps each byte to one code point, exactly what numpy expects
when it restores array data written by Python 2.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
from pathlib import Path

import numpy as np

from bbadapt.platform.errors import WeightsError
from converters.readers.base import open_regular


class UnsafePickle(WeightsError):
    """A pickle that would call something a weights file has no need for: refused, never run."""


def _dtype(*args):
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise UnsafePickle("the pickle holds an object-dtype array; refused (its elements could be any object)")
    return dtype


def _reconstruct(subtype, shape, dtype):
    """numpy pickles an array as ``_reconstruct(ndarray, (0,), dtype)`` and sends shape and data with its state,
    whose size numpy checks against the bytes in the file; a bigger shape here allocates from nothing."""
    if subtype is not np.ndarray:
        raise UnsafePickle(f"the pickle rebuilds an array subclass {subtype!r}; refused")
    dims = shape if isinstance(shape, (tuple, list)) else (shape,)
    if not all(type(d) is int and d >= 0 for d in dims) or math.prod(dims) > 1:
        raise UnsafePickle(f"the pickle allocates an array of shape {tuple(dims)!r} before its data "
                           "(numpy writes (0,)); corrupt or hostile file, refused")
    return np.core.multiarray._reconstruct(np.ndarray, tuple(dims), _dtype(dtype))


def _frombuffer(buffer, dtype, shape, order):
    return np.core.numeric._frombuffer(buffer, _dtype(dtype), shape, order)


def _scalar(dtype, *args):
    return np.core.multiarray.scalar(_dtype(dtype), *args)


def _latin1_encode(text, encoding="utf-8"):
    if str(encoding).lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise UnsafePickle(f"the pickle asks for _codecs.encode with codec {encoding!r}; refused")
    return text.encode("latin-1")


ALLOWED = {}
for _numpy in ("numpy.core", "numpy._core"):
    ALLOWED.update({
        (f"{_numpy}.multiarray", "_reconstruct"): _reconstruct,
        (f"{_numpy}.multiarray", "scalar"): _scalar,
        (f"{_numpy}.numeric", "_frombuffer"): _frombuffer,
    })
ALLOWED.update({
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _latin1_encode,
})


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only :data:`ALLOWED` globals; no persistent ids, no out-of-band buffers."""

    def find_class(self, module: str, name: str):
        value = ALLOWED.get((module, name))
        if value is None:
            raise UnsafePickle(f"the pickle calls {module}.{name}, which a weights file has no need for; "
                               "refused (only numpy arrays and plain containers are loaded)")
        return value

    def persistent_load(self, pid):
        raise UnsafePickle("the pickle uses persistent ids (a torch/zip checkpoint?); refused")


def loads(data: bytes, origin: str = "pickle", encoding: str = "latin1"):
    """Unpickle ``data`` allowing only numpy arrays and plain containers."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
    except WeightsError as exc:
        raise type(exc)(f"{origin}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, UnicodeDecodeError, MemoryError, OverflowError) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise WeightsError(f"{origin}: not a readable pickle, or truncated/corrupt ({reason})") from None


def load(path: str | os.PathLike, encoding: str = "latin1"):
    path = Path(path)
    with open_regular(path) as f:
        data = f.read()
    return loads(data, origin=str(path), encoding=encoding)


def looks_like(head: bytes) -> bool:
    """A pickle starts with PROTO (protocol >= 2) or, for protocol 0/1, with one of a few opcodes."""
    if len(head) < 2:
        return False
    if head[0] == 0x80:
        return 2 <= head[1] <= 5
    return head[0] in b"(}]c"
