"""Gluon parameter files of zoo models: ``export()`` pairs and bare ``.params`` files.

``gluon-export``: ``HybridBlock.export()`` writes ``X-symbol.json`` + ``X-0000.params`` with
``arg:``/``aux:`` keys carrying the instance prefix (``arg:cifarresnetv10_conv0_weight``).
The architecture is read from the graph by trying the zoo: every registered model is
constructed (cheap: no weights, no shapes), and kept if its parameter names (prefix
stripped) equal the graph's variables and its traced graph has the same layers (op types
with kernel/stride/pad/filters/pooling attributes, as a multiset). That separates depths
and families, and also relatives whose parameters are identical but whose graphs differ
(v1c vs v1d: an average pool in the shortcut). No per-model table is involved.

``gluon-params``: a bare ``.params`` (``save_parameters`` structural names, or export-style
names without their graph) does not say what it is; ``--arch``/MODEL must.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from pathlib import Path

from bbadapt.core.registry import Converted
from bbadapt.platform.errors import ModelError, WeightsError
from converters.readers import mxnet_symbol, ndarray_file
from converters.readers.base import Float32Tensors, Format, file_digest, float32_tensors, require_file

LAYER_ATTRS = {  # attribute (default) pairs that define what a layer computes
    "Convolution": (("kernel", ""), ("stride", "(1,1)"), ("pad", "(0,0)"), ("dilate", "(1,1)"),
                    ("num_filter", ""), ("num_group", "1"), ("no_bias", "False")),
    "Pooling": (("kernel", ""), ("stride", "(1,1)"), ("pad", "(0,0)"), ("pool_type", "max"),
                ("pooling_convention", "valid")),
    "FullyConnected": (("num_hidden", ""), ("no_bias", "False")),
    "BatchNorm": (),  # fix_gamma is spelled differently across versions: checked on the values instead
    "Activation": (("act_type", ""),),
}


def _norm(value) -> str:
    """One spelling per attribute value across mxnet versions ("(3, 3)"/"(3,3)", "true"/"True")."""
    text = str(value).replace(" ", "")
    return text.capitalize() if text.lower() in ("true", "false") else text


def layer_signature(nodes: list[dict]) -> Counter:
    """What the graph computes, as a multiset of (op, defining attributes); names ignored."""
    sig: Counter = Counter()
    for node in nodes:
        op = node["op"]
        if op == "null":
            continue
        attrs = ndarray_file.node_attrs(node)
        if op == "Pooling" and str(attrs.get("global_pool", "False")).lower() in ("true", "1"):
            sig[(op, "global", attrs.get("pool_type", "max"))] += 1
            continue
        sig[(op,) + tuple(_norm(attrs.get(k, d)) for k, d in LAYER_ATTRS.get(op, ()))] += 1
    return sig


def _strip_prefix(names: list[str]) -> set[str]:
    common = os.path.commonprefix(names)
    cut = common.rfind("_") + 1
    return {n[cut:] for n in names}


def graph_variables(graph: dict) -> list[str]:
    return [n["name"] for n in graph["nodes"] if n["op"] == "null" and n["name"] != "data"]


@functools.cache
def _param_names(name: str) -> frozenset:
    """Zoo model ``name``'s parameter names with the instance prefix stripped (the model built unmaterialized)."""
    from bbadapt.core import zoo

    net = zoo.instantiate(zoo.model_info(name), pretrained=False)
    return frozenset(_strip_prefix(list(net.collect_params().keys())))


@functools.lru_cache(maxsize=1)
def _zoo_names() -> dict[str, frozenset]:
    """Zoo model -> its parameter names with the instance prefix stripped (every model built: about 4 s)."""
    from bbadapt.core import zoo

    return {name: _param_names(name) for name in zoo.MODELS}


@functools.cache
def _traced_signature(name: str) -> frozenset:
    import json

    import mxnet as mx

    from bbadapt.core import zoo

    net = zoo.instantiate(zoo.model_info(name), pretrained=False)
    out = net(mx.sym.var("data"))
    return frozenset(layer_signature(json.loads(out.tojson())["nodes"]).items())


def _graph_key(graph: dict) -> tuple[frozenset, frozenset]:
    """What a zoo model must share with the graph: its parameter names (prefix stripped) and its layers."""
    return frozenset(_strip_prefix(graph_variables(graph))), frozenset(layer_signature(graph["nodes"]).items())


def candidates(graph: dict) -> list[str]:
    """Zoo models whose parameter names and layers both match the graph (usually one)."""
    names, signature = _graph_key(graph)
    return [name for name, zoo_names in _zoo_names().items()
            if zoo_names == names and _traced_signature(name) == signature]


def matches(graph: dict, name: str) -> bool:
    """:func:`candidates`'s test for one model: building one instead of the whole zoo is what makes a
    conversion whose model the user named start at once."""
    names, signature = _graph_key(graph)
    return _param_names(name) == names and _traced_signature(name) == signature


