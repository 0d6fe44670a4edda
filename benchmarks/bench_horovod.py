"""Training throughput with Horovod: 1 worker vs 2 workers, on this machine's CPU.

Runs the real ``bbadapt train DIR --horovod --cpu`` under ``horovodrun -np N -H localhost:N
--gloo --network-interface lo`` for N = 1 and 2, each worker taking 1 image per step (global
``--batch-size`` = N), on a detector bundle like the tests' (resnet18_v1b, seeded calibrated
random weights, rgb255, BN affine, RPN/ROI counts for small images) and the raccoon photos
shipped in tests/data (or ``--dataset``). The figure is the ``samples_per_s`` of the
``epoch`` records of ``train.log.jsonl`` (all workers' images per second of the epoch), the
first epoch left out (hybridization and warm-up).

    python benchmarks/bench_horovod.py [--epochs 4] [--short 128] [--dataset voc:DIR]

Needs horovod (``sh scripts/horovod-wheel.sh .venv/bin/python``). Each worker runs with
``OMP_NUM_THREADS=1``, so on a 2-core machine 2 workers can at best double the throughput;
a loaded machine shows less.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "resnet18_v1b"
SMALL = dict(rpn_channel=256, roi_size=(7, 7), rpn_train_pre_nms=3000, rpn_train_post_nms=300,
             rpn_test_pre_nms=1000, rpn_test_post_nms=100, num_sample=32)
PHOTOS = [1, 2, 3, 4, 5, 6]  # tests/data/raccoon_voc/VOC2017: all six train here


def make_bundle(out: Path) -> Path:
    from bbadapt.bundle.manifest import staged_output, write_manifest
    from bbadapt.core import zoo
    from bbadapt.core.rewrite import adapt
    from bbadapt.core.spec import PRESETS
    from bbadapt.core.weights import randomize
    from bbadapt.engines.gluon.detector_bundle import add_detector
    from bbadapt.verify import images

    net = zoo.build(MODEL)
    raw, _ = images.photos((96, 96), limit=4)
    randomize(net, 0, PRESETS["imagenet"].normalize(raw))
    adapted = adapt(net, "imagenet", "rgb255", bn="affine")
    info = zoo.model_info(MODEL)
    with staged_output(out) as stage:
        section = add_detector(stage, adapted, info, ["raccoon"], "c4", freeze_at=2, overrides=SMALL, seed=0)
        write_manifest(stage, {"kind": "detector", "model": MODEL, "family": info.family,
                               "source": adapted.source.to_dict(), "target": adapted.target.to_dict(),
                               "plan": adapted.plan, "detector": section})
    return out


def shipped_photos(root: Path) -> str:
    source = ROOT / "tests" / "data" / "raccoon_voc" / "VOC2017"
    voc = root / "VOC2017"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    for i in PHOTOS:
        shutil.copy(source / "Annotations" / f"raccoon-{i}.xml", voc / "Annotations")
        shutil.copy(source / "JPEGImages" / f"raccoon-{i}.jpg", voc / "JPEGImages")
    names = "".join(f"raccoon-{i}\n" for i in PHOTOS)
    (voc / "ImageSets/Main/train.txt").write_text(names)
    (voc / "ImageSets/Main/val.txt").write_text(names)
    return f"voc:{root}"


def run(bundle: Path, dataset: str, workers: int, args) -> list[float]:
    """samples/s of every epoch after the first, for a job of ``workers`` workers."""
    horovodrun = Path(sys.executable).parent / "horovodrun"
    out = bundle.parent / f"run-{workers}"
    shutil.copytree(bundle, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [str(horovodrun), "-np", str(workers), "-H", f"localhost:{workers}", "--gloo",
               "--network-interface", "lo", sys.executable, "-m", "bbadapt.cli", "train", str(out),
               "--dataset", dataset, "--horovod", "--cpu", "--batch-size", str(workers), "--epochs", str(args.epochs),
               "--lr", "0.0002", "--short-side", str(args.short), "--max-size", str(args.short * 3 // 2),
               "--val-interval", str(args.epochs + 1), "--log-interval", "100"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        sys.exit(f"{workers} worker(s) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "train.log.jsonl").read_text().splitlines()]
    return [r["samples_per_s"] for r in records if r["event"] == "epoch" and r["epoch"] > 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--short", type=int, default=128)
    parser.add_argument("--dataset", default=None, help="voc:DIR (default: the 6 raccoon photos in tests/data)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-horovod-") as tmp:
        tmp = Path(tmp)
        dataset = args.dataset or shipped_photos(tmp / "voc")
        bundle = make_bundle(tmp / "bundle")
        rates = {n: run(bundle, dataset, n, args) for n in (1, 2)}
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(f"{MODEL} C4 detector, short side {args.short}, CPU, 1 image per worker per step, "
          f"median over epochs 2..{args.epochs} ({os.cpu_count()} cores)")
    print(f"1 worker : {one:6.2f} samples/s   (epochs: {', '.join(f'{r:.2f}' for r in rates[1])})")
    print(f"2 workers: {two:6.2f} samples/s   (epochs: {', '.join(f'{r:.2f}' for r in rates[2])})")
    print(f"speed-up 2 vs 1: {two / one:.2f}x")


if __name__ == "__main__":
    main()
