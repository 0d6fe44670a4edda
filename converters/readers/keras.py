"""Keras applications ResNets (ResNet50/101/152 and ResNet50V2/101V2/152V2) from HDF5 files.

Three layouts of the same weights exist, all HDF5 (read with h5py, no Keras needed):

* legacy weights files (``save_weights`` of Keras 2, the published
  ``resnet50_weights_tf_dim_ordering_tf_kernels.h5``): root attribute ``layer_names``, one
  group per layer with attribute ``weight_names`` (``conv1_conv/kernel:0``), the tensors at
  ``<layer>/<weight name>``. Long attribute lists are split into ``layer_names0``, ``1`` ...
* legacy full-model files (``model.save("x.h5")``): the same under a ``model_weights`` group;
* Keras 3 ``.weights.h5``: ``layers/<class>[_k]/vars/<i>``, addressed by class and order
  (``layers/conv2d_3/vars/0``); recent Keras also stores the layer name as the ``name``
  attribute of ``vars``. Without it the order of ``model.layers`` is all there is.

Two layer namings exist: ``conv2_block1_1_conv``/``conv2_block1_1_bn`` (keras.applications
since 2.2.5 and Keras 3: BN eps 1.001e-5) and the Caffe-style names of the Keras <= 2.2.4
ResNet50 (``res2a_branch2a``/``bn2a_branch2a``, ``conv1``/``bn_conv1``, ``fc1000``: BN with
Keras's default eps 1e-3). Within a layer, tensors are taken by position, as Keras itself
loads them: conv ``kernel, bias``; BN ``gamma, beta, moving_mean, moving_variance``.

v1 maps onto Gluon ``resnetN_v1`` (stride in the first 1x1, as in Keras); a Keras conv bias
where the Gluon conv has none is folded into the following BN's moving mean
(``BN(conv(x) + b)`` is ``BN'(conv(x))`` with ``mean' = mean - b``). V2 maps onto
:func:`bbadapt.core.architectures.keras_resnet.keras_resnet_v2`. The architecture (v1/V2, blocks per
stage, classes) comes from the content, never from the file name.
"""

from __future__ import annotations

import io
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bbadapt.core.architectures.keras_resnet import KERAS_EPS
from bbadapt.core.registry import Converted, custom_info
from bbadapt.core.zoo import RESNET_LAYOUTS
from bbadapt.platform.errors import ModelError, WeightsError
from converters.readers import limits
from converters.readers.base import (
    Format,
    bfloat16_bits,
    file_digest,
    float32_tensors,
    open_regular,
    require_file,
    unmatched_error,
)

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"
KERAS_ZIP_MEMBER = "model.weights.h5"  # the weights inside a Keras 3 ``.keras`` archive
MAX_METADATA_BYTES = 1 << 20  # a .keras metadata.json is a few hundred bytes
# What h5py raises for damaged files besides OSError: HDF5 errors mapped to KeyError (objects), RuntimeError
# (links, B-trees), ValueError/TypeError (datatypes, attributes) -- found by fuzzing (tests/converters/fuzz_readers.py)
HDF5_DAMAGE = (OSError, KeyError, RuntimeError, ValueError, TypeError)
ZIP_DAMAGE = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError)  # damaged or exotic zip members
OLD_EPS = 1e-3  # Keras 2 BatchNormalization default: the Caffe-style ResNet50 never set it
STAGES = (2, 3, 4, 5)  # Keras stage numbers: conv2..conv5 / res2..res5
DEPTHS = {blocks: d for d, (blocks, bottleneck) in RESNET_LAYOUTS.items() if bottleneck}  # Keras ships 50/101/152
CANDIDATES = ("ResNet50", "ResNet101", "ResNet152", "ResNet50V2", "ResNet101V2", "ResNet152V2")

NEW_BLOCK = re.compile(r"conv([2-5])_block(\d+)_(0|1|2|3|preact)_(conv|bn)")
OLD_BLOCK = re.compile(r"(res|bn)([2-5])([a-z])_branch(1|2a|2b|2c)")
OLD_PART = {"1": "0", "2a": "1", "2b": "2", "2c": "3"}
SINGLE = {  # name -> (key, naming style)
    "conv1_conv": (("stem", "conv"), "new"), "conv1_bn": (("stem", "bn"), "new"),
    "post_bn": (("post", "bn"), "new"), "predictions": (("top", "dense"), "new"),
    "conv1": (("stem", "conv"), "old"), "bn_conv1": (("stem", "bn"), "old"), "fc1000": (("top", "dense"), "old"),
}
NAMING = {"new": "keras.applications (conv2_block1_1_conv)", "old": "Caffe-style, Keras <= 2.2.4 (res2a_branch2a)"}


