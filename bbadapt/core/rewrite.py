"""Adapt a network: fold the input normalization in, freeze every BatchNorm.

Two phases keep this honest and reloadable:

* :func:`make_plan` turns the traced :class:`~bbadapt.core.trace.Graph` and the user's
  choices into typed steps (:mod:`bbadapt.core.plan`), each naming structural paths of the
  *original* net;
* :func:`apply_plan` executes them in order, one small handler per step type, computing
  new values in float64 (:mod:`bbadapt.core.foldmath`) from the values the net holds, and
  returns what each step found out (:class:`~bbadapt.core.plan.StepResult`).

The plan goes into the manifest; :func:`bbadapt.bundle.backbone.load_backbone` replays it
on a freshly built net to recreate the structure, then loads the saved parameters. BN
steps come before the input step: both act linearly on the first conv (output channels vs
input channels), so the order does not change the result, only which paths are still valid.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from bbadapt.core import foldmath
from bbadapt.core.blocks import bn_constants, get_block, make_frozen_affine, param_value, replace_block, set_conv
from bbadapt.core.plan import (
    Affine,
    FoldIntoBN,
    FoldIntoConv,
    Fuse,
    GlobalStats,
    InsertInputAffine,
    PlanStep,
    StepResult,
    fold_used,
    to_records,
)
from bbadapt.core.spec import InputSpec, affine_map, parse_spec
from bbadapt.core.trace import Graph, block_paths, trace
from bbadapt.platform.errors import ModelError, OptionError, WeightsError

FOLDS = ("auto", "bn", "conv")
BN_MODES = ("global-stats", "affine", "fused")
TINY_VAR = 1e-6  # running_var below this: the frozen scale is driven by eps alone
FP16_MAX = 65504.0


@dataclass
class Adapted:
    """An adapted network and how it came to be: the plan's steps and what applying each found out."""

    net: object
    source: InputSpec
    target: InputSpec
    bn: str
    steps: list[PlanStep]
    results: list[StepResult]
    graph: Graph | None  # None for a backbone reloaded from a bundle
    health: list[dict] = field(default_factory=list)  # BN channels worth a warning

    @property
    def plan(self) -> list[dict]:
        """The applied plan in its JSON form (what the manifest stores)."""
        return to_records(self.steps, self.results)

    @property
    def fold(self) -> str:
        """The fold actually used: "bn", "conv" or "none" (nothing to fold)."""
        return fold_used(self.steps)

    @property
    def exact(self) -> bool:
        return all(result.exact is not False for result in self.results)


def make_plan(graph: Graph, source: InputSpec, target: InputSpec, fold: str = "auto",
              bn: str = "fused") -> list[PlanStep]:
    """Steps that turn the traced net into its adapted form (no values touched)."""
    if fold not in FOLDS:
        raise OptionError(f"unknown fold {fold!r}; choose one of {', '.join(FOLDS)}")
    if bn not in BN_MODES:
        raise OptionError(f"unknown BN mode {bn!r}; choose one of {', '.join(BN_MODES)}")
    fused_with = {b: c for c, b in graph.pairs}
    steps: list[PlanStep] = []
    for path in graph.bn_order:
        if path == graph.data_bn:
            continue
        if bn == "fused" and path in fused_with:
            steps.append(Fuse(conv=fused_with[path], bn=path))
        elif bn == "global-stats":
            steps.append(GlobalStats(bn=path))
        else:
            steps.append(Affine(bn=path, why=graph.unfusable.get(path, "no fusable conv") if bn == "fused" else None))
    folding = "bn" if fold == "auto" else fold
    data_form = "global-stats" if bn == "global-stats" else "affine"
    if graph.data_bn and folding == "bn":
        steps.append(FoldIntoBN(bn=graph.data_bn, conv=graph.first_conv, form=data_form))
    elif graph.data_bn:
        steps.append(FoldIntoConv(conv=graph.first_conv, absorb_bn=graph.data_bn))
    elif not source.same_function(target):
        if folding == "bn":
            steps.append(InsertInputAffine(conv=graph.first_conv))
        else:
            steps.append(FoldIntoConv(conv=graph.first_conv, absorb_bn=None))
    return steps


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


@dataclass(frozen=True)
class InputMap:
    """The input normalization to fold: ``x_source[c] = a[c] * x_target[perm[c]] + b[c]``."""

    perm: tuple[int, int, int]
    a: np.ndarray
    b: np.ndarray

    @classmethod
    def between(cls, source: InputSpec, target: InputSpec) -> InputMap:
        return cls(*affine_map(source, target))

    def seen_by_conv(self, net, data_bn: str | None) -> tuple[np.ndarray, np.ndarray]:
        """The per-channel affine (source channel order) the first conv sees, through the data BN if any."""
        if data_bn:
            return foldmath.through_data_bn(self.a, self.b, *bn_constants(get_block(net, data_bn)))
        return self.a, self.b


# ---------------------------------------------------------------- one handler per step type


def _fuse(net, step: Fuse, _input: InputMap) -> StepResult:
    from bbadapt.core.blocks import Identity

    conv = get_block(net, step.conv)
    s, t = bn_constants(get_block(net, step.bn))
    weight, bias = foldmath.fuse_conv_bn(param_value(conv.weight),
                                         param_value(conv.bias) if conv.bias is not None else None, s, t)
    set_conv(net, step.conv, weight, bias)
    replace_block(net, step.bn, Identity())
    return StepResult()


