"""timm ResNets with a GluonCV twin: state dicts (``.safetensors``, ``.pth``) and timm folders.

timm's ``ResNet`` class builds gluoncv's whole v1b family from three settings, and names every
tensor as torchvision does (BN ``weight``/``bias``, ``layerK.i.downsample``):

* ``stem_type='deep'``: a 3x3 conv stack ``conv1.0``/``.3``/``.6`` (BN ``conv1.1``/``.4``, then ``bn1``)
  of widths ``w, w, 2w`` instead of the 7x7 ``conv1`` -- gluoncv's ``deep_stem`` (``stem_width`` w);
* ``avg_down``: the projection shortcut's conv and BN sit at ``downsample.1``/``.2`` behind an
  average pool at ``downsample.0`` (no tensors) -- gluoncv's ``avg_down``;
* the blocks per stage and basic/bottleneck blocks -- the depth.

So ``resnetN`` is ``resnetN_v1b``, ``resnetNc`` (deep stem 32) ``_v1c``, ``resnetNd`` (deep stem 32,
avg-down) ``_v1d``, ``resnetNs`` (deep stem 64) ``_v1s``, and a deep stem 64 with avg-down would be
``_v1e`` (timm registers no such model). All of it is read from the tensors (:func:`diagnose`), never
from a name; the names only say which gluoncv model to build. Everything else timm builds on the same
class has no twin and is refused in one line saying what it has that gluoncv lacks: squeeze-excitation
or other attention (``seresnet``, ``ecaresnet``, ``resnetrs``), a tiered stem (``resnet50t``), GroupNorm
(``resnet50_gn``), a depth gluoncv lacks (``resnet26``), grouped/wider convs (ResNeXt, wide ResNets).

A timm folder (``save_for_hf``: ``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``)
also says the input normalization: ``pretrained_cfg``'s ``mean``/``std`` (timm divides by 255 first)
set the source spec. A bare state dict does not say it; ``imagenet`` is assumed (timm's gluon ports
and torchvision-recipe weights use it) and a note says so.

Reading the tensors is :mod:`converters.readers.torchvision`'s (safetensors with numpy, ``.pth``
through ``torch.load(weights_only=True)``). Out: :mod:`converters.writers.timm`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from bbadapt.core.registry import Converted
from bbadapt.core.spec import PRESETS, InputSpec
from bbadapt.platform.errors import ModelError, WeightsError
from converters.readers import torchvision as tv
from converters.readers.base import Format, ResNetNaming, file_digest, open_regular, read_layout

CONFIG = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what save_for_hf writes, in the order preferred
MAX_CONFIG_BYTES = 1 << 20
TWIN_VARIANTS = {(None, False): "b", (32, False): "c", (32, True): "d", (64, False): "s", (64, True): "e"}
GLUONCV_DEPTHS = {"b": (18, 34, 50, 101, 152), "c": (50, 101, 152), "d": (50, 101, 152), "e": (50, 101, 152),
                  "s": (50, 101, 152)}  # what gluoncv's model zoo registers (checked against the zoo in the tests)
# What extra tensors in a timm ResNet usually are, for the refusal's "why" (matched on the tensor name).
EXTRA_KINDS = ((".se.", "squeeze-excitation / attention modules"), (".attn.", "attention modules"),
               ("maxpool.", "a strided-conv stem pool (timm replace_stem_pool)"), (".aa.", "anti-aliased downsampling"),
               (".drop_block", "DropBlock"), ("conv1.9.", "a deeper stem"))
DEFAULT_SPEC_NOTE = ("input spec imagenet assumed: a bare timm/torchvision state dict does not say its normalization "
                     "(timm folders do, in config.json); pass --from if the weights were trained with another")

NAMING = ResNetNaming(re.compile(r"^layer([1-4])\.(\d+)\."), (1, 2, 3, 4), "bn1.weight", "layer1.0.conv3.weight",
                      "the tensors are not a timm/torchvision ResNet state dict (need bn1 and layer1..layer4)")


@dataclass(frozen=True)
class Layout:
    """A timm ResNet's layout as its tensors show it."""

    depth: int | None
    bottleneck: bool
    blocks: tuple[int, ...]
    stem: tuple[int, int, int] | None  # deep-stem widths; None: the 7x7 stem
    avg_down: bool

    @property
    def variant(self) -> str | None:
        """gluoncv's letter (b, c, d, e, s), or None when no gluoncv stem has these widths."""
        if self.stem is not None and self.stem != (self.stem[0], self.stem[0], 2 * self.stem[0]):
            return None
        return TWIN_VARIANTS.get((self.stem[0] if self.stem else None, self.avg_down))

    @property
    def twin(self) -> str:
        return f"resnet{self.depth}_v1{self.variant}"

    @property
    def timm_arch(self) -> str | None:
        """timm's registered name for this layout (None: timm registers none, e.g. the v1e layout)."""
        if self.variant == "e":
            return None
        return f"resnet{self.depth}{'' if self.variant == 'b' else self.variant}"

    def describe(self) -> str:
        stem = "7x7 stem" if self.stem is None else f"deep stem {'/'.join(map(str, self.stem))}"
        shortcut = ", average-pool shortcut" if self.avg_down else ""
        return f"{stem}{shortcut}, {'bottleneck' if self.bottleneck else 'basic'} blocks {list(self.blocks)}"

    def to_dict(self) -> dict:
        return {"depth": self.depth, "bottleneck": self.bottleneck, "blocks": list(self.blocks),
                "stem": list(self.stem) if self.stem else None, "avg_down": self.avg_down}


