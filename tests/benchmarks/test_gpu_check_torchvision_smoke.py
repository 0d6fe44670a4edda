"""``benchmarks/gpu_check_torchvision.py --cpu --smoke``: the torchvision export's GPU check, on the CPU.

The script a GPU owner runs (issue 13: equivalence with the model on CUDA, TF32 off, then 50
training steps) with the same steps, here with the model on the CPU, a C4 detector only,
small check sizes and 5 training steps: it keeps the script working, not its GPU numbers.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_torchvision_gpu_check_exports_rechecks_and_trains_on_the_cpu(tmp_path):
    summary = tmp_path / "summary.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check_torchvision.py"), "--cpu", "--smoke",
                             "--layouts", "c4", "--out", str(summary)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = json.loads(summary.read_text())
    assert found["passed"] and found["device"] == "cpu" and found["model"] == "resnet18_v1b"
    c4 = found["c4"]
    assert c4["device_check"]["passed"] and c4["device_check"]["worst_rms_ratio"] <= 1.0
    assert c4["cpu_check"].startswith("backbone max rel ")
    trained = c4["training"]
    assert trained["steps"] == 5 and trained["image_size"] == [128, 160]
    assert all(math.isfinite(v) for v in trained["losses"]) and trained["last_mean"] < trained["first_mean"]
    assert "c4: cpu equivalence (TF32 off): PASSED" in result.stdout
