"""The original MXNet symbolic model-zoo ResNets: ``resnet-N-symbol.json`` + ``resnet-N-EEEE.params``.

These are pre-activation ResNets (He et al., "Identity Mappings") that take raw 0..255 RGB
and normalize it with their first layer, a fix_gamma BatchNorm ``bn_data``. Layer names:
``bn_data``, ``conv0``, ``bn0``, ``pool0``, ``stageK_unitM_{bn1,conv1,bn2,conv2[,bn3,conv3]}``,
``stageK_unitM_sc`` (1x1 shortcut conv), ``bn1``, ``fc1``.

Everything about the architecture is read from the graph, not from a per-depth table:
stages and units, basic or bottleneck units, which units have a shortcut conv, strides,
stem geometry, classes, and every BatchNorm's eps and fix_gamma (the operator defaults,
eps 1e-3 and fix_gamma True, apply where a node leaves them out). The Gluon network is
gluon's ``resnetN_v2`` layout built from gluon's own ``BasicBlockV2``/``BottleneckV2``,
so structural names are those of ``resnetN_v2``; one builder serves every depth because
the zoo twin is never exact: its BatchNorms use eps 1e-5 where the graph says 2e-5, and
the original ResNet-18 has a 1x1 shortcut conv in stage1 unit1 that ``resnet18_v2`` lacks.
Each conv/BN/FC of the built net is then compared with its graph node (kernel, stride,
pad, filters, bias, groups, dilation, eps, fix_gamma) before any weight is assigned.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from bbadapt.core.architectures.symbolic_resnet import layer_paths, symbolic_resnet
from bbadapt.core.registry import Converted, custom_info
from bbadapt.core.trace import block_paths
from bbadapt.platform.errors import ModelError, WeightsError
from bbadapt.platform.native import quiet_native_output
from converters.readers import ndarray_file
from converters.readers.base import Format, file_digest, float32_tensors, require_file, unmatched_error

BUILDER = "mxnet-symbolic-resnet"
UNIT_RE = re.compile(r"^stage(\d+)_unit(\d+)_(bn[123]|conv[123]|sc)$")
STEM_LAYERS = ("bn_data", "conv0", "bn0", "bn1", "fc1")
KNOWN_OPS = {"BatchNorm", "Convolution", "Activation", "Pooling", "Flatten", "FullyConnected",
             "elemwise_add", "_Plus", "_plus", "null"}  # the ops after the classifier: OUTPUT_OPS
# BatchNorm operator defaults (src/operator/nn/batch_norm-inl.h) for nodes that omit them
BN_DEFAULT_EPS, BN_DEFAULT_FIX_GAMMA = 1e-3, True
# (graph param suffix, gluon param name, arg or aux) per layer kind
PARAM_NAMES = {
    "BatchNorm": (("gamma", "gamma", "arg"), ("beta", "beta", "arg"),
                  ("moving_mean", "running_mean", "aux"), ("moving_var", "running_var", "aux")),
    "Convolution": (("weight", "weight", "arg"), ("bias", "bias", "arg")),
    "FullyConnected": (("weight", "weight", "arg"), ("bias", "bias", "arg")),
}


# --- reading the graph ---------------------------------------------------------------------

def _ints(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    if text is None:
        return default
    return tuple(int(v) for v in re.findall(r"-?\d+", str(text)))


def _bool(text, default: bool) -> bool:
    return default if text is None else str(text).strip().lower() in ("true", "1")


def layers_of(graph: dict) -> dict[str, tuple[str, dict]]:
    """Op nodes by name: (op, attrs), whatever key this graph's mxnet version used for attrs."""
    return {n["name"]: (n["op"], ndarray_file.node_attrs(n)) for n in graph["nodes"] if n["op"] != "null"}


def is_symbolic_zoo_graph(graph: dict) -> bool:
    """Symbolic model-zoo naming: a ``bn_data``/``conv0`` stem and ``stageK_unitM_`` layers, no prefix."""
    ops = layers_of(graph)
    return ops.get("bn_data", ("",))[0] == "BatchNorm" and ops.get("conv0", ("",))[0] == "Convolution" \
        and any(UNIT_RE.match(name) for name in ops)