def _listing(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def diagnose(shapes: dict[str, tuple[int, ...]], what: str | None = None, origin: str | None = None) -> Layout:
    """The layout of a timm ResNet from its tensor names and shapes (num_batches_tracked left out), if it has a
    GluonCV twin; else one WeightsError line saying what it is and why there is no twin.

    ``what``: how to call the model in the refusal (``timm seresnet50`` when a config names it); ``origin``: the
    file, said first.
    """
    names = set(shapes)
    depth, bottleneck, counts = read_layout(names, NAMING)
    if "conv1.weight" in names:
        stem = None
    elif all(f"conv1.{i}.weight" in names for i in (0, 3, 6)):
        stem = tuple(int(shapes[f"conv1.{i}.weight"][0]) for i in (0, 3, 6))
    else:
        stem = ()  # neither: said below
    avg_down = any(f"layer{k}.0.downsample.2.weight" in names for k in (1, 2, 3, 4))
    found = Layout(depth, bottleneck, counts, stem or None, avg_down)
    what = (f"{origin}: " if origin else "") + (what or f"a timm ResNet ({found.describe()})")

    def refuse(why: str) -> WeightsError:
        return WeightsError(f"{what} has no GluonCV twin: {why}; refused (bbadapt reads gluoncv's resnetN_v1b..v1s "
                            "layouts: timm resnet18..152, resnet50/101/152 c, d, s)")

    conv1 = sorted(n for n in names if n.startswith("conv1."))
    if stem == ():
        raise refuse(f"its stem ({_listing(conv1)}) is neither a 7x7 conv nor a 3-conv deep stem")
    if "bn1.running_var" not in names:
        raise refuse("its normalization layers keep no running statistics (GroupNorm or similar, e.g. timm "
                     "resnet50_gn); gluoncv's ResNets use BatchNorm")
    if depth is None:
        raise refuse(f"{counts} {'bottleneck' if bottleneck else 'basic'} blocks per stage is no depth gluoncv has "
                     "(18, 34, 50, 101, 152)")
    if found.variant is None:
        raise refuse(f"a deep stem of widths {'/'.join(map(str, found.stem))}; gluoncv's are 32/32/64 (v1c, v1d) "
                     "and 64/64/128 (v1s, v1e) (a tiered stem, as timm resnet50t has?)")
    if depth not in GLUONCV_DEPTHS[found.variant]:
        raise refuse(f"gluoncv has no {found.twin} ({found.describe()}; its v1{found.variant} models are ResNet-"
                     f"{', '.join(map(str, GLUONCV_DEPTHS[found.variant]))})")
    classes = shapes.get("fc.weight", (1000,))[0]
    want = {k: v for k, v in tv.expected_shapes(depth, classes, found.stem, avg_down).items()
            if not k.endswith(tv.IGNORED_SUFFIX)}
    extra = sorted(names - set(want))
    if extra:
        kinds = sorted({kind for marker, kind in EXTRA_KINDS for n in extra if marker in n})
        raise refuse(f"{len(extra)} tensors it has no place for ({_listing(extra)})"
                     + (f": {', '.join(kinds)}" if kinds else ""))
    missing = sorted(set(want) - names)
    if missing:
        raise refuse(f"{len(missing)} tensors of gluoncv's {found.twin} are missing ({_listing(missing)})")
    wrong = [k for k in sorted(want, key=list(want).index) if tuple(shapes[k]) != want[k]]
    if wrong:
        raise refuse(f"{wrong[0]} has shape {tuple(shapes[wrong[0]])} where {found.twin} has {want[wrong[0]]}"
                     + (" (grouped or wider convs: ResNeXt, wide ResNet?)" if ".conv" in wrong[0] else ""))
    return found


# ---------------------------------------------------------------- folders


@dataclass(frozen=True)
class Source:
    """Where a timm model's weights are, and what its folder's config.json says (None for a bare file)."""

    weights: Path
    folder: Path | None
    config: dict | None
    config_path: Path | None

    @property
    def architecture(self) -> str | None:
        return self.config["architecture"] if self.config else None


def is_folder(path: Path) -> bool:
    """A timm folder: ``config.json`` naming an ``architecture``, beside model.safetensors or pytorch_model.bin."""
    return (path / CONFIG).is_file() and any((path / w).is_file() for w in WEIGHT_FILES)


def _in_folder(path: Path) -> bool:
    return path.name in WEIGHT_FILES and not path.is_dir() and is_folder(path.parent)


def locate(path: Path) -> Source:
    """A timm folder's weights file and config (config.json read and checked), or a bare file as it is.

    The weights file of a folder, named by itself, is read with its config.json too (as a graph's ``.params``
    partner is): the folder is what says the input spec, and re-checks find both files again.
    """
    if _in_folder(path):
        path = path.parent
    if not path.is_dir():
        return Source(path, None, None, None)
    weights = next((path / w for w in WEIGHT_FILES if (path / w).exists()), None)
    if weights is None:
        raise WeightsError(f"{path} is a folder without {' or '.join(WEIGHT_FILES)} (a timm save_for_hf folder has one)")
    config_path = path / CONFIG
    with open_regular(config_path, "timm config", MAX_CONFIG_BYTES) as f:
        raw = f.read()
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{config_path} is not JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise WeightsError(f"{config_path} names no architecture (timm's save_for_hf writes \"architecture\")")
    return Source(weights, path, config, config_path)


def spec_from_config(config: dict, origin: str) -> InputSpec:
    """The input spec a timm ``pretrained_cfg`` states (timm: ``(x/255 - mean) / std`` per RGB channel)."""
    cfg = config.get("pretrained_cfg")
    if not isinstance(cfg, dict):
        raise WeightsError(f"{origin} has no pretrained_cfg, so it does not say the input normalization "
                           "(mean, std); pass --from")
    values = {}
    for key in ("mean", "std"):
        value = cfg.get(key)
        if value is None:
            raise WeightsError(f"{origin}: pretrained_cfg has no {key}, so it does not say the input normalization; "
                               "pass --from")
        value = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(value) == 1:
            value = value * 3
        if len(value) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                      for v in value):
            raise WeightsError(f"{origin}: pretrained_cfg {key} must be 1 or 3 finite numbers, got {cfg.get(key)!r}")
        values[key] = tuple(float(v) for v in value)
    if min(values["std"]) <= 0:
        raise WeightsError(f"{origin}: pretrained_cfg std must be positive, got {list(values['std'])}")
    spec = InputSpec("rgb", 1 / 255, values["mean"], values["std"])
    return next((p for p in PRESETS.values() if p.same_function(spec)), spec)


