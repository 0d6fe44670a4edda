"""Deployed detector speed (issue 24): onnxruntime vs eager torch on the CPU, side by side in one run.

    python benchmarks/bench_deploy.py EXPORT_DIR [--runs 5] [--threads 2]

EXPORT_DIR is a torchvision export (``bbadapt export BUNDLE --torchvision DIR``) or a torch checkpoint. The
script writes the ONNX file with ``bbadapt.engines.torch.deploy`` (proof included) into a temporary folder,
then times, on the same packaged photos at 480x640 (decoded uint8), batches of 1 and 4:

* eager torch: the export's own ``frcnn_runtime`` model, fed ``[image / 255]`` as a torch user would;
* onnxruntime: the written file, CPUExecutionProvider, fed the uint8 batch.

Both get the same thread count. Medians of ``--runs`` after one warm-up each; it prints images/s, the ratio
(goal: onnxruntime >= eager torch) and the file's size. Nothing is asserted on time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZE = (480, 640)


def median_seconds(run, runs: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import numpy as np
    import onnxruntime as ort
    import torch

    from bbadapt.engines.torch.deploy import DeployOptions, check_images, deploy
    from bbadapt.engines.torch.export import load_model

    torch.set_num_threads(args.threads)
    model, _ = load_model(args.export)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "detector.onnx"
        print(f"writing and proving {out.name} ...", flush=True)
        summary = deploy(args.export, out, DeployOptions(form="onnx"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
        print(f"file: {summary['bytes'] / 1e6:.1f} MB, proof passed: {summary['passed']}, onnxruntime {ort.__version__}, "
              f"torch {torch.__version__}, {args.threads} threads, photos {SIZE[0]}x{SIZE[1]}")
        print(f"{'batch':>5} {'eager torch img/s':>18} {'onnxruntime img/s':>18} {'ort / torch':>12}")
        for batch_size in (1, 4):
            batch = np.concatenate([check_images(SIZE, min(batch_size, 8))] * (1 + batch_size // 8))[:batch_size]
            floats = [torch.from_numpy(im).permute(2, 0, 1).float() / 255.0 for im in batch]

            def eager(floats=floats):
                with torch.no_grad():
                    model(floats)

            t_torch = median_seconds(eager, args.runs)
            t_ort = median_seconds(lambda batch=batch: session.run(None, {"images": batch}), args.runs)
            print(f"{batch_size:>5} {batch_size / t_torch:>18.2f} {batch_size / t_ort:>18.2f} {t_torch / t_ort:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
