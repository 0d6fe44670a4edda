"""The suite's xdist groups hold: tests marked with one ``xdist_group`` run on one worker.

tests/core/test_zoo_matrix.py and tests/verify share a network and its float64 reference between the
tests of a group (an lru_cache per worker). Under pytest 9.2 with pytest-xdist 3.8 the groups were
silently ignored (pyproject.toml pins pytest < 9): every worker built them again. This runs a real
two-worker pytest on two grouped tests and reads which worker ran each.
"""

from __future__ import annotations

import os
import subprocess
import sys

GROUPED = '''
import os
import pytest

@pytest.mark.xdist_group("shared")
@pytest.mark.parametrize("k", range(4))
def test_grouped(k):
    with open(os.environ["GROUP_RECORD"], "a") as record:
        record.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")
'''


def test_tests_of_one_xdist_group_run_on_one_worker(tmp_path):
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    record = tmp_path / "workers.txt"
    result = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider",
                             "-v", "-c", "/dev/null", "--rootdir", str(tmp_path), str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**os.environ, "GROUP_RECORD": str(record)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    workers = record.read_text().split()
    assert len(workers) == 4 and len(set(workers)) == 1, (workers, result.stdout[-3000:])
    assert "test_grouped[0]@shared" in result.stdout