def _affine(net, step: Affine, _input: InputMap) -> StepResult:
    bn = get_block(net, step.bn)
    s, t = bn_constants(bn)
    replace_block(net, step.bn, make_frozen_affine(len(s), bn.prefix, s, t, bn.running_var.list_ctx()))
    return StepResult()


def _global_stats(net, step: GlobalStats, _input: InputMap) -> StepResult:
    bn = get_block(net, step.bn)
    fix = bool(bn._kwargs["fix_gamma"])
    gamma = np.ones(bn.running_var.shape) if fix else param_value(bn.gamma)
    new = _global_stats_bn(bn, gamma, param_value(bn.beta), param_value(bn.running_mean),
                           param_value(bn.running_var), fix)
    replace_block(net, step.bn, new)
    return StepResult()


def _target_order_affine(net, conv_path: str, data_bn: str | None, input_map: InputMap) -> tuple[np.ndarray, np.ndarray]:
    """The input affine re-indexed by target channel; the first conv made to read target channel order."""
    scale, shift = input_map.seen_by_conv(net, data_bn)
    weight = _first_conv_weight(net, conv_path)
    set_conv(net, conv_path, foldmath.permute_conv_input(weight, input_map.perm), None)
    return foldmath.to_target_order(scale, input_map.perm), foldmath.to_target_order(shift, input_map.perm)


def _fold_into_bn(net, step: FoldIntoBN, input_map: InputMap) -> StepResult:
    """The data BN becomes the input affine: a FrozenAffine, or a global-stats BatchNorm (fix_gamma kept if it can be)."""
    scale, shift = _target_order_affine(net, step.conv, step.bn, input_map)
    bn = get_block(net, step.bn)
    if step.form == "affine":
        replace_block(net, step.bn, make_frozen_affine(3, bn.prefix, scale, shift, bn.running_var.list_ctx()))
        return StepResult(exact=True)
    eps = float(bn._kwargs["eps"])
    fix = step.fix_gamma
    if fix is None:  # the first application decides; the record pins it for replays on other values
        fix = bool(bn._kwargs["fix_gamma"]) and foldmath.can_fix_gamma(scale, eps)
    values = foldmath.global_stats_bn_for_affine(scale, shift, param_value(bn.beta), param_value(bn.running_var),
                                                 eps, fix)
    replace_block(net, step.bn, _global_stats_bn(bn, *values, fix))
    return StepResult(exact=True, fix_gamma=fix)


def _insert_input_affine(net, step: InsertInputAffine, input_map: InputMap) -> StepResult:
    from mxnet.gluon import nn

    scale, shift = _target_order_affine(net, step.conv, None, input_map)
    conv = get_block(net, step.conv)
    seq = nn.HybridSequential(prefix=conv.prefix + "input_")
    seq.add(make_frozen_affine(3, conv.prefix + "input_affine_", scale, shift, conv.weight.list_ctx()))
    seq.add(conv)
    replace_block(net, step.conv, seq)
    return StepResult(exact=True)


def _fold_into_conv(net, step: FoldIntoConv, input_map: InputMap) -> StepResult:
    from bbadapt.core.blocks import Identity

    scale, shift = input_map.seen_by_conv(net, step.absorb_bn)
    conv = get_block(net, step.conv)
    weight = _first_conv_weight(net, step.conv)
    bias = param_value(conv.bias) if conv.bias is not None else None
    set_conv(net, step.conv, *foldmath.fold_input_into_conv(weight, bias, scale, shift, input_map.perm))
    if step.absorb_bn:
        replace_block(net, step.absorb_bn, Identity())
    return StepResult(exact=bool(np.all(shift == 0)), max_abs_shift=float(np.max(np.abs(shift))))


HANDLERS: dict[type, Callable[..., StepResult]] = {
    Fuse: _fuse, Affine: _affine, GlobalStats: _global_stats,
    FoldIntoBN: _fold_into_bn, InsertInputAffine: _insert_input_affine, FoldIntoConv: _fold_into_conv,
}


def apply_plan(net, steps: list[PlanStep], source: InputSpec, target: InputSpec) -> list[StepResult]:
    """Execute ``steps`` on ``net`` in place; one result per step (the BN health notes included)."""
    input_map = InputMap.between(source, target)
    results = []
    for step in steps:
        handler = HANDLERS.get(type(step))
        if handler is None:
            raise ModelError(f"unknown plan step {step!r}")
        health = _health(step.reads_bn, get_block(net, step.reads_bn)) if step.reads_bn else None
        results.append(replace(handler(net, step, input_map), health=health))
    return results


def clone(net, trainable: bool = True, dtype: str | None = None):
    """An independent copy (parameters included) that can be rewritten freely.

    ``trainable=False`` gives a copy without gradient buffers (for reference runs: half
    the memory of a trainable copy). ``dtype``: the copy cast to it (``float64`` for the
    checks' truth and twins). The copy is never hybridized, whatever ``net`` was.

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
    if dtype is not None:
        twin.cast(dtype)
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
    from bbadapt.core.blocks import FrozenAffine, Identity

    source, target = parse_spec(source), parse_spec(target)
    if any(isinstance(b, (FrozenAffine, Identity)) for b in block_paths(net).values()):
        raise ModelError("this network was already adapted by bbadapt; adapt the original network instead")
    work = net if inplace else clone(net)
    graph = trace(work)
    steps = make_plan(graph, source, target, fold, bn)
    results = apply_plan(work, steps, source, target)
    return Adapted(work, source, target, bn, steps, results, graph, [r.health for r in results if r.health])
