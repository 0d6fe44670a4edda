"""The torch twin of the training proof: K SGD steps of an exported torchvision detector against the
reference a PyTorch user would build (issue 20, item 5).

The export (``bbadapt export --torchvision``) holds every backbone BatchNorm as a
``FrozenBatchNorm2d`` with weight ``s``, bias ``t``, mean 0 and ``running_var = 1 - eps``, and
conv1 with the bundle's input fold undone. The reference is what a PyTorch user writes from the
*original* (unfolded) weights: ``torchvision.models.resnetN(norm_layer=FrozenBatchNorm2d)`` with
gamma, beta, running mean and variance as trained, the input normalization as the
``image_mean``/``image_std`` of a stock ``GeneralizedRCNNTransform``, under the export's own RPN
and RoI heads (GluonCV's; torchvision's stock heads compute other losses).

Torch and torchvision only (no mxnet, no bbadapt engine): the test
(tests/converters/test_torchvision_training_equivalence.py) and ``benchmarks/device_check.sh``
share it. The rule is the MXNet proof's (:mod:`bbadapt.verify.gradients`,
tests/engines/gluon/test_training_equivalence.py): per-step losses within 1e-4 relative; every
trainable parameter after K steps within 1e-5 relative, or within twice the rounding floor (the
reference run again with every backbone value moved by one float32 ulp, up or down at random:
how far K steps carry a rounding change in the reference's own run).
"""

from __future__ import annotations

import copy
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d

LOSS_RTOL, PARAM_RTOL = 1e-4, 1e-5
STAGES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
GLUON_BN = {"gamma": "weight", "beta": "bias", "running_mean": "running_mean", "running_var": "running_var"}


# ---------------------------------------------------------------- data