def identify(graph: dict, arch: str | None) -> list[str]:
    """The zoo models the graph is checked to match: only ``arch`` where it is named and matches (the
    user's word, confirmed; an unknown name is one line with suggestions), else every zoo model that
    matches (for the choice or the refusal)."""
    if arch and matches(graph, arch):
        return [arch]
    return candidates(graph)


def _choose(found: list[str], arch: str | None, origin: str) -> str:
    from bbadapt.core import zoo

    if arch:
        zoo.model_info(arch)  # unknown names: one line with suggestions
        if arch not in found:
            what = f"matches {', '.join(found)}" if found else "matches no zoo model"
            raise ModelError(f"--arch {arch} contradicts {origin}, whose graph {what} (weights for another model?)")
        return arch
    if not found:
        raise WeightsError(f"{origin}: no supported zoo model has this graph's parameters and layers "
                           "(not a zoo model, or a modified one); see `bbadapt list --all`")
    if len(found) > 1:
        raise ModelError(f"{origin} fits several zoo models ({', '.join(found)}); pick one with --arch")
    return found[0]


def _provenance(path: Path, files: list[Path], fmt: str, arch: str | None, **facts) -> dict:
    return {"kind": "file", "format": fmt, "path": str(path.resolve()), "sha256": file_digest(path),
            "files": {str(f.resolve()): file_digest(f) for f in files}, "arch_arg": arch, **facts}


def _fill(name: str, arrays: dict, origin: str) -> tuple[object, Float32Tensors]:
    """Build zoo model ``name`` and fill it; dtype/NaN/missing/extra/shape errors name structural keys."""
    from bbadapt.core import zoo
    from bbadapt.core.weights import assign, to_structural

    net = zoo.build(name)
    untagged = {k.split(":", 1)[1] if k.startswith(("arg:", "aux:")) else k: v for k, v in arrays.items()}
    tensors = float32_tensors(to_structural(untagged, net), origin)
    assign(net, tensors.arrays, origin)
    return net, tensors


def read_export(path: Path, arch: str | None = None, progress=None) -> Converted:
    """A ``HybridBlock.export()`` pair: the zoo model identified from its graph, then filled."""
    from bbadapt.core import zoo

    say = progress or (lambda _m: None)
    path = require_file(path)
    json_path, params_path, note = ndarray_file.pair(path)
    graph = ndarray_file.symbol_json(json_path)
    say(f"identifying the architecture of {json_path.name}")
    found = identify(graph, arch)
    name = _choose(found, arch, str(json_path))
    arrays = ndarray_file.load(params_path)
    say(f"filling {name} from {params_path.name}")
    net, tensors = _fill(name, arrays, str(params_path))
    fix_gamma_notes = check_fix_gamma(graph, net, arrays, str(json_path))
    version = graph.get("attrs", {}).get("mxnet_version")
    provenance = _provenance(path, [json_path, params_path], FORMAT_EXPORT.name, arch, pairing=note,
                             naming="gluon export() (arg:/aux: + instance prefix)",
                             prefix=os.path.commonprefix(graph_variables(graph)), candidates=found,
                             fix_gamma_notes=fix_gamma_notes, dtype_note=tensors.note,
                             mxnet_version=version[1] if isinstance(version, list) and len(version) == 2 else None)
    return Converted(net=net, arch={"zoo": name}, info=zoo.model_info(name), provenance=provenance)


def _bn_fix_gamma(graph: dict) -> dict[str, bool]:
    """Graph BatchNorm gamma variable -> the node's fix_gamma (operator default True)."""
    nodes = graph["nodes"]
    found = {}
    for node in nodes:
        if node["op"] == "BatchNorm" and len(node["inputs"]) > 1:
            fixed = str(ndarray_file.node_attrs(node).get("fix_gamma", "True")).lower() in ("true", "1")
            found[nodes[node["inputs"][1][0]]["name"]] = fixed
    return found


def check_fix_gamma(graph: dict, net, arrays: dict, origin: str) -> list[str]:
    """Where graph and zoo model disagree on fix_gamma, the stored gamma must be exactly 1.

    The exporting gluon version may have spelled ``scale=False`` differently (the gluoncv
    CIFAR v2 export says fix_gamma False on its data BN, today's gluoncv says True); the
    two compute the same function only if gamma is 1. Returns notes for the provenance.
    """
    from bbadapt.core.trace import block_paths
    from bbadapt.core.weights import structural_params

    blocks = block_paths(net)
    params = structural_params(net)
    net_prefix = os.path.commonprefix([p.name for p in params.values()])
    net_prefix = net_prefix[: net_prefix.rfind("_") + 1]
    by_plain = {p.name[len(net_prefix):]: key for key, p in params.items()}
    graph_fix = _bn_fix_gamma(graph)
    graph_prefix = os.path.commonprefix(graph_variables(graph))
    graph_prefix = graph_prefix[: graph_prefix.rfind("_") + 1]
    untagged = {k.split(":", 1)[-1]: v for k, v in arrays.items()}
    notes, conflicts = [], []
    for var, fixed in sorted(graph_fix.items()):
        key = by_plain.get(var[len(graph_prefix):])
        if key is None or var not in untagged:
            continue
        ours = bool(blocks[key.rsplit(".", 1)[0]]._kwargs["fix_gamma"])
        if ours == fixed:
            continue
        if (params[key].data().asnumpy() == 1).all():  # the stored gamma, as converted to float32
            notes.append(f"{key}: graph fix_gamma={fixed}, zoo model fix_gamma={ours}; same function (gamma is 1)")
        else:
            conflicts.append(key)
    if conflicts:
        raise WeightsError(f"{origin}: graph and zoo model disagree on fix_gamma at {len(conflicts)} BatchNorms "
                           f"(e.g. {conflicts[0]}) whose stored gamma is not 1; they would compute different functions")
    return notes


