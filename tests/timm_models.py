"""timm ResNets for the tests: built offline (``pretrained=False``), BatchNorm statistics that look trained,
saved the three ways a PyTorch user has them (.safetensors, .pth, a ``save_for_hf`` folder).

Statistics: measured on real photos in training mode (cumulative average), then the affine parameters
spread (gammas 0.2..2, betas +-0.5) and the stored means moved by up to 3x their spread with the
compensating beta change a trained net shows (the same function; every fold has to cancel it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bbadapt.core.spec import PRESETS, InputSpec
from bbadapt.verify import images


def timm_model(name: str, seed: int = 0, spec: InputSpec = PRESETS["imagenet"], calibrated: bool = False, **kwargs):
    """``calibrated``: draw the affine parameters first (gammas 0.5..1.5, betas +-0.1) and measure the statistics
    with them in place, so every BN normalizes its real input and activations keep a trained net's scale through
    the depth (what a detector built on it needs: otherwise C4 features reach ~1e2 and the RoI loss starts at ~240).
    The default measures first and spreads the affine parameters after: harder numbers for an equivalence check."""
    import timm
    import torch

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    rng = np.random.RandomState(seed)
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative: the statistics of the calibration photos
        if calibrated:
            with torch.no_grad():
                bn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, bn.num_features).astype(np.float32)))
                bn.bias.copy_(torch.from_numpy(rng.normal(0.0, 0.1, bn.num_features).astype(np.float32)))
    raw, _ = images.photos((96, 96), limit=4)
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(spec.normalize(raw)))
    with torch.no_grad():
        for bn in bns:
            n = bn.num_features
            if not calibrated:
                bn.weight.copy_(torch.from_numpy(rng.uniform(0.2, 2.0, n).astype(np.float32)))
                bn.bias.copy_(torch.from_numpy(rng.uniform(-0.5, 0.5, n).astype(np.float32)))
            spread = torch.sqrt(bn.running_var + bn.eps)
            shift = spread * torch.from_numpy(rng.uniform(-3, 3, n).astype(np.float32))
            bn.running_mean += shift  # (x - mean - d) * s + beta + d * s: the same function
            bn.bias += shift * bn.weight / spread
    model.eval()
    return model


def save_all(model, root: Path, name: str, data_config: dict | None = None) -> dict[str, Path]:
    """The model as ``name.safetensors``, ``name.pth`` and a ``save_for_hf`` folder ``name/``."""
    import timm
    import torch
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(root / f"{name}.safetensors"), metadata={"format": "pt"})
    torch.save(state, str(root / f"{name}.pth"))
    timm.models.save_for_hf(model, str(root / name), safe_serialization=True, data_config=data_config)
    return {"safetensors": root / f"{name}.safetensors", "pth": root / f"{name}.pth", "folder": root / name}


def forward(model, x: np.ndarray, double: bool = False) -> np.ndarray:
    """timm's own forward (eval mode) of an NCHW batch, float32 or float64."""
    import copy

    import torch

    m = copy.deepcopy(model).double() if double else model
    with torch.no_grad():
        out = m(torch.from_numpy(x.astype(np.float64 if double else np.float32)))
    if isinstance(out, (list, tuple)):
        return [o.numpy() for o in out]
    return out.numpy()


def verdict(judged: np.ndarray, ref32: np.ndarray, truth64: np.ndarray, tolerance: float = 1e-5) -> dict:
    """The check's rule: max rel within the tolerance raised to the float32 floor (both runs' own largest errors
    against the float64 truth, over its largest magnitude); top-1 agreement for logits."""
    judged, ref32 = np.asarray(judged, np.float64), np.asarray(ref32, np.float64)
    scale = np.abs(truth64).max()
    max_rel = float(np.abs(judged - ref32).max() / np.abs(ref32).max())
    floor = float((np.abs(ref32 - truth64).max() + np.abs(judged - truth64).max()) / scale)
    out = {"max_rel": max_rel, "floor": floor, "tolerance": max(tolerance, floor),
           "vs_float64": float(np.abs(judged - truth64).max() / scale)}
    if judged.ndim == 2:
        out["top1"] = float(np.mean(judged.argmax(1) == truth64.argmax(1)))
    out["passed"] = max_rel <= out["tolerance"] and out.get("top1", 1.0) == 1.0
    return out