@dataclass
class KerasWeights:
    """What an HDF5 file holds, before any mapping: layer name -> tensors in Keras's order."""

    layers: dict[str, list[np.ndarray]]
    layout: str  # legacy-weights | legacy-full-model | keras3-weights
    facts: dict  # keras_version, backend, how layer names were found


# -- sniffing -----------------------------------------------------------------------------

def sniff(path: Path, head: bytes) -> bool:
    """An HDF5 file (or a ``.keras`` zip) whose structure is Keras's; never raises."""
    try:
        if head.startswith(HDF5_MAGIC):
            import h5py

            try:
                f = h5py.File(path, "r")
            except OSError:
                return True  # an HDF5 file h5py cannot open (damaged): read() says so, instead of "unknown format"
            with f:
                return _layout(f) is not None
        if head.startswith(ZIP_MAGIC):
            with zipfile.ZipFile(path) as z:
                return KERAS_ZIP_MEMBER in z.namelist()
    except Exception:  # noqa: BLE001 - a sniffer answers "not mine" for anything unreadable
        return False
    return False


def _has_list_attr(group, name: str) -> bool:
    return name in group.attrs or f"{name}0" in group.attrs


def _layout(f) -> str | None:
    import h5py

    if _has_list_attr(f, "layer_names"):
        return "legacy-weights"
    if isinstance(f.get("model_weights"), h5py.Group) and _has_list_attr(f["model_weights"], "layer_names"):
        return "legacy-full-model"
    if isinstance(f.get("layers"), h5py.Group):
        return "keras3-weights"
    return None


# -- reading the file ---------------------------------------------------------------------

def _text(value) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _list_attr(group, name: str) -> list[str]:
    """A string-list attribute, joined back when Keras split it into ``name0``, ``name1`` ..."""
    if name in group.attrs:
        return [_text(v) for v in np.atleast_1d(group.attrs[name])]
    values, k = [], 0
    while f"{name}{k}" in group.attrs:
        values += [_text(v) for v in np.atleast_1d(group.attrs[f"{name}{k}"])]
        k += 1
    return values


def _array(group, key: str, where: str) -> np.ndarray:
    if key not in group:
        raise WeightsError(f"{where} lists tensor {key!r} but the file does not hold it (incomplete file?)")
    dataset = group[key]
    if not hasattr(dataset, "shape"):
        raise WeightsError(f"{where}: {key!r} is not a tensor")
    limits.check_hdf5_dataset(dataset, where)
    if _text(dataset.attrs.get("dtype", "")) == "bfloat16":  # how Keras 3 stores bfloat16 variables: their bits
        if dataset.dtype.itemsize != 2 or dataset.dtype.kind not in "iu":
            raise WeightsError(f"{where}: {key!r} is marked bfloat16 but stores {dataset.dtype}; corrupt file")
        return bfloat16_bits(np.asarray(dataset[()]))
    return np.asarray(dataset[()])


def _read_legacy(group, origin: str) -> dict[str, list[np.ndarray]]:
    layers = {}
    for name in _list_attr(group, "layer_names"):
        if name not in group:
            raise WeightsError(f"{origin} lists layer {name!r} in layer_names but holds no group for it (incomplete file?)")
        weight_names = _list_attr(group[name], "weight_names")
        if weight_names:
            layers[name] = [_array(group[name], w, f"{origin} layer {name}") for w in weight_names]
    return layers


def _read_keras3(f, origin: str) -> tuple[dict[str, list[np.ndarray]], str]:
    """Layers by their stored names, or by class and order when the names are not stored."""
    import h5py

    entries = []  # (group key, stored layer name or None, tensors)
    for key, item in f["layers"].items():
        variables = item.get("vars") if isinstance(item, h5py.Group) else None
        if variables is None or not len(variables):
            continue
        tensors = [_array(variables, str(i), f"{origin} layers/{key}") for i in range(len(variables))]
        name = variables.attrs.get("name")
        entries.append((key, _text(name) if name is not None else None, tensors))
    if entries and all(name for _, name, _ in entries):
        return {name: tensors for _, name, tensors in entries}, "stored layer names"
    return _by_order(entries, origin), "layer order (no names stored)"


