"""``bbadapt train --horovod`` under a real ``horovodrun``: 2 workers on this machine's CPU, Gloo over loopback.

Horovod must be installed (``make test`` installs it: scripts/horovod-wheel.sh); without it these
tests fail, they do not skip. They run outside the xdist pool (``-m horovod``): each job is two
worker processes. Every job has a hard deadline, and every process it started (horovodrun, its
helpers, both workers) is killed by PID when the test ends, whatever happened.

The bundle is the one of tests/engines/gluon/test_train.py (resnet18_v1b, seeded random weights, rgb255,
BN affine, RPN/ROI counts for 128-px images); the data are 6 real raccoon photos shipped in
tests/data/raccoon_voc (4 to train on, 2 to validate on).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bbadapt.engines.gluon.distributed import parameter_digest
from bbadapt.engines.gluon.train import load_quietly
from tests.engines.gluon.raccoon import raccoon_voc
from tests.engines.gluon.test_train import make_bundle

pytestmark = pytest.mark.horovod

ROOT = Path(__file__).resolve().parents[3]
TRAIN_IMAGES, VAL_IMAGES = [1, 2, 3, 4], [5, 6]
HOROVODRUN = Path(sys.executable).parent / "horovodrun"
TRAIN = ["--horovod", "--cpu", "--lr", "0.0002", "--short-side", "128", "--max-size", "192", "--log-interval", "1"]
JOB_DEADLINE_S = 420  # a 2-epoch job takes well under a minute here; this only stops a hung job
FAILURE_DEADLINE_S = 60  # the promise: a job with a dead or failing worker ends within this


# ----------------------------------------------------------------------------- a horovodrun job


class HorovodJob:
    """``horovodrun -np 2 -H localhost:2 --gloo --network-interface lo COMMAND`` with its processes tracked.

    horovodrun starts each worker in a session of its own, so killing horovodrun's process
    group would miss them: the job records every descendant it sees while it runs (workers
    included) and kills each of them, by PID, on exit.
    """

    def __init__(self, command: list, output: Path):
        self.command, self.output = [str(c) for c in command], output
        self.seen: dict[int, object] = {}  # pid -> psutil.Process (which refuses to signal a reused pid)

    def __enter__(self) -> HorovodJob:
        assert HOROVODRUN.is_file(), (f"horovod is not installed in {Path(sys.executable).parent.parent}: "
                                      "`make test` installs it (scripts/horovod-wheel.sh)")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1", "HOROVOD_LOG_LEVEL": "warning"}
        self._out = self.output.open("wb")
        self.proc = subprocess.Popen([str(HOROVODRUN), "-np", "2", "-H", "localhost:2", "--gloo",
                                      "--network-interface", "lo", *self.command],
                                     stdout=self._out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.track()
        return self

    def track(self) -> None:
        import psutil

        try:
            for child in [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]:
                self.seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass

    def worker(self, rank: int):
        """The worker process of ``rank`` (its environment says HOROVOD_RANK)."""
        import psutil

        for proc in list(self.seen.values()):
            try:
                if proc.environ().get("HOROVOD_RANK") == str(rank) and "python" in proc.name():
                    return proc
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return None

    def until(self, condition, timeout: float, what: str):
        """Poll ``condition()`` (tracking new processes) until it is true; fail after ``timeout``."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.track()
            value = condition()
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"the job ended (exit {self.proc.returncode}) before {what}:\n{self.text()}")
            time.sleep(0.05)
        raise AssertionError(f"no {what} within {timeout} s:\n{self.text()}")

    def wait(self, timeout: float) -> int:
        end = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > end:
                raise AssertionError(f"horovodrun still running after {timeout} s:\n{self.text()}")
            self.track()
            time.sleep(0.1)
        return self.proc.returncode

    def text(self) -> str:
        self._out.flush()
        return self.output.read_text(errors="replace")[-6000:]

    def __exit__(self, *exc) -> None:
        import psutil

        self.track()
        for proc in self.seen.values():
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(list(self.seen.values()), timeout=10)
        self.proc.wait(timeout=10)
        self._out.close()


def horovod_train(directory: Path, voc: Path, *args, output: Path, deadline: float = JOB_DEADLINE_S):
    """Run ``bbadapt train DIR --horovod ...`` on 2 workers to its end; (exit code, output text)."""
    command = [sys.executable, "-m", "bbadapt.cli", "train", directory, "--dataset", f"voc:{voc}", *TRAIN, *args]
    with HorovodJob(command, output) as job:
        code = job.wait(deadline)
        return code, job.text()


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return raccoon_voc(tmp_path_factory.mktemp("voc"), TRAIN_IMAGES, VAL_IMAGES)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundles") / "frcnn", ["raccoon"])


@pytest.fixture(scope="module")
def two_epochs(bundle, voc, tmp_path_factory):
    """The bundle trained for 2 epochs by 2 Horovod workers, global batch 2 (1 image per worker per step)."""
    out = tmp_path_factory.mktemp("hvd") / "frcnn"
    shutil.copytree(bundle, out)
    code, text = horovod_train(out, voc, "--epochs", "2", "--batch-size", "2", output=out.parent / "job.txt")
    assert code == 0, text
    return out, text


