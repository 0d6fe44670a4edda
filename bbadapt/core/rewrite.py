"""Adapt a network: fold the input normalization in, freeze every BatchNorm.

Two phases keep this honest and reloadable:

* :func:`make_plan` turns the traced :class:`~bbadapt.trace.Graph` and the user's choices
  into a list of plain-dict steps (``fuse``, ``affine``, ``global_stats``, ``input_bn``,
  ``input_insert``, ``input_conv``), each naming structural paths of the *original* net;
* :func:`apply_plan` executes them in order, computing new values in float64 from the
  values the net holds.

The plan goes into the manifest; :func:`bbadapt.bundle.load_backbone` replays it on a
freshly built net to recreate the structure, then loads the saved parameters. BN steps
come before the input step: both act linearly on the first conv (output channels vs input
channels), so the order does not change the result, only which paths are still valid.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from bbadapt.core.blocks import (
    FrozenAffine,
    Identity,
    bn_constants,
    get_block,
    make_frozen_affine,
    param_value,
    replace_block,
    set_conv,
)
from bbadapt.core.errors import ModelError, OptionError, WeightsError
from bbadapt.core.spec import InputSpec, affine_map, parse_spec
from bbadapt.core.trace import Graph, block_paths, trace

FOLDS = ("auto", "bn", "conv")
BN_MODES = ("global-stats", "affine", "fused")
TINY_VAR = 1e-6  # running_var below this: the frozen scale is driven by eps alone
FP16_MAX = 65504.0


@dataclass
class Adapted:
    """An adapted network and how it came to be."""

    net: object
    source: InputSpec
    target: InputSpec
    bn: str
    plan: list[dict]
    graph: Graph | None  # None for a backbone reloaded from a bundle
    health: list[dict] = field(default_factory=list)  # BN channels worth a warning

    @property
    def fold(self) -> str:
        """The fold actually used: "bn", "conv" or "none" (nothing to fold)."""
        return fold_used(self.plan)

    @property
    def exact(self) -> bool:
        return all(step.get("exact", True) for step in self.plan)


def make_plan(graph: Graph, source: InputSpec, target: InputSpec, fold: str = "auto", bn: str = "fused") -> list[dict]:
    """Steps that turn the traced net into its adapted form (no values touched)."""
    if fold not in FOLDS:
        raise OptionError(f"unknown fold {fold!r}; choose one of {', '.join(FOLDS)}")
    if bn not in BN_MODES:
        raise OptionError(f"unknown BN mode {bn!r}; choose one of {', '.join(BN_MODES)}")
    fused_with = {b: c for c, b in graph.pairs}
    steps: list[dict] = []
    for path in graph.bn_order:
        if path == graph.data_bn:
            continue
        if bn == "fused" and path in fused_with:
            steps.append({"op": "fuse", "conv": fused_with[path], "bn": path})
        elif bn == "global-stats":
            steps.append({"op": "global_stats", "bn": path})
        else:
            step = {"op": "affine", "bn": path}
            if bn == "fused":
                step["why"] = graph.unfusable.get(path, "no fusable conv")
            steps.append(step)
    folding = "bn" if fold == "auto" else fold
    data_form = "global-stats" if bn == "global-stats" else "affine"
    if graph.data_bn and folding == "bn":
        steps.append({"op": "input_bn", "bn": graph.data_bn, "conv": graph.first_conv, "form": data_form})
    elif graph.data_bn:
        steps.append({"op": "input_conv", "conv": graph.first_conv, "absorb_bn": graph.data_bn})
    elif not source.same_function(target):
        if folding == "bn":
            steps.append({"op": "input_insert", "conv": graph.first_conv})
        else:
            steps.append({"op": "input_conv", "conv": graph.first_conv, "absorb_bn": None})
    return steps


def fold_used(plan: list[dict]) -> str:
    ops = {s["op"] for s in plan}
    return "conv" if "input_conv" in ops else "bn" if ops & {"input_bn", "input_insert"} else "none"


def _health(path: str, bn) -> dict | None:
    var = param_value(bn.running_var)
    if np.any(var + float(bn._kwargs["eps"]) <= 0):
        raise WeightsError(f"BatchNorm {path} has running_var + eps <= 0 in {int(np.sum(var + bn._kwargs['eps'] <= 0))} channels; the original network is undefined there")
    s, _ = bn_constants(bn)
    tiny = int(np.sum(var < TINY_VAR))
    fp16 = int(np.sum(var > FP16_MAX))
    if tiny or fp16:
        return {"bn": path, "tiny_var_channels": tiny, "fp16_overflow_channels": fp16, "max_abs_scale": float(np.max(np.abs(s)))}
    return None


def _first_conv_weight(net, path: str) -> np.ndarray:
    conv = get_block(net, path)
    weight = param_value(conv.weight)
    if weight.ndim != 4 or weight.shape[1] != 3:
        raise ModelError(f"first conv {path} reads {weight.shape[1]} channels; the input fold needs 3")
    return weight


def _input_affine(net, step: dict, a, b) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel affine (source channel order) that the first conv sees."""
    if step.get("bn") or step.get("absorb_bn"):
        s_d, t_d = bn_constants(get_block(net, step.get("bn") or step["absorb_bn"]))
        return s_d * a, s_d * b + t_d
    return a, b