def _class_and_index(key: str) -> tuple[str, int]:
    match = re.fullmatch(r"(.+?)(?:_(\d+))?", key)
    return match.group(1), int(match.group(2) or 0)


def _by_order(entries: list, origin: str) -> dict[str, list[np.ndarray]]:
    """Name order-addressed Keras 3 groups: the k-th ``conv2d`` is the k-th Conv2D of ``model.layers``."""
    by_class: dict[str, list] = {"conv2d": [], "batch_normalization": [], "dense": []}
    unknown = []
    for key, _, tensors in entries:
        cls, index = _class_and_index(key)
        if cls in by_class:
            by_class[cls].append((index, tensors))
        else:
            unknown.append(f"layers/{key}")
    if unknown:
        raise unmatched_error(origin, unknown, [])
    n_conv, n_bn, n_dense = (len(by_class[c]) for c in ("conv2d", "batch_normalization", "dense"))
    version, blocks = _shape_from_counts(n_conv, n_bn, n_dense, origin)
    names = keras3_layer_order(version, blocks, n_dense > 0)
    layers = {}
    for cls, suffix in (("conv2d", "_conv"), ("batch_normalization", "_bn"), ("dense", "predictions")):
        wanted = [n for n in names if n.endswith(suffix)]
        for name, (_, tensors) in zip(wanted, sorted(by_class[cls], key=lambda e: e[0]), strict=True):
            layers[name] = tensors
    return layers


def _shape_from_counts(n_conv: int, n_bn: int, n_dense: int, origin: str) -> tuple[int, list[int]]:
    """v1 has one BN per conv; V2 four convs (the projections) more than BNs. Blocks from the total."""
    version = 1 if n_conv == n_bn else 2 if n_conv == n_bn + 4 else 0
    total, rest = divmod(n_conv - 5, 3)
    for blocks in DEPTHS:
        if version and not rest and sum(blocks) == total and n_dense <= 1:
            return version, list(blocks)
    raise WeightsError(f"{origin}: {n_conv} Conv2D, {n_bn} BatchNormalization and {n_dense} Dense layers without "
                       f"stored names are none of {', '.join(CANDIDATES)}")


def keras3_layer_order(version: int, blocks: list[int], top: bool) -> list[str]:
    """Names of the weighted layers in Keras 3's ``model.layers`` order (checked against Keras 3.15).

    Keras orders a residual block's shortcut projection after the main branch's 3x3 conv.
    """
    names = ["conv1_conv"] + (["conv1_bn"] if version == 1 else [])
    for stage, n in zip(STAGES, blocks, strict=True):
        for b in range(1, n + 1):
            p = f"conv{stage}_block{b}_"
            if version == 1:
                tail = ["0_conv", "3_conv", "0_bn", "3_bn"] if b == 1 else ["3_conv", "3_bn"]
                names += [p + s for s in ["1_conv", "1_bn", "2_conv", "2_bn"] + tail]
            else:
                names += [p + s for s in ["preact_bn", "1_conv", "1_bn", "2_conv", "2_bn"]
                          + (["0_conv"] if b == 1 else []) + ["3_conv"]]
    names += (["post_bn"] if version == 2 else []) + (["predictions"] if top else [])
    return names


def _open_h5(path: Path):
    import h5py

    with open_regular(path) as f:
        head = f.read(len(HDF5_MAGIC))
    try:
        if head.startswith(ZIP_MAGIC):
            with zipfile.ZipFile(path) as z:
                limits.check_zip(z, str(path), [KERAS_ZIP_MEMBER])  # before inflating it into memory
                return h5py.File(io.BytesIO(z.read(KERAS_ZIP_MEMBER)), "r")
        return h5py.File(path, "r")
    except (*HDF5_DAMAGE, *ZIP_DAMAGE) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise WeightsError(f"cannot read {path}: not a readable HDF5/Keras file, or truncated/corrupt ({reason})") from None