def naming_style(names: list[str]) -> str:
    """structural (save_parameters), export (arg:/aux: + instance prefix), or symbolic zoo."""
    if mxnet_symbol.is_symbolic_zoo_names(names):
        return "symbolic-zoo"
    if names and all(n.startswith(("arg:", "aux:")) for n in names):
        return "export"
    if names and all(n.split(".")[0].isidentifier() and "." in n for n in names):
        return "structural"
    return "prefixed"  # collect_params().save(): full names without arg:/aux:


def _hint(names: list[str]) -> str:
    """Zoo models whose parameter names fit a bare file, as a hint for the missing --arch."""
    plain = [n.split(":", 1)[1] if n.startswith(("arg:", "aux:")) else n for n in names]
    if naming_style(names) == "structural":
        return ""
    wanted = frozenset(_strip_prefix(plain))
    fits = [name for name, zoo_names in _zoo_names().items() if zoo_names == wanted]
    return f"; by its parameter names it could be {', '.join(fits)}" if fits else ""


def read_bare(path: Path, arch: str | None = None, progress=None) -> Converted:
    """A bare ``.params`` of a zoo model; ``arch`` (MODEL / --arch) says which model."""
    from bbadapt.core import zoo

    path = require_file(path)
    entries = ndarray_file.scan(path)
    names = [e.name for e in entries]
    if not arch:
        raise ModelError(f"{path} is a bare .params file, which does not say its architecture; "
                         f"name the model (bbadapt convert MODEL --weights FILE, or --arch){_hint(names)}")
    info = zoo.model_info(arch)
    arrays = ndarray_file.load(path)
    (progress or (lambda _m: None))(f"filling {arch} from {path.name}")
    net, tensors = _fill(arch, arrays, str(path))
    provenance = _provenance(path, [path], FORMAT_PARAMS.name, arch, naming=naming_style(names), dtype_note=tensors.note)
    return Converted(net=net, arch={"zoo": arch}, info=info, provenance=provenance)


def _sniff_export(path: Path, head: bytes) -> bool:
    """An MXNet graph JSON that is not symbolic-zoo, or arg:/aux: params with such a graph beside them."""
    try:
        verdict = ndarray_file.sniff_graph(path, head, lambda graph: not mxnet_symbol.is_symbolic_zoo_graph(graph))
        if verdict is not None:
            return verdict
        names = ndarray_file.names_if_ndarray(path, head)
        if not names or naming_style(names) != "export":
            return False
        graph = ndarray_file.graph_partner(path)
        if graph is not None and os.path.lexists(graph) and not graph.is_file():
            return True  # export names and a graph beside that is no file (a FIFO, a dangling link): read() says so
        json_path, _, _ = ndarray_file.pair(path)
        return not mxnet_symbol.is_symbolic_zoo_graph(ndarray_file.symbol_json(json_path))
    except (WeightsError, OSError, ValueError, TypeError, KeyError, AttributeError):
        return False


def _sniff_bare(path: Path, head: bytes) -> bool:
    """Any named NDArray file whose names are not the symbolic zoo's; also a damaged one (read() says what is wrong)."""
    names = ndarray_file.names_if_ndarray(path, head)
    if names is None:
        return ndarray_file.is_ndarray_file(head)
    return bool(names) and naming_style(names) != "symbolic-zoo"


FORMAT_EXPORT = Format(
    name="gluon-export",
    description="Gluon HybridBlock.export() pair (X-symbol.json + X-0000.params) of a zoo model; architecture read from the graph",
    sniff=_sniff_export, read=read_export, extensions=("-symbol.json", ".params"),
)
FORMAT_PARAMS = Format(
    name="gluon-params",
    description="bare Gluon .params of a zoo model (save_parameters or export names); needs --arch/MODEL",
    sniff=_sniff_bare, read=read_bare, extensions=(".params",),
)
FORMATS = (FORMAT_EXPORT, FORMAT_PARAMS)
FORMAT = FORMAT_EXPORT