def _units(ops: dict, origin: str) -> dict[int, dict[int, set[str]]]:
    stages: dict[int, dict[int, set[str]]] = {}
    for name in ops:
        m = UNIT_RE.match(name)
        if m:
            stages.setdefault(int(m[1]), {}).setdefault(int(m[2]), set()).add(m[3])
    if sorted(stages) != list(range(1, len(stages) + 1)) or any(
            sorted(u) != list(range(1, len(u) + 1)) for u in stages.values()):
        raise WeightsError(f"{origin}: stages/units are not numbered 1..n ({ {k: sorted(v) for k, v in stages.items()} })")
    return stages


def _unit_kind(stages: dict, origin: str) -> bool:
    """True for bottleneck units (bn1..3, conv1..3), False for basic ones (bn1..2, conv1..2)."""
    basic, bottleneck = {"bn1", "conv1", "bn2", "conv2"}, {"bn1", "conv1", "bn2", "conv2", "bn3", "conv3"}
    kinds = {frozenset(parts - {"sc"}) for units in stages.values() for parts in units.values()}
    if kinds == {frozenset(bottleneck)}:
        return True
    if kinds == {frozenset(basic)}:
        return False
    raise WeightsError(f"{origin}: residual units are neither all basic nor all bottleneck "
                       f"(layer sets {sorted(sorted(k) for k in kinds)})")


def _conv(ops: dict, name: str) -> dict:
    attrs = ops[name][1]
    return {"filters": int(attrs["num_filter"]), "kernel": _ints(attrs.get("kernel"), ()),
            "stride": _ints(attrs.get("stride"), (1, 1)), "pad": _ints(attrs.get("pad"), (0, 0)),
            "dilate": _ints(attrs.get("dilate"), (1, 1)), "groups": int(attrs.get("num_group", 1)),
            "bias": not _bool(attrs.get("no_bias"), False)}


def _bn(ops: dict, name: str) -> tuple[float, bool]:
    attrs = ops[name][1]
    return float(attrs.get("eps", BN_DEFAULT_EPS)), _bool(attrs.get("fix_gamma"), BN_DEFAULT_FIX_GAMMA)


def _pools(ops: dict, origin: str) -> tuple[dict, dict]:
    pools = {n: a for n, (op, a) in ops.items() if op == "Pooling"}
    globals_ = [a for a in pools.values() if _bool(a.get("global_pool"), False)]
    local = [a for a in pools.values() if not _bool(a.get("global_pool"), False)]
    if len(local) != 1 or len(globals_) != 1 or local[0].get("pool_type") != "max" \
            or globals_[0].get("pool_type") != "avg":
        raise WeightsError(f"{origin}: expected one max-pool in the stem and one global average pool, "
                           f"found {len(local)} local and {len(globals_)} global pools")
    return local[0], globals_[0]


def _unknown_layers(ops: dict, origin: str) -> None:
    odd_ops = sorted({op for op, _ in ops.values()} - KNOWN_OPS)
    if odd_ops:
        raise WeightsError(f"{origin}: the graph has operators this converter does not map: {', '.join(odd_ops)}")
    weighted = {n for n, (op, _) in ops.items() if op in PARAM_NAMES}
    odd = sorted(n for n in weighted if n not in STEM_LAYERS and not UNIT_RE.match(n))
    if odd:
        raise WeightsError(f"{origin}: the graph has layers this converter does not map: {', '.join(odd[:6])}")
    absent = [n for n in STEM_LAYERS if n not in ops]
    if absent:
        raise WeightsError(f"{origin}: not a symbolic model-zoo ResNet graph (no {', '.join(absent)})")


# Ops a graph may apply to the classifier's output only (training losses and output activations):
# the converted network outputs the classifier's logits and the provenance records what followed.
OUTPUT_OPS = frozenset({"SoftmaxOutput", "softmax", "log_softmax", "SoftmaxActivation", "LogisticRegressionOutput",
                        "LinearRegressionOutput", "MAERegressionOutput", "sigmoid", "Activation"})


