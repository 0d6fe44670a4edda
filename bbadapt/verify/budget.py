"""How much memory the equivalence check will need, known before any image is allocated.

The check runs every probe batch (6 images a size by default) through the original net in
float32 and float64 and through the adapted net, and keeps every probe's output for the
comparison. Its peak therefore grows with the pixel count: ``--sizes 5000x5000`` on a
ResNet-50 needs tens of GB. Rather than letting the kernel's OOM killer (or a native
allocation failure deep inside MXNet) end the run, the need is estimated from the network's
own activation shapes, read off its symbolic graph at a small size and scaled by pixels, and
refused with the estimate when it exceeds what the machine can give.
"""

from __future__ import annotations

import os
from pathlib import Path

from bbadapt.platform.errors import ResourceError

PROBE_SIDE = 64  # the size the activation shapes are read at; they scale with the pixel count
# Peak growth per activation element of one image, measured with benchmarks/bench_check_memory.py:
# 3.5-3.6 bytes on resnet18_v1 at 448x448 and 896x896 (float64 run dominates; not every
# intermediate is alive at once), but 5.5 in one full `make test` run (resident growth 852 MB at
# 384x384, 6 images, beside another busy test worker; 648 MB alone). 7 keeps a margin above
# both, so a refusal errs on the safe side. The exact-aware verdict added two float64 runs of the adapted net
# (its twin and the one-ulp yardstick) whose probes are kept: 7.5 measured by tests/verify/test_budget.py
# (1.14 GB at 384x384, 6 images, beside a busy worker), so 9.
BYTES_PER_ACTIVATION = 9.0


def activation_elements_per_pixel(net) -> float:
    """Elements of every intermediate output of ``net`` per input pixel, for one image."""
    from bbadapt.core.rewrite import clone

    return activation_elements(clone(net, trainable=False), (1, 3, PROBE_SIDE, PROBE_SIDE)) / float(PROBE_SIDE * PROBE_SIDE)


def activation_elements(block, shape: tuple[int, ...]) -> int:
    """Elements of every intermediate output of the (eager) ``block`` fed one input of ``shape``, read off its
    symbolic graph (nothing is allocated); a block with several outputs counts them all."""
    import mxnet as mx

    out = block(mx.sym.var("data"))
    internals = (mx.sym.Group(list(out)) if isinstance(out, (list, tuple)) else out).get_internals()
    outputs = [name for name in internals.list_outputs() if name.endswith("_output")]
    _, shapes, _ = internals.infer_shape_partial(data=shape)
    by_name = dict(zip(internals.list_outputs(), shapes or [], strict=False))
    return sum(int(_product(by_name[name])) for name in outputs if by_name.get(name))


def _product(shape) -> int:
    result = 1
    for d in shape:
        result *= int(d)
    return result


def check_bytes(per_pixel: float, sizes: list[tuple[int, int]], images_per_size: int) -> int:
    """Estimated peak bytes of the check for these sizes (the largest batch dominates, probes add up)."""
    pixels = [h * w for h, w in sizes]
    largest = max(pixels) * images_per_size * per_pixel * BYTES_PER_ACTIVATION
    inputs = sum(pixels) * images_per_size * 3 * (8 + 4 + 4)  # raw batches in float64 and float32 copies
    return int(largest + inputs)


def available_bytes() -> int:
    """Memory this process can still get: MemAvailable, capped by a cgroup limit when there is one."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:
                available = min(available, int(limit) - int(Path(usage_file).read_text().strip()))
            break
        except (OSError, ValueError):
            continue
    return max(int(available), 0)


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB"


def require_check_memory(net, sizes: list[tuple[int, int]], images_per_size: int) -> int:
    """Refuse (one line, before allocating) a check that would not fit in memory; return the estimate."""
    need = check_bytes(activation_elements_per_pixel(net), sizes, images_per_size)
    have = available_bytes()
    if need > have:
        largest = max(sizes, key=lambda s: s[0] * s[1])
        raise ResourceError(f"the check at {largest[0]}x{largest[1]} needs about {_gb(need)} of memory and "
                            f"{_gb(have)} is available; choose smaller --sizes")
    return need