def voc_samples(root: str | Path, split: str = "train", limit: int | None = None, classes=("raccoon",)):
    """``[(image CHW float RGB 0..1, {"boxes", "labels"})]`` of a VOC directory (``VOC2017`` inside ``root``
    or ``root`` itself), read with PIL: the device machine has no mxnet."""
    from PIL import Image

    root = Path(root)
    voc = next((p for p in [root, *sorted(root.glob("VOC*"))] if (p / "ImageSets" / "Main").is_dir()), root)
    names = (voc / "ImageSets" / "Main" / f"{split}.txt").read_text().split()[:limit]
    samples = []
    for name in names:
        with Image.open(voc / "JPEGImages" / f"{name}.jpg") as im:
            pixels = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
        boxes, labels = [], []
        for obj in ET.parse(voc / "Annotations" / f"{name}.xml").getroot().iter("object"):
            box = obj.find("bndbox")
            boxes.append([float(box.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")])
            labels.append(list(classes).index(obj.find("name").text.strip()) + 1)
        samples.append((torch.from_numpy(pixels).permute(2, 0, 1).contiguous(),
                        {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}))
    return samples


# ---------------------------------------------------------------- the reference


def torchvision_state(gluon_params: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """A GluonCV ``resnetN_v1b``'s parameters (``_collect_params_with_prefix`` names) under torchvision's names."""
    state = {}
    for name, value in gluon_params.items():
        if name.startswith("fc."):
            continue
        head, _, leaf = name.rpartition(".")
        state[f"{head}.{GLUON_BN.get(leaf, leaf)}"] = torch.from_numpy(np.ascontiguousarray(value, np.float32))
    return state


def reference_body(depth: int, state: dict[str, torch.Tensor], eps: float = 1e-5) -> nn.Module:
    """``torchvision.models.resnet{depth}`` with ``FrozenBatchNorm2d`` for every BN, loaded with ``state``."""
    body = getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=lambda c: FrozenBatchNorm2d(c, eps=eps))
    missing, unexpected = body.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"fc.weight", "fc.bias"}:
        raise ValueError(f"the reference body does not take these weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return body


def reference_detector(export_model: nn.Module, body: nn.Module, image_mean, image_std) -> nn.Module:
    """The export's detector (its RPN and RoI heads, their weights) on torchvision's own ``body``,
    the normalization as a stock ``GeneralizedRCNNTransform``'s ``image_mean``/``image_std``."""
    model = copy.deepcopy(export_model)
    holders = [model.backbone.body]
    box_head = model.roi_heads.box_head
    if hasattr(box_head, "layer4"):  # C4: stage 4 runs in the box head
        holders.append(box_head)
    for holder in holders:
        for stage in STAGES:
            if hasattr(holder, stage):
                setattr(holder, stage, getattr(body, stage))
    old = model.transform
    model.transform = GeneralizedRCNNTransform(old.min_size, old.max_size, list(image_mean), list(image_std),
                                               size_divisible=old.size_divisible, fixed_size=old.fixed_size)
    model.freeze(model.config["backbone"]["trainable_layers"])  # the export's freeze-at, by the same names
    return model


def nudge_by_one_ulp(module: nn.Module, seed: int) -> None:
    """Move every float parameter and buffer of ``module`` by one float32 ulp, up or down at random."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if not tensor.is_floating_point():
                continue
            value = tensor.detach().cpu().numpy()
            away = np.where(rng.random(value.shape) < 0.5, -np.inf, np.inf).astype(value.dtype)
            tensor.copy_(torch.from_numpy(np.nextafter(value, away)))


# ---------------------------------------------------------------- K steps


def sgd_steps(model: nn.Module, samples, steps: int, lr: float, momentum: float = 0.9, wd: float = 1e-4,
              seed: int = 0, device: str = "cpu"):
    """``steps`` SGD steps of a copy of ``model``, one sample per step (in order, cycling): per-step losses, the trainable
    parameters after them (float64 numpy, by name) and the first step's gradients.

    ``torch.manual_seed(seed + step)`` before each forward: both runs draw the same anchor and RoI samples.
    """
    model = copy.deepcopy(model).to(device).train()  # the caller's model stays as it was
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.SGD([p for _, p in named], lr=lr, momentum=momentum, weight_decay=wd)
    losses, first_grads = [], {}
    for step in range(steps):
        image, target = samples[step % len(samples)]
        torch.manual_seed(seed + step)
        parts = model([image.to(device)], [{k: v.to(device) for k, v in target.items()}])
        optimizer.zero_grad()
        sum(parts.values()).backward()
        if step == 0:
            first_grads = {n: p.grad.detach().double().cpu().numpy().copy() for n, p in named if p.grad is not None}
        optimizer.step()
        losses.append({k: float(v.detach()) for k, v in parts.items()})
    params = {n: p.detach().double().cpu().numpy().copy() for n, p in named}
    return losses, params, first_grads


def relative(a, b) -> float:
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(float(np.max(np.abs(b))), 1e-30))


def loss_difference(ours: list[dict], ref: list[dict]) -> float:
    return max(abs(o[k] - r[k]) / abs(r[k]) if r[k] else abs(o[k]) for o, r in zip(ours, ref, strict=True) for k in r)


def verdict(ours, ref, floor_params: dict) -> dict:
    """The rule: losses within 1e-4 relative, parameters within max(1e-5, 2 x the ulp floor)."""
    (steps, params, _), (ref_steps, ref_params, _) = ours, ref
    if set(params) != set(ref_params):
        raise ValueError(f"the trainable sets differ: {sorted(set(params) ^ set(ref_params))[:5]}")
    loss_rel = loss_difference(steps, ref_steps)
    worst = max(ref_params, key=lambda k: relative(params[k], ref_params[k]))
    worst_rel = relative(params[worst], ref_params[worst])
    floor = max(relative(floor_params[k], ref_params[k]) for k in ref_params)
    tolerance = max(PARAM_RTOL, 2 * floor)
    return {"losses": loss_rel, "params": worst_rel, "worst": worst, "rounding_floor": floor,
            "param_tolerance": tolerance, "trainable": len(ref_params),
            "passed": bool(loss_rel <= LOSS_RTOL and worst_rel <= tolerance)}


def fused_gradient_scale(fused_grads: dict, ref_grads: dict, scales: dict[str, np.ndarray]) -> dict:
    """``bn=fused``: each fused conv is W' = W * s per output channel, so its gradient is dL/dW / s.

    ``scales``: the BN scale s per fused conv weight name (reference names). Per output channel,
    the measured ratio |g'| / |g| against 1/|s|: the largest, the range of 1/|s|, and how many
    channels are within 1% of it. A statement, not a verdict (as the MXNet report).
    """
    worst, agree, channels, expected_all = None, 0, 0, []
    for name, s in scales.items():
        if name not in fused_grads or name not in ref_grads:
            continue
        g_fused = np.sqrt((fused_grads[name].reshape(len(s), -1) ** 2).sum(1))
        g_ref = np.sqrt((ref_grads[name].reshape(len(s), -1) ** 2).sum(1))
        live = g_ref > 1e-12
        measured = np.where(live, g_fused / np.where(live, g_ref, 1), np.nan)
        expected = 1 / np.abs(s)
        expected_all.append(expected)
        ok = np.abs(measured - expected) <= 0.01 * expected
        agree += int(np.sum(ok[live]))
        channels += int(np.sum(live))
        c = int(np.nanargmax(measured)) if live.any() else 0
        if live.any() and (worst is None or measured[c] > worst["measured"]):
            worst = {"param": name, "channel": c, "measured": float(measured[c]), "expected": float(expected[c])}
    if worst is None:
        return {}
    every = np.concatenate(expected_all)
    return {**worst, "min_expected": float(every.min()), "max_expected": float(every.max()),
            "agree": agree / max(channels, 1), "channels": channels}


def fused_statement(scale: dict) -> str:
    if not scale:
        return "bn=fused: no fused conv received a gradient"
    return (f"bn=fused re-parameterizes each fused conv as W' = W * s per output channel: its gradient is dL/dW / s, "
            f"so training the fused net is not training the original. Largest per-channel gradient-scale ratio "
            f"{scale['measured']:.4g} ({scale['param']} channel {scale['channel']}: 1/|s| = {scale['expected']:.4g}); "
            f"1/|s| spans {scale['min_expected']:.3g} .. {scale['max_expected']:.3g}; the measured ratio is within 1% "
            f"of 1/|s| in {scale['agree']:.1%} of {scale['channels']} channels; an SGD step moves such a channel by "
            "the square of its ratio. Export an affine bundle to train.")
