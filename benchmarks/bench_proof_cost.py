"""What the proof costs: wall time and peak resident size, per phase, before and after (issue 22).

    .venv/bin/python benchmarks/bench_proof_cost.py --base ../wt-base          # the three figures, base vs this tree
    .venv/bin/python benchmarks/bench_proof_cost.py --base ../wt-base --only convert152
    .venv/bin/python benchmarks/bench_proof_cost.py --base ../wt-base --tests tests/verify/test_check.py

``--base`` is a checkout of the commit to compare with (``git worktree add ../wt-base <commit>``);
each figure runs there and here, alternately, in the same run (``--repeat`` times), each run a fresh
process with its own PYTHONPATH. The figures:

* ``convert152``: ``bbadapt convert resnet152_v2 --weights random`` (build, calibrate, adapt, check, write);
* ``detector``: ``bbadapt convert resnet50_v2 --weights random --detector faster-rcnn --classes raccoon``;
* ``torchvision``: ``bbadapt export --torchvision`` of that detector (C4, default sizes), on the base's own
  bundle for the base and this tree's for this tree;
* ``--tests FILES``: those pytest files with ``--durations``, under both trees (the suite is ~50 min: pick).

Time and memory per phase come from outside the process: the CLI prints each step (``... msg``) on
stderr when it is not a terminal; each line is timestamped as it arrives and the resident size of the
process (``/proc/PID/statm``) is sampled every 5 ms, so a phase is the time from one step's line to
the next and its peak the largest resident size seen in between. Targets (issue 22) are printed, not
enforced: convert152 <= 15 s and <= 1.5 GB; torchvision <= 60 s and <= 2.5 GB.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")
TARGETS = {"convert152": (15.0, 1.5), "torchvision": (60.0, 2.5)}


def _resident(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _tree_resident(pid: int) -> int:
    """The process and its children (pytest-xdist workers, subprocesses of a test)."""
    total = _resident(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return total + sum(_tree_resident(int(c)) for c in children)


def run(argv: list[str], root: Path, cwd: Path, env_extra: dict | None = None) -> dict:
    """Run ``argv`` with ``root`` first on PYTHONPATH; time, peak resident size and per-phase figures."""
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           **(env_extra or {})}
    env.pop("COLUMNS", None)
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    phases: list[list] = [["start", 0.0, 0]]  # name, start time, peak bytes
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = _tree_resident(proc.pid)
            peak[0] = max(peak[0], rss)
            phases[-1][2] = max(phases[-1][2], rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    err = []
    for line in proc.stderr:
        err.append(line)
        if line.startswith("... "):
            phases.append([line[4:].strip(), time.perf_counter() - start, 0])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    reader.join()
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak": peak[0], "rc": proc.returncode, "phases": phases, "stdout": "".join(out),
            "stderr": "".join(err)}


def _phase_key(name: str) -> str:
    """Group the per-batch steps: '... (2/3)' and the sizes folded away."""
    name = re.sub(r"\(\d+/\d+\)", "", name)
    name = re.sub(r"\d+ images of \d+x\d+", "N images", name)
    name = re.sub(r"checking \d+x\d+ \(.*\)", "checking a size", name)
    return name.strip()


def phase_table(result: dict) -> list[tuple[str, float, float]]:
    """(phase, seconds, peak GB) with repeated steps summed (time) and maxed (memory), in first-seen order."""
    rows: dict[str, list[float]] = {}
    marks = result["phases"] + [["end", result["wall"], 0]]
    for (name, t0, pk), (_n, t1, _p) in zip(marks, marks[1:], strict=False):
        row = rows.setdefault(_phase_key(name), [0.0, 0.0])
        row[0] += t1 - t0
        row[1] = max(row[1], pk / 2**30)
    return [(k, v[0], v[1]) for k, v in rows.items()]


def bbadapt(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "bbadapt.cli", *args]


def figures(only: set[str] | None, tmp: Path) -> list[tuple[str, callable]]:
    """(name, fn(root, tag) -> argv, cwd): what to run under each tree."""
    def convert152(root: Path, tag: str):
        return bbadapt(root, "convert", "resnet152_v2", "--weights", "random", "--out", str(tmp / f"r152-{tag}"), "--force")

    def detector(root: Path, tag: str):
        return bbadapt(root, "convert", "resnet50_v2", "--weights", "random", "--detector", "faster-rcnn",
                       "--classes", "raccoon", "--out", str(tmp / f"frcnn-{tag}"), "--force")

    def torchvision(root: Path, tag: str):
        return bbadapt(root, "export", str(tmp / f"frcnn-{tag}"), "--torchvision", str(tmp / f"tv-{tag}"), "--force")

    chosen = [("convert152", convert152), ("detector", detector), ("torchvision", torchvision)]
    if only:
        if "torchvision" in only:
            only = only | {"detector"}  # the export reads the detector bundle that figure writes
        chosen = [c for c in chosen if c[0] in only]
    return chosen


def report(name: str, before: list[dict], after: list[dict]) -> None:
    def best(rs: list[dict]) -> dict:
        return min(rs, key=lambda r: r["wall"])

    b, a = best(before), best(after)
    print(f"\n== {name}: before {b['wall']:.1f} s / {b['peak'] / 2**30:.2f} GB, after {a['wall']:.1f} s / "
          f"{a['peak'] / 2**30:.2f} GB; after/before time {a['wall'] / b['wall']:.2f}x, peak "
          f"{a['peak'] / max(b['peak'], 1):.2f}x (best of {len(before)}; rc {b['rc']} / {a['rc']})")
    for tag, rs in (("before", before), ("after", after)):
        print(f"   {tag} runs: " + ", ".join(f"{r['wall']:.1f} s ({r['cpu']:.0f} s CPU) / {r['peak'] / 2**30:.2f} GB"
                                          for r in rs))
    if name in TARGETS:
        t, m = TARGETS[name]
        ok = a["wall"] <= t and a["peak"] / 2**30 <= m
        verdict = "not judged: the run failed" if a["rc"] != 0 else "MET" if ok else "MISSED"
        print(f"   target <= {t:g} s and <= {m:g} GB: {verdict}")
    for tag, r in (("before", b), ("after", a)):
        print(f"   {tag}, per phase (s, peak GB):")
        for phase, secs, gb in phase_table(r):
            print(f"     {secs:7.1f} s {gb:6.2f} GB  {phase[:110]}")
        if r["rc"] != 0:
            print("   stderr tail:", r["stderr"][-800:])


def test_durations(files: list[str], base: Path, repeat: int) -> None:
    res = {}
    for tag, root in (("before", base), ("after", HERE)):
        argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--durations=15", *files]
        env = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"}
        res[tag] = [run(argv, root, root, env) for _ in range(repeat)]
    for tag, rs in res.items():
        r = min(rs, key=lambda r: r["wall"])
        print(f"\n== tests ({tag}): {r['wall']:.1f} s, peak {r['peak'] / 2**30:.2f} GB, rc {r['rc']}")
        lines = r["stdout"].splitlines()
        keep = [ln for ln in lines if re.match(r"^\d+\.\d+s (call|setup|teardown)", ln) or "passed" in ln or "failed" in ln]
        print("\n".join(keep[-20:]))
    b, a = (min(r["wall"] for r in res[t]) for t in ("before", "after"))
    print(f"   after/before: {a / b:.2f}x")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, required=True, help="a checkout of the commit to compare with")
    p.add_argument("--only", action="append", help="convert152, detector, torchvision (repeatable)")
    p.add_argument("--repeat", type=int, default=1, help="runs per tree and figure, alternating (best counts)")
    p.add_argument("--tests", nargs="*", help="also time these pytest files under both trees")
    p.add_argument("--keep", action="store_true", help="keep the outputs (printed temp directory)")
    args = p.parse_args()
    base = args.base.resolve()
    tmp = Path(tempfile.mkdtemp(prefix="proof-cost-"))
    failed = False
    try:
        for name, argv_of in figures(set(args.only) if args.only else None, tmp):
            before, after = [], []
            for _ in range(args.repeat):
                before.append(run(argv_of(base, "before"), base, base))
                after.append(run(argv_of(HERE, "after"), HERE, HERE))
            report(name, before, after)
            sys.stdout.flush()
            failed = failed or any(r["rc"] != 0 for r in before + after)
        if args.tests:
            test_durations(args.tests, base, args.repeat)
    finally:
        if args.keep:
            print("outputs kept in", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
