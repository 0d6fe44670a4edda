"""GPU check for the torchvision detector export (issue 13): equivalence on CUDA, then 50 training steps.

MXNet 1.9.1 has no Hopper kernels, so the GluonCV side always runs on the CPU; the exported
torchvision model runs on CUDA. Steps, for a C4 and an FPN detector (random-weight backbone):

1. ``bbadapt convert ... --detector faster-rcnn`` and ``export --torchvision`` (its own CPU check);
2. the four-level check again with the model on the GPU, TF32 off (cuDNN convs and matmuls in
   IEEE float32), so the tolerances of the CPU proof apply unchanged;
3. 50 SGD iterations on the GPU (TF32 back to PyTorch's defaults) on one batch of two packaged
   photos with fixed boxes, the same samples each step: every loss finite and the mean of the
   last 10 below the mean of the first 10.

Prints one line per result and a JSON summary; exit status 1 if anything failed.

    python benchmarks/gpu_check_torchvision.py                 # on a CUDA machine (resnet50_v1b, default sizes)
    python benchmarks/gpu_check_torchvision.py --cpu --smoke   # anywhere: resnet18_v1b, small sizes, 5 steps
                                                               # (make test runs it, C4 only)
    python benchmarks/gpu_check_torchvision.py --model resnet50_v2 --layouts c4   # the users' headline body
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bbadapt.core import zoo

zoo.import_gluoncv()  # before torch: gluoncv refuses to import beside torch >= 2 otherwise

import numpy as np  # noqa: E402

SMOKE_SIZES = [(64, 80)]  # GluonCV pads its proposals there: the check's -1 rows are exercised
TRAIN_SIZE = (256, 320)
SMOKE_TRAIN_SIZE = (128, 160)
SMOKE_ROIS = 32  # RoIs sampled per image (torchvision's default 512: each runs stage 4 in a C4 head)
TRAIN_BOXES = [[40.0, 30.0, 220.0, 200.0]]  # one object per photo, in TRAIN_SIZE pixels


def tf32(enabled: bool) -> None:
    """TF32 on or off for cuDNN convolutions and cuBLAS matmuls (new and old PyTorch switches)."""
    import torch

    precision = "tf32" if enabled else "ieee"
    try:
        torch.backends.cudnn.conv.fp32_precision = precision
        torch.backends.cuda.matmul.fp32_precision = precision
    except AttributeError:  # torch < 2.9
        torch.backends.cudnn.allow_tf32 = enabled
        torch.backends.cuda.matmul.allow_tf32 = enabled


def make_bundle(root: Path, model: str, layout: str) -> Path:
    from bbadapt.pipeline import ConvertOptions, DetectorOptions, convert

    out = root / f"frcnn-{layout}"
    convert(model, out, ConvertOptions(weights="random", sizes=[(64, 64)]),
            DetectorOptions(classes=["raccoon", "dog"], layout=layout, freeze_at=2))
    return out


def equivalence_on(device: str, bundle: Path, export: Path, sizes) -> dict:
    from converters.writers.torchvision_detector import import_runtime, load_gluon
    from converters.writers.torchvision_detector_check import CheckOptions, run_check

    model = import_runtime(export).load(export, device)
    return run_check(load_gluon(bundle), model, CheckOptions(sizes=sizes))


def train(device: str, export: Path, steps: int, size: tuple[int, int] = TRAIN_SIZE, rois: int | None = None) -> dict:
    """``steps`` SGD iterations on one fixed batch (two photos), the same anchor and RoI samples each
    time (seeded): the loss is one function, and it must fall."""
    import torch

    from bbadapt.verify import images
    from converters.writers.torchvision_detector import import_runtime

    model = import_runtime(export).load(export, device).train()
    model.transform.min_size, model.transform.max_size = (size[0],), 1000
    if rois:
        model.roi_heads.fg_bg_sampler.batch_size_per_image = rois
    raw, _ = images.photos(size, limit=2)
    batch = [torch.from_numpy((r / 255).astype(np.float32)).to(device) for r in raw]
    scale = size[0] / TRAIN_SIZE[0]
    target = {"boxes": torch.tensor(TRAIN_BOXES, device=device) * scale, "labels": torch.tensor([1], device=device)}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        torch.manual_seed(0)
        loss = sum(model(batch, [target] * len(batch)).values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)  # random backbones: activations ~100
        optimizer.step()
        losses.append(float(loss.detach()))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    window = max(1, min(10, steps // 2))
    first, last = float(np.mean(losses[:window])), float(np.mean(losses[-window:]))
    return {"steps": steps, "image_size": list(size), "seconds": time.perf_counter() - start, "losses": losses,
            "first_mean": first, "last_mean": last, "passed": all(math.isfinite(v) for v in losses) and last < first}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run the torchvision side on the CPU (no GPU needed)")
    parser.add_argument("--smoke", action="store_true", help="resnet18_v1b, small check sizes, 5 training steps")
    parser.add_argument("--steps", type=int, default=None, help="training iterations (default 50; smoke 5)")
    parser.add_argument("--model", default=None,
                        help="the GluonCV body (default resnet50_v1b; smoke resnet18_v1b); e.g. resnet50_v2, resnet50_v1d")
    parser.add_argument("--layouts", default="c4,fpn", help="comma-separated detector layouts (default c4,fpn)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON summary here")
    args = parser.parse_args()

    import torch

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch; use --cpu", file=sys.stderr)
        return 1
    model = args.model or ("resnet18_v1b" if args.smoke else "resnet50_v1b")
    sizes = SMOKE_SIZES if args.smoke else None
    steps = args.steps or (5 if args.smoke else 50)
    results: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "model": model,
                     "torch": torch.__version__}
    ok = True
    with tempfile.TemporaryDirectory(prefix="gpu-check-tv-") as tmp:
        root = Path(tmp)
        for layout in args.layouts.split(","):
            from converters.writers.torchvision_detector import ExportOptions, export_detector

            t0 = time.perf_counter()
            bundle = make_bundle(root, model, layout)
            export = root / f"tv-{layout}"
            export_detector(bundle, export, options=ExportOptions(sizes=sizes))
            cpu_check = json.loads((export / "check.json").read_text())
            print(f"{layout}: export + CPU check {time.perf_counter() - t0:.0f} s: {cpu_check['summary']}")
            if device == "cuda":
                tf32(False)
            check = equivalence_on(device, bundle, export, sizes)
            print(f"{layout}: {device} equivalence (TF32 off): {'PASSED' if check['passed'] else 'FAILED'}: {check['summary']}")
            if device == "cuda":
                tf32(True)
            trained = (train(device, export, steps, SMOKE_TRAIN_SIZE, SMOKE_ROIS) if args.smoke
                       else train(device, export, steps))
            print(f"{layout}: {steps} training steps on {device} in {trained['seconds']:.1f} s: loss "
                  f"{trained['first_mean']:.3f} -> {trained['last_mean']:.3f}: {'PASSED' if trained['passed'] else 'FAILED'}")
            results[layout] = {"cpu_check": cpu_check["summary"], "device_check": {k: check[k] for k in ("passed", "summary", "worst_max_rel", "worst_rms_ratio")},
                               "training": trained}
            ok = ok and check["passed"] and trained["passed"]
    results["passed"] = ok
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