def read_keras_file(path: Path) -> KerasWeights:
    """Every weighted layer of a Keras HDF5 file (any of the three layouts), as numpy arrays."""
    origin = str(path)
    f = _open_h5(path)
    try:
        layout = _layout(f)
        if layout is None:
            raise WeightsError(f"{path} is an HDF5 file but not Keras weights (no layer_names attribute, "
                               "no model_weights or layers/ group)")
        facts = {k: _text(f.attrs[k]) for k in ("keras_version", "backend") if k in f.attrs}
        if layout == "keras3-weights":
            layers, facts["layer_names_from"] = _read_keras3(f, origin)
        else:
            group = f["model_weights"] if layout == "legacy-full-model" else f
            facts.update({k: _text(group.attrs[k]) for k in ("keras_version", "backend") if k in group.attrs})
            layers, facts["layer_names_from"] = _read_legacy(group, origin), "layer_names attribute"
    except HDF5_DAMAGE as exc:  # a dataset whose bytes are cut off, a damaged B-tree or object header
        reason = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
        raise WeightsError(f"cannot read {path}: truncated or corrupt HDF5 data ({reason})") from None
    finally:
        f.close()
    facts.update(_archive_facts(path))
    if not layers:
        raise WeightsError(f"{path} holds no layer weights (a nested model, or an empty Keras file?)")
    if facts.get("backend") == "theano":
        raise WeightsError(f"{path} was saved by the Theano backend (flipped kernels); use the tf_dim_ordering_tf_kernels file")
    tensors = float32_tensors({f"{name}/{i}": t for name, ts in layers.items() for i, t in enumerate(ts)}, origin)
    layers = {name: [tensors.arrays[f"{name}/{i}"] for i in range(len(ts))] for name, ts in layers.items()}
    facts["dtype_note"] = tensors.note
    return KerasWeights(layers, layout, facts)


def _archive_facts(path: Path) -> dict:
    """keras_version/backend from a ``.keras`` archive's metadata.json (plain .h5 files: nothing)."""
    import json

    try:
        with zipfile.ZipFile(path) as z:
            if z.getinfo("metadata.json").file_size > MAX_METADATA_BYTES:
                return {}
            meta = json.loads(z.read("metadata.json"))
    except (*ZIP_DAMAGE, KeyError, ValueError, OSError, RecursionError):
        return {}
    return {k: str(meta[k]) for k in ("keras_version",) if k in meta}


# -- names -> architecture ----------------------------------------------------------------

def _key(name: str) -> tuple[tuple | None, str | None]:
    """(canonical key, naming style) of a Keras layer name; (None, None) when it is not a ResNet layer."""
    if name in SINGLE:
        return SINGLE[name]
    m = NEW_BLOCK.fullmatch(name)
    if m:
        return (int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)), "new"
    m = OLD_BLOCK.fullmatch(name)
    if m:
        kind = "conv" if m.group(1) == "res" else "bn"
        return (int(m.group(2)), ord(m.group(3)) - ord("a") + 1, OLD_PART[m.group(4)], kind), "old"
    return None, None


def _name(key: tuple, style: str) -> str:
    """The Keras layer name of a canonical key, in the file's naming style (for error lines)."""
    for name, (k, s) in SINGLE.items():
        if k == key and s == style:
            return name
    stage, block, part, kind = key
    if style == "new":
        return f"conv{stage}_block{block}_{part}_{kind}"
    branch = {v: k for k, v in OLD_PART.items()}[part]
    return f"{'res' if kind == 'conv' else 'bn'}{stage}{chr(ord('a') + block - 1)}_branch{branch}"


@dataclass
class Architecture:
    version: int  # 1 or 2
    blocks: list[int]
    classes: int  # 0: saved without the classifier
    style: str  # "new" or "old" naming

    @property
    def depth(self) -> int:
        return 3 * sum(self.blocks) + 2

    @property
    def keras_name(self) -> str:
        return f"ResNet{self.depth}" + ("V2" if self.version == 2 else "")

    @property
    def eps(self) -> float:
        return OLD_EPS if self.style == "old" else KERAS_EPS


def parse_layers(layers: dict[str, list[np.ndarray]], origin: str) -> tuple[dict[tuple, list[np.ndarray]], Architecture]:
    """Canonical keys for every layer, and the architecture they describe; unknown names are listed."""
    keyed, styles, unknown = {}, set(), []
    for name, tensors in layers.items():
        key, style = _key(name)
        if key is None:
            unknown.append(name)
        else:
            keyed[key] = tensors
            styles.add(style)
    if unknown:
        raise unmatched_error(f"{origin} (Keras ResNet layers expected)", unknown, [])
    if len(styles) > 1:
        raise WeightsError(f"{origin} mixes Caffe-style (res2a_branch2a) and keras.applications (conv2_block1_1_conv) layer names")
    blocks = []
    for stage in STAGES:
        present = sorted({k[1] for k in keyed if k[0] == stage})
        if present != list(range(1, len(present) + 1)) or not present:
            gaps = sorted(set(range(1, max(present, default=0) + 1)) - set(present)) or [1]
            raise WeightsError(f"{origin}: stage conv{stage} lacks block(s) {', '.join(map(str, gaps))}; "
                               "not a complete Keras ResNet")
        blocks.append(len(present))
    version = 2 if ("post", "bn") in keyed or any(k[2] == "preact" for k in keyed if isinstance(k[0], int)) else 1
    top = keyed.get(("top", "dense"))
    classes = int(top[0].shape[-1]) if top else 0
    return keyed, Architecture(version, blocks, classes, styles.pop())


