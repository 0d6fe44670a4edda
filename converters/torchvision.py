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

Out: :func:`export_bundle` writes a bundle's backbone as a torchvision state dict. What
the file means: **torchvision's standard ``resnetN`` taking the bundle's SOURCE input spec**
(the convention the weights were trained with, ``imagenet`` for torchvision/gluoncv
weights), because torchvision's architecture has no layer where a folded input
normalization could live exactly (folding a shift into the first conv is wrong near the
zero-padded border). Every frozen BatchNorm form is re-expressed exactly as a BN with
``running_mean 0``, ``running_var 1 - eps`` (so ``1/sqrt(var + eps)`` is exactly 1 in
float32), ``weight s`` and ``bias t``; a fused conv keeps its fused weights and its bias
moves into the BN's ``bias``. So the exported BNs are frozen-BN constants, not dataset
statistics: use them in eval mode or as ``FrozenBatchNorm2d`` (torchvision detection and
detectron2 do), never let training-mode BN update them.
"""

from __future__ import annotations

import re
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from bbadapt.errors import ModelError, OutputError, WeightsError

from . import safetensors_io
from .affine_bn import unit_variance
from .base import Converted, Format, check_tensors, file_digest, require_file, unmatched_error

BN_EPS = 1e-5  # torchvision's and gluoncv v1b's BatchNorm eps
WIDTHS = (64, 128, 256, 512)
DEPTHS = {  # (blocks per stage, bottleneck) -> depth: the ResNet paper's table
    ((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34, ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101, ((3, 8, 36, 3), True): 152,
}
TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # protocol 2, then torch's magic long
IGNORED_SUFFIX = ".num_batches_tracked"
_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")


VAR_ONE = unit_variance(BN_EPS)  # running_var of an exported frozen BN: var + eps == 1 in float32


# ---------------------------------------------------------------- layout


def layout(names) -> tuple[int, bool, tuple[int, ...]]:
    """(depth, bottleneck, blocks per stage) read off the tensor names; ModelError if no ResNet."""
    blocks: dict[int, set[int]] = {}
    for name in names:
        m = _BLOCK_KEY.match(name)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if sorted(blocks) != [1, 2, 3, 4] or "conv1.weight" not in names:
        raise ModelError("the tensors are not a torchvision ResNet state dict (need conv1.weight and layer1..layer4)")
    counts = tuple(len(blocks[k]) for k in (1, 2, 3, 4))
    if any(sorted(blocks[k]) != list(range(len(blocks[k]))) for k in blocks):
        raise ModelError(f"the ResNet blocks are not numbered 0..n-1 in every layer ({counts})")
    bottleneck = "layer1.0.conv3.weight" in names
    depth = DEPTHS.get((counts, bottleneck))
    if depth is None:
        known = ", ".join(f"resnet{d}: {c} {'bottleneck' if b else 'basic'}" for (c, b), d in DEPTHS.items())
        raise ModelError(f"a ResNet with {counts} {'bottleneck' if bottleneck else 'basic'} blocks per stage is not "
                         f"one of torchvision's ({known})")
    return depth, bottleneck, counts


def conv_bn_pairs(depth: int) -> list[tuple[str, str]]:
    """(conv, bn) structural paths of torchvision's ``resnet<depth>``, in forward order."""
    counts, bottleneck = next(k for k, d in DEPTHS.items() if d == depth)
    pairs = [("conv1", "bn1")]
    for stage, n in enumerate(counts, start=1):
        for i in range(n):
            prefix = f"layer{stage}.{i}"
            for k in range(1, 4 if bottleneck else 3):
                pairs.append((f"{prefix}.conv{k}", f"{prefix}.bn{k}"))
            if i == 0 and (stage > 1 or bottleneck):
                pairs.append((f"{prefix}.downsample.0", f"{prefix}.downsample.1"))
    return pairs


