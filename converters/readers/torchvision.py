"""torchvision ResNet-18..152 state dicts, in and out.

torchvision's ResNet ("v1.5": stride in the 3x3, plain 7x7 stem, conv+BN projection
shortcut, BN eps 1e-5) is gluoncv's ``resnetN_v1b`` layer for layer, and the structural
names even agree (``layer1.0.downsample.0``); only BatchNorm's affine parameters are
called ``weight``/``bias`` instead of ``gamma``/``beta``, and torchvision keeps a
``num_batches_tracked`` counter that has no effect on inference (ignored). Weights expect
the ``imagenet`` input spec.

In: ``.safetensors`` is read with numpy (:mod:`converters.safetensors_io`), no torch
needed. ``.pth``/``.pt`` (zip or legacy pickle) go through ``torch.load(weights_only=True)``
-- torch's own restricted loader -- only when torch is installed (``bbadapt[torch]``).
The depth comes from the tensors (blocks per stage, basic or bottleneck), never from the
file name.

Out: :mod:`converters.writers.torchvision`.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np

from bbadapt.core.foldmath import unit_variance
from bbadapt.core.registry import Converted
from bbadapt.core.zoo import RESNET_LAYOUTS
from bbadapt.platform.errors import ModelError, WeightsError
from converters.readers import limits, safetensors_io
from converters.readers.base import (
    Format,
    ResNetNaming,
    bfloat16_bits,
    file_digest,
    float32_tensors,
    read_layout,
    require_file,
    unmatched_error,
)

BN_EPS = 1e-5  # torchvision's and gluoncv v1b's BatchNorm eps
WIDTHS = (64, 128, 256, 512)
TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # protocol 2, then torch's magic long
IGNORED_SUFFIX = ".num_batches_tracked"


VAR_ONE = unit_variance(BN_EPS)  # running_var of an exported frozen BN: var + eps == 1 in float32


# ---------------------------------------------------------------- layout


NAMING = ResNetNaming(re.compile(r"^layer([1-4])\.(\d+)\."), (1, 2, 3, 4), "conv1.weight", "layer1.0.conv3.weight",
                      "the tensors are not a torchvision ResNet state dict (need conv1.weight and layer1..layer4)")


def layout(names) -> tuple[int, bool, tuple[int, ...]]:
    """(depth, bottleneck, blocks per stage) read off the tensor names."""
    depth, bottleneck, counts = read_layout(names, NAMING)
    if depth is None:
        known = ", ".join(f"resnet{d}: {c} {'bottleneck' if b else 'basic'}" for d, (c, b) in RESNET_LAYOUTS.items())
        raise WeightsError(f"a ResNet with {counts} {'bottleneck' if bottleneck else 'basic'} blocks per stage is not "
                         f"one of torchvision's ({known})")
    return depth, bottleneck, counts


def _conv_bn_layers(depth: int, stem: tuple[int, int, int] | None = None, avg_down: bool = False):
    """(conv, bn, out channels, in channels, kernel) of every conv+BN pair, in forward order.

    ``stem``: the widths of a deep stem (``conv1.0``/``.3``/``.6``, 3x3 each, BN ``conv1.1``/``.4``/``bn1``;
    gluoncv v1c/v1d/v1e/v1s, timm ``resnetNc/d/s``), None for torchvision's 7x7 ``conv1``. ``avg_down``: the
    projection shortcut is ``downsample.1``/``.2`` behind an average pool (``downsample.0``, no tensors).
    """
    counts, bottleneck = RESNET_LAYOUTS[depth]
    expansion = 4 if bottleneck else 1
    if stem is None:
        yield "conv1", "bn1", 64, 3, 7
        in_c = 64
    else:
        yield "conv1.0", "conv1.1", stem[0], 3, 3
        yield "conv1.3", "conv1.4", stem[1], stem[0], 3
        yield "conv1.6", "bn1", stem[2], stem[1], 3
        in_c = stem[2]
    shortcut = ("downsample.1", "downsample.2") if avg_down else ("downsample.0", "downsample.1")
    for stage, (n, width) in enumerate(zip(counts, WIDTHS, strict=True), start=1):
        for i in range(n):
            p = f"layer{stage}.{i}"
            if bottleneck:
                yield f"{p}.conv1", f"{p}.bn1", width, in_c, 1
                yield f"{p}.conv2", f"{p}.bn2", width, width, 3
                yield f"{p}.conv3", f"{p}.bn3", width * 4, width, 1
            else:
                yield f"{p}.conv1", f"{p}.bn1", width, in_c, 3
                yield f"{p}.conv2", f"{p}.bn2", width, width, 3
            if i == 0 and (stage > 1 or in_c != width * expansion):
                yield f"{p}.{shortcut[0]}", f"{p}.{shortcut[1]}", width * expansion, in_c, 1
            in_c = width * expansion


def conv_bn_pairs(depth: int, stem: tuple[int, int, int] | None = None, avg_down: bool = False) -> list[tuple[str, str]]:
    """(conv, bn) structural paths of torchvision's ``resnet<depth>`` (or a deep-stem/avg-down relative), in order."""
    return [(conv, bn) for conv, bn, *_ in _conv_bn_layers(depth, stem, avg_down)]