def _arch_arg(arch: str) -> tuple[int, int]:
    m = re.fullmatch(r"(?:keras[-_]?)?resnet[-_]?(\d+)(?:[-_]?v([12]))?", arch.strip().lower())
    if not m:
        raise ModelError(f"--arch {arch!r} is not a Keras ResNet; candidates: {', '.join(CANDIDATES)}")
    return int(m.group(1)), int(m.group(2) or 1)


def _check_arch_arg(arch: str | None, found: Architecture, origin: str) -> None:
    if arch is None:
        return
    depth, version = _arch_arg(arch)
    if (depth, version) != (found.depth, found.version):
        raise ModelError(f"--arch {arch} contradicts {origin}, which holds {found.keras_name} weights "
                         f"(candidates: {', '.join(CANDIDATES)})")


# -- Keras tensors -> Gluon structural names ----------------------------------------------

class _Mapper:
    """Fills Gluon structural names from canonical Keras keys, remembering what it used and missed."""

    def __init__(self, keyed: dict, style: str):
        self.keyed, self.style = keyed, style
        self.out: dict[str, np.ndarray] = {}
        self.used: set = set()
        self.missing: list[str] = []
        self.folded = 0

    def _take(self, key: tuple, counts: tuple[int, ...], what: str) -> list[np.ndarray] | None:
        if key not in self.keyed:
            self.missing.append(_name(key, self.style))
            return None
        self.used.add(key)
        tensors = self.keyed[key]
        if len(tensors) not in counts:
            raise WeightsError(f"{_name(key, self.style)} holds {len(tensors)} tensors; a {what} has {' or '.join(map(str, counts))}")
        return tensors

    def conv(self, key: tuple, path: str, has_bias: bool, bn_key: tuple | None = None, bn_path: str | None = None) -> None:
        """A Keras Conv2D (HWIO kernel, optional bias) and the BN that follows it, if any."""
        tensors = self._take(key, (1, 2), "Conv2D (kernel, bias)")
        bias = None
        if tensors is not None:
            kernel = tensors[0]
            if kernel.ndim != 4:
                raise WeightsError(f"{_name(key, self.style)}: kernel of shape {kernel.shape} is not a 2-D conv kernel")
            self.out[f"{path}.weight"] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))  # HWIO -> OIHW
            bias = tensors[1] if len(tensors) == 2 else None
            if has_bias:
                self.out[f"{path}.bias"] = bias if bias is not None else np.zeros(kernel.shape[-1], np.float32)
        if bn_key is not None:
            fold = None if has_bias else bias
            self.bn(bn_key, bn_path, fold)

    def bn(self, key: tuple, path: str, conv_bias: np.ndarray | None = None) -> None:
        tensors = self._take(key, (4,), "BatchNormalization (gamma, beta, moving_mean, moving_variance)")
        if tensors is None:
            return
        gamma, beta, mean, var = tensors
        if conv_bias is not None:  # BN(conv + b) == BN'(conv) with mean' = mean - b
            mean = (mean.astype(np.float64) - conv_bias).astype(np.float32)
            self.folded += 1
        for name, value in zip(("gamma", "beta", "running_mean", "running_var"), (gamma, beta, mean, var), strict=True):
            self.out[f"{path}.{name}"] = value

    def dense(self, path: str) -> None:
        tensors = self._take(("top", "dense"), (2,), "Dense (kernel, bias)")
        if tensors is not None:
            kernel, bias = tensors
            if kernel.ndim != 2:
                raise WeightsError(f"{_name(('top', 'dense'), self.style)}: kernel of shape {kernel.shape} is not a Dense kernel")
            self.out[f"{path}.weight"] = np.ascontiguousarray(kernel.T)  # (in, out) -> (out, in)
            self.out[f"{path}.bias"] = bias


