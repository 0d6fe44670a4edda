"""``benchmarks/gpu_check.py --cpu --smoke``: every step of the GPU check, on the CPU at tiny sizes.

What a GPU owner runs is the same script with the same steps; running it here keeps it
working (its numbers mean nothing at these sizes). The run is a subprocess, as a user
starts it; the workdir is kept so the outputs of the steps can be looked at.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STEPS = ["doctor", "convert resnet18_v2", "detector (C4)", "train fp32 (3 it)", "train amp (CPU: refused)",
         "evaluate", "timing gluoncv", "timing bbadapt affine", "timing bbadapt fused"]


def test_the_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    work = tmp_path / "work"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu", "--smoke",
                             "--workdir", str(work)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = result.stdout[result.stdout.index("step "):].splitlines()
    rows = {line.split("|")[0].strip(): [cell.strip() for cell in line.split("|")[1:]] for line in table[2:]
            if "|" in line}
    assert list(rows) == STEPS
    assert all(cells[0] == "PASS" for cells in rows.values()), rows
    assert rows["doctor"][2].startswith("no: this mxnet is the CPU-only build")
    assert rows["convert resnet18_v2"][2].startswith("check PASSED")
    assert rows["train amp (CPU: refused)"][2].startswith("refused: --amp (mixed precision) needs GPUs; ")
    assert rows["evaluate"][2].startswith("voc07 mAP ")
    assert "gluoncv/this 1.00x on cpu(0)" in rows["timing gluoncv"][2]
    assert result.stdout.rstrip().endswith("all steps passed")
    log = [json.loads(line) for line in (work / "train-fp32" / "train.log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log if r["event"] == "iter"][-1] == 3  # one epoch over the smoke run's 3 photos
    assert (work / "train-fp32" / "checkpoints" / "last" / "detector.params").is_file()
    assert not (work / "train-amp" / "checkpoints").exists()