def records(directory: Path, event: str) -> list[dict]:
    lines = (directory / "train.log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def worker_tracebacks(text: str) -> list[str]:
    """Traceback lines the workers printed (horovodrun prefixes their lines with [rank]; its own
    report of a failed job is a traceback of horovodrun, not of bbadapt)."""
    return [line for line in text.splitlines() if line.startswith(("[0]", "[1]")) and "Traceback" in line]


def checkpoint_files(directory: Path) -> dict[str, bytes]:
    root = directory / "checkpoints"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in (directory / "checkpoints").iterdir() if ".partial-" in p.name or ".old-" in p.name]


# ----------------------------------------------------------------------------- 1. a whole run


def test_two_workers_two_epochs_write_each_checkpoint_once_and_end_with_equal_parameters(two_epochs, bundle):
    out, text = two_epochs
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "epoch-0001", "epoch-0002", "last"]
    # rank 0 alone logs: one record per epoch, validation and checkpoint, none twice
    epochs = records(out, "epoch")
    assert [r["epoch"] for r in epochs] == [1, 2] and {r["workers"] for r in epochs} == {2}
    assert [r["epoch"] for r in records(out, "val")] == [1, 2]
    assert [Path(r["path"]).name for r in records(out, "checkpoint")] == ["epoch-0001", "epoch-0002"]
    assert (out / "checkpoints/last/detector.params").read_bytes() == \
        (out / "checkpoints/epoch-0002/detector.params").read_bytes()
    assert text.count("trained epochs 1..2") == 1  # the closing line: rank 0 only
    # the final parameters of the two workers are bitwise equal, and they are what rank 0 saved
    (finish,) = records(out, "finish")
    assert finish["workers"] == 2 and len(finish["param_digests"]) == 2
    assert finish["param_digests"][0] == finish["param_digests"][1]
    assert parameter_digest(load_quietly(out / "checkpoints" / "last", None)) == finish["param_digests"][0]
    assert parameter_digest(load_quietly(bundle, None)) != finish["param_digests"][0]  # it trained


def test_batch_size_is_the_global_batch_split_over_the_workers(two_epochs):
    """--batch-size 2 on 2 workers: 1 image per worker per step, so the 4 training images are 2
    steps per epoch (a per-worker batch of 2 would be 1 step), and samples/s counts both workers."""
    out, _ = two_epochs
    iters = records(out, "iter")
    assert [(r["epoch"], r["batch"], r["batches"]) for r in iters] == [(1, 0, 2), (1, 1, 2), (2, 0, 2), (2, 1, 2)]
    assert [r["iteration"] for r in iters] == [1, 2, 3, 4]
    (finish,) = records(out, "finish")
    assert finish["iteration"] == 4


def test_default_options_run_one_image_per_worker(bundle, voc, tmp_path):
    """No --batch-size under horovodrun -np 2: one image per device per worker, a global batch of 2
    (it used to stop with "--batch-size 1 ... must be a multiple of the 2 workers")."""
    out = tmp_path / "frcnn"
    shutil.copytree(bundle, out)
    code, text = horovod_train(out, voc, "--epochs", "1", output=tmp_path / "job.txt")
    assert code == 0, text
    assert not worker_tracebacks(text)
    iters = records(out, "iter")
    assert [(r["epoch"], r["batch"], r["batches"]) for r in iters] == [(1, 0, 2), (1, 1, 2)]
    (finish,) = records(out, "finish")
    assert finish["workers"] == 2 and finish["param_digests"][0] == finish["param_digests"][1]
    stored = json.loads((out / "checkpoints" / "last" / "manifest.json").read_text())["checkpoint"]["config"]
    assert stored["batch_size"] == 2  # the resolved global batch is what a --resume must match


def test_batch_size_not_divisible_by_the_workers_is_refused(bundle, voc, tmp_path):
    out = tmp_path / "frcnn"
    shutil.copytree(bundle, out)
    code, text = horovod_train(out, voc, "--epochs", "1", "--batch-size", "3", output=tmp_path / "job.txt",
                               deadline=FAILURE_DEADLINE_S * 3)
    assert code != 0
    for rank in (0, 1):  # both refuse, before any collective
        assert f"[{rank}]<stderr>:bbadapt: error: --batch-size 3 (the global batch, over all workers) must be a " \
               "multiple of the 2 workers x 1 device(s)" in text, text
    assert not worker_tracebacks(text) and not (out / "checkpoints").exists()


def test_resume_under_horovod_continues_the_run_exactly(two_epochs, bundle, voc, tmp_path):
    """1 epoch, then --resume to 2: the same parameters, bit for bit, as the uninterrupted run
    (the per-epoch split of the images and the seeds are functions of the epoch)."""
    out = tmp_path / "frcnn"
    shutil.copytree(bundle, out)
    code, text = horovod_train(out, voc, "--epochs", "1", "--batch-size", "2", output=tmp_path / "first.txt")
    assert code == 0, text
    code, text = horovod_train(out, voc, "--epochs", "2", "--batch-size", "2", "--resume",
                               output=tmp_path / "resumed.txt")
    assert code == 0, text
    assert [r["epoch"] for r in records(out, "epoch")] == [1, 2]
    (_, finish) = records(out, "finish")
    (uninterrupted,) = records(two_epochs[0], "finish")
    assert finish["param_digests"] == uninterrupted["param_digests"]


