"""Measured vs estimated memory of the equivalence check (calibrates bbadapt.verify.budget).

    python benchmarks/bench_check_memory.py resnet18_v1 448 896
    python benchmarks/bench_check_memory.py resnet50_v1b 448

Each size runs in a fresh process (peak RSS only grows); prints the estimate, the measured
growth of peak RSS during the check, and their ratio (the estimate must stay above 1x).
"""

from __future__ import annotations

import resource
import subprocess
import sys


def measure(name: str, side: int) -> None:
    from bbadapt.core import zoo
    from bbadapt.core.rewrite import adapt
    from bbadapt.verify.budget import activation_elements_per_pixel, check_bytes
    from bbadapt.verify.equivalence import CheckOptions, check

    net = zoo.build(name)
    adapted = adapt(net, "imagenet", "rgb255")
    per_pixel = activation_elements_per_pixel(net)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    check(net, "imagenet", adapted, options=CheckOptions(sizes=[(side, side)]))
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    estimate = check_bytes(per_pixel, [(side, side)], 6)
    print(f"| {name} | {side}x{side} | {per_pixel:.0f} | {estimate / 2**30:.2f} | {growth / 2**30:.2f} | "
          f"{estimate / max(growth, 1):.2f}x |", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--one":
        measure(sys.argv[2], int(sys.argv[3]))
    else:
        print("| model | size | activations/pixel | estimate GB | measured growth GB | estimate/measured |")
        print("| --- | --- | --- | --- | --- | --- |")
        for side in sys.argv[2:]:
            subprocess.run([sys.executable, __file__, "--one", sys.argv[1], side], check=True)
