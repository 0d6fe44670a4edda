"""Freed memory goes back to the operating system between a check's steps, so its peak is its largest step.

glibc serves a block of at least ``M_MMAP_THRESHOLD`` bytes with its own ``mmap`` and returns it
on free, but it *raises* that threshold to the size of each such block freed (up to 32 MB). After
the first freed activations, the later ones (float64 feature maps, a RoI head's chunks) come from
the heap, and a heap's free pages stay resident: measured on ``bbadapt export --torchvision`` of a
ResNet-50 C4 detector, the resident size at the start of each step crept from 1.7 to 3.3 GB over
three photos, and the peak was 5.9 GB.

Two ways out, both glibc's own: a fixed low threshold (``MALLOC_MMAP_THRESHOLD_``, what ``make
test`` sets for its workers) maps and unmaps every large block, and every new block's pages are
faulted in and zeroed again, which made ``convert resnet152_v2`` 1.4x slower, measured; or
``malloc_trim(0)`` between steps, which hands back the heap's free pages a few times per check at
the cost of one walk over the heap and of faulting the pages in again. The torchvision export's
check does the latter (:func:`release_free_memory`) after each float64 run and photo: 0.74x the
peak (5.9 -> 4.3 GB, with its other changes) at 0.96x the time. ``convert``'s check does not:
trimming after each of its batches cut a ResNet-152's peak to 0.77x but cost 1.16x the time, and
the issue asks for both. Where the C library is not glibc (musl, macOS) there is no such call and nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Give the heap's free pages back to the operating system (glibc ``malloc_trim(0)``); True if any were."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