def expected_shapes(depth: int, classes: int = 1000, stem: tuple[int, int, int] | None = None,
                    avg_down: bool = False) -> dict[str, tuple[int, ...]]:
    """Every tensor of torchvision's ``resnet<depth>`` state dict and its shape (num_batches_tracked: ``()``);
    ``stem``/``avg_down`` as :func:`conv_bn_pairs` (timm's names for gluoncv v1c/v1d/v1e/v1s)."""
    shapes: dict[str, tuple[int, ...]] = {}
    in_c = 0
    for conv, bn, out_c, in_c, k in _conv_bn_layers(depth, stem, avg_down):
        shapes[f"{conv}.weight"] = (out_c, in_c, k, k)
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{bn}.{p}"] = (out_c,)
        shapes[f"{bn}{IGNORED_SUFFIX}"] = ()
    shapes["fc.weight"] = (classes, out_c)
    shapes["fc.bias"] = (classes,)
    return shapes


def _to_gluon(name: str, bn_paths: set[str]) -> str:
    """torchvision name -> gluoncv v1b structural name (BN weight/bias are gamma/beta)."""
    owner, _, leaf = name.rpartition(".")
    if owner in bn_paths:
        leaf = {"weight": "gamma", "bias": "beta"}.get(leaf, leaf)
    return f"{owner}.{leaf}"


# ---------------------------------------------------------------- reading


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise WeightsError(f"{path} is a PyTorch checkpoint and reading it needs torch (pip install 'bbadapt[torch]'); "
                           "or save the state dict as .safetensors, which bbadapt reads without torch") from None
    _check_torch_zip(path)
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for bad files; all mean "unreadable"
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"cannot read {path} with torch.load(weights_only=True): {reason}") from None
    for key in ("state_dict", "model"):  # training checkpoints nest the weights
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors (a whole pickled model?)")
    return {str(k): bfloat16_bits(v.detach().cpu().contiguous().view(torch.int16).numpy()) if v.dtype == torch.bfloat16
            else v.detach().cpu().numpy() for k, v in loaded.items()}


def _check_torch_zip(path: Path) -> None:
    """A torch zip checkpoint's members may not declare more than they store (before torch inflates them)."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            limits.check_zip(z, str(path))
    except zipfile.BadZipFile as exc:
        raise WeightsError(f"cannot read {path}: damaged zip ({exc})") from None


def read_state_dict(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The raw tensors of a safetensors or torch file, and facts about the container."""
    with open(path, "rb") as f:
        head = f.read(64)
    if safetensors_io.looks_like(head):
        arrays, metadata = safetensors_io.load(path)
        facts = {"container": "safetensors", "metadata": metadata}
    else:
        arrays = _read_torch(path)
        facts = {"container": "torch-zip" if zipfile.is_zipfile(path) else "torch-legacy-pickle"}
    prefix = "module."  # nn.DataParallel's wrapper
    if arrays and all(k.startswith(prefix) for k in arrays):
        arrays = {k[len(prefix):]: v for k, v in arrays.items()}
        facts["stripped_prefix"] = prefix
    return arrays, facts


def _zoo_name(arch: str | None, depth: int) -> str:
    detected = f"resnet{depth}_v1b"
    if arch is None:
        return detected
    aliases = {detected, f"resnet{depth}", f"torchvision.resnet{depth}"}
    if arch not in aliases:
        raise ModelError(f"--arch {arch} contradicts the file, which holds a torchvision resnet{depth} "
                         f"(accepted: {', '.join(sorted(aliases))})")
    return detected


def load_twin(arrays: dict[str, np.ndarray], name: str, origin: str):
    """The gluoncv zoo net ``name`` holding a torchvision-named state dict (float32 arrays, no num_batches_tracked)."""
    from bbadapt.core import zoo
    from bbadapt.core.weights import assign, structural_params

    net = zoo.build(name)
    params = structural_params(net)
    bn_paths = {k.rpartition(".")[0] for k in params if k.endswith(".running_var")}
    renamed = {_to_gluon(k, bn_paths): k for k in arrays}
    unmatched = sorted(renamed[g] for g in renamed if g not in params)
    missing = sorted(k for k in params if k not in renamed)
    if unmatched or missing:
        raise unmatched_error(origin, unmatched, missing)
    assign(net, {g: arrays[t].astype(np.float32) for g, t in renamed.items()}, origin=origin)
    return net