def _classifier(graph: dict, origin: str) -> tuple[int, list[int]]:
    """(index of the one FullyConnected, indices of the output-only ops that follow it)."""
    nodes = graph["nodes"]
    fcs = [i for i, n in enumerate(nodes) if n["op"] == "FullyConnected"]
    if len(fcs) != 1:
        raise WeightsError(f"{origin}: a ResNet graph has one classifier (FullyConnected); this one has {len(fcs)}")
    consumers: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        for src, *_ in node["inputs"]:
            consumers.setdefault(src, []).append(i)
    after, odd, todo = [], set(), list(consumers.get(fcs[0], []))
    while todo:
        i = todo.pop()
        if i in after:
            continue
        if nodes[i]["op"] not in OUTPUT_OPS:
            odd.add(nodes[i]["op"])
            continue
        after.append(i)
        todo.extend(consumers.get(i, []))
    if odd:
        raise WeightsError(f"{origin}: the graph has operators this converter does not map: {', '.join(sorted(odd))} "
                           f"(after the classifier {nodes[fcs[0]]['name']}, where only output activations may follow)")
    heads = {h[0] for h in graph["heads"]}
    if not heads <= {fcs[0], *after}:
        extra = sorted(nodes[i]["name"] for i in heads - {fcs[0], *after})
        raise WeightsError(f"{origin}: the graph has outputs besides its classifier and what follows it ({', '.join(extra)})")
    return fcs[0], sorted(after)


def output_activations(graph: dict, origin: str = "graph") -> list[str]:
    """The output-only ops after the classifier, as ``"op name"`` (recorded, not converted)."""
    _, after = _classifier(graph, origin)
    return [f"{graph['nodes'][i]['op']} {graph['nodes'][i]['name']}" for i in after]


def classifier_name(graph: dict, origin: str = "graph") -> str:
    return graph["nodes"][_classifier(graph, origin)[0]]["name"]


def head_trimmed(graph: dict, origin: str = "graph") -> dict:
    """The graph up to its classifier, the classifier named ``fc1`` as in the zoo (idempotent).

    Output-only ops become inert ``null`` nodes (indices stay valid), so the graph's layers
    and wiring can be compared with the Gluon network, which outputs logits.
    """
    fc, after = _classifier(graph, origin)
    nodes = [dict(n) for n in graph["nodes"]]
    for i in after:
        nodes[i] = {"op": "null", "name": nodes[i]["name"], "inputs": []}
    nodes[fc]["name"] = "fc1"
    return {**graph, "nodes": nodes, "heads": [[fc, 0, 0]]}


INFER_SIZE = 224  # the input side shapes are inferred for: what every symbolic-zoo ResNet was trained on
_OPERATOR_NAME = re.compile(r'Error in operator ([^:\s]+):|in operator \w+\(name="([^"]*)"')
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: )?")


def graph_shapes(graph: dict, origin: str) -> dict[str, tuple[int, ...]]:
    """Every variable's shape (weights and statistics), as MXNet infers them for one 224x224 image.

    Why: a graph can parse and still be one MXNet rejects (an absurd ``num_filter`` or kernel, a
    ``FullyConnected`` with ``num_hidden`` 0); building a network from it would fail deep inside
    MXNet, or allocate whatever a hostile file declares. Checking the attributes MXNet trusts, then
    asking MXNet's own shape inference, gives one "damaged graph" line naming the node, and the
    shapes, whose total size :func:`check_weights_fit` compares with the parameters file.
    """
    import mxnet as mx

    problem = _attribute_problem(graph)
    if problem:
        raise WeightsError(f"{origin}: damaged MXNet graph: {problem}")
    trimmed = head_trimmed(graph, origin)
    nodes = [{**n, "name": original["name"]}  # the names the user's file uses (head_trimmed renames the classifier)
             for n, original in zip(trimmed["nodes"], graph["nodes"], strict=True)]
    document = {**trimmed, "nodes": nodes, "arg_nodes": [i for i, n in enumerate(nodes) if n["op"] == "null"]}
    try:
        with quiet_native_output():  # MXNet logs its upgrade of old graphs, and prints "infer_shape error. ..."
            symbol = mx.sym.load_json(json.dumps(document))
            arg_shapes, _, aux_shapes = symbol.infer_shape(data=(1, 3, INFER_SIZE, INFER_SIZE))
            names = symbol.list_arguments() + symbol.list_auxiliary_states()
    except mx.base.MXNetError as exc:
        raise WeightsError(f"{origin}: damaged MXNet graph: {_rejection(str(exc))}") from None
    if arg_shapes is None or aux_shapes is None:
        raise WeightsError(f"{origin}: damaged MXNet graph: the shapes of its weights cannot be inferred")
    return {n: tuple(s) for n, s in zip(names, arg_shapes + aux_shapes, strict=True) if n not in ("data", "softmax_label")}


