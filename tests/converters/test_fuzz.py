"""A short, deterministic fuzz run of every reader and ``inspect`` (``make fuzz`` runs a long, random one).

Each target runs in its own process (``tests/converters/fuzz_readers.py``): a native crash in a
library fails this test with its output instead of taking the test session down.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .fuzz_readers import ALL_TARGETS

EXAMPLES = 25  # per target: seconds each; the Makefile's fuzz target runs thousands


@pytest.mark.parametrize("target", list(ALL_TARGETS))
def test_mutated_files_end_in_success_or_a_clean_one_line_error(target, tmp_path):
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
           "MXNET_HOME": str(tmp_path / "mxnet-home"), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([sys.executable, "-m", "tests.converters.fuzz_readers", target, "--examples",
                             str(EXAMPLES), "--derandomize"], cwd=root, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    assert f"{target}: {EXAMPLES} mutated files" in result.stdout
