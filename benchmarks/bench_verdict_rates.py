"""False-FAIL and false-PASS rates of the check's verdict, measured, for the old float32 rule and the float64 one.

Exact conversions (a false FAIL is any FAILED): CIFAR ResNet-20 v1 and v2 x three BatchNorm forms
x seeds x two size sets, with calibrated random weights, and ResNet-18 v1b with trained-like and
extreme statistics (tests/trained_like.py). Defective conversions (a false PASS is any PASSED):
the four defects of tests/verify/test_verdict_matrix.py in each BN form. Each configuration runs
in its own process under a oneDNN instruction-set cap (``--isa``, repeatable; ``default`` is the
machine's own); the same table comes out for each.

The *old rule* is recomputed from each report's float32 figures: max rel within max(1e-5, 2x the
original's own float32 error) and the adapted net's float32 RMS error against float64 at most 2x
the original's, the rule before the float64 twin decided.

    .venv/bin/python benchmarks/bench_verdict_rates.py --seeds 5 --isa SSE41 --isa AVX2 --isa default
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys
import bbadapt
from bbadapt.core import zoo
from bbadapt.core.spec import parse_spec
from bbadapt.pipeline import calibration_images
from bbadapt.verify.equivalence import CheckOptions, check, reference
from tests import trained_like
from tests.verify.test_verdict_matrix import DEFECTS

seeds = int(sys.argv[1])

def old_rule(report):
    return all(p["fp64"]["ratio"] <= 2.0 and p["max_rel"] <= max(1e-5, 2 * p["fp64"]["original"] / p["ref_max_abs"])
               for p in report["probes"])

rows = []
def record(kind, model, regime, bn, report):
    rows.append({"kind": kind, "model": model, "regime": regime, "bn": bn, "new": report["passed"],
                 "old": old_rule(report), "ratio": report["worst_yardstick_ratio"]})

for model in ("cifar_resnet20_v1", "cifar_resnet20_v2"):
    info = zoo.model_info(model)
    source = parse_spec(info.source_spec)
    raw, _ = calibration_images(info)
    for seed in range(seeds):
        net = zoo.build(model)
        trained_like.make(net, seed, source.normalize(raw), "calibrated")
        for sizes in ([(32, 32), (37, 29)], [(40, 40), (33, 45)]):
            ref = reference(net, source, CheckOptions(sizes=sizes, cifar=True))
            for bn in ("global-stats", "affine", "fused"):
                record("exact", model, "calibrated", bn, check(net, source, bbadapt.adapt(net, source, "rgb255", bn=bn), ref=ref))
info = zoo.model_info("resnet18_v1b")
source = parse_spec(info.source_spec)
raw, _ = calibration_images(info)
for regime in ("trained-like", "extreme"):
    net = zoo.build("resnet18_v1b")
    trained_like.make(net, 1, source.normalize(raw[:4]), regime)
    ref = reference(net, source, CheckOptions(sizes=[(64, 64), (45, 53)], n_photos=1))
    for bn in ("global-stats", "affine", "fused"):
        record("exact", "resnet18_v1b", regime, bn, check(net, source, bbadapt.adapt(net, source, "bgr255", bn=bn), ref=ref))
        for name, inject in DEFECTS.items():
            adapted = bbadapt.adapt(net, source, "rgb255", bn=bn)
            inject(adapted, net)
            record(name, "resnet18_v1b", regime, bn, check(net, source, adapted, ref=ref))
print("ROWS " + json.dumps(rows))
"""


def run(isa: str, seeds: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "DNNL_MAX_CPU_ISA"}
    if isa != "default":
        env["DNNL_MAX_CPU_ISA"] = isa
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", WORKER, str(seeds)], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(next(ln for ln in out.splitlines() if ln.startswith("ROWS "))[5:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--isa", action="append", default=None, help="DNNL_MAX_CPU_ISA value, or default (repeatable)")
    args = parser.parse_args()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    print(f"CPU: {cpu}")
    print("| ISA cap | exact conversions | false FAIL, old rule | false FAIL, new rule | defects | false PASS, old rule "
          "| false PASS, new rule | worst exact ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for isa in args.isa or ["default"]:
        rows = run(isa, args.seeds)
        exact = [r for r in rows if r["kind"] == "exact"]
        defects = [r for r in rows if r["kind"] != "exact"]
        print(f"| {isa} | {len(exact)} | {sum(not r['old'] for r in exact)} | {sum(not r['new'] for r in exact)} | "
              f"{len(defects)} | {sum(r['old'] for r in defects)} | {sum(r['new'] for r in defects)} | "
              f"{max(r['ratio'] for r in exact):.2f} |", flush=True)


if __name__ == "__main__":
    main()