# attributes MXNet divides by or loops over without checking them all (num_group 0 kills the process with
# SIGFPE in 1.9.1; a Pooling stride of 0 or a negative pad passes shape inference): (smallest value, ops)
CHECKED_ATTRS = {"num_group": (1, ("Convolution", "Deconvolution")), "num_filter": (1, ("Convolution", "Deconvolution")),
                 "num_hidden": (1, ("FullyConnected",)), "stride": (1, ("Convolution", "Deconvolution", "Pooling")),
                 "dilate": (1, ("Convolution", "Deconvolution")), "kernel": (1, ("Convolution", "Deconvolution", "Pooling")),
                 "pad": (0, ("Convolution", "Deconvolution", "Pooling"))}


def _attribute_problem(graph: dict) -> str | None:
    """A layer attribute out of range, named with its node, before MXNet sees it (some values crash MXNet)."""
    for node in graph["nodes"]:
        attrs = ndarray_file.node_attrs(node)
        global_pool = _bool(attrs.get("global_pool"), False)
        for key, (least, ops) in CHECKED_ATTRS.items():
            if node["op"] not in ops or key not in attrs or (global_pool and key in ("kernel", "stride", "pad")):
                continue
            values = re.findall(r"-?\d+", str(attrs[key]))
            if any(int(v) < least for v in values):
                shown = " ".join(str(attrs[key]).split())[:40]  # one line, whatever the file holds
                return f"node {node['name']!r} has {key} {shown} (each value must be at least {least})"
    return None


def _rejection(message: str) -> str:
    """MXNet's complaint about a graph, in one line: the node it names and the reason, without log prefixes."""
    text = message.split("MXNetError: ", 1)[-1] if "MXNetError: " in message else message
    match = _OPERATOR_NAME.search(text)
    node = next((g for g in match.groups() if g), None) if match else None
    reason = re.sub(r"^Error in operator [^:\s]+: ", "", text.splitlines()[0])
    reason = _LOG_PREFIX.sub("", reason)
    reason = re.sub(r", in operator \w+\(.*$", "", reason)
    reason = " ".join(reason.split())[:160]
    return f"node {node!r} is rejected by MXNet ({reason})" if node else f"MXNet rejects it ({reason})"


def check_weights_fit(shapes: dict[str, tuple[int, ...]], params_path: Path, origin: str) -> None:
    """The graph may not declare more weights than the parameters file can hold (2 bytes a value at least).

    Checked before any network is built: a graph with ``num_filter`` 10**6 is a valid MXNet graph of
    terabytes, and its partner file, whatever it is, cannot fill it."""
    from converters.readers.limits import nbytes

    declared = sum(nbytes(s, 2) for s in shapes.values())
    stored = params_path.stat().st_size
    if declared > stored:
        raise WeightsError(f"{origin}: the graph declares weights of {declared:,} bytes even in 16-bit floats, but "
                           f"{params_path.name} holds {stored:,} bytes; a damaged graph, or parameters of another model")


def read_graph(graph: dict, origin: str) -> dict:
    """The builder kwargs (JSON-able) that describe the network a symbolic-zoo graph computes."""
    try:
        return _read_graph(head_trimmed(graph, origin), origin)
    except (KeyError, ValueError, IndexError, TypeError) as exc:
        raise WeightsError(f"{origin}: malformed graph ({type(exc).__name__}: {exc}); a damaged -symbol.json?") from None


