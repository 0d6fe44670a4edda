"""The torch side of ``benchmarks/device_check.sh`` (issue 20, item 8): torch and torchvision only, no mxnet.

Subcommands (the shell script runs them in order; each is usable alone):

``build OUT``
    Writes exported detectors (``OUT/c4``, ``OUT/fpn``: ``config.json``, ``model.safetensors``,
    ``frcnn_runtime.py``: what ``bbadapt export --torchvision`` writes, less ``check.json``) from the
    configs shipped in ``benchmarks/device_check/`` (resnet50_v1b, as ``bbadapt export`` wrote them;
    ``--smoke``: resnet18_v1b) with seeded weights: torch's own init for the convs and heads, and every
    frozen BN's scale and shift set, in one pass over a raccoon photo, to normalize its input (the
    last BN of each residual branch at a fifth of that, as trained ResNets keep it), so activations
    stay near 1 and training at the default lr does not diverge. An exported ResNet-50 detector
    (170 MB) is too large to carry; its config is 10 kB.
``bench OUT``
    Times the train step (forward, backward, SGD) and inference of each built detector with the
    backbone BN as eval-mode ``BatchNorm2d``, as ``FrozenBatchNorm2d`` (affine, as exported) and
    fused into the convs; peak GPU memory and images/s. ``--cpu`` prints the same three-way ratio
    on the CPU.
``table RESULTS.jsonl``
    One table of every step's record; exit 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "benchmarks" / "device_check"
RUNTIME = REPO / "converters" / "writers" / "frcnn_runtime.py"
RACCOON = REPO / "tests" / "data" / "raccoon_voc"
LAYOUTS = ("c4", "fpn")
BRANCH_SCALE = 0.2
SMOKE_ROIS = 32
SEED = 0


def runtime():
    """frcnn_runtime.py, loaded from its file (converters/writers on sys.path would shadow torchvision)."""
    import importlib.util

    if "frcnn_runtime" not in sys.modules:
        spec = importlib.util.spec_from_file_location("frcnn_runtime", RUNTIME)
        module = importlib.util.module_from_spec(spec)
        sys.modules["frcnn_runtime"] = module
        spec.loader.exec_module(module)
    return sys.modules["frcnn_runtime"]


def photos(limit: int):
    sys.path.insert(0, str(REPO))
    from bbadapt.verify.torch_training import voc_samples  # torch only

    return voc_samples(RACCOON, "train", limit=limit)


# ---------------------------------------------------------------- build


def write_safetensors(path: Path, state: dict) -> None:
    header, blobs, offset = {}, [], 0
    for name, tensor in state.items():
        data = tensor.detach().to("cpu").float().contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for blob in blobs:
            f.write(blob)


def calibrate(model, image) -> None:
    """Every FrozenBatchNorm2d of the backbone set, in forward order, to normalize its input on ``image``
    (a fifth of that at the end of each residual branch)."""
    import torch
    from torchvision.ops import FrozenBatchNorm2d

    def hook(module, args, output):
        if module.calibrated:
            return output
        x = args[0]
        mean, std = x.mean((0, 2, 3)), x.std((0, 2, 3)).clamp_min(1e-3)
        scale = module.gain / std
        module.weight.copy_(scale * torch.sqrt(module.running_var + module.eps))
        module.bias.copy_(module.running_mean * scale - mean * scale)
        module.calibrated = True
        return module(x)

    hooks = []
    bodies = [model.backbone.body] + ([model.roi_heads.box_head] if hasattr(model.roi_heads.box_head, "layer4") else [])
    for body in bodies:
        for name, module in body.named_modules():
            if isinstance(module, FrozenBatchNorm2d):
                block = body.get_submodule(name.rsplit(".", 1)[0]) if "." in name else body
                last = "bn3" if hasattr(block, "conv3") else "bn2"
                branch_end = name.endswith(("downsample.1", f".{last}")) and name.count(".") >= 2
                module.gain, module.calibrated = (BRANCH_SCALE if branch_end else 1.0), False
                hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model.eval()
        model([image])
    for h in hooks:
        h.remove()


def shrink_for_smoke(config: dict) -> None:
    """Fewer RoIs per image: the C4 head runs layer4 on every RoI whatever the image size, and on a CPU
    without native bfloat16 that is oneDNN's slow path (--amp: 145 s for one 64-pixel photo with GluonCV's
    128 sampled and 300 kept RoIs, 74% of it in that head). The smoke proves the steps run, not these counts."""
    config["rpn"]["pre_nms_top_n"] = {"training": 256, "testing": 128}
    config["rpn"]["post_nms_top_n"] = {"training": 32, "testing": 16}
    config["roi_heads"]["batch_size_per_image"] = 16


def build(out: Path, smoke: bool) -> list[dict]:
    import torch

    rt = runtime()
    image = photos(1)[0][0]
    records = []
    for layout in LAYOUTS:
        t0 = time.perf_counter()
        config = json.loads((CONFIGS / f"{'resnet18' if smoke else 'resnet50'}_v1b-{layout}.json").read_text())
        if smoke:
            shrink_for_smoke(config)
        torch.manual_seed(SEED)
        model = rt.GluonFasterRCNN(config)
        calibrate(model, image)
        target = out / layout
        target.mkdir(parents=True, exist_ok=True)
        (target / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        write_safetensors(target / "model.safetensors", model.state_dict())
        shutil.copy(RUNTIME, target / RUNTIME.name)
        rt.load(target, "cpu")  # the written directory loads strictly, as any export
        records.append({"step": f"build {layout}", "passed": True, "seconds": time.perf_counter() - t0,
                        "note": f"{config['backbone'].get('gluon_model', '')} {layout}, seeded"})
    return records


# ---------------------------------------------------------------- BN forms


def as_eval_batchnorm(model):
    """Every FrozenBatchNorm2d replaced by an eval-mode BatchNorm2d with the same statistics, affine frozen."""
    import torch
    from torch import nn
    from torchvision.ops import FrozenBatchNorm2d

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FrozenBatchNorm2d):
                bn = nn.BatchNorm2d(child.weight.numel(), eps=child.eps)
                with torch.no_grad():
                    for k in ("weight", "bias", "running_mean", "running_var"):
                        getattr(bn, k).copy_(getattr(child, k))
                bn.weight.requires_grad_(False)
                bn.bias.requires_grad_(False)
                bn.eval()
                bn.train = lambda mode=True, _bn=bn: _bn  # stays in eval mode under model.train()
                setattr(parent, name, bn)
    return model


def fused(model):
    """Every conv followed by a FrozenBatchNorm2d absorbs it (W * s, bias t); the BN becomes Identity."""
    import torch
    from torch import nn
    from torchvision.ops import FrozenBatchNorm2d

    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, FrozenBatchNorm2d):
                s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                t = bn.bias - bn.running_mean * s
                with torch.no_grad():
                    conv.weight.mul_(s.view(-1, 1, 1, 1))
                conv.bias = nn.Parameter(t.clone(), requires_grad=False)
                setattr(parent, bn_name, nn.Identity())
    left = [n for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)]
    if left:
        raise RuntimeError(f"BNs with no conv before them stay unfused: {left[:3]}")
    return model


def bench(out: Path, device: str, iters: int, smoke: bool) -> list[dict]:
    import copy

    import torch

    rt = runtime()
    samples = [(img.to(device), {k: v.to(device) for k, v in t.items()}) for img, t in photos(2)]
    records = []
    for layout in LAYOUTS:
        base = rt.load(out / layout, "cpu")
        if smoke:
            base.transform.min_size, base.transform.max_size = (128,), 192
            base.roi_heads.fg_bg_sampler.batch_size_per_image = SMOKE_ROIS  # a C4 head runs stage 4 per RoI
            base.rpn._pre_nms_top_n = {"training": 300, "testing": 300}
            base.rpn._post_nms_top_n = {"training": 64, "testing": 64}
            samples = samples[:1]
        for form, make in (("eval BatchNorm2d", as_eval_batchnorm), ("FrozenBatchNorm2d", lambda m: m), ("fused", fused)):
            model = make(copy.deepcopy(base)).to(device)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
            images = [s[0] for s in samples]
            targets = [s[1] for s in samples]

            def step(model=model, images=images, targets=targets, optimizer=optimizer):
                model.train()
                loss = sum(model(images, targets).values())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                return loss

            def infer(model=model, images=images):
                model.eval()
                with torch.no_grad():
                    model(images)

            timings = {}
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for what, fn in (("train", step), ("infer", infer)):
                if not smoke:
                    fn()  # warm-up (cuDNN autotuning, allocator)
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                _sync(device)
                timings[what] = (time.perf_counter() - t0) / iters
            peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
            records.append({"step": f"bench {layout}: {form}", "passed": True, "layout": layout, "form": form,
                            "train_ms": 1e3 * timings["train"], "infer_ms": 1e3 * timings["infer"],
                            "train_img_s": len(images) / timings["train"], "infer_img_s": len(images) / timings["infer"],
                            "peak_mib": peak, "iters": iters})
        by = {r["form"]: r for r in records if r.get("layout") == layout}
        for name in ("FrozenBatchNorm2d", "fused"):
            by[name]["train_speedup_vs_eval_bn"] = by["eval BatchNorm2d"]["train_ms"] / by[name]["train_ms"]
    return records


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- table


def table(path: Path) -> int:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [("step", "result", "seconds", "train ms", "infer ms", "train img/s", "infer img/s", "peak MiB", "vs eval BN",
             "note")]
    for r in records:
        def f(k, fmt="{:.1f}", r=r):
            return fmt.format(r[k]) if r.get(k) is not None else ""
        rows.append((r["step"], "ok" if r["passed"] else "FAILED", f("seconds"), f("train_ms"), f("infer_ms"),
                     f("train_img_s"), f("infer_img_s"), f("peak_mib", "{:.0f}"),
                     f("train_speedup_vs_eval_bn", "{:.2f}x"), r.get("note", "")))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        print(" | ".join(str(v).ljust(w) for v, w in zip(row, widths)))
        if k == 0:
            print("-+-".join("-" * w for w in widths))
    failed = [r["step"] for r in records if not r["passed"]]
    print(f"\n{len(records) - len(failed)}/{len(records)} steps passed" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed or not records else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("build", "bench", "table"))
    parser.add_argument("path", type=Path)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU")
    parser.add_argument("--smoke", action="store_true", help="resnet18_v1b configs, small images, few iterations")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per measurement (default 20; smoke 1)")
    parser.add_argument("--results", type=Path, default=None, help="append one JSON record per line here")
    args = parser.parse_args(argv)
    if args.command == "table":
        return table(args.path)
    import torch

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("device_check: no CUDA device visible to torch; use --cpu", file=sys.stderr)
        return 1
    torch.manual_seed(SEED)
    try:
        records = (build(args.path, args.smoke) if args.command == "build"
                   else bench(args.path, device, args.iters or (1 if args.smoke else 20), args.smoke))
        code = 0
    except Exception as exc:  # noqa: BLE001 - one failed record, the table says which step
        records, code = [{"step": args.command, "passed": False, "note": f"{type(exc).__name__}: {exc}"[:200]}], 1
        print(f"device_check {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
    for r in records:
        print(json.dumps(r))
    if args.results:
        with args.results.open("a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    if args.command == "bench":
        for layout in LAYOUTS:
            by = {r["form"]: r for r in records if r.get("layout") == layout}
            if len(by) == 3:
                print(f"{layout} on {device}: train step eval BN {by['eval BatchNorm2d']['train_ms']:.1f} ms, "
                      f"FrozenBatchNorm2d {by['FrozenBatchNorm2d']['train_ms']:.1f} ms "
                      f"({by['FrozenBatchNorm2d']['train_speedup_vs_eval_bn']:.2f}x), fused {by['fused']['train_ms']:.1f} ms "
                      f"({by['fused']['train_speedup_vs_eval_bn']:.2f}x)")
    return code


if __name__ == "__main__":
    sys.exit(main())
