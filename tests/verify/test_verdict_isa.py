"""The verdict does not depend on the CPU: the same cases, under every oneDNN instruction set, say the same.

MXNet's oneDNN picks its float32 kernels by the CPU's instruction set, and float32 rounding
moves with them: on an AVX-512 machine an exact fused conversion of cifar_resnet20_v1 (seed
2) was reported FAILED under the old float32 rule and PASSED under ``DNNL_MAX_CPU_ISA=AVX2``.
Each configuration below runs in its own process (oneDNN reads the variable once): SSE4.1,
AVX2, AVX-512 and the machine's default, plus MXNet without oneDNN at all. An instruction set
the CPU lacks falls back to the best one it has, so every configuration runs anywhere; the
verdicts, the decisive figures' pass/fail and the probes named must agree, and be right.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGURATIONS = {
    "SSE41": {"DNNL_MAX_CPU_ISA": "SSE41"},
    "AVX2": {"DNNL_MAX_CPU_ISA": "AVX2"},
    "AVX512_CORE": {"DNNL_MAX_CPU_ISA": "AVX512_CORE"},
    "default": {},
    "no-oneDNN": {"MXNET_MKLDNN_ENABLED": "0"},
}

# The command line case through the API the CLI calls, then exact and defective adaptations of a
# trained-like ResNet-18 v1b (one per BN form) sharing one reference.
SCRIPT = r"""
import json, sys, tempfile
import mxnet as mx
import numpy as np
import bbadapt
from bbadapt.core import zoo
from bbadapt.core.spec import parse_spec
from bbadapt.pipeline import calibration_images
from bbadapt.verify.equivalence import CheckOptions, check, reference
from tests import trained_like
from tests.verify.test_verdict_matrix import DEFECTS

out = {}
with tempfile.TemporaryDirectory() as tmp:
    report, _ = bbadapt.convert("cifar_resnet20_v1", tmp + "/c20", bbadapt.ConvertOptions(
        weights="random", seed=2, target="rgb255", fold="bn", bn="fused"))
    out["cli-case"] = (report["verdict"], report["worst_yardstick_ratio"] <= 1.0)
info = zoo.model_info("resnet18_v1b")
source = parse_spec(info.source_spec)
net = zoo.build("resnet18_v1b")
raw, _ = calibration_images(info)
trained_like.make(net, 5, source.normalize(raw[:4]), "trained-like")
ref = reference(net, source, CheckOptions(sizes=[(40, 40), (37, 45)], n_photos=1))
for bn in ("global-stats", "affine", "fused"):
    r = check(net, source, bbadapt.adapt(net, source, "bgr255", bn=bn), ref=ref)
    out[f"exact-{bn}"] = (r["verdict"], [p["passed"] for p in r["probes"]])
for name, inject in DEFECTS.items():
    adapted = bbadapt.adapt(net, source, "rgb255", bn="affine")
    inject(adapted, net)
    r = check(net, source, adapted, ref=ref)
    out[name] = (r["verdict"], [p["passed"] for p in r["probes"]])
print("VERDICTS " + json.dumps(out))
"""


# Both tests read one module fixture (a subprocess per instruction set, about 100 s): on one xdist worker it runs
# once; spread over two, each worker ran it (seen in make test's durations: 99 s setup twice).
pytestmark = pytest.mark.xdist_group("verdict-isa")


def _verdicts(configuration: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DNNL_MAX_CPU_ISA", "MXNET_MKLDNN_ENABLED")}
    env.update(configuration, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("VERDICTS "))
    return json.loads(line[len("VERDICTS "):])


@pytest.fixture(scope="module")
def verdicts() -> dict[str, dict]:
    return {name: _verdicts(env) for name, env in CONFIGURATIONS.items()}


def test_every_instruction_set_gives_the_same_verdicts(verdicts):
    first, *rest = verdicts.values()
    for name, got in verdicts.items():
        assert got == first, (name, got, first)
    assert len(rest) == len(CONFIGURATIONS) - 1


def test_the_verdicts_are_right_under_every_instruction_set(verdicts):
    for name, got in verdicts.items():
        assert got["cli-case"] == ["PASSED", True], name
        for bn in ("global-stats", "affine", "fused"):
            assert got[f"exact-{bn}"][0] == "PASSED" and all(got[f"exact-{bn}"][1]), (name, bn)
        for defect in ("wrong-channel-order", "bn-scale-twice", "eps-dropped", "one-weight-1e-4"):
            assert got[defect][0] == "FAILED" and False in got[defect][1], (name, defect)
