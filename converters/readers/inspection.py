"""``bbadapt inspect FILE``: what a weights file is, and whether its BatchNorms are healthy.

Works without mxnet (NDArray files are read by :mod:`converters.ndarray_file`, graphs as
JSON), so it can triage a file on any machine before a conversion is attempted. A
sibling ``-symbol.json`` adds what only the graph knows: each BatchNorm's eps and
fix_gamma, and the network's depth.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import numpy as np

from bbadapt.platform.errors import BbadaptError, WeightsError
from converters.readers import ndarray_file, safe_pickle, safetensors_io
from converters.readers.base import HEAD_BYTES, dtype_name, file_digest, numeric, open_regular

FP16_MAX = 65504.0
# bbadapt.rewrite.TINY_VAR (a test keeps them equal); importing rewrite would import mxnet
TINY_VAR = 1e-6
VAR_SUFFIXES = ("running_var", "moving_var", "moving_variance")
WEIGHTED_OPS = ("Convolution", "FullyConnected")


def inspect_file(path: str | os.PathLike) -> dict:
    """A JSON-able description of a weights file or a timm folder (see :func:`render` for the human form)."""
    from converters.readers import timm

    if Path(path).is_dir() and timm.is_folder(Path(path)):
        return _describe_timm(Path(path))
    with open_regular(path) as f:
        head = f.read(HEAD_BYTES)
    path = Path(path)
    if ndarray_file.is_ndarray_file(head):
        return _inspect_params(path, head, _companion(path))
    if ndarray_file.looks_like_symbol_json(head):
        graph = ndarray_file.symbol_json(path)
        try:
            _, params, _ = ndarray_file.pair(path)
        except WeightsError as exc:
            return {"path": str(path), "format": _graph_format(graph), "graph_summary": _graph_summary(graph),
                    "status": "problems", "problems": [str(exc)]}
        with open_regular(params) as f:
            info = _inspect_params(params, f.read(HEAD_BYTES), (path, graph))
        info["inspected_from"] = str(path)
        return info
    return _inspect_other(path)


def _companion(path: Path) -> tuple[Path, dict] | None:
    try:
        json_path, _, _ = ndarray_file.pair(path)
        return json_path, ndarray_file.symbol_json(json_path)
    except WeightsError:
        return None


def _graph_summary(graph: dict) -> dict:
    layers = Counter(n["op"] for n in graph["nodes"] if n["op"] != "null")
    bns = _graph_bns(graph).values()
    return {"layers": dict(layers), "depth": longest_weighted_path(graph),
            "bn_eps": {f"{e:g}": n for e, n in Counter(b["eps"] for b in bns).items()},
            "fix_gamma": [b["node"] for b in bns if b["fix_gamma"]]}


def _graph_format(graph: dict) -> str:
    from converters.readers.mxnet_symbol import is_symbolic_zoo_graph

    return "mxnet-symbol" if is_symbolic_zoo_graph(graph) else "gluon-export"


def _inspect_other(path: Path) -> dict:
    """Not an MXNet file: read it completely with its format's reader (no mxnet), and describe it.

    A damaged or unsafe file raises the reader's one-line :class:`WeightsError` (the CLI exits
    1); a file no converter claims is described as such, after a pickle has been checked for
    what it would call.
    """
    from converters import readers as converters

    try:
        fmt = converters.detect(path).name
    except BbadaptError:
        fmt = None
    except Exception as exc:  # noqa: BLE001 - a format module that needs a missing package
        return {"path": str(path), "format": None, "status": "unknown",
                "problems": [f"format detection failed ({type(exc).__name__}: {exc})"]}
    if fmt in FOREIGN_READERS:
        arrays, architecture, naming = FOREIGN_READERS[fmt](path)
        return _describe(path, fmt, arrays, architecture, naming)
    with open_regular(path) as f:
        head = f.read(HEAD_BYTES)
    if safetensors_io.looks_like(head):  # safetensors of some other network: still parsed and validated
        arrays, architecture, naming = _torchvision_tensors(path)
        return _describe(path, "safetensors", arrays, architecture, "safetensors")
    if safe_pickle.looks_like(head):
        try:
            safe_pickle.load(path)  # refuses, never runs, what a hostile pickle would call
        except safe_pickle.UnsafePickle:
            raise
        except WeightsError:
            pass  # not a pickle after all
        else:
            return {"path": str(path), "format": None, "status": "unknown", "size_bytes": path.stat().st_size,
                    "problems": ["a pickle of plain data and arrays, but not a format bbadapt reads "
                                 "(see `bbadapt formats`)"]}
    return {"path": str(path), "format": None, "status": "unknown", "size_bytes": path.stat().st_size,
            "problems": ["not a format bbadapt reads (see `bbadapt formats`)"]}


def _describe(path: Path, fmt: str, arrays: dict, architecture: dict, naming: str) -> dict:
    info = {
        "path": str(path), "format": fmt, "size_bytes": path.stat().st_size, "sha256": file_digest(path),
        "graph": None,
        "tensors": {"count": len(arrays), "dtypes": dict(Counter(dtype_name(a) for a in arrays.values())),
                    "parameters": int(sum(a.size for a in arrays.values())), "naming": naming, "prefix": None},
        "architecture": architecture,
        "batchnorm": _bn_health(arrays, None),
    }
    info["problems"] = _problems(info, arrays)
    if architecture.get("problem"):
        info["problems"].append(architecture["problem"])
    info["status"] = _status(info, arrays)
    return info


def _status(info: dict, arrays: dict) -> str:
    """ok, problems (worth a look; a conversion may still be exact) or damaged (NaN/Inf values, negative variances)."""
    broken = any(numeric(a).dtype.kind == "f" and not np.all(np.isfinite(numeric(a))) for a in arrays.values()) \
        or info["batchnorm"]["negative_var"]
    return "damaged" if broken else "problems" if info["problems"] else "ok"


def _torchvision_tensors(path: Path) -> tuple[dict, dict, str]:
    from bbadapt.platform.errors import ModelError
    from converters.readers import torchvision

    arrays, facts = torchvision.read_state_dict(path)
    arrays = {k: v for k, v in arrays.items() if not k.endswith(torchvision.IGNORED_SUFFIX)}
    try:
        depth, bottleneck, counts = torchvision.layout(set(arrays))
    except (ModelError, WeightsError) as exc:  # no ResNet: described, not damaged
        return arrays, {"guess": "not a torchvision ResNet", "depth": None, "classes": None, "source": "names",
                        "problem": str(exc)}, facts["container"]
    fc = arrays.get("fc.weight")
    return arrays, {"guess": f"torchvision resnet{depth} = timm resnet{depth} ({'bottleneck' if bottleneck else 'basic'} "
                             f"blocks {list(counts)}; gluoncv twin resnet{depth}_v1b)",
                    "depth": depth, "classes": int(fc.shape[0]) if fc is not None and fc.ndim == 2 else None,
                    "source": "names"}, f"torchvision state dict ({facts['container']})"


def _timm_tensors(path: Path, architecture: str | None = None) -> tuple[dict, dict, str]:
    from bbadapt.platform.errors import ModelError
    from converters.readers import timm
    from converters.readers import torchvision as tv

    arrays, facts = tv.read_state_dict(path)
    arrays = {k: v for k, v in arrays.items() if not k.endswith(tv.IGNORED_SUFFIX)}
    fc = arrays.get("fc.weight")
    classes = int(fc.shape[0]) if fc is not None and fc.ndim == 2 else None
    try:
        found = timm.diagnose({k: v.shape for k, v in arrays.items()}, f"timm {architecture}" if architecture else None)
    except (ModelError, WeightsError) as exc:  # no twin: described, not damaged
        return arrays, {"guess": f"timm {architecture or 'ResNet'} without a gluoncv twin", "depth": None,
                        "classes": classes, "source": "names", "timm_arch": architecture, "gluoncv_twin": None,
                        "problem": str(exc)}, facts["container"]
    name = architecture or found.timm_arch or "ResNet"
    return arrays, {"guess": f"timm {name} ({found.describe()}; gluoncv twin {found.twin})", "depth": found.depth,
                    "classes": classes, "source": "names", "timm_arch": name, "gluoncv_twin": found.twin,
                    "layout": found.to_dict()}, f"timm state dict ({facts['container']})"


def _describe_timm(folder: Path) -> dict:
    """A timm save_for_hf folder: its weights file described, with what config.json says (architecture, input spec)."""
    from converters.readers import timm

    src = timm.locate(folder)  # an unreadable config.json is one line, like a damaged file
    arrays, architecture, naming = _timm_tensors(src.weights, src.architecture)
    info = _describe(src.weights, "timm", arrays, architecture, naming)
    try:
        spec = timm.spec_from_config(src.config, str(src.config_path)).to_string()
    except WeightsError as exc:
        spec = None
        info["problems"].append(str(exc))
        info["status"] = _status(info, arrays)
    info.update({"path": str(folder), "weights_file": str(src.weights), "config": str(src.config_path),
                 "input_spec": spec})
    return info


KERAS_TENSOR_NAMES = {"conv": ("kernel", "bias"), "bn": ("gamma", "beta", "moving_mean", "moving_variance"),
                      "dense": ("kernel", "bias")}


def _keras_tensors(path: Path) -> tuple[dict, dict, str]:
    from bbadapt.platform.errors import ModelError
    from converters.readers import keras

    weights = keras.read_keras_file(path)
    arrays = {}
    for layer, tensors in weights.layers.items():
        key, _ = keras._key(layer)
        names = KERAS_TENSOR_NAMES.get(key[-1] if key else "", ())
        for i, tensor in enumerate(tensors):
            arrays[f"{layer}/{names[i] if i < len(names) else i}"] = tensor
    try:
        _, found = keras.parse_layers(weights.layers, str(path))
    except (WeightsError, ModelError) as exc:
        return arrays, {"guess": "not a Keras ResNet", "depth": None, "classes": None, "source": "names",
                        "problem": str(exc)}, weights.layout
    return arrays, {"guess": f"Keras {found.keras_name} ({keras.NAMING[found.style]})", "depth": found.depth,
                    "classes": found.classes or None, "source": "names"}, f"Keras {weights.layout}"


def _detectron_tensors(path: Path) -> tuple[dict, dict, str]:
    from bbadapt.platform.errors import ModelError
    from converters.readers import detectron

    blobs = detectron.blobs_of(safe_pickle.load(path), path)
    try:
        depth, bottleneck, counts = detectron.layout(set(blobs))
    except (ModelError, WeightsError) as exc:  # no ResNet: described, not damaged
        return blobs, {"guess": "not a Detectron ResNet", "depth": None, "classes": None, "source": "names",
                       "problem": str(exc)}, "Caffe2 blobs"
    classes, _ = detectron._head(blobs)
    return blobs, {"guess": f"Detectron R-{depth} ({'bottleneck' if bottleneck else 'basic'} blocks {list(counts)}; "
                            f"gluon twin resnet{depth}_v1, BatchNorms as AffineChannel)",
                   "depth": depth, "classes": classes, "source": "names"}, "Caffe2/Detectron blobs"


FOREIGN_READERS = {"timm": _timm_tensors, "torchvision": _torchvision_tensors, "keras": _keras_tensors, "detectron": _detectron_tensors}


def _inspect_params(path: Path, head: bytes, companion: tuple[Path, dict] | None) -> dict:
    from converters.readers import gluon_params, mxnet_symbol

    arrays = ndarray_file.load(path)
    names = list(arrays)
    style = gluon_params.naming_style(names)
    fmt = next((f.name for f in (mxnet_symbol.FORMAT, *gluon_params.FORMATS) if f.sniff(path, head)), None)
    graph = companion[1] if companion else None
    info = {
        "path": str(path), "format": fmt, "size_bytes": path.stat().st_size, "sha256": file_digest(path),
        "graph": str(companion[0]) if companion else None,
        "tensors": {"count": len(arrays), "dtypes": dict(Counter(dtype_name(a) for a in arrays.values())),
                    "parameters": int(sum(a.size for a in arrays.values())), "naming": style,
                    "prefix": _prefix(names) if style in ("export", "prefixed") else None},
        "architecture": _architecture(arrays, style, graph),
        "batchnorm": _bn_health(arrays, graph),
    }
    info["problems"] = _problems(info, arrays)
    info["status"] = _status(info, arrays)
    return info


def _prefix(names: list[str]) -> str:
    plain = [n.split(":", 1)[-1] for n in names]
    common = os.path.commonprefix(plain)
    return common[: common.rfind("_") + 1]


# --- architecture ------------------------------------------------------------------------------

def longest_weighted_path(graph: dict) -> int:
    """Conv/FC layers on the longest data->output path: the depth ResNet names count."""
    nodes = graph["nodes"]
    depth = [0] * len(nodes)
    for i, node in enumerate(nodes):
        below = max((depth[src] for src, *_ in node["inputs"]), default=0)
        depth[i] = below + (1 if node["op"] in WEIGHTED_OPS else 0)
    return max(depth[h[0]] for h in graph["heads"])


def _classes(arrays: dict) -> int | None:
    dense = [a for n, a in arrays.items() if a.ndim == 2 and re.search(r"(weight)$", n)]
    return int(dense[-1].shape[0]) if dense else None


def _architecture(arrays: dict, style: str, graph: dict | None) -> dict:
    """A probable architecture, from the graph when there is one, else from the tensor names."""
    classes = _classes(arrays)
    if graph is not None and style == "symbolic-zoo":
        from converters.readers.mxnet_symbol import depth, read_graph

        try:
            kwargs = read_graph(graph, "graph")
        except WeightsError as exc:
            return {"guess": f"symbolic-zoo names, but the graph does not read as a ResNet ({exc})",
                    "depth": longest_weighted_path(graph), "classes": classes, "source": "graph"}
        return {"guess": f"MXNet symbolic-zoo pre-activation ResNet-{depth(kwargs)} (gluon family resnet{depth(kwargs)}_v2)",
                "depth": depth(kwargs), "classes": kwargs["classes"], "units": kwargs["units"],
                "bottleneck": kwargs["bottleneck"], "source": "graph"}
    if graph is not None:
        family = _prefix(list(arrays)) or "unknown"
        deep = longest_weighted_path(graph)
        return {"guess": f"{family}* model, {deep} weighted layers on the longest path, {classes} classes",
                "depth": deep, "classes": classes, "source": "graph"}
    convs = [n for n, a in arrays.items() if a.ndim == 4]
    shortcuts = [n for n in convs if "downsample" in n or re.search(r"_sc_weight$", n)]
    if style in ("structural", "symbolic-zoo"):
        deep = len(convs) - len(shortcuts) + sum(1 for a in arrays.values() if a.ndim == 2)
        return {"guess": f"about {deep} weighted layers deep ({len(shortcuts)} shortcut convs), {classes} classes",
                "depth": deep, "classes": classes, "source": "names"}
    return {"guess": f"{_prefix(list(arrays)) or 'unknown'} model: {len(convs)} convs, {classes} classes "
                     "(no graph beside it: shortcut convs cannot be told apart)",
            "depth": None, "classes": classes, "source": "names"}


# --- BatchNorm health --------------------------------------------------------------------------

def _graph_bns(graph: dict | None) -> dict[str, dict]:
    """Parameter-name stem (``stage1_unit1_bn1_``) -> {eps, fix_gamma} for every BN node of a graph."""
    if graph is None:
        return {}
    nodes = graph["nodes"]
    found = {}
    for node in nodes:
        if node["op"] != "BatchNorm" or len(node["inputs"]) < 2:
            continue
        attrs = ndarray_file.node_attrs(node)
        gamma = nodes[node["inputs"][1][0]]["name"]
        found[gamma[: -len("gamma")]] = {
            "node": node["name"], "eps": _number(attrs.get("eps"), 1e-3),
            "fix_gamma": str(attrs.get("fix_gamma", "True")).lower() in ("true", "1")}
    return found


def _number(text, default: float) -> float:
    """An attribute that should be a number (``default`` when absent; NaN, shown as nan, when it is not one)."""
    try:
        value = float(default if text is None else text)
    except (TypeError, ValueError):
        return float("nan")
    return value


def _bn_health(arrays: dict, graph: dict | None) -> dict:
    tiny = TINY_VAR
    plain = {k.split(":", 1)[-1]: v for k, v in arrays.items()}
    variances = {k: v for k, v in plain.items() if k.endswith(VAR_SUFFIXES)}
    graph_bns = _graph_bns(graph)
    report = {"count": len(variances), "tiny_var": [], "fp16_overflow_var": [], "negative_var": [],
              "fix_gamma": [], "fix_gamma_ignored_values": [], "eps": None, "tiny_var_threshold": tiny}
    for name, var in sorted(variances.items()):
        var = np.asarray(numeric(var), dtype=np.float64)
        for key, hits in (("tiny_var", (var >= 0) & (var < tiny)), ("fp16_overflow_var", var > FP16_MAX),
                          ("negative_var", var < 0)):
            if hits.any():
                report[key].append({"name": name, "channels": int(hits.sum()), "of": int(var.size),
                                    "min": float(var.min()), "max": float(var.max())})
    if graph_bns:
        report["eps"] = {f"{e:g}": n for e, n in Counter(b["eps"] for b in graph_bns.values()).items()}
        for stem, bn in sorted(graph_bns.items()):
            if bn["fix_gamma"]:
                report["fix_gamma"].append(bn["node"])
                gamma = numeric(plain[stem + "gamma"]) if stem + "gamma" in plain else None
                if gamma is not None and not np.all(gamma == 1):
                    report["fix_gamma_ignored_values"].append(bn["node"])
    return report


def _problems(info: dict, arrays: dict) -> list[str]:
    problems = []
    bn = info["batchnorm"]
    for key, text in (("tiny_var", f"running_var < {bn['tiny_var_threshold']:g}: the frozen scale is set by eps alone"),
                      ("fp16_overflow_var", "running_var > 65504: overflows float16"),
                      ("negative_var", "negative running_var: corrupt statistics")):
        if bn[key]:
            channels = sum(h["channels"] for h in bn[key])
            problems.append(f"{channels} channels in {len(bn[key])} BatchNorms with {text} (e.g. {bn[key][0]['name']})")
    odd = sorted(k for k in info["tensors"]["dtypes"] if not k.startswith(("float", "bfloat")))
    if odd:
        problems.append(f"{', '.join(odd)} tensors: weights must be floating point (convert refuses the file)")
    bad = sorted(k for k, a in arrays.items() if numeric(a).dtype.kind == "f" and not np.all(np.isfinite(numeric(a))))
    if bad:
        problems.append(f"NaN/Inf values in {len(bad)} tensors (e.g. {bad[0]})")
    if info["format"] is None:
        problems.append("named MXNet arrays, but not a layout a converter reads")
    return problems


# --- rendering ---------------------------------------------------------------------------------

def render(info: dict, console) -> None:
    """The inspection as rich tables on ``console``."""
    from rich.table import Table

    table = Table("", "", show_header=False, title=f"{Path(info['path']).name}", title_justify="left")
    table.add_row("format", str(info.get("format") or "unknown"))
    if info.get("graph"):
        table.add_row("graph", str(info["graph"]))
    if "tensors" in info:
        t = info["tensors"]
        table.add_row("tensors", f"{t['count']} ({', '.join(f'{n} {d}' for d, n in t['dtypes'].items())}), "
                                 f"{t['parameters']:,} values")
        table.add_row("naming", t["naming"] + (f" (prefix {t['prefix']})" if t.get("prefix") else ""))
        table.add_row("architecture", info["architecture"]["guess"])
        if "input_spec" in info:  # a timm folder's config.json
            table.add_row("input spec (config.json)", str(info["input_spec"] or "unreadable, see below"))
        bn = info["batchnorm"]
        table.add_row("BatchNorms", str(bn["count"]))
        if bn["eps"]:
            table.add_row("BN eps (graph)", ", ".join(f"{e} x{n}" for e, n in bn["eps"].items()))
        if bn["fix_gamma"]:
            ignored = f"; stored gamma != 1 ignored in {', '.join(bn['fix_gamma_ignored_values'])}" \
                if bn["fix_gamma_ignored_values"] else ""
            table.add_row("fix_gamma (graph)", ", ".join(bn["fix_gamma"]) + ignored)
    elif "graph_summary" in info:
        g = info["graph_summary"]
        table.add_row("layers", ", ".join(f"{n} {op}" for op, n in g["layers"].items()))
        table.add_row("depth", f"{g['depth']} weighted layers on the longest path")
        table.add_row("BN eps (graph)", ", ".join(f"{e} x{n}" for e, n in g["bn_eps"].items()) or "-")
        table.add_row("fix_gamma (graph)", ", ".join(g["fix_gamma"]) or "-")
    elif "size_bytes" in info:
        table.add_row("size", f"{info['size_bytes']:,} bytes")
    console.print(table)
    for problem in info.get("problems", []):
        console.print(f"  ! {problem}", markup=False)
    if not info.get("problems"):
        console.print("  no problems found", markup=False)