def _read_graph(graph: dict, origin: str) -> dict:
    ops = layers_of(graph)
    _unknown_layers(ops, origin)
    stages = _units(ops, origin)
    bottleneck = _unit_kind(stages, origin)
    last = "conv3" if bottleneck else "conv2"
    channels = [_conv(ops, "conv0")["filters"]]
    strides, shortcuts, units = [], [], []
    for k in sorted(stages):
        outs = {_conv(ops, f"stage{k}_unit{m}_{last}")["filters"] for m in stages[k]}
        if len(outs) != 1:
            raise WeightsError(f"{origin}: stage{k} units end with different widths {sorted(outs)}")
        channels.append(outs.pop())
        units.append(len(stages[k]))
        strides.append(max(max(_conv(ops, f"stage{k}_unit1_{p}")["stride"]) for p in stages[k][1] if "conv" in p))
        shortcuts.append([m - 1 for m in sorted(stages[k]) if "sc" in stages[k][m]])
    stem = _conv(ops, "conv0")
    pool, _ = _pools(ops, origin)
    bns = {n: _bn(ops, n) for n, (op, _) in ops.items() if op == "BatchNorm"}
    eps_values = [e for e, _ in bns.values()]
    eps = max(set(eps_values), key=eps_values.count)
    return {
        "bottleneck": bottleneck, "units": units, "channels": channels, "strides": strides,
        "shortcuts": shortcuts, "classes": int(ops["fc1"][1]["num_hidden"]),
        "stem": {"kernel": stem["kernel"][0], "stride": stem["stride"][0], "pad": stem["pad"][0],
                 "pool": [_ints(pool.get("kernel"), ())[0], _ints(pool.get("stride"), (1,))[0],
                          _ints(pool.get("pad"), (0,))[0]],
                 "pool_ceil": pool.get("pooling_convention", "valid") == "full"},
        "eps": eps, "bn_eps": {n: e for n, (e, _) in sorted(bns.items()) if e != eps},
        "fix_gamma": sorted(n for n, (_, fixed) in bns.items() if fixed),
    }


def depth(kwargs: dict) -> int:
    return 2 + (3 if kwargs["bottleneck"] else 2) * sum(kwargs["units"])


# --- the network -----------------------------------------------------------------------------

def verify_layers(net, graph: dict, kwargs: dict, origin: str) -> None:
    """Every mapped layer of ``net`` computes what its graph node says (geometry, eps, fix_gamma)."""
    ops = layers_of(head_trimmed(graph, origin))
    blocks = block_paths(net)
    wrong = []
    for name, path in layer_paths(kwargs).items():
        op, block = ops[name][0], blocks[path]
        kw = getattr(block, "_kwargs", {})
        if op == "Convolution":
            c = _conv(ops, name)
            ours = {"filters": block._channels, "kernel": tuple(kw["kernel"]), "stride": tuple(kw["stride"]),
                    "pad": tuple(kw["pad"]), "dilate": tuple(kw["dilate"]), "groups": kw["num_group"],
                    "bias": not kw["no_bias"]}
        elif op == "BatchNorm":
            eps, fixed = _bn(ops, name)
            c, ours = {"eps": eps, "fix_gamma": fixed}, {"eps": kw["eps"], "fix_gamma": kw["fix_gamma"]}
        elif op == "FullyConnected":
            c = {"units": int(ops[name][1]["num_hidden"]), "bias": not _bool(ops[name][1].get("no_bias"), False)}
            ours = {"units": block._units, "bias": block.bias is not None}
        else:
            c, ours = {"op": op}, {"op": type(block).__name__}
        diff = {k: (c[k], ours[k]) for k in c if c[k] != ours[k]}
        if diff:
            wrong.append(f"{name} {diff}")
    if wrong:
        raise ModelError(f"{origin}: the Gluon network does not fit the graph at {len(wrong)} layers "
                         f"(graph vs gluon: {'; '.join(wrong[:3])})")


ADD_OPS = ("elemwise_add", "_Plus", "_plus", "broadcast_add", "_add")
WIRING_OPS = ("Activation", "Pooling") + ADD_OPS  # compared as counts; weighted layers edge by edge


def _used(graph: dict) -> set[int]:
    """Nodes the outputs depend on (a graph may hold dangling nodes)."""
    nodes, todo, seen = graph["nodes"], [h[0] for h in graph["heads"]], set()
    while todo:
        i = todo.pop()
        if i not in seen:
            seen.add(i)
            todo.extend(src for src, *_ in nodes[i]["inputs"])
    return seen


def _frontiers(graph: dict, name_of) -> tuple[dict[str, frozenset], Counter]:
    """Each weighted layer -> the weighted layers (or "data") it reads through unweighted ops.

    ``name_of(i)`` gives the common name of weighted op node i (or None). Also returns the
    counts of relu/pool/add ops the outputs depend on, so a dropped activation or residual
    add is seen too.
    """
    nodes, used = graph["nodes"], _used(graph)
    reach: list[frozenset] = []
    layers: dict[str, frozenset] = {}
    ops: Counter = Counter()
    for i, node in enumerate(nodes):
        if node["op"] == "null":
            reach.append(frozenset({"data"}) if node["name"] == "data" else frozenset())
            continue
        below = frozenset().union(*(reach[src] for src, *_ in node["inputs"][:1 if node["op"] in PARAM_NAMES else None]))
        name = name_of(i) if node["op"] in PARAM_NAMES else None
        if name is not None:
            layers[name] = below
            reach.append(frozenset({name}))
        else:
            reach.append(below)
            if node["op"] in WIRING_OPS and i in used:
                ops["add" if node["op"] in ADD_OPS else node["op"]] += 1
    return layers, ops