def _to_target_order(values: np.ndarray, perm) -> np.ndarray:
    out = np.empty_like(values)
    out[list(perm)] = values
    return out


def _global_stats_bn(template, gamma, beta, mean, var, fix_gamma: bool):
    """A frozen (use_global_stats, untrained) BatchNorm with the given statistics."""
    import mxnet as mx
    from mxnet.gluon import nn

    kw = template._kwargs
    new = nn.BatchNorm(axis=1, momentum=kw["momentum"], epsilon=kw["eps"], center=True, scale=not fix_gamma,
                       use_global_stats=True, in_channels=len(gamma), prefix=template.prefix)
    new.initialize(mx.init.Zero(), ctx=template.running_var.list_ctx())
    for name, value in (("gamma", gamma), ("beta", beta), ("running_mean", mean), ("running_var", var)):
        param = getattr(new, name)
        param.set_data(mx.nd.array(value, dtype="float32"))
        param.grad_req = "null"
    return new


def _bn_for_affine(template, scale: np.ndarray, shift: np.ndarray, step: dict):
    """A global-stats BatchNorm computing ``x * scale + shift``, keeping fix_gamma when possible.

    With fix_gamma the scale must come from the variance alone (``1/sqrt(var+eps)``), which
    needs ``1/scale^2 >= eps``; otherwise gamma is switched on. The choice is recorded in
    ``step`` so that replaying the plan on other values builds the same structure.
    """
    eps = float(template._kwargs["eps"])
    beta = param_value(template.beta)
    safe = np.where(scale == 0, 1.0, scale)
    mean = np.where(scale == 0, 0.0, (beta - shift) / safe)
    beta = np.where(scale == 0, shift, beta)
    var_fixed = 1.0 / safe ** 2 - eps
    if "fix_gamma" not in step:
        step["fix_gamma"] = bool(template._kwargs["fix_gamma"] and np.all(var_fixed >= 0) and np.all(scale > 0))
    if step["fix_gamma"]:
        return _global_stats_bn(template, np.ones_like(scale), beta, mean, np.maximum(var_fixed, 0.0), True)
    var = np.abs(param_value(template.running_var))
    return _global_stats_bn(template, scale * np.sqrt(var + eps), beta, mean, var, False)