# ---------------------------------------------------------------- reading


def _model_args_change_layout(config: dict | None) -> bool:
    args = (config or {}).get("model_args") or {}
    return isinstance(args, dict) and bool(set(args) & {"stem_type", "stem_width", "avg_down", "layers", "block"})


def _arch_aliases(found: Layout) -> set[str]:
    names = {found.twin}
    if found.timm_arch:
        names |= {found.timm_arch, f"timm:{found.timm_arch}", f"timm.{found.timm_arch}"}
    return names


def read(path: Path, arch: str | None = None, progress=None) -> Converted:
    """A timm ResNet (state dict file or folder) as its gluoncv twin with the same weights."""
    from bbadapt.core import zoo

    say = progress or (lambda _m: None)
    src = locate(Path(path))
    arrays, facts, ignored, note = tv.float32_state(src.weights)
    named = f"timm {src.architecture}" if src.architecture else None
    found = diagnose({k: v.shape for k, v in arrays.items()}, named, str(src.weights))
    if src.architecture and not _model_args_change_layout(src.config):
        stated = src.architecture.split(".")[0]
        if found.timm_arch and stated != found.timm_arch:
            raise WeightsError(f"{src.config_path} says {src.architecture} but the tensors are timm "
                               f"{found.timm_arch} ({found.describe()})")
    if arch is not None and arch not in _arch_aliases(found):
        raise ModelError(f"--arch {arch} contradicts the file, which holds timm {found.timm_arch or found.twin} "
                         f"(accepted: {', '.join(sorted(_arch_aliases(found)))})")
    if src.config is not None:
        spec = spec_from_config(src.config, str(src.config_path))
        spec_note = f"input spec {spec.to_string()} from {src.config_path} (pretrained_cfg mean/std)"
    else:
        spec, spec_note = PRESETS["imagenet"], DEFAULT_SPEC_NOTE
    timm_name = src.architecture or found.timm_arch or f"ResNet ({found.describe()})"
    say(f"timm {timm_name} ({found.describe()}) -> {found.twin}")
    net = tv.load_twin(arrays, found.twin, f"{src.weights} (timm {timm_name})")
    files = {str(src.weights.resolve()): file_digest(src.weights)}
    if src.config_path is not None:
        files[str(src.config_path.resolve())] = file_digest(src.config_path)
    provenance = {"kind": "file", "format": FORMAT.name, "path": str(src.weights.resolve()),
                  "sha256": files[str(src.weights.resolve())], "files": files, "arch_arg": arch, **facts,
                  "folder": str(src.folder.resolve()) if src.folder else None, "timm_arch": timm_name,
                  "gluoncv_twin": found.twin, "layout": found.to_dict(),
                  "naming": "timm/torchvision state_dict (conv1.0, bn1.weight, layerK.i.downsample.1 ...)",
                  "ignored": {"num_batches_tracked": len(ignored)}, "dtype_note": note,
                  "input_spec": spec.to_string(), "input_spec_note": spec_note}
    info = dataclasses.replace(zoo.model_info(found.twin), source_spec=spec.to_string())
    return Converted(net=net, arch={"zoo": found.twin}, info=info, provenance=provenance)