def verify_wiring(net, graph: dict, kwargs: dict, origin: str) -> None:
    """The graph and the built network connect their layers the same way (residuals included)."""
    import mxnet as mx

    from bbadapt.core.trace import param_owner

    graph = head_trimmed(graph, origin)
    paths = layer_paths(kwargs)
    by_path = {p: n for n, p in paths.items()}
    traced = json.loads(net(mx.sym.var("data")).tojson())
    gluon_nodes = traced["nodes"]
    owner = param_owner(block_paths(net))

    def gluon_name(i: int) -> str | None:
        weight = gluon_nodes[gluon_nodes[i]["inputs"][1][0]]["name"]
        return by_path.get(owner.get(weight, ""))

    ours, our_ops = _frontiers(traced, gluon_name)
    theirs, their_ops = _frontiers(graph, lambda i: graph["nodes"][i]["name"])
    wrong = [f"{n} reads {sorted(theirs.get(n, ()))} in the graph, {sorted(ours.get(n, ()))} in gluon"
             for n in sorted(set(ours) | set(theirs)) if ours.get(n) != theirs.get(n)]
    if our_ops != their_ops:
        wrong.append(f"relu/pool/add counts {dict(their_ops)} in the graph, {dict(our_ops)} in gluon")
    if wrong:
        raise ModelError(f"{origin}: the graph is wired differently from a pre-activation ResNet at "
                         f"{len(wrong)} places ({'; '.join(wrong[:2])})")


def symbolic_names(kwargs: dict, graph: dict) -> dict[str, str]:
    """Structural parameter name -> the key the symbolic zoo writes (``arg:conv0_weight`` ...)."""
    stored_as = {"fc1": classifier_name(graph)}  # the classifier may be called fc, fc1000 ...
    ops = layers_of(head_trimmed(graph))
    names = {}
    for layer, path in layer_paths(kwargs).items():
        op, attrs = ops[layer]
        for suffix, gluon, tag in PARAM_NAMES[op]:
            if suffix == "bias" and _bool(attrs.get("no_bias"), False):
                continue
            names[f"{path}.{gluon}"] = f"{tag}:{stored_as.get(layer, layer)}_{suffix}"
    return names


# --- the format ------------------------------------------------------------------------------

def _untagged(key: str) -> str:
    return key.split(":", 1)[1] if key.startswith(("arg:", "aux:")) else key


def _map_arrays(arrays: dict, names: dict[str, str], origin: str) -> dict:
    by_plain = {_untagged(k): v for k, v in arrays.items()}
    wanted = {_untagged(v): k for k, v in names.items()}
    unmatched = sorted(k for k in by_plain if k not in wanted)
    missing = sorted(k for k in wanted if k not in by_plain)
    if unmatched or missing:
        raise unmatched_error(origin, unmatched, missing)
    return {structural: by_plain[plain] for plain, structural in wanted.items()}


def _check_arch(arch: str | None, kwargs: dict, origin: str) -> None:
    """``--arch`` may only name this graph's own family and depth (its gluon twin)."""
    twin = f"resnet{depth(kwargs)}_v2"
    if arch and arch != twin:
        raise ModelError(f"{origin} is a symbolic-zoo pre-activation ResNet-{depth(kwargs)} "
                         f"(gluon family {twin}); --arch {arch} contradicts it")


def gluon_twin(kwargs: dict) -> str | None:
    """The gluon zoo model with exactly these layers (eps aside), if there is one."""
    from mxnet.gluon.model_zoo.vision.resnet import resnet_spec

    spec = resnet_spec.get(depth(kwargs))
    if not spec:
        return None
    kind, layers, channels = spec
    gluon_shortcuts = []
    prev = channels[0]
    for c in channels[1:]:
        gluon_shortcuts.append([0] if c != prev else [])
        prev = c
    same = (kind == ("bottle_neck" if kwargs["bottleneck"] else "basic_block") and layers == kwargs["units"]
            and channels == kwargs["channels"] and kwargs["strides"] == [1, 2, 2, 2]
            and kwargs["shortcuts"] == gluon_shortcuts)
    return f"resnet{depth(kwargs)}_v2" if same else None