def expected_shapes(depth: int, classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Every tensor of torchvision's ``resnet<depth>`` state dict and its shape (num_batches_tracked: ``()``)."""
    counts, bottleneck = next(k for k, d in DEPTHS.items() if d == depth)
    expansion = 4 if bottleneck else 1
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_bn(conv: str, bn: str, out_c: int, in_c: int, k: int) -> None:
        shapes[f"{conv}.weight"] = (out_c, in_c, k, k)
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{bn}.{p}"] = (out_c,)
        shapes[f"{bn}{IGNORED_SUFFIX}"] = ()

    conv_bn("conv1", "bn1", 64, 3, 7)
    in_c = 64
    for stage, (n, width) in enumerate(zip(counts, WIDTHS, strict=True), start=1):
        for i in range(n):
            p = f"layer{stage}.{i}"
            if bottleneck:
                conv_bn(f"{p}.conv1", f"{p}.bn1", width, in_c, 1)
                conv_bn(f"{p}.conv2", f"{p}.bn2", width, width, 3)
                conv_bn(f"{p}.conv3", f"{p}.bn3", width * 4, width, 1)
            else:
                conv_bn(f"{p}.conv1", f"{p}.bn1", width, in_c, 3)
                conv_bn(f"{p}.conv2", f"{p}.bn2", width, width, 3)
            if i == 0 and in_c != width * expansion:
                conv_bn(f"{p}.downsample.0", f"{p}.downsample.1", width * expansion, in_c, 1)
            in_c = width * expansion
    shapes["fc.weight"] = (classes, in_c)
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
    odd = sorted(k for k, v in loaded.items() if v.dtype == torch.bfloat16)
    if odd:
        raise WeightsError(f"{path} holds bfloat16 tensors ({len(odd)}, e.g. {odd[0]}); bbadapt converts float32 weights only")
    return {str(k): v.detach().cpu().numpy() for k, v in loaded.items()}


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


def read(path: Path, arch: str | None = None, progress=None) -> Converted:
    """A torchvision ResNet state dict as gluoncv ``resnetN_v1b`` with the same weights."""
    from bbadapt import zoo
    from bbadapt.weights import assign, structural_params

    say = progress or (lambda _m: None)
    path = require_file(path)
    arrays, facts = read_state_dict(path)
    ignored = sorted(k for k in arrays if k.endswith(IGNORED_SUFFIX))
    arrays = {k: v for k, v in arrays.items() if not k.endswith(IGNORED_SUFFIX)}
    check_tensors(arrays, str(path))
    depth, bottleneck, counts = layout(set(arrays))
    name = _zoo_name(arch, depth)
    say(f"torchvision resnet{depth} ({'bottleneck' if bottleneck else 'basic'} blocks {counts}) -> {name}")
    net = zoo.build(name)
    params = structural_params(net)
    bn_paths = {k.rpartition(".")[0] for k in params if k.endswith(".running_var")}
    renamed = {_to_gluon(k, bn_paths): k for k in arrays}
    unmatched = sorted(renamed[g] for g in renamed if g not in params)
    missing = sorted(k for k in params if k not in renamed)
    if unmatched or missing:
        raise unmatched_error(f"{path} (torchvision resnet{depth})", unmatched, missing)
    assign(net, {g: arrays[t].astype(np.float32) for g, t in renamed.items()}, origin=str(path))
    digest = file_digest(path)
    provenance = {"kind": "file", "format": FORMAT.name, "path": str(path.resolve()), "sha256": digest,
                  "files": {str(path.resolve()): digest}, "arch_arg": arch, **facts,
                  "layout": {"depth": depth, "bottleneck": bottleneck, "blocks": list(counts)},
                  "naming": "torchvision state_dict (conv1, bn1.weight, layerK.i.downsample.0 ...)",
                  "ignored": {"num_batches_tracked": len(ignored)}}
    return Converted(net=net, arch={"zoo": name}, info=zoo.model_info(name), provenance=provenance)


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


# ---------------------------------------------------------------- export


def _affine_of(block) -> tuple[np.ndarray, np.ndarray]:
    """A frozen-BN slot's function as ``x * s + t`` (float64): Identity, FrozenAffine or BatchNorm."""
    from mxnet.gluon import nn

    from bbadapt.layers import FrozenAffine, Identity, bn_constants, param_value

    if isinstance(block, Identity):
        return np.ones(1), np.zeros(1)
    if isinstance(block, FrozenAffine):
        return param_value(block.scale), param_value(block.shift)
    if isinstance(block, nn.BatchNorm):
        return bn_constants(block)
    raise ModelError(f"unexpected block {type(block).__name__} where a BatchNorm was")


def _first_conv(bundle, block) -> tuple[np.ndarray, np.ndarray]:
    """conv1 re-expressed for SOURCE-spec input: (weight, bias), the input fold undone exactly."""
    from mxnet.gluon import nn

    from bbadapt.layers import FrozenAffine, param_value
    from bbadapt.spec import affine_map

    perm, a, b = affine_map(bundle.source, bundle.target)
    ops = {s["op"] for s in bundle.adapted.plan}
    if "input_bn" in ops:
        raise ModelError("the bundle folded its input into a data BatchNorm, which torchvision's ResNet has no place for")
    if isinstance(block, nn.HybridSequential):  # input_insert: FrozenAffine (target order) before the conv
        affine, conv = block[0], block[1]
        if not isinstance(affine, FrozenAffine):
            raise ModelError("conv1 of the bundle is a sequence that does not start with its input affine")
        want_scale, want_shift = np.empty(3), np.empty(3)
        want_scale[list(perm)], want_shift[list(perm)] = a, b
        if not (np.allclose(param_value(affine.scale), want_scale, rtol=1e-6, atol=0)
                and np.allclose(param_value(affine.shift), want_shift, rtol=1e-6, atol=1e-6)):
            raise ModelError("the bundle's input affine does not match its source/target specs; cannot undo it")
        weight = param_value(conv.weight)[:, list(perm)]
        bias = param_value(conv.bias) if conv.bias is not None else np.zeros(weight.shape[0])
        return weight, bias
    weight_t = param_value(block.weight)
    bias = param_value(block.bias) if block.bias is not None else np.zeros(weight_t.shape[0])
    if "input_conv" in ops:  # weights were scaled by a and permuted; the shift went into the bias
        weight = weight_t[:, list(perm)] / a.reshape(1, 3, 1, 1)
        return weight, bias - np.einsum("ochw,c->o", weight, b)
    return weight_t, bias  # no input step: source and target are the same function


def torchvision_state(bundle) -> dict[str, np.ndarray]:
    """The bundle backbone as torchvision ``resnetN`` tensors (float32; num_batches_tracked int64 0)."""
    from bbadapt.layers import get_block, param_value

    depth = _v1b_depth(bundle.model)
    net = bundle.adapted.net
    state: dict[str, np.ndarray] = {}
    for conv_path, bn_path in conv_bn_pairs(depth):
        conv = get_block(net, conv_path)
        if conv_path == "conv1":
            weight, bias = _first_conv(bundle, conv)
        else:
            weight = param_value(conv.weight)
            bias = param_value(conv.bias) if conv.bias is not None else np.zeros(weight.shape[0])
        s, t = _affine_of(get_block(net, bn_path))
        s, t = np.broadcast_to(s, bias.shape), np.broadcast_to(t, bias.shape)
        state[f"{conv_path}.weight"] = weight
        state[f"{bn_path}.weight"] = s
        state[f"{bn_path}.bias"] = s * bias + t
        state[f"{bn_path}.running_mean"] = np.zeros_like(s)
        state[f"{bn_path}.running_var"] = np.full_like(s, VAR_ONE)
    fc = get_block(net, "fc")
    state["fc.weight"], state["fc.bias"] = param_value(fc.weight), param_value(fc.bias)
    state = {k: v.astype(np.float32) for k, v in state.items()}
    state.update({f"{bn}{IGNORED_SUFFIX}": np.zeros((), np.int64) for _, bn in conv_bn_pairs(depth)})
    want = expected_shapes(depth, classes=state["fc.weight"].shape[0])
    wrong = sorted(k for k in want if tuple(state[k].shape) != want[k])
    if wrong or set(want) != set(state):
        raise ModelError(f"the bundle's {bundle.model} does not have torchvision resnet{depth}'s channel counts "
                         f"(e.g. {wrong[0] if wrong else min(set(want) ^ set(state))}); a pruned variant?")
    return state


def _v1b_depth(model: str) -> int:
    m = re.fullmatch(r"resnet(18|34|50|101|152)_v1b", model)
    if not m:
        raise ModelError(f"the bundle's model {model} is not torchvision-compatible: torchvision's ResNet is "
                         "gluoncv resnet{18,34,50,101,152}_v1b (7x7 stem, stride in the 3x3, conv shortcut)")
    return int(m.group(1))


def export_bundle(bundle_dir: str | Path, out: str | Path, force: bool = False, progress=None,
                  sizes: list[tuple[int, int]] | None = None, input_range: str = "01") -> dict:
    """Write a bundle's backbone as a torchvision ``resnetN`` state dict (``.safetensors``, or ``.pth`` with torch).

    The file is read back (by this module's own reader) and checked against the bundle's
    backbone on real photos before it is renamed into place; the exported model expects
    the bundle's SOURCE spec (see the module docstring). Returns a summary with the check.
    A detector bundle or training checkpoint goes to
    :func:`converters.writers.torchvision_detector.export_detector` instead (``out`` is then
    a directory; ``input_range`` "01" or "255" is the detector's input range).
    """
    from .writers import torchvision_detector

    if torchvision_detector.is_detector_dir(bundle_dir):
        options = torchvision_detector.ExportOptions(input_range=input_range, sizes=sizes, force=force)
        return torchvision_detector.export_detector(bundle_dir, out, force=force, progress=progress, options=options)
    import bbadapt
    from bbadapt.spec import parse_spec

    from .bundle_io import check_summary, open_bundle, refuse_existing_file, write_atomic

    say = progress or (lambda _m: None)
    out = Path(out)
    refuse_existing_file(out, force)
    as_pth = out.suffix in (".pth", ".pt")
    if as_pth:
        try:
            import torch
        except ImportError:
            raise OutputError(f"writing {out.suffix} needs torch (pip install 'bbadapt[torch]'); "
                              "write .safetensors instead (torchvision loads it with safetensors.torch.load_file)") from None
    elif out.suffix != ".safetensors":
        raise OutputError(f"{out}: name the torchvision export .safetensors (or .pth/.pt with torch installed)")
    say(f"reading bundle {bundle_dir}")
    bundle = open_bundle(bundle_dir)
    state = torchvision_state(bundle)
    source = parse_spec(bundle.source)
    metadata = {"format": "pt", "bbadapt.input_spec": source.to_string(), "bbadapt.model": bundle.model,
                "bbadapt.arch": f"torchvision.models.resnet{_v1b_depth(bundle.model)}",
                "bbadapt.bn": "frozen constants: running_mean 0, running_var 1-eps, weight s, bias t (eval mode only)"}
    payload = safetensors_io.dumps(state, metadata)
    with tempfile.TemporaryDirectory(prefix="bbadapt-export-") as tmp:
        staged = Path(tmp) / "export.safetensors"
        staged.write_bytes(payload)
        say("reading the export back and checking it against the bundle")
        again = read(staged)
    report = bbadapt.check(again.net, source, bundle.adapted, sizes=sizes, n_photos=2)
    if not report["passed"]:
        raise OutputError(f"the exported weights do not reproduce the bundle (worst max rel {report['worst_max_rel']:.3g}); "
                          f"nothing written: {'; '.join(report.get('reasons', []))[:200]}")
    if as_pth:
        def save_and_verify(tmp: Path) -> None:  # the .pth must hold exactly the checked tensors
            torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, str(tmp))
            back = torch.load(str(tmp), weights_only=True)
            if set(back) != set(state) or any(not np.array_equal(back[k].numpy(), state[k]) for k in state):
                raise OutputError(f"{out}: torch.load of the written file does not give the checked tensors")

        write_atomic(out, save_and_verify, force)
    else:
        write_atomic(out, lambda tmp: tmp.write_bytes(payload), force)
    say(f"wrote {out}")
    return {"format": "torchvision", "out": str(out), "container": "pth" if as_pth else "safetensors",
            "architecture": metadata["bbadapt.arch"], "input_spec": source.to_string(), "bundle_target": bundle.target.to_string(),
            "tensors": len(state), "sha256": file_digest(out), "check_passed": bool(report["passed"]),
            "check_worst_max_rel": float(report["worst_max_rel"]), "check": check_summary(report),
            "meaning": "torchvision's standard ResNet fed the bundle's source spec; BNs hold frozen constants (eval mode)"}
