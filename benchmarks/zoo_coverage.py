"""Coverage table: every registered model, adapted and checked, with its worst error.

Not a test (tests/core/test_zoo_matrix.py asserts the same things): this prints the figures a
closing note or a release note quotes, one line per model, the worst max rel over the
exact modes (fold=bn x global-stats/affine/fused), the stem-interior error of fold=conv,
and whether the tolerance had to be raised because the original itself is ill-conditioned
in float32. Weights are seeded random with BN statistics calibrated on real photos.

    python benchmarks/zoo_coverage.py [--core] [--sizes 48x48,37x41]
"""

from __future__ import annotations

import argparse
import time

from bbadapt import adapt
from bbadapt.core import zoo
from bbadapt.core.spec import PRESETS
from bbadapt.core.weights import randomize
from bbadapt.verify import images
from bbadapt.verify.equivalence import CheckOptions, check, reference

BN_MODES = ("global-stats", "affine", "fused")


def calibrated(name: str):
    info = zoo.model_info(name)
    net = zoo.build(name)
    raw = images.cifar_tiles(16)[0] if info.is_cifar else images.photos((96, 96), limit=4)[0]
    randomize(net, 0, PRESETS[info.source_spec].normalize(raw))
    return net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--core", action="store_true", help="only the 33 core models")
    parser.add_argument("--sizes", default="48x48,37x41", help="check sizes for ImageNet models")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    models = [m for m in zoo.list_models() if m.core or not args.core]
    print(f"{'model':24} {'family':14} {'exact worst max rel':>20} {'conv interior':>14} {'raised':>7} {'ok':>4} "
          f"{'conclusive':>10} {'s':>5}")
    passed = 0
    for info in models:
        start = time.time()
        net = calibrated(info.name)
        ref = reference(net, info.source_spec, CheckOptions(sizes=[(32, 32), (37, 29)] if info.is_cifar else sizes,
                                                            n_photos=1, cifar=info.is_cifar))
        exact = [check(net, info.source_spec, adapt(net, info.source_spec, "rgb255", fold="bn", bn=bn), ref=ref)
                 for bn in BN_MODES]
        conv = check(net, info.source_spec, adapt(net, info.source_spec, "rgb255", fold="conv", bn="fused"), ref=ref)
        worst = max(r["worst_max_rel"] for r in exact)
        interior = conv["probes"][0]["interior"]["max_rel"]
        raised = any(r["tolerance"].get("raised") for r in exact)
        ok = all(r["passed"] for r in exact) and conv["passed"]
        passed += ok
        conclusive = all(r["conclusive"] for r in exact)
        print(f"{info.name:24} {info.family:14} {worst:20.2e} {interior:14.2e} {'yes' if raised else 'no':>7} "
              f"{'yes' if ok else 'NO':>4} {'yes' if conclusive else 'NO':>10} {time.time() - start:5.0f}", flush=True)
    print(f"\n{passed}/{len(models)} models pass in every mode")


if __name__ == "__main__":
    main()