def _map_v1(m: _Mapper, arch: Architecture) -> None:
    m.conv(("stem", "conv"), "features.0", False, ("stem", "bn"), "features.1")
    for k, (stage, n) in enumerate(zip(STAGES, arch.blocks, strict=True)):
        for b in range(1, n + 1):
            base = f"features.{4 + k}.{b - 1}"
            m.conv((stage, b, "1", "conv"), f"{base}.body.0", True, (stage, b, "1", "bn"), f"{base}.body.1")
            m.conv((stage, b, "2", "conv"), f"{base}.body.3", False, (stage, b, "2", "bn"), f"{base}.body.4")
            m.conv((stage, b, "3", "conv"), f"{base}.body.6", True, (stage, b, "3", "bn"), f"{base}.body.7")
            if b == 1:
                m.conv((stage, b, "0", "conv"), f"{base}.downsample.0", False, (stage, b, "0", "bn"), f"{base}.downsample.1")
    if arch.classes:
        m.dense("output")


def _map_v2(m: _Mapper, arch: Architecture) -> None:
    m.conv(("stem", "conv"), "features.0", True)
    for k, (stage, n) in enumerate(zip(STAGES, arch.blocks, strict=True)):
        for b in range(1, n + 1):
            base = f"features.{2 + k}.{b - 1}"
            m.bn((stage, b, "preact", "bn"), f"{base}.preact_bn")
            if b == 1:
                m.conv((stage, b, "0", "conv"), f"{base}.conv0", True)
            m.conv((stage, b, "1", "conv"), f"{base}.conv1", False, (stage, b, "1", "bn"), f"{base}.bn1")
            m.conv((stage, b, "2", "conv"), f"{base}.conv2", False, (stage, b, "2", "bn"), f"{base}.bn2")
            m.conv((stage, b, "3", "conv"), f"{base}.conv3", True)
    m.bn(("post", "bn"), "features.6")
    if arch.classes:
        m.dense("output")


def to_gluon(keyed: dict, arch: Architecture, origin: str) -> tuple[dict[str, np.ndarray], int]:
    """Gluon structural-name arrays for ``arch``; Keras layers left over or lacking are named."""
    m = _Mapper(keyed, arch.style)
    (_map_v1 if arch.version == 1 else _map_v2)(m, arch)
    unused = sorted(_name(k, arch.style) for k in set(keyed) - m.used)
    if unused or m.missing:
        raise unmatched_error(f"{origin} ({arch.keras_name} layout)", unused, m.missing)
    return m.out, m.folded


def arch_record(arch: Architecture) -> dict:
    builder = "keras_resnet_v1" if arch.version == 1 else "keras_resnet_v2"
    return {"builder": f"keras-resnet-{builder.rsplit('_', 1)[1]}",
            "kwargs": {"blocks": list(arch.blocks), "classes": arch.classes, "eps": arch.eps}}


# -- the format ---------------------------------------------------------------------------

def read(path: Path, arch: str | None = None, progress=None) -> Converted:
    """A Keras ResNet weights file -> Gluon net (v1: resnetN_v1 layout, V2: Keras's own layout)."""
    from bbadapt.core.architectures import rebuild
    from bbadapt.core.weights import assign

    progress = progress or (lambda _m: None)
    path = require_file(path).resolve()
    origin = str(path)
    progress(f"reading Keras weights from {path.name}")
    weights = read_keras_file(path)
    keyed, found = parse_layers(weights.layers, origin)
    _check_arch_arg(arch, found, origin)
    arrays, folded = to_gluon(keyed, found, origin)
    record = arch_record(found)
    progress(f"{found.keras_name} ({NAMING[found.style]}), {len(weights.layers)} weighted layers")
    net = rebuild(record)
    assign(net, arrays, origin)
    digest = file_digest(path)
    spec = "tf" if found.version == 2 else "caffe"
    info = custom_info(f"keras-{found.keras_name.lower()}", f"keras-v{found.version}", spec, 224)
    provenance = {
        "kind": "file", "format": FORMAT.name, "path": str(Path(path).resolve()), "sha256": digest,
        "files": {str(Path(path).resolve()): digest},
        "arch_arg": arch, "keras_model": found.keras_name, "layout": weights.layout, "naming": NAMING[found.style],
        "include_top": bool(found.classes), "classes": found.classes, "bn_eps": found.eps,
        "conv_biases_folded_into_bn_mean": folded, **weights.facts,
    }
    return Converted(net, record, info, provenance)


FORMAT = Format(
    name="keras",
    description="Keras applications ResNet50/101/152 and V2 weights (HDF5 .h5, Keras 3 .weights.h5, .keras)",
    sniff=sniff,
    read=read,
    extensions=(".h5", ".weights.h5", ".keras"),
)
