"""What a GPU owner runs to see bbadapt work on their GPU: under 10 minutes on one Ampere GPU.

    python benchmarks/gpu_check.py                 # GPU 0 (--gpu N for another)
    python benchmarks/gpu_check.py --cpu --smoke   # the same steps on the CPU at tiny sizes (tests run it)

Steps, each a row of the closing table, each through the real command line where there is one:

1. ``bbadapt doctor --gpu`` (``--cpu``: ``bbadapt doctor``): nothing else runs if it fails;
2. ``bbadapt convert resnet50_v2 --weights random --to rgb255`` (with its equivalence check);
3. a C4 Faster R-CNN on it: ``convert ... --detector faster-rcnn --classes raccoon``;
4. ``bbadapt train`` for 50 iterations on the repository's raccoon photos (tests/data/raccoon_voc)
   with ``--gpus N`` in float32, and 5. the same with ``--amp`` (float16, GluonCV's recipe; on
   the CPU the step checks that ``--amp`` is refused in one line: MXNet 1.9.1 has no usable
   CPU AMP here, see docs/gpu.md);
6. ``bbadapt evaluate`` of the float32 run's last checkpoint;
7. the training step of GluonCV's own ``faster_rcnn_resnet50_v1b_custom`` (frozen BN as
   ``use_global_stats``) against bbadapt's ``affine`` and ``fused`` detectors from the same
   weights (``bench_detector.py``'s setup), timed on the device, round robin, medians.

Exit status 0 only if every step passed. ``--smoke`` shrinks everything (resnet18_v2, short
side 192, one epoch over the photos, one timed step) so that the script runs in ``make test``
(tests/benchmarks/test_gpu_check_smoke.py) and cannot rot; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import bbadapt  # noqa: F401  first: preloads the pip CUDA libraries before anything imports mxnet

HERE = Path(__file__).resolve().parent
VOC = HERE.parent / "tests" / "data" / "raccoon_voc"
CLASSES = "raccoon"


@dataclass(frozen=True)
class Settings:
    """Sizes of one run: the full check or the smoke run."""

    model: str
    short_side: int
    max_size: int
    iterations: int  # at least this many training iterations (whole epochs over the photos)
    check_sizes: Optional[str]  # convert's equivalence check sizes (None: its defaults)
    timing_short: int
    timing_warmup: int
    timing_runs: int
    photos: Optional[int] = None  # train on the first N training photos only (None: all)


FULL = Settings("resnet50_v2", 600, 1000, 50, None, 600, 2, 10)
SMOKE = Settings("resnet18_v2", 192, 256, 1, "64x64", 192, 0, 1, photos=3)


@dataclass
class Step:
    name: str
    ok: Optional[bool] = None  # None: not run
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Check:
    """The steps of one run and where they write."""

    settings: Settings
    workdir: Path
    gpu: Optional[int]  # None: the CPU
    steps: list[Step] = field(default_factory=list)

    @property
    def device_args(self) -> list[str]:
        return ["--cpu"] if self.gpu is None else ["--gpus", str(self.gpu)]

    def cli(self, name: str, args: list[str], expect: int = 0,
            detail: Callable[[subprocess.CompletedProcess], str] = lambda r: last_line(r.stdout)) -> bool:
        """One ``bbadapt`` command as a step: passed when it exits with ``expect``."""
        step = Step(name)
        self.steps.append(step)
        print(f"--- {name}: bbadapt {' '.join(args)}", flush=True)
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "bbadapt.cli", *args], capture_output=True, text=True)
        step.seconds = time.perf_counter() - start
        step.ok = result.returncode == expect
        if step.ok:
            step.detail = detail(result)
        else:
            step.detail = f"exit {result.returncode} (expected {expect}): {last_line(result.stderr) or last_line(result.stdout)}"
            print(result.stdout[-2000:], result.stderr[-4000:], sep="\n", file=sys.stderr)
        return step.ok

    def skip(self, *names: str, why: str) -> None:
        self.steps.extend(Step(name, None, 0.0, why) for name in names)


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and not ln.startswith("... ")]
    return lines[-1] if lines else ""


def dataset(check: Check) -> tuple[str, str, int]:
    """``voc:DIR``, the split to evaluate on (val if the set has one) and the number of training photos.

    With ``photos`` set, the first photos of the training split are copied (VOC layout) into the
    workdir and that copy is both trained and evaluated on.
    """
    main = VOC / "VOC2017" / "ImageSets" / "Main"
    names = (main / "train.txt").read_text().split()
    if check.settings.photos is None:
        return f"voc:{VOC}", "val" if (main / "val.txt").is_file() else "train", len(names)
    names, subset = names[:check.settings.photos], check.workdir / "voc" / "VOC2017"
    for folder, suffix in (("JPEGImages", ".jpg"), ("Annotations", ".xml")):
        (subset / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy(VOC / "VOC2017" / folder / f"{name}{suffix}", subset / folder)
    (subset / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (subset / "ImageSets" / "Main" / "train.txt").write_text("\n".join(names) + "\n")
    return f"voc:{subset.parent}", "train", len(names)


def run(check: Check) -> None:
    s, work = check.settings, check.workdir
    doctor = ["doctor"] if check.gpu is None else ["doctor", "--gpu"]
    if not check.cli("doctor", doctor, detail=lambda r: _gpu_line(r.stdout)):
        check.skip("convert", "detector", "train fp32", "train amp", "evaluate", "timing", why="doctor failed")
        return
    sizes = ["--sizes", s.check_sizes] if s.check_sizes else []
    check.cli(f"convert {s.model}", ["convert", s.model, "--weights", "random", "--to", "rgb255",
                                     "--out", str(work / "backbone"), "--force", *sizes],
              detail=lambda r: next((ln for ln in r.stdout.splitlines() if ln.startswith("check ")), ""))
    detector = work / "detector"
    built = check.cli("detector (C4)", ["convert", s.model, "--weights", "random", "--detector", "faster-rcnn",
                                        "--classes", CLASSES, "--out", str(detector), "--force", *sizes],
                      detail=lambda r: next((ln for ln in r.stdout.splitlines() if ln.startswith("detector:")), ""))
    if built:
        train_and_evaluate(check, detector)
    else:
        check.skip("train fp32", "train amp", "evaluate", why="no detector")
    timing(check)


def train_and_evaluate(check: Check, detector: Path) -> None:
    s, work = check.settings, check.workdir
    data, split, photos = dataset(check)
    epochs = max(1, math.ceil(s.iterations / photos))
    common = ["--dataset", data, "--train-split", "train", "--val-split", split, "--epochs", str(epochs),
              "--val-interval", str(epochs), "--checkpoint-every", str(epochs), "--short-side", str(s.short_side),
              "--max-size", str(s.max_size), "--lr", "0.0002", "--warmup", "10", "--log-interval", "10",
              *check.device_args]  # a small lr: random heads on raw-pixel activations start with large losses
    runs = {"fp32": work / "train-fp32", "amp": work / "train-amp"}
    for out in runs.values():
        shutil.copytree(detector, out)
    trained = check.cli(f"train fp32 ({epochs * photos} it)", ["train", str(runs["fp32"]), *common],
                        detail=lambda r: _train_detail(runs["fp32"]))
    if check.gpu is None:  # MXNet 1.9.1 AMP needs a GPU here: the refusal is the behaviour to check
        check.cli("train amp (CPU: refused)", ["train", str(runs["amp"]), *common, "--amp"], expect=2,
                  detail=lambda r: "refused: " + last_line(r.stderr).removeprefix("bbadapt: error: "))
    else:
        check.cli(f"train amp ({epochs * photos} it)", ["train", str(runs["amp"]), *common, "--amp"],
                  detail=lambda r: _train_detail(runs["amp"]))
    if not trained:
        check.skip("evaluate", why="training failed")
        return
    device = [] if check.gpu is None else ["--gpu", str(check.gpu)]
    check.cli("evaluate", ["evaluate", str(runs["fp32"] / "checkpoints" / "last"), "--dataset", data,
                           "--split", split, "--short-side", str(s.short_side), "--max-size", str(s.max_size),
                           *device])


def _gpu_line(stdout: str) -> str:
    return next((ln.split(None, 2)[2] for ln in stdout.splitlines() if ln.startswith("GPU work")), "")


def _train_detail(directory: Path) -> str:
    records = [json.loads(ln) for ln in (directory / "train.log.jsonl").read_text().splitlines()]
    last = [r for r in records if r["event"] == "iter"][-1]
    return f"{last['iteration']} iterations, last loss {last['loss']:.3f}, {last['samples_per_s']:.2f} samples/s"


def timing(check: Check) -> None:
    """Train step of gluoncv's own frozen-BN detector vs bbadapt affine and fused, on the device."""
    from bbadapt.platform.devices import contexts

    sys.path.insert(0, str(HERE))
    import bench_detector as bench

    s = check.settings
    start = time.perf_counter()
    try:
        (ctx,) = contexts(None if check.gpu is None else str(check.gpu))  # the preflight, before any kernel
        with warnings.catch_warnings():  # gluoncv's anchors Constant ignores grad_req 'write': its own script's noise
            warnings.filterwarnings("ignore", message="Constant parameter .* does not support grad_req")
            nets, inputs, box, label = bench.build(s.timing_short)
        for net in nets.values():
            net.collect_params().reset_ctx(ctx)
        inputs = {k: v.as_in_context(ctx) for k, v in inputs.items()}
        seconds = bench.round_robin(nets, inputs, bench.train_step, box.as_in_context(ctx),
                                    label.as_in_context(ctx), s.timing_warmup, s.timing_runs)
    except Exception as exc:  # noqa: BLE001 - a failed step is a row of the table, and exit 1
        check.steps.append(Step("timing", False, time.perf_counter() - start, f"{type(exc).__name__}: {exc}"))
        return
    shape = "x".join(map(str, inputs["gluoncv"].shape[2:]))
    reference = seconds["gluoncv"]
    for variant, t in seconds.items():
        check.steps.append(Step(f"timing {variant}", True, t, f"train step, {bench.MODEL} {shape}, median of "
                                                              f"{s.timing_runs}, gluoncv/this {reference / t:.2f}x on {ctx}"))


def table(steps: list[Step]) -> str:
    rows = [f"{'step':<28}| {'result':<6} | {'seconds':>8} | detail", "-" * 100]
    for step in steps:
        result = {True: "PASS", False: "FAIL", None: "SKIP"}[step.ok]
        rows.append(f"{step.name:<28}| {result:<6} | {step.seconds:>8.2f} | {step.detail}")
    return "\n".join(rows)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", type=int, default=0, help="the GPU to check (default 0)")
    parser.add_argument("--cpu", action="store_true", help="run every step on the CPU instead")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, few iterations (numbers mean nothing)")
    parser.add_argument("--workdir", type=Path, help="keep the outputs here [default: a temporary directory]")
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bbadapt-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    check = Check(SMOKE if args.smoke else FULL, work, None if args.cpu else args.gpu)
    start = time.perf_counter()
    try:
        run(check)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    where = "CPU" if check.gpu is None else f"GPU {check.gpu}"
    print(f"\nbbadapt GPU check on {where}{' (smoke sizes)' if args.smoke else ''}: "
          f"{time.perf_counter() - start:.0f} s in all\n")
    print(table(check.steps))
    failed = [s.name for s in check.steps if s.ok is not True]
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all steps passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