def float32_state(path: Path) -> tuple[dict[str, np.ndarray], dict, list[str], str | None]:
    """A state dict file's tensors as float32 without num_batches_tracked; container facts; the ignored names;
    the dtype note."""
    arrays, facts = read_state_dict(path)
    ignored = sorted(k for k in arrays if k.endswith(IGNORED_SUFFIX))
    tensors = float32_tensors({k: v for k, v in arrays.items() if not k.endswith(IGNORED_SUFFIX)}, str(path))
    return tensors.arrays, facts, ignored, tensors.note


def read(path: Path, arch: str | None = None, progress=None) -> Converted:
    """A torchvision ResNet state dict as gluoncv ``resnetN_v1b`` with the same weights."""
    from bbadapt.core import zoo

    say = progress or (lambda _m: None)
    path = require_file(path)
    arrays, facts, ignored, note = float32_state(path)
    depth, bottleneck, counts = layout(set(arrays))
    name = _zoo_name(arch, depth)
    say(f"torchvision resnet{depth} ({'bottleneck' if bottleneck else 'basic'} blocks {counts}) -> {name}")
    net = load_twin(arrays, name, f"{path} (torchvision resnet{depth})")
    digest = file_digest(path)
    provenance = {"kind": "file", "format": FORMAT.name, "path": str(path.resolve()), "sha256": digest,
                  "files": {str(path.resolve()): digest}, "arch_arg": arch, **facts,
                  "layout": {"depth": depth, "bottleneck": bottleneck, "blocks": list(counts)},
                  "naming": "torchvision state_dict (conv1, bn1.weight, layerK.i.downsample.0 ...)",
                  "ignored": {"num_batches_tracked": len(ignored)}, "dtype_note": note}
    return Converted(net=net, arch={"zoo": name}, info=zoo.model_info(name), provenance=provenance)


MAX_PICKLE_PEEK = 64 << 20  # data.pkl of a ResNet-152 state dict is ~60 kB


def state_dict_names(path: Path) -> set[str]:
    """The tensor names of a safetensors or torch checkpoint, without torch and without running any pickle.

    For sniffing: a torch checkpoint's pickle (``data.pkl`` in the zip, or the legacy file's pickles) is only
    parsed opcode by opcode (:func:`pickletools.genops`), and every string it pushes that looks like a dotted
    tensor name is returned; nothing is resolved or called. Empty when the file is none of these.
    """
    import io
    import pickletools

    with open(path, "rb") as f:
        head = f.read(64)
    if safetensors_io.looks_like(head):
        return set(safetensors_io.header_names(path))
    if head.startswith(b"PK\x03\x04") and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            member = next((i for i in z.infolist() if i.filename.endswith("data.pkl")), None)
            if member is None or member.file_size > MAX_PICKLE_PEEK:
                return set()
            streams, count = [io.BytesIO(z.read(member))], 1
    elif head.startswith(TORCH_LEGACY_MAGIC):
        with open(path, "rb") as f:
            streams, count = [io.BytesIO(f.read(MAX_PICKLE_PEEK))], 4  # magic, protocol, sys info, the state dict
    else:
        return set()
    names: set[str] = set()
    stream = streams[0]
    for _ in range(count):
        for op, arg, _pos in pickletools.genops(stream):
            if isinstance(arg, str) and "." in arg and " " not in arg:
                names.add(arg)
            if op.name == "STOP":
                break
    return names


def sniff(path: Path, head: bytes) -> bool:
    """safetensors with torchvision ResNet names, a torch zip checkpoint, or a legacy torch pickle."""
    try:
        if safetensors_io.looks_like(head):
            names = safetensors_io.header_names(path)  # a damaged file is still claimed: read() says what is wrong
            return "conv1.weight" in names or "module.conv1.weight" in names
        if head.startswith(TORCH_LEGACY_MAGIC):
            return True
        if head.startswith(b"PK\x03\x04") and b"data.pkl" in head[:200]:  # torch writes <name>/data.pkl first
            return True  # even when cut short (no central directory): read() then says what is wrong
        if head.startswith(b"PK\x03\x04") and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                return any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist())
    except Exception:  # noqa: BLE001 - a sniffer must not raise on garbage
        return False
    return False


FORMAT = Format(
    name="torchvision",
    description="torchvision ResNet-18..152 state dict (.safetensors without torch; .pth/.pt with torch) -> gluoncv resnetN_v1b",
    sniff=sniff,
    read=read,
    extensions=(".safetensors", ".pth", ".pt"),
)