def timm_only(names: set[str]) -> bool:
    """Names only timm's ResNet class writes (the rest, 7x7-stem files, stay torchvision's, damaged ones too): a deep
    stem, an avg-down shortcut, norms without running statistics, or modules gluoncv lacks (SE, attention ...)."""
    if not ("bn1.weight" in names and any(n.startswith("layer1.0.") for n in names)):
        return False
    return ("conv1.weight" not in names or "bn1.running_var" not in names
            or any(f"layer{k}.0.downsample.2.weight" in names for k in (1, 2, 3, 4))
            or any(marker in n for n in names for marker, _ in EXTRA_KINDS))


def sniff(path: Path, head: bytes) -> bool:
    """A ResNet state dict with names only timm writes (:func:`timm_only`), or the weights file of a timm folder."""
    try:
        if _in_folder(path):
            return True
        names = tv.state_dict_names(path)
    except Exception:  # noqa: BLE001 - a sniffer must not raise on garbage
        return False
    if names and all(n.startswith("module.") for n in names):
        names = {n[len("module."):] for n in names}
    return timm_only(names)


FORMAT = Format(
    name="timm",
    description="timm ResNets with a gluoncv twin (resnet18..152, resnet50/101/152 c/d/s): state dict or "
                "save_for_hf folder (config.json: input spec) -> gluoncv resnetN_v1b/c/d/s",
    sniff=sniff,
    read=read,
    extensions=(".safetensors", ".pth", "DIR/"),
    folder=is_folder,
)