def _build(kwargs: dict, origin: str):
    """The network the graph describes; MXNet's refusal to build it (a stem that a 64x64 probe image cannot pass,
    where shapes were inferred at 224x224) is one 'damaged graph' line, not an internal error."""
    import mxnet as mx

    try:
        with quiet_native_output():
            return symbolic_resnet(**kwargs)
    except (mx.base.MXNetError, ValueError) as exc:
        raise WeightsError(f"{origin}: damaged MXNet graph: {_rejection(str(exc))}") from None


def read(path: Path, arch: str | None = None, progress=None) -> Converted:
    """Convert a symbolic-zoo checkpoint (either file of the pair) into a Gluon network."""
    say = progress or (lambda _m: None)
    path = require_file(path)
    json_path, params_path, note = ndarray_file.pair(path)
    graph = ndarray_file.symbol_json(json_path)
    if not is_symbolic_zoo_graph(graph):
        raise WeightsError(f"{json_path} is an MXNet graph but not a symbolic model-zoo ResNet "
                           "(no bn_data/conv0/stageK_unitM_ layers); try --format gluon-export")
    kwargs = read_graph(graph, str(json_path))
    _check_arch(arch, kwargs, str(json_path))
    check_weights_fit(graph_shapes(graph, str(json_path)), params_path, str(json_path))
    say(f"reading {params_path.name} ({note})")
    tensors = float32_tensors(ndarray_file.load(params_path), str(params_path))
    arrays = tensors.arrays
    net = _build(kwargs, str(json_path))
    verify_layers(net, graph, kwargs, str(json_path))
    verify_wiring(net, graph, kwargs, str(json_path))
    from bbadapt.core.weights import assign

    assign(net, _map_arrays(arrays, symbolic_names(kwargs, graph), str(params_path)), str(params_path))
    name = f"mxnet_resnet{depth(kwargs)}_v2"
    version = graph.get("attrs", {}).get("mxnet_version")
    provenance = {
        "kind": "file", "format": FORMAT.name, "path": str(path.resolve()), "sha256": file_digest(path),
        "files": {str(json_path.resolve()): file_digest(json_path), str(params_path.resolve()): file_digest(params_path)},
        "arch_arg": arch, "pairing": note, "naming": "mxnet symbolic model zoo (arg:/aux: + layer names)",
        "mxnet_version": version[1] if isinstance(version, list) and len(version) == 2 else None,
        "gluon_twin": gluon_twin(kwargs),
        "output_activations": output_activations(graph, str(json_path)),
        "bn": {"eps": kwargs["eps"], "other_eps": kwargs["bn_eps"], "fix_gamma": kwargs["fix_gamma"]},
        "dtype_note": tensors.note,
    }
    return Converted(net=net, arch={"builder": BUILDER, "kwargs": json.loads(json.dumps(kwargs))},
                     info=custom_info(name, "mxnet-symbolic-v2", "rgb255", 224), provenance=provenance)


def sniff(path: Path, head: bytes) -> bool:
    """A symbolic-zoo graph (JSON), or an NDArray file with symbolic-zoo names."""
    try:
        verdict = ndarray_file.sniff_graph(path, head, is_symbolic_zoo_graph)
        if verdict is not None:
            return verdict
        names = ndarray_file.names_if_ndarray(path, head)
        return bool(names) and is_symbolic_zoo_names(names)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return False


def is_symbolic_zoo_names(names: list[str]) -> bool:
    plain = {_untagged(n) for n in names}
    return "conv0_weight" in plain and "bn_data_moving_var" in plain \
        and any(UNIT_RE.match(n.rsplit("_", 1)[0]) or UNIT_RE.match(n.rsplit("_", 2)[0]) for n in plain)


FORMAT = Format(
    name="mxnet-symbol",
    description="original MXNet symbolic model-zoo ResNet (resnet-N-symbol.json + resnet-N-EEEE.params), raw RGB 0..255",
    sniff=sniff, read=read, extensions=("-symbol.json", ".params"),
)