# ----------------------------------------------------------------------------- 2. a worker dies or fails


def start_and_wait_for_first_checkpoint(job: HorovodJob, out: Path) -> dict[str, bytes]:
    """Wait for epoch 1's checkpoint record (written after epoch-0001, last and best); their bytes."""
    job.until(lambda: (out / "train.log.jsonl").is_file() and records(out, "checkpoint"), JOB_DEADLINE_S,
              "first checkpoint")
    return checkpoint_files(out)


def test_a_killed_worker_ends_the_job_and_leaves_the_checkpoints_alone(bundle, voc, tmp_path):
    out = tmp_path / "frcnn"
    shutil.copytree(bundle, out)
    command = [sys.executable, "-m", "bbadapt.cli", "train", out, "--dataset", f"voc:{voc}", *TRAIN,
               "--epochs", "4", "--batch-size", "2"]
    with HorovodJob(command, tmp_path / "job.txt") as job:
        before = start_and_wait_for_first_checkpoint(job, out)
        rank1 = job.until(lambda: job.worker(1), 10, "worker of rank 1")
        rank1.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        code = job.wait(FAILURE_DEADLINE_S)
        assert time.monotonic() - killed_at < FAILURE_DEADLINE_S
    assert code != 0
    assert sorted(before) == sorted(checkpoint_files(out)) and before == checkpoint_files(out)
    assert leftovers(out) == []


def test_a_worker_that_raises_ends_the_job_and_leaves_the_checkpoints_alone(bundle, voc, tmp_path):
    """Rank 0 fails writing epoch 2's checkpoint (a file is in the way: a real OutputError)
    while rank 1 waits for it in a collective."""
    out = tmp_path / "frcnn"
    shutil.copytree(bundle, out)
    command = [sys.executable, "-m", "bbadapt.cli", "train", out, "--dataset", f"voc:{voc}", *TRAIN,
               "--epochs", "3", "--batch-size", "2"]
    with HorovodJob(command, tmp_path / "job.txt") as job:
        before = start_and_wait_for_first_checkpoint(job, out)
        (out / "checkpoints" / "epoch-0002").write_text("in the way\n")
        job.until(lambda: records(out, "val")[1:] or job.proc.poll() is not None, JOB_DEADLINE_S,
                  "epoch 2 validation")  # rank 0 raises right after it
        failed_at = time.monotonic()
        code = job.wait(FAILURE_DEADLINE_S)
        assert time.monotonic() - failed_at < FAILURE_DEADLINE_S
        text = job.text()
    assert code != 0
    assert "[0]<stderr>:bbadapt: error: output " in text and "epoch-0002 exists and is not a directory" in text, text
    # told in the end-of-epoch allgather, not by Horovod's shutdown inside MXNet's engine (which once segfaulted)
    assert ("[1]<stderr>:bbadapt: error: worker 1: another worker of this Horovod job failed at the end of epoch 2 "
            "(worker 0: output ") in text, text
    assert "Segmentation fault" not in text, text
    assert not worker_tracebacks(text), text
    (out / "checkpoints" / "epoch-0002").unlink()
    assert before == checkpoint_files(out)
    assert leftovers(out) == []


# ----------------------------------------------------------------------------- 3. gradient averaging


def test_horovod_averages_gradients_like_one_process_on_the_combined_batch(bundle, voc, tmp_path):
    """Worker r trains on image r; the gradient SGD applies after Horovod's allreduce equals the
    mean of both images' gradients computed in one process (same samples drawn)."""
    script = Path(__file__).with_name("horovod_gradient_step.py")
    with HorovodJob([sys.executable, script, bundle, voc, tmp_path / "hvd", "--horovod"], tmp_path / "job.txt") as job:
        assert job.wait(JOB_DEADLINE_S) == 0, job.text()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    single = subprocess.run([sys.executable, script, bundle, voc, tmp_path / "one"], env=env, capture_output=True,
                            text=True, timeout=JOB_DEADLINE_S)
    assert single.returncode == 0, single.stderr
    rank0, rank1 = (np.load(tmp_path / "hvd" / f"grad-rank{r}.npz") for r in (0, 1))
    reference = np.load(tmp_path / "one" / "grad-rank0.npz")
    assert sorted(rank0.files) == sorted(reference.files) and len(reference.files) > 10
    for name in reference.files:
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)  # every worker applies the same
        ref = reference[name]
        scale = max(float(np.abs(ref).max()), 1e-12)
        np.testing.assert_allclose(rank0[name], ref, rtol=0, atol=1e-6 * scale, err_msg=name)
    assert any(np.abs(reference[n]).max() > 0 for n in reference.files)
