"""The training check: does the adapted net *train* like the original with frozen BatchNorm?

The forward check (:mod:`bbadapt.verify.equivalence`) proves the adapted net computes the
same function. A detector bundle is also trained, so its gradients must be the ones the
original would get when trained the way GluonCV trains detector backbones: every BatchNorm
frozen (``use_global_stats=True``). This module proves that, for one image:

* the **reference** is the original net fed ``source``-normalized input, every BatchNorm
  switched to ``use_global_stats=True``, run inside ``autograd.record(train_mode=True)``,
  in float32 and in float64 (the truth). Switching the BNs is not a detail: MXNet's
  BatchNorm run in predict mode (``train_mode=False``) with ``use_global_stats=False``
  *back-propagates with the batch-statistics formula* (it differentiates through the
  mean and variance of the batch) while its forward pass uses the running statistics, so
  a reference built that way has gradients no frozen-BN training ever sees;
* the **adapted** net is fed ``target``-spec input in float32, also in train mode;
* the loss is ``sum(output * P)`` with a fixed random projection ``P`` (float32 values,
  the same in every run): a scalar whose gradient reaches every weight;
* the gradient of every trainable parameter of the adapted net (``grad_req != "null"``)
  is compared with the gradient of the original parameter it came from, under the same
  rule as a forward probe (:func:`bbadapt.verify.equivalence.compare`: max rel within
  tolerance, raised to 2x the original's own float32 error where that is larger, and an
  RMS error against float64 at most 2x the original's own).

What "the original parameter it came from" means is read off the applied plan:

* most weights are unchanged by the rewrite: same structural name, same value, and their
  gradients must be equal;
* the first conv after an exact input fold (``input_bn`` / ``input_insert``) reads the
  target's channel order: its weight is the original's with input channels permuted, so
  its gradient is compared after undoing that permutation (an inserted input affine also
  moves the conv one level down, ``P`` -> ``P.1``);
* after ``fold=conv`` (``input_conv``) the first conv holds ``W'[:, perm[c]] = W[:, c] *
  scale[c]``; the chain rule gives ``dL/dW[:, c] = scale[c] * dL/dW'[:, perm[c]]`` only
  where the folded shift is 0 (the exact case; otherwise the shift adds a term and the
  padding differs, and the whole check is information, not a verdict). An optimizer step
  on ``W'`` still moves the function by ``1/scale^2`` times the original's step: the
  report says so. Its bias holds the folded shift; where the original conv has no bias it
  is listed as excluded, with that reason;
* ``bn=fused`` re-parameterizes every fused conv, ``W' = W * s[o]``: its gradient is
  ``dL/dW / s[o]`` per output channel, and SGD on ``W'`` is not SGD on ``W`` (the
  effective learning rate of channel ``o`` is multiplied by ``1/s[o]^2``). Nothing to pass
  there: the report states the largest per-channel gradient-scale ratio instead (``1/|s|``
  from the original's BN, with the measured ratio beside it and the share of channels where
  the two agree within 1%).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bbadapt.core import foldmath
from bbadapt.core.blocks import bn_constants, get_block
from bbadapt.core.plan import FoldIntoBN, FoldIntoConv, Fuse, InsertInputAffine
from bbadapt.core.rewrite import Adapted, InputMap, clone
from bbadapt.core.trace import block_paths
from bbadapt.verify import images as imgs
from bbadapt.verify.check_report import Training
from bbadapt.verify.equivalence import INCONCLUSIVE_ABOVE, CheckOptions, compare

TRAINING_BN = ("affine", "global-stats")  # BN forms a bundle trains with; "fused" gets the ratio statement
GradMap = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class GradientOptions:
    """What the training check runs on and how strictly it judges.

    ``size``: the one image size (default 32x32 for CIFAR nets, 64x64 otherwise: gradients
    of every weight need no large image, and convert's runtime stays small); ``cifar``: a
    CIFAR tile instead of a photo; ``photos_dir``: photos to use instead of the packaged
    ones; ``tolerance``/``fp64_factor``: the forward check's rule; ``seed``: the projection.
    """

    size: tuple[int, int] | None = None
    cifar: bool = False
    photos_dir: str | None = None
    tolerance: float = 1e-5
    fp64_factor: float = 2.0
    seed: int = 0

    def image(self) -> tuple[np.ndarray, dict]:
        """The single raw RGB 0..255 image (batch 1) and what it is."""
        size = self.size or ((32, 32) if self.cifar else (64, 64))
        if self.cifar and self.photos_dir is None:
            tiles, _ = imgs.cifar_tiles(1)
            raw = tiles if size == (32, 32) else imgs.resize_batch(tiles, size)
            return raw, {"kind": "photo", "name": "cifar-tile-0", "size": list(size)}
        raw, names = imgs.photos(size, limit=1, directory=self.photos_dir)
        return raw, {"kind": "photo", "name": names[0], "size": list(size)}


@dataclass(frozen=True)
class Pairing:
    """One trainable weight of the adapted net and the original weight its gradient is compared with.

    ``to_original`` maps the adapted gradient into the original parameter's frame
    (identity for an unchanged weight); ``fused``: a BN was fused into it (ratio, no verdict).
    """

    adapted: str
    original: str
    mapping: str
    to_original: GradMap
    fused: bool = False


def _same(g: np.ndarray) -> np.ndarray:
    return g


def pairings(adapted: Adapted, original) -> tuple[list[Pairing], list[dict]]:
    """Which original parameter each trainable adapted parameter corresponds to, from the applied plan.

    Returns the pairs and the trainable parameters left out (each with its reason).
    """
    orig_names = set(original._collect_params_with_prefix())
    input_map = InputMap.between(adapted.source, adapted.target)
    perm = input_map.perm
    unpermute: GradMap = lambda g: foldmath.unpermute_conv_input(g, perm)  # noqa: E731
    special: dict[str, tuple[str, str, GradMap]] = {}  # adapted name -> (original name, mapping, map)
    excluded: dict[str, str] = {}
    fused = {step.conv: step.bn for step in adapted.steps if isinstance(step, Fuse)}
    for step in adapted.steps:
        if isinstance(step, FoldIntoBN):
            special[f"{step.conv}.weight"] = (f"{step.conv}.weight", "input channels permuted back", unpermute)
        elif isinstance(step, InsertInputAffine):
            special[f"{step.conv}.1.weight"] = (f"{step.conv}.weight", "input channels permuted back", unpermute)
            special[f"{step.conv}.1.bias"] = (f"{step.conv}.bias", "same", _same)
        elif isinstance(step, FoldIntoConv):
            scale, _shift = input_map.seen_by_conv(original, step.absorb_bn)
            chain: GradMap = lambda g, s=scale: unpermute(g) * s.reshape(1, -1, 1, 1)  # noqa: E731
            special[f"{step.conv}.weight"] = (f"{step.conv}.weight", "chain rule through the fold: "
                                              "dL/dW[:, c] = scale[c] * dL/dW'[:, perm[c]]", chain)
            if f"{step.conv}.bias" not in orig_names and step.conv not in fused:
                excluded[f"{step.conv}.bias"] = ("holds the input shift folded in by fold=conv; the original conv "
                                                 "has no bias to compare with")
    pairs, left_out = [], []
    for name, param in sorted(adapted.net._collect_params_with_prefix().items()):
        if param.grad_req == "null":
            continue
        orig, mapping, fn = special.get(name, (name, "same", _same))
        conv, _, leaf = orig.rpartition(".")  # the original's conv path (an inserted input affine moves the adapted one)
        if conv in fused and leaf == "bias" and orig not in orig_names:
            left_out.append({"name": name, "reason": f"the bias fused in from BatchNorm {fused[conv]} (its beta and "
                             "mean): no trainable counterpart in a frozen-BN original"})
        elif name in excluded:
            left_out.append({"name": name, "reason": excluded[name]})
        elif orig not in orig_names:
            left_out.append({"name": name, "reason": "no parameter of that name in the original"})
        else:
            pairs.append(Pairing(name, orig, mapping, fn, fused=conv in fused and leaf == "weight"))
    return pairs, left_out


def frozen_reference(original, wanted: set[str], dtype: str = "float32"):
    """A copy of ``original`` as frozen-BN training sees it: every BatchNorm ``use_global_stats=True``.

    Only the ``wanted`` parameters get gradient buffers (the rest are not compared).
    """
    from mxnet.gluon import nn

    net = clone(original, trainable=False, dtype=None if dtype == "float32" else dtype)
    for block in block_paths(net).values():
        if isinstance(block, nn.BatchNorm):
            block._kwargs["use_global_stats"] = True  # see the module docstring: the predict-mode pitfall
    for name, param in net._collect_params_with_prefix().items():
        if name in wanted:
            param.grad_req = "write"
    return net


def projection(out_shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The fixed random projection of the loss, float32 values held in float64."""
    return np.random.RandomState(seed).standard_normal(out_shape).astype(np.float32).astype(np.float64)


def gradients(net, x: np.ndarray, wanted: set[str], seed: int, dtype: str = "float32") -> dict[str, np.ndarray]:
    """dL/dp for the ``wanted`` parameters of ``net``, L = sum(output * projection), in autograd train mode."""
    import mxnet as mx
    from mxnet import autograd

    params = net._collect_params_with_prefix()
    with autograd.record(train_mode=True):
        out = net(mx.nd.array(x, dtype=dtype))
        out = out[0] if isinstance(out, (list, tuple)) else out
        loss = (out * mx.nd.array(projection(out.shape, seed), dtype=dtype)).sum()
    loss.backward()
    return {name: params[name].grad().asnumpy().astype(np.float64) for name in wanted}


def _scale_ratio(pairs: list[Pairing], adapted_g: dict, original_g: dict, adapted: Adapted, original) -> dict:
    """The largest per-output-channel gradient-scale ratio over the fused convs, and how the gradients bear it out.

    The ratio is the algebra's, ``1/|s|`` from the original BN fused into the conv
    (``max(1/|s|, |s|)``: the furthest from 1 either way); ``agree`` is the share of channels
    whose measured ``|dL/dW'[o]| / |dL/dW[o]|`` is within 1% of it. Measured ratios alone
    would not do: a channel whose gradient is tiny can be dominated by a float32 kink flip.
    """
    fused = {step.conv: step.bn for step in adapted.steps if isinstance(step, Fuse)}
    worst: dict = {}
    live_total = agreeing = 0
    for p in pairs:
        if not p.fused:
            continue
        conv = p.original.rpartition(".")[0]
        a = p.to_original(adapted_g[p.adapted])
        a = a.reshape(a.shape[0], -1)
        o = original_g[p.original].reshape(a.shape[0], -1)
        na, no = np.linalg.norm(a, axis=1), np.linalg.norm(o, axis=1)
        live = (na > 0) & (no > 0)  # a channel no gradient reaches (a dead ReLU) has no measured ratio
        measured = np.where(live, na / np.where(live, no, 1.0), np.nan)
        s, _ = bn_constants(get_block(original, fused[conv]))
        expected = 1.0 / np.abs(s)
        live_total += int(live.sum())
        agreeing += int(np.sum(live & (np.abs(measured / expected - 1.0) <= 1e-2)))
        spread = np.maximum(expected, 1.0 / expected)
        ch = int(np.argmax(spread))
        if not worst or spread[ch] > worst["ratio"]:
            worst.update({"ratio": float(spread[ch]), "expected": float(expected[ch]),
                          "measured": float(measured[ch]) if live[ch] else None,
                          "param": p.adapted, "bn": fused[conv], "channel": ch})
        worst["min_expected"] = min(worst.get("min_expected", np.inf), float(expected.min()))
        worst["max_expected"] = max(worst.get("max_expected", 0.0), float(expected.max()))
    if worst:
        worst["channels"], worst["agree"] = live_total, agreeing / live_total if live_total else None
    return worst


def training_check(original, adapted: Adapted, options: GradientOptions | None = None,
                   progress: Callable[[str], None] | None = None) -> Training:
    """The ``training`` section of a report: gradients of the adapted net against the frozen-BN original.

    ``original``: the original net (fed ``adapted.source``); ``adapted``: what :func:`adapt`
    returned (fed ``adapted.target``). Schema in ``docs/report-schema.md``. The section's
    evidence (records, reasons, notes): its result follows from it
    (:attr:`~bbadapt.verify.check_report.Training.passed`), the report's verdict from
    :func:`~bbadapt.verify.check_report.decide`.
    """
    say = progress or (lambda _msg: None)
    options = options or GradientOptions()
    raw, image = options.image()
    pairs, left_out = pairings(adapted, original)
    wanted_o = {p.original for p in pairs}
    wanted_a = {p.adapted for p in pairs}
    say(f"gradients of {len(pairs)} trainable weights: the frozen-BN original in float32 and float64, "
        f"the adapted net in float32 ({raw.shape[2]}x{raw.shape[3]}, batch 1)")
    o32 = gradients(frozen_reference(original, wanted_o), adapted.source.normalize(raw), wanted_o, options.seed)
    o64 = gradients(frozen_reference(original, wanted_o, "float64"), adapted.source.normalize(raw, "float64"),
                    wanted_o, options.seed, "float64")
    net = clone(adapted.net)  # gradients go to a copy: the adapted net is left as it was
    a32 = gradients(net, adapted.target.normalize(raw), wanted_a, options.seed)
    judging = CheckOptions(tolerance=options.tolerance, fp64_factor=options.fp64_factor)
    records = []
    for p in pairs:
        rec = {"name": p.adapted, "original": p.original, "shape": list(a32[p.adapted].shape), "mapping": p.mapping}
        if p.fused:
            rec.update({"mapping": "fused: W' = W * s per output channel", "passed": None})
        else:
            judged = compare([o32[p.original]], [o64[p.original]], [p.to_original(a32[p.adapted])], judging)
            rec.update({k: v for k, v in judged.items() if k != "within"}, passed=judged["within"])
        records.append(rec)
    chaotic = {r["name"] for r in records if r["passed"] is not None and r["tolerance"] > INCONCLUSIVE_ABOVE}
    if adapted.exact and (chaotic or any(r["passed"] is False for r in records)):
        _float64_twin(records, pairs, adapted, raw, o32, o64, options.seed, judging, chaotic, say)
    report = {"bn": adapted.bn, "exact": adapted.exact, "input": image, "loss": "sum(output * fixed random projection)",
              "reference": "original, source-spec input, every BatchNorm use_global_stats=True, autograd train mode",
              "tolerance": {"max_rel": options.tolerance, "fp64_factor": options.fp64_factor},
              "parameters": records, "excluded": left_out, "notes": [], "reasons": []}
    judged = [r for r in records if r["passed"] is not None]
    report["float32_worst_max_rel"] = max((r["max_rel"] for r in judged), default=None)
    report["worst_max_rel"] = max((_resting_on(r) for r in judged), default=None)
    if adapted.bn == "fused":  # stated, not judged (Training.passed): a fused conv trains with another step size
        report["gradient_scale"] = _scale_ratio(pairs, a32, o32, adapted, original)
        report["notes"].append(_fused_statement(report["gradient_scale"]))
    elif not adapted.exact:  # information (Training.passed): the padding difference reaches every gradient
        report["notes"].append("fold=conv is approximate here (a non-zero shift went into the first conv's bias): "
                               "the padding difference reaches every gradient, so these errors are information")
    else:
        for r in judged:
            if not r["passed"]:
                report["reasons"].append(_reason(r, options.fp64_factor))
        if not all(np.isfinite(r["max_abs"]) for r in judged):
            report["reasons"].append("non-finite gradients")
    kinks = [r["name"] for r in records if r.get("kink")]
    if kinks:
        report["notes"].append(
            f"{len(kinks)} weights ({', '.join(kinks[:3])}{', ...' if len(kinks) > 3 else ''}) have float32 gradients "
            f"further from the original's than rounding (float32 worst max rel {report['float32_worst_max_rel']:.2e}), "
            "the signature of a ReLU or max-pool input within float32 rounding of its kink that the adapted net's "
            "float32 run puts on the other side; the adapted net run in float64 meets the same rule against the "
            "float64 truth there (float64_twin), so they pass: same function, float32 rounding")
    chaos = _chaos_note(records, options.tolerance)
    report["conclusive"] = all(r.get("conclusive", True) for r in records)
    if chaos:
        report["notes"].append(chaos)
    report["notes"] += _fold_step_notes(adapted, original)
    return Training.from_dict(report)


def _float64_twin(records: list[dict], pairs: list[Pairing], adapted: Adapted, raw: np.ndarray, o32: dict, o64: dict,
                  seed: int, judging: CheckOptions, chaotic: set[str], say: Callable[[str], None]) -> None:
    """Re-judge float32 failures, and settle the original's own chaotic gradients, on the adapted net run in float64.

    A gradient is not a continuous function of the activations: where a ReLU's (or a max
    pool's) input lies within float32 rounding of its kink, the adapted net's float32 run
    can fall on the other side than the original's float32 run and the float64 truth, and
    every gradient upstream of that unit moves by far more than rounding (measured: 1e-2
    relative in layer2.3..layer3.4 of a calibrated random resnet50_v1b, both BN forms,
    with the forward pass equal to 3e-5). That is rounding, not a different function. The
    same rule, applied to the adapted net run in float64 (its float32 weights, cast), tells
    the two apart: a real slip (a wrong constant, a BN using batch statistics, a changed
    weight) is there in float64 too, a kink flip is not. A weight passes this way only if
    the float64 twin meets the forward rule; the record keeps both results.

    Where the *original's* float32 gradient is itself off its float64 truth by more than
    ``INCONCLUSIVE_ABOVE`` (its own kink flips), the raised tolerance proves little; the
    twin's distance to the truth (``vs_truth_max_rel``) within the asked tolerance settles it.
    """
    failed = {r["name"] for r in records if r["passed"] is False}
    say(f"re-running the adapted net in float64 for {len(failed | chaotic)} gradients float32 cannot settle")
    twin = clone(adapted.net, dtype="float64")
    a64 = gradients(twin, adapted.target.normalize(raw, "float64"), failed | chaotic, seed, "float64")
    by_name = {p.adapted: p for p in pairs}
    for r in records:
        if r["name"] not in failed | chaotic:
            continue
        p = by_name[r["name"]]
        mapped, truth = p.to_original(a64[p.adapted]), o64[p.original]
        judged = compare([o32[p.original]], [truth], [mapped], judging)
        r["float64_twin"] = {k: judged[k] for k in ("max_abs", "max_rel", "fp64", "tolerance")}
        r["float64_twin"]["vs_truth_max_rel"] = float(np.abs(mapped - truth).max() / (np.abs(truth).max() or 1.0))
        if r["name"] in failed and judged["within"]:
            r["passed"], r["kink"] = True, True
        if r["name"] in chaotic:
            r["conclusive"] = bool(r["float64_twin"]["vs_truth_max_rel"] <= judging.tolerance)


def _chaos_note(records: list[dict], tolerance: float) -> str | None:
    chaotic = [r for r in records if "conclusive" in r]
    if not chaotic:
        return None
    worst = max(r["float64_twin"]["vs_truth_max_rel"] for r in chaotic)
    names = ", ".join(r["name"] for r in chaotic[:3]) + (", ..." if len(chaotic) > 3 else "")
    head = (f"the original's own float32 gradient is off its float64 truth by more than {INCONCLUSIVE_ABOVE:g} "
            f"relative at {len(chaotic)} weights ({names}; kink flips in the original itself), so float32 cannot "
            "show equivalence finer than that there; ")
    if all(r["conclusive"] for r in chaotic):
        return head + (f"the adapted net run in float64 is within {worst:.1e} of the truth at all of them "
                       f"(<= {tolerance:g}): conclusive")
    return "INCONCLUSIVE: " + head + (f"the adapted net run in float64 is {worst:.1e} from the truth there, above "
                                      f"{tolerance:g}")


def _resting_on(r: dict) -> float:
    """The error a weight's verdict rests on: the float64 twin's where float32 could not settle it."""
    if r.get("kink"):
        return r["float64_twin"]["max_rel"]
    if r.get("conclusive"):
        return r["float64_twin"]["vs_truth_max_rel"]
    return r["max_rel"]


def _reason(r: dict, fp64_factor: float) -> str:
    if r["max_rel"] > r["tolerance"]:
        return f"dL/d{r['name']}: max rel {r['max_rel']:.2e} > tolerance {r['tolerance']:.1e}"
    return (f"dL/d{r['name']}: RMS error vs float64 {r['fp64']['adapted_rms']:.2e} is {r['fp64']['ratio']:.1f}x the "
            f"original fp32 net's own ({r['fp64']['original_rms']:.2e}), above {fp64_factor}x: more than rounding")


def _fused_statement(scale: dict) -> str:
    if not scale:
        return "bn=fused: no fused conv received a gradient"
    measured = "no gradient reached it" if scale["measured"] is None else f"measured {scale['measured']:.4g}"
    agree = "" if scale["agree"] is None else (f"; the measured ratio is within 1% of 1/|s| in {scale['agree']:.1%} "
                                               f"of {scale['channels']} channels")
    return (f"bn=fused re-parameterizes each fused conv as W' = W * s per output channel: its gradient is dL/dW / s, "
            f"so training the fused net is not training the original. Largest per-channel gradient-scale ratio "
            f"{scale['ratio']:.3g} ({scale['param']} channel {scale['channel']}: 1/|s| of {scale['bn']} = "
            f"{scale['expected']:.4g}, {measured}); 1/|s| spans {scale['min_expected']:.3g} .. "
            f"{scale['max_expected']:.3g}{agree}; an SGD step moves such a channel by the square of its ratio. Use "
            "--bn affine or global-stats to train.")


def _fold_step_notes(adapted: Adapted, original) -> list[str]:
    """fold=conv: the gradient maps back through the fold, an optimizer step does not."""
    step = next((s for s in adapted.steps if isinstance(s, FoldIntoConv)), None)
    if step is None:
        return []
    scale, _ = InputMap.between(adapted.source, adapted.target).seen_by_conv(original, step.absorb_bn)
    return [f"fold=conv scales the first conv's input channels by {', '.join(f'{v:.3g}' for v in scale)}: its "
            "gradient maps back by the chain rule (compared that way), but an optimizer step on the folded weight "
            "moves the function by 1/scale^2 times the original's step (up to "
            f"{float(np.max(1.0 / np.square(scale))):.3g}x); the other weights are unaffected"]
