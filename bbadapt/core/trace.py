"""Graph discovery by tracing: what consumes the data, which BN follows which conv.

The Gluon block tree says what layers exist, not how they are wired: a v2 block's ``bn1``
reads the block input (a sum), while ``bn2`` reads ``conv1`` alone. Tracing the network
into a symbol gives the wiring. Parameters name the blocks that own them, so every symbol
node can be mapped back to a structural path (``features.5.0.bn2``) that the rewrite uses.
Nothing here is specific to a model family.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from bbadapt.platform.errors import ModelError


@dataclass
class Stage:
    """A stage: a sequence of residual blocks. Probed at its output."""

    path: str
    rf: float  # receptive field (input pixels) of its output
    jump: int  # stride of its output relative to the input

    @property
    def ring(self) -> int | None:
        """Width in cells of the border ring whose receptive field reaches the zero padding."""
        return None if math.isinf(self.rf) else math.ceil((self.rf - 1) / (2 * self.jump))


@dataclass
class Graph:
    """What tracing found, in structural paths."""

    data_consumer: str  # path of the layer reading the input
    data_consumer_kind: str  # "conv" or "bn"
    first_conv: str  # the first convolution (after the data BN, if any)
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (conv, bn) that can fuse
    unfusable: dict[str, str] = field(default_factory=dict)  # bn -> why it cannot fuse
    bn_order: list[str] = field(default_factory=list)  # every BN in graph order
    stages: list[Stage] = field(default_factory=list)
    stem: Stage | None = None  # probed at the input of the first stage (its path is that stage's)

    @property
    def data_bn(self) -> str | None:
        return self.data_consumer if self.data_consumer_kind == "bn" else None


def block_paths(net) -> dict[str, object]:
    """Structural path -> block, in registration order (root is '')."""
    out: dict[str, object] = {}

    def walk(block, path: str) -> None:
        out[path] = block
        for name, child in block._children.items():
            walk(child, f"{path}.{name}" if path else name)

    walk(net, "")
    return out


def param_owner(paths: dict[str, object]) -> dict[str, str]:
    owner = {}
    for path, block in paths.items():
        for param in block._reg_params.values():
            owner[param.name] = path
    return owner


def _count_convs(block) -> int:
    from mxnet.gluon import nn

    own = 1 if isinstance(block, (nn.Conv2D,)) else 0
    return own + sum(_count_convs(c) for c in block._children.values())


def find_stages(net) -> list[str]:
    """Stages are sequences whose every child is a residual block (holds >= 2 convs)."""
    from mxnet.gluon import nn

    found: list[str] = []

    def walk(block, path: str) -> None:
        children = list(block._children.items())
        if (isinstance(block, nn.HybridSequential) and path and children
                and all(_count_convs(c) >= 2 for _, c in children)):
            found.append(path)
            return
        for name, child in children:
            walk(child, f"{path}.{name}" if path else name)

    walk(net, "")
    return found


def symbol_graph(net) -> list[dict]:
    """The net traced into MXNet's JSON graph (works hybridized or not)."""
    import mxnet as mx

    out = net(mx.sym.var("data"))
    if isinstance(out, (list, tuple)):
        out = mx.sym.Group(list(out))
    return json.loads(out.tojson())["nodes"]


def trace(net) -> Graph:
    """Discover data consumer, conv->BN pairs, pre-activation BNs and stages of ``net``."""
    paths = block_paths(net)
    owner = param_owner(paths)
    nodes = symbol_graph(net)
    consumers: dict[int, int] = {}
    for node in nodes:
        if node["op"] != "null":
            for src, *_ in node["inputs"]:
                consumers[src] = consumers.get(src, 0) + 1

    def block_of(node: dict) -> str | None:
        """The block owning an op node, found through its weight/gamma variable."""
        if len(node["inputs"]) < 2:
            return None
        var = nodes[node["inputs"][1][0]]
        return owner.get(var["name"]) if var["op"] == "null" else None

    data_idx = next(i for i, n in enumerate(nodes) if n["op"] == "null" and n["name"] == "data")
    readers = [n for n in nodes if n["op"] != "null" and any(src == data_idx for src, *_ in n["inputs"])]
    if len(readers) != 1 or readers[0]["op"] not in ("Convolution", "BatchNorm"):
        kinds = ", ".join(n["op"] for n in readers) or "nothing"
        raise ModelError(f"cannot adapt: the input is read by {kinds}; expected one convolution or BatchNorm")
    first = readers[0]
    graph = Graph(block_of(first) or "", "conv" if first["op"] == "Convolution" else "bn", "")

    for node in nodes:
        if node["op"] == "Convolution" and not graph.first_conv:
            graph.first_conv = block_of(node) or ""
        if node["op"] != "BatchNorm":
            continue
        bn = block_of(node)
        if bn is None:
            raise ModelError(f"cannot map BatchNorm node {node['name']} to a Gluon block")
        graph.bn_order.append(bn)
        src = node["inputs"][0][0]
        producer = nodes[src]
        if producer["op"] == "Convolution" and consumers.get(src, 0) == 1 and block_of(producer):
            graph.pairs.append((block_of(producer), bn))  # type: ignore[arg-type]
        elif producer["op"] == "Convolution":
            graph.unfusable[bn] = "its conv's output is also read elsewhere (a residual branch)"
        elif producer["op"] == "null":
            graph.unfusable[bn] = "reads the network input (before zero padding)"
        else:
            graph.unfusable[bn] = f"pre-activation: reads the output of {producer['op']}, not of a conv"
    if not graph.first_conv:
        raise ModelError("cannot adapt: no convolution found in the network")
    _receptive_fields(net, nodes, graph)
    return graph


def _receptive_fields(net, nodes: list[dict], graph: Graph) -> None:
    """Receptive field and stride of each stage output and of the stem (first stage input)."""
    rf: list[float] = []
    jump: list[int] = []
    for node in nodes:
        ins = [src for src, *_ in node["inputs"] if nodes[src]["op"] != "null" or nodes[src]["name"] == "data"]
        r = max((rf[s] for s in ins), default=1.0)
        j = max((jump[s] for s in ins), default=1)
        attrs = node.get("attrs", {})
        if node["op"] in ("Convolution", "Pooling"):
            if attrs.get("global_pool") == "True":
                r = math.inf
            else:
                kernel = _tuple(attrs.get("kernel", "(1,1)"))
                stride = _tuple(attrs.get("stride", "(1,1)"))
                dilate = _tuple(attrs.get("dilate", "(1,1)"))
                r = r + (kernel[0] - 1) * dilate[0] * j
                j = j * stride[0]
        rf.append(r)
        jump.append(j)
    paths = block_paths(net)
    for k, path in enumerate(find_stages(net)):
        prefix = paths[path].prefix
        members = [i for i, n in enumerate(nodes) if n["name"].startswith(prefix) and n["op"] != "null"]
        if not members:
            continue
        graph.stages.append(Stage(path, rf[members[-1]], jump[members[-1]]))
        if k == 0:
            inside = set(members)
            feeding = [s for i in members for s, *_ in nodes[i]["inputs"]
                       if s not in inside and (nodes[s]["op"] != "null" or nodes[s]["name"] == "data")]
            src = max(feeding, default=0)
            graph.stem = Stage(path, rf[src], jump[src])


def _tuple(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.strip("()[] ").split(",") if v.strip())
