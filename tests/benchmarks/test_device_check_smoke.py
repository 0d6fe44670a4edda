"""``benchmarks/device_check.sh --cpu --smoke``: the one-GPU device check, on the CPU (issue 20, item 8).

The script a GPU owner runs, with the same steps: doctor, the seeded C4 and FPN exports built from
the shipped configs (resnet18_v1b in smoke mode), ``bbadapt train`` of each (float32 and --amp,
here bfloat16 on the CPU) and ``bbadapt evaluate`` through the torch engine, the three BN forms
timed, one table. It keeps the script working, not its GPU numbers. The train and evaluate steps
need the torch engine (bbadapt/engines/torch): they are called, never skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_device_check_runs_every_step_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE_CHECK_DIR": str(tmp_path)}
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "device_check.sh"), "--cpu", "--smoke"],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=1800)  # a hang guard, not a speed assertion
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records}
    failed = [f"{r['step']}: {r['note']}" for r in records if not r["passed"]]
    assert result.returncode == 0 and not failed, "\n".join(failed) + "\n" + result.stdout[-4000:] + result.stderr[-2000:]
    for name in ["doctor", "build", "bench", *(f"{what} {layout} {p}" for what in ("train", "evaluate")
                                               for layout in ("c4", "fpn") for p in ("fp32", "amp"))]:
        assert name in steps, (name, sorted(steps))
    for layout in ("c4", "fpn"):
        forms = {r["form"]: r for r in records if r.get("layout") == layout}
        assert set(forms) == {"eval BatchNorm2d", "FrozenBatchNorm2d", "fused"}
        assert all(r["train_ms"] > 0 and r["infer_ms"] > 0 for r in forms.values())
        assert forms["fused"]["train_speedup_vs_eval_bn"] > 0
    # every recorded step (doctor, build, 4 trains, 4 evaluates, bench and its 6 forms) passed, as the table says
    assert f"{len(records)}/{len(records)} steps passed" in result.stdout and len(records) == 17
    assert "vs eval BN" in result.stdout