def apply_plan(net, plan: list[dict], source: InputSpec, target: InputSpec) -> list[dict]:
    """Execute ``plan`` on ``net`` in place; returns BN health notes. Marks input steps exact or not."""
    from mxnet.gluon import nn

    health = []
    perm, a, b = affine_map(source, target)
    inv = [perm.index(j) for j in range(3)]  # target channel j comes from source channel inv[j]
    for step in plan:
        op = step["op"]
        read_bn = step.get("bn") or step.get("absorb_bn")
        if read_bn:
            note = _health(read_bn, get_block(net, read_bn))
            if note:
                health.append(note)
        if op == "fuse":
            conv = get_block(net, step["conv"])
            s, t = bn_constants(get_block(net, step["bn"]))
            weight = param_value(conv.weight) * s.reshape(-1, 1, 1, 1)
            bias = (param_value(conv.bias) if conv.bias is not None else 0.0) * s + t
            set_conv(net, step["conv"], weight, bias)
            replace_block(net, step["bn"], Identity())
        elif op == "affine":
            bn = get_block(net, step["bn"])
            s, t = bn_constants(bn)
            replace_block(net, step["bn"], make_frozen_affine(len(s), bn.prefix, s, t, bn.running_var.list_ctx()))
        elif op == "global_stats":
            bn = get_block(net, step["bn"])
            fix = bool(bn._kwargs["fix_gamma"])
            gamma = np.ones(bn.running_var.shape) if fix else param_value(bn.gamma)
            new = _global_stats_bn(bn, gamma, param_value(bn.beta), param_value(bn.running_mean),
                                   param_value(bn.running_var), fix)
            replace_block(net, step["bn"], new)
        elif op in ("input_bn", "input_insert"):
            scale, shift = _input_affine(net, step, a, b)
            scale, shift = _to_target_order(scale, perm), _to_target_order(shift, perm)
            weight = _first_conv_weight(net, step["conv"])
            set_conv(net, step["conv"], weight[:, inv], None)
            if op == "input_bn":
                bn = get_block(net, step["bn"])
                new = (_bn_for_affine(bn, scale, shift, step) if step["form"] == "global-stats"
                       else make_frozen_affine(3, bn.prefix, scale, shift, bn.running_var.list_ctx()))
                replace_block(net, step["bn"], new)
            else:
                conv = get_block(net, step["conv"])
                seq = nn.HybridSequential(prefix=conv.prefix + "input_")
                seq.add(make_frozen_affine(3, conv.prefix + "input_affine_", scale, shift, conv.weight.list_ctx()))
                seq.add(conv)
                replace_block(net, step["conv"], seq)
            step["exact"] = True
        elif op == "input_conv":
            scale, shift = _input_affine(net, step, a, b)
            conv = get_block(net, step["conv"])
            weight = _first_conv_weight(net, step["conv"])
            bias = param_value(conv.bias) if conv.bias is not None else np.zeros(weight.shape[0])
            bias = bias + np.einsum("ochw,c->o", weight, shift)
            weight = (weight * scale.reshape(1, 3, 1, 1))[:, inv]
            set_conv(net, step["conv"], weight, bias)
            if step.get("absorb_bn"):
                replace_block(net, step["absorb_bn"], Identity())
            step["exact"] = bool(np.all(shift == 0))
            step["max_abs_shift"] = float(np.max(np.abs(shift)))
        else:
            raise ModelError(f"unknown plan step {op!r}")
    return health


def clone(net, trainable: bool = True):
    """An independent copy (parameters included) that can be rewritten freely.

    ``trainable=False`` gives a copy without gradient buffers (for reference runs: half
    the memory of a trainable copy). The copy is never hybridized, whatever ``net`` was.

    deepcopy would pickle every NDArray; seeding its memo with plain array copies makes
    cloning a ResNet-152 a memcpy instead of a serialization round trip.
    """
    memo: dict = {}
    for param in net.collect_params().values():
        for arrays in (param._data, param._grad):
            for arr in arrays or []:
                memo[id(arr)] = arr.copy()
    for block in block_paths(net).values():  # compiled graphs of a hybridized net hold C pointers: never copy them
        for attr in ("_cached_op", "_cached_graph"):
            if getattr(block, attr, None) is not None:
                memo[id(getattr(block, attr))] = None if attr == "_cached_op" else ()
    twin = copy.deepcopy(net, memo)
    twin.hybridize(False)  # rewrites and probes work on the eager tree; hybridize the result yourself
    for block in block_paths(twin).values():
        if hasattr(block, "_clear_cached_op"):
            block._clear_cached_op()
    for param in twin.collect_params().values():
        if not trainable:
            param.grad_req = "null"  # drops the copied gradient buffers
        elif param._data is not None and param.grad_req != "null":
            param._init_grad()  # copied arrays are not marked for autograd; without this backward() fails
    return twin


def adapt(net, source: str | InputSpec, target: str | InputSpec = "rgb255", fold: str = "auto",
          bn: str = "fused", inplace: bool = False) -> Adapted:
    """Fold ``source``->``target`` input normalization into ``net`` and freeze its BatchNorms.

    ``fold``: ``bn`` (exact: a data BatchNorm, existing or inserted), ``conv`` (into the
    first conv; exact only where the shift is zero, otherwise wrong near the zero-padded
    border) or ``auto`` (the exact one). ``bn``: ``global-stats``, ``affine`` or ``fused``
    (BNs that cannot fuse become affine; the plan says which and why). The original net is
    left untouched unless ``inplace``.
    """
    source, target = parse_spec(source), parse_spec(target)
    if any(isinstance(b, (FrozenAffine, Identity)) for b in block_paths(net).values()):
        raise ModelError("this network was already adapted by bbadapt; adapt the original network instead")
    work = net if inplace else clone(net)
    graph = trace(work)
    plan = make_plan(graph, source, target, fold, bn)
    health = apply_plan(work, plan, source, target)
    return Adapted(work, source, target, bn, plan, graph, health)
