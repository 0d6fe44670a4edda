"""How much memory a weights file may make a reader allocate, checked before allocating.

A file declares sizes (an HDF5 dataset's shape, a zip member's uncompressed size, a pickled
array's shape, a safetensors header's shapes) long before its bytes are read; a hostile
file declares gigabytes in a few bytes. Every reader checks what a file declares against
what it actually stores, before allocating:

* uncompressed formats (NDArray ``.params``, safetensors, numpy pickles) may not declare more
  bytes than the file holds: sizes are computed with Python integers (no int64 overflow);
* compressed storage (zip members, HDF5 chunks with filters) may expand by at most
  :data:`MAX_RATIO`, which real float32 weights never approach (they compress by ~1.1x);
* no single file may unpack to more than :data:`MAX_UNPACKED_BYTES` (the largest ResNet
  bbadapt reads, ResNet-152, is 0.24 GB of float32; the ImageNet-11k ResNet-50 0.11 GB).

With these, reading any file costs at most a small multiple of its real size: the target is
a peak resident size below twice the model's size plus 1 GB, whatever the file declares.
"""

from __future__ import annotations

import math
import zipfile

from bbadapt.platform.errors import WeightsError

MAX_RATIO = 20
MAX_UNPACKED_BYTES = 2 << 30
SMALL_BYTES = 64 << 10  # below this, a declared size is never worth refusing


def nbytes(shape, itemsize: int) -> int:
    """Bytes a C-order array of ``shape`` needs, exactly (Python ints: no int64 overflow)."""
    return math.prod(int(d) for d in shape) * int(itemsize)


def check_declared(declared: int, stored: int, origin: str, what: str, ratio: float = MAX_RATIO) -> None:
    """Refuse ``declared`` bytes backed by only ``stored`` bytes (times ``ratio``), or beyond the cap."""
    if declared > MAX_UNPACKED_BYTES:
        raise WeightsError(f"{origin}: {what} declares {declared:,} bytes, more than bbadapt reads from one file "
                           f"({MAX_UNPACKED_BYTES:,}); corrupt or hostile file, refused")
    if declared > max(stored * ratio, SMALL_BYTES):
        raise WeightsError(f"{origin}: {what} declares {declared:,} bytes but the file stores {stored:,} for it; "
                           "corrupt or hostile file, refused")


def check_zip(archive: zipfile.ZipFile, origin: str, members: list[str] | None = None) -> None:
    """Check the declared uncompressed sizes of ``members`` (default: all) before anything is inflated."""
    infos = archive.infolist() if members is None else [archive.getinfo(m) for m in members]
    total = 0
    for info in infos:
        check_declared(info.file_size, info.compress_size, origin, f"zip member {info.filename}")
        total += info.file_size
    check_declared(total, sum(i.compress_size for i in infos), origin, "the zip archive")


def check_hdf5_dataset(dataset, origin: str) -> None:
    """An HDF5 dataset may be read only if its storage is local and backs the shape it declares.

    Refused: external raw files and virtual datasets (they read other files on this machine),
    and shapes bigger than the bytes stored for them (an unwritten 32768x32768 dataset costs
    a few bytes in the file and 4 GB in memory).
    """
    import h5py

    where = f"dataset {dataset.name}"
    plist = dataset.id.get_create_plist()
    if plist.get_layout() not in (h5py.h5d.COMPACT, h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED) \
            or plist.get_external_count():
        raise WeightsError(f"{origin}: {where} keeps its data outside the file (external or virtual storage); refused")
    declared = nbytes(dataset.shape or (), dataset.dtype.itemsize)
    ratio = MAX_RATIO if plist.get_nfilters() else 1.0
    check_declared(declared, dataset.id.get_storage_size(), origin, where, ratio)
