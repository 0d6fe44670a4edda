"""``benchmarks/device_check.sh --cpu --smoke``: the one-GPU device check, on the CPU (issue 20, item 8).

The script a GPU owner runs, with the same steps: doctor, the seeded C4 and FPN exports built from
the shipped configs (resnet18_v1b in smoke mode), ``bbadapt train`` of each (float32 and --amp,
here bfloat16 on the CPU) and ``bbadapt evaluate`` through the torch engine, the three BN forms
timed, one table. It keeps the script working, not its GPU numbers. The train and evaluate steps
need the torch engine (bbadapt/engines/torch): they are called, never skipped.

It runs in the torch engine's own environment (issue 20, item 7): ``.venv-torch``, which ``make test``
builds with ``pip install -e ".[torch]"`` and numpy 2, and which has no mxnet and no gluoncv, as a
PyTorch user's venv and the lent GPU machines have. ``BBADAPT_TORCH_ONLY_PYTHON`` names its interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TORCH_ONLY_PYTHON = os.environ.get("BBADAPT_TORCH_ONLY_PYTHON", str(REPO / ".venv-torch" / "bin" / "python"))
ENVIRONMENT = """
import importlib.util, json
import numpy, torch, torchvision
print(json.dumps({"numpy": numpy.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
                  "mxnet": importlib.util.find_spec("mxnet") is not None,
                  "gluoncv": importlib.util.find_spec("gluoncv") is not None}))
"""


def torch_only_python() -> str:
    """The torch-only venv's interpreter, after checking it is one: numpy 2, torch, no mxnet, no gluoncv."""
    assert Path(TORCH_ONLY_PYTHON).exists(), (
        f"{TORCH_ONLY_PYTHON} is missing: `make .venv-torch/.installed` builds the torch engine's venv (make test does)")
    found = subprocess.run([TORCH_ONLY_PYTHON, "-c", ENVIRONMENT], capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stderr[-2000:]
    versions = json.loads(found.stdout)
    assert int(versions["numpy"].split(".")[0]) >= 2 and not versions["mxnet"] and not versions["gluoncv"], versions
    return TORCH_ONLY_PYTHON


def test_the_device_check_runs_every_step_on_the_cpu_in_a_venv_without_mxnet(tmp_path):
    env = {**os.environ, "PYTHON": torch_only_python(), "DEVICE_CHECK_DIR": str(tmp_path)}
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "device_check.sh"), "--cpu", "--smoke"],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=1800)  # a hang guard, not a speed assertion
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records}
    failed = [f"{r['step']}: {r['note']}" for r in records if not r["passed"]]
    assert result.returncode == 0 and not failed, "\n".join(failed) + "\n" + result.stdout[-4000:] + result.stderr[-2000:]
    for name in ["doctor", "build", "bench", *(f"{what} {layout} {p}" for what in ("train", "evaluate")
                                               for layout in ("c4", "fpn") for p in ("fp32", "amp"))]:
        assert name in steps, (name, sorted(steps))
    # doctor in the torch-only venv: exit 0, the torch engine runs, no mxnet
    assert steps["doctor"]["note"].startswith("no usable mxnet; torch ") and "(exit 0)" in steps["doctor"]["note"]
    for layout in ("c4", "fpn"):
        forms = {r["form"]: r for r in records if r.get("layout") == layout}
        assert set(forms) == {"eval BatchNorm2d", "FrozenBatchNorm2d", "fused"}
        assert all(r["train_ms"] > 0 and r["infer_ms"] > 0 for r in forms.values())
        assert forms["fused"]["train_speedup_vs_eval_bn"] > 0
    # every recorded step (doctor, build, 4 trains, 4 evaluates, bench and its 6 forms) passed, as the table says
    assert f"{len(records)}/{len(records)} steps passed" in result.stdout and len(records) == 17
    assert "vs eval BN" in result.stdout
