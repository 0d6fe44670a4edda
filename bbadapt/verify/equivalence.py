"""The equivalence check: does the adapted net fed target-spec input compute what the
original pipeline (source-spec normalization, then the original net) computes?

Probes are the stem (input of the first stage), every stage output and the final output.
Five runs on the same raw images:

* the original in float32 and the adapted net in float32: what a user runs, compared
  element by element (max abs, max rel, cosine ...): the figures of the report;
* the original in float64: the truth;
* the adapted net in float64 (its *float64 twin*: the same float32 weights, cast);
* the original pipeline in float64 with every float32 number in it moved by one ulp
  (:mod:`bbadapt.verify.yardstick`): the *one-ulp yardstick*.

**The verdict** of an exact adaptation is decided in float64: a probe passes when the twin's
RMS error against the truth is at most the yardstick's (the larger of two directions). The twin
differs from the truth only by the half-ulp roundings of the folded weights, which the
yardstick bounds from above (each is matched by a perturbation twice its size in the same
place); a defect (a wrong eps, a lost beta, a swapped channel, a moved weight) stands above
it by its own size. Float32 cannot decide this: the two float32 runs are different
computations whose rounding moves with the CPU's kernels (oneDNN picks other ones on
AVX-512), and a fixed factor between two such noisy numbers was crossed by rounding alone.
Float64 arithmetic is nine orders of magnitude below the yardstick, so the verdict does not
depend on the CPU.

The float32 figures stay in the report. Float32 cannot show the two nets agree finer than
their own rounding: the *float32 floor* of a probe is the original's and the adapted net's
largest float32 errors against the truth added (``max_rel`` can never exceed it), and the
tolerance a probe reports is the asked one raised to that floor where it is larger.

For the approximate ``fold=conv`` the verdict uses the probe interiors the zero padding
cannot reach (the same float64 rule on those cells), and the report says how large the
border error is; it never calls that fold exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bbadapt.core.rewrite import Adapted, clone
from bbadapt.core.spec import InputSpec, parse_spec
from bbadapt.core.trace import Graph, trace
from bbadapt.verify import images as imgs
from bbadapt.verify.check_report import CheckReport, Probe
from bbadapt.verify.yardstick import SEED, nudge_in_place, restore_twin, written_by_adaptation

FP32_RESOLUTION = 2.0 ** -23
INCONCLUSIVE_ABOVE = 1e-3  # a raised tolerance above this proves nothing useful: say so
YARDSTICK_LIMIT = 1.0  # the float64 twin's error at most the one-ulp yardstick's (RMS and max)
# Two directions, the larger effect counts: where a few numbers dominate (the 3 scales and 3 shifts of an input
# fold), one random direction can cancel them against each other and understate what their rounding can do.
YARDSTICK_DRAWS = 2
FP64_FLOOR = 2.0 ** -40  # relative to the truth: the smallest yardstick (float64 rounding, 1e-16, stays far below)
DECIDED_BY = "float64 twin against the one-ulp yardstick"
YARDSTICK = ("the adapted net in float64 with every number the adaptation wrote (each parameter not bit-identical to "
             "the original's) moved by one float32 ulp")


@dataclass
class ProbeSet:
    """Where to look: structural paths that exist in both the original and adapted nets."""

    stem: str  # the first stage, probed at its input
    stages: list[str]
    rings: dict[str, int | None]  # border ring width (cells) per probe name
    jumps: dict[str, int]  # stride per probe name

    @classmethod
    def from_graph(cls, graph: Graph) -> ProbeSet:
        named = ([("stem", graph.stem)] if graph.stem else []) + [(f"stage{i + 1}", s) for i, s in enumerate(graph.stages)]
        return cls(graph.stages[0].path if graph.stages else "", [s.path for s in graph.stages],
                   {n: s.ring for n, s in named}, {n: s.jump for n, s in named})

    def interior_size(self) -> int:
        """Smallest square side at which every spatial probe keeps an interior of >= 2 cells."""
        sides = [self.jumps[n] * (2 * r + 2) for n, r in self.rings.items() if r is not None]
        return max(sides, default=32)

    def names(self) -> list[str]:
        return (["stem"] if self.stem else []) + [f"stage{i + 1}" for i in range(len(self.stages))] + ["output"]


def _eager(net):
    """``net`` itself, or an eager copy when hybridized (probe hooks fire only on eager blocks)."""
    return clone(net, trainable=False) if getattr(net, "_active", False) else net


def run_probes(net, x: np.ndarray, probes: ProbeSet, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Forward ``x`` through an un-hybridized net, capturing every probe as numpy."""
    import mxnet as mx

    from bbadapt.core.trace import block_paths

    blocks = block_paths(net)
    got: dict[str, np.ndarray] = {}
    handles = []
    if probes.stem:
        handles.append(blocks[probes.stem].register_forward_pre_hook(
            lambda _b, inputs: got.__setitem__("stem", inputs[0].asnumpy())))
    for i, path in enumerate(probes.stages):
        handles.append(blocks[path].register_forward_hook(
            lambda _b, _inp, out, key=f"stage{i + 1}": got.__setitem__(key, out.asnumpy())))
    try:
        out = net(mx.nd.array(x, dtype=dtype))
    finally:
        for h in handles:
            h.detach()
    got["output"] = (out[0] if isinstance(out, (list, tuple)) else out).asnumpy()
    return got


def _stats(err: np.ndarray, scale: float) -> dict | None:
    if err.size == 0:
        return None
    m = float(err.max())
    return {"max_abs": m, "max_rel": m / scale, "mean_abs": float(err.mean())}


def _ring_split(err: np.ndarray, ring: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Split an NCHW error map into border ring and interior values."""
    if err.ndim != 4 or ring is None:
        return err.ravel(), np.empty(0)
    h, w = err.shape[2:]
    mask = np.ones((h, w), bool)
    if 2 * ring < h and 2 * ring < w:
        mask[ring:h - ring, ring:w - ring] = False
    return err[:, :, mask].ravel(), err[:, :, ~mask].ravel()


def default_sizes(input_size: int) -> list[tuple[int, int]]:
    """Two sizes, one of them odd and non-square (odd sizes catch padding/stride slips)."""
    if input_size <= 32:
        return [(32, 32), (37, 29)]
    return [(224, 224), (129, 161)]


def probe_images(size: tuple[int, int], cifar: bool, photos_dir=None, n_photos: int = 2, n_noise: int = 1,
                 seed: int = 0, colours=imgs.FLAT_COLOURS) -> tuple[np.ndarray, list[dict]]:
    """Real photos (CIFAR tiles for CIFAR nets), noise and flat colours at ``size``."""
    if cifar and photos_dir is None:
        tiles, _ = imgs.cifar_tiles()
        real = imgs.resize_batch(tiles[::10][:n_photos], size) if size != (32, 32) else tiles[::10][:n_photos]
        names = [f"cifar-tile-{i * 10}" for i in range(len(real))]
    else:
        real, names = imgs.photos(size, limit=n_photos, directory=photos_dir)
    noise = imgs.noise(size, n_noise, seed)
    flat = imgs.flat(size, colours)
    meta = ([{"kind": "photo", "name": n} for n in names] + [{"kind": "random", "name": f"noise-{i}"} for i in range(n_noise)]
            + [{"kind": "flat", "name": "rgb(%d,%d,%d)" % c} for c in colours])
    for m in meta:
        m["size"] = list(size)
    return np.concatenate([real, noise, flat]), meta


@dataclass(frozen=True)
class CheckOptions:
    """What a check runs on and how strictly it judges (``bbadapt convert --images/--sizes/--tolerance``).

    ``images``: raw RGB 0..255 NCHW batches instead of the default probe set (photos, noise,
    flat colours at ``sizes``); ``photos_dir``: photos to use instead of the packaged ones;
    ``cifar``: CIFAR tiles and 32-pixel sizes; ``labelled``: (raw images, labels) to also
    report both pipelines' accuracy. ``tolerance``: the max rel the float32 runs are asked to
    agree within (raised, and said, where float32 cannot show that much; the verdict rests on
    the float64 twin and the one-ulp yardstick). ``fp64_factor``: the training check's factor
    (:mod:`bbadapt.verify.gradients`), and the float32 RMS ratio the report flags as worse rounding.
    """

    images: list[np.ndarray] | None = None
    sizes: list[tuple[int, int]] | None = None
    photos_dir: str | None = None
    cifar: bool = False
    n_photos: int = 2
    tolerance: float = 1e-5
    fp64_factor: float = 2.0
    labelled: tuple[np.ndarray, np.ndarray] | None = None


@dataclass
class Reference:
    """The original pipeline's side of a check: probe images and the fp32/fp64 outputs.

    Computing it is most of a check's cost (the float64 run above all); comparing several
    adaptations of one network (fold x BN modes) can share one.
    """

    original: object  # the network given (identifies the reference)
    net32: object  # the network actually run in float32 (an eager copy if the original is hybridized)
    source: InputSpec
    probes: ProbeSet
    batches: list[np.ndarray]
    inputs: list[dict]
    fp32: list[dict[str, np.ndarray]]
    fp64: list[dict[str, np.ndarray]]


def _probe_batches(options: CheckOptions, probes: ProbeSet, interiors: bool) -> tuple[list[np.ndarray], list[dict]]:
    """The raw images a check runs on, and what each one is."""
    if options.images is not None:
        batches = list(options.images)
        return batches, [{"kind": "given", "name": f"batch{i}", "size": list(b.shape[2:])} for i, b in enumerate(batches)]
    batches, inputs = [], []
    sizes = options.sizes or default_sizes(32 if options.cifar else 224)
    plan = [(size, options.n_photos, 1, imgs.FLAT_COLOURS) for size in sizes]
    if interiors:
        side = probes.interior_size()
        plan.append(((side, side), 1, 0, imgs.FLAT_COLOURS[:1]))
    for size, n_real, n_noise, colours in plan:
        raw, meta = probe_images(size, options.cifar, options.photos_dir, n_real, n_noise, colours=colours)
        batches.append(raw)
        inputs += meta
    return batches, inputs


def reference(original, source: str | InputSpec, options: CheckOptions | None = None, *, interiors: bool = False,
              progress: Callable[[str], None] | None = None) -> Reference:
    """Run the original pipeline (source normalization, original net, fp32 and fp64).

    ``interiors``: add one photo and one flat image at a size where every stage keeps an
    interior untouched by the zero padding (what an approximate fold is judged on).
    """
    say = progress or (lambda _msg: None)
    options = options or CheckOptions()
    source = parse_spec(source)
    say("tracing the original network")
    probes = ProbeSet.from_graph(trace(original))
    ref32 = _eager(original)
    ref64 = clone(original, trainable=False, dtype="float64")
    batches, inputs = _probe_batches(options, probes, interiors)
    fp32, fp64 = [], []
    for k, raw in enumerate(batches):
        say(f"running the original in float32 and float64 on {len(raw)} images of {raw.shape[2]}x{raw.shape[3]} "
            f"({k + 1}/{len(batches)})")
        fp32.append(run_probes(ref32, source.normalize(raw), probes))
        fp64.append(run_probes(ref64, source.normalize(raw, "float64"), probes, "float64"))
    return Reference(original, ref32, source, probes, batches, inputs, fp32, fp64)


@dataclass
class _Candidate:
    """The adapted side of a check: the net run in float32, the spec it is fed, and what it claims."""

    net: object
    target: InputSpec
    exact: bool
    fold: str | None
    bn: str | None

    @classmethod
    def of(cls, adapted, target: str | InputSpec | None) -> _Candidate:
        if isinstance(adapted, Adapted):
            return cls(_eager(adapted.net), adapted.target if target is None else parse_spec(target), adapted.exact,
                       adapted.fold, adapted.bn)
        return cls(_eager(adapted), parse_spec(target if target is not None else "rgb255"), True, None, None)

    def twin(self):
        """The float64 twin: the same (float32) weights, computed in float64."""
        return clone(self.net, trainable=False, dtype="float64")



def _shared_reference(ref: Reference, original, source: InputSpec, options: CheckOptions) -> Reference:
    if ref.original is not original or not ref.source.same_function(source):
        raise ValueError("the reference was computed for another network or source spec")
    if options.images is not None or options.sizes is not None:
        raise ValueError("images/sizes belong to the reference; pass them to reference(), not with ref=")
    return ref


def _run_candidate(ref: Reference, candidate: _Candidate, say: Callable[[str], None]) -> dict[str, dict[str, list]]:
    """Per probe: the original's float32 and float64 outputs, the adapted net's float32 ones, its float64 twin's,
    and the one-ulp yardstick's (one list per direction), batch by batch.

    One float64 copy of the adapted net is alive at a time: a ResNet-152 in float64 is half a GB.
    """
    names = ref.probes.names()
    collected: dict[str, dict[str, list]] = {name: {"o32": [], "o64": [], "a32": [], "a64": [], "y64": []}
                                             for name in names}
    n = len(ref.batches)
    for k, raw in enumerate(ref.batches):
        say(f"running the adapted net in float32 on {len(raw)} images of {raw.shape[2]}x{raw.shape[3]} ({k + 1}/{n})")
        a32 = run_probes(candidate.net, candidate.target.normalize(raw), ref.probes)
        for name, c in collected.items():
            c["o32"].append(ref.fp32[k][name])
            c["o64"].append(ref.fp64[k][name])
            c["a32"].append(a32[name])
            c["y64"].append([])
    # One float64 net serves the twin and both yardstick draws: each draw nudges the written parameters in place
    # and the next restores them from the float32 net (exact), instead of cloning and casting the net again.
    written = written_by_adaptation(candidate.net, ref.net32)
    net = candidate.twin()
    inputs = [candidate.target.normalize(raw, "float64") for raw in ref.batches]
    runs = [("its float64 twin", "a64", None)] + [
        (f"the one-ulp yardstick ({d + 1}/{YARDSTICK_DRAWS})", "y64", SEED + d) for d in range(YARDSTICK_DRAWS)]
    nudged = False
    for what, key, seed in runs:
        if seed is not None:
            if nudged:
                restore_twin(net, candidate.net, written)
            nudge_in_place(net, written, seed)
            nudged = True
        for k, raw in enumerate(ref.batches):
            say(f"running {what} in float64 on {len(raw)} images of {raw.shape[2]}x{raw.shape[3]} ({k + 1}/{n})")
            out = run_probes(net, inputs[k], ref.probes, "float64")
            for name, c in collected.items():
                (c[key] if key == "a64" else c[key][k]).append(out[name])
            del out
    del net
    return collected


def _probe_path(probes: ProbeSet, name: str) -> str:
    return probes.stem if name == "stem" else (probes.stages[int(name[5:]) - 1] if name.startswith("stage") else "")


def compare(o32: list[np.ndarray], o64: list[np.ndarray], a32: list[np.ndarray], options: CheckOptions) -> dict:
    """How far ``a32`` is from ``o32``, and how both compare with the float64 truth ``o64``.

    The judging rule every check shares (forward probes here, gradients in
    :mod:`bbadapt.verify.gradients`): ``max_rel`` (max abs error / max |o32|) within
    ``tolerance``, where the tolerance is raised to ``fp64_factor`` times the original's own
    float32 error against float64 (equivalence cannot be shown finer than that), and the
    adapted values' RMS error against float64 at most ``fp64_factor`` times the original's
    (floored at fp32 resolution). ``within`` says whether both hold.
    """
    ref_max = max(float(np.abs(v).max()) for v in o32) or 1.0
    flat_err = np.concatenate([np.abs(a.astype(np.float64) - o).ravel() for a, o in zip(a32, o32, strict=True)])
    e64_orig, rms_orig = _vs_float64(o32, o64)
    e64_adapt, rms_adapt = _vs_float64(a32, o64)
    rms_floor = FP32_RESOLUTION * _rms(o64)
    rec = {
        "ref_max_abs": ref_max,
        "max_abs": float(flat_err.max()),
        "max_rel": float(flat_err.max()) / ref_max,
        "mean_abs": float(flat_err.mean()),
        "fp64": {"original": e64_orig, "adapted": e64_adapt, "original_rms": rms_orig, "adapted_rms": rms_adapt,
                 "ratio": rms_adapt / max(rms_orig, rms_floor, np.finfo(np.float64).tiny)},
        "tolerance": max(options.tolerance, options.fp64_factor * e64_orig / ref_max),
    }
    rec["within"] = bool(rec["max_rel"] <= rec["tolerance"] and rec["fp64"]["ratio"] <= options.fp64_factor)
    return rec


def against_yardstick(truth: list[np.ndarray], twin: list[np.ndarray], yards: list[list[np.ndarray]],
                      ring: int | None = None) -> dict | None:
    """The decision: is the float64 twin no further from the float64 truth than one-ulp moves take it?

    ``truth`` and ``twin`` are the original's float64 run and the adapted net's float64 twin,
    batch by batch; ``yards`` holds, batch by batch, the one-ulp yardstick's runs (one per
    direction, :mod:`bbadapt.verify.yardstick`): its size is how far they move from the twin,
    the larger of the directions. ``ring``: judge only the interior cells (an approximate
    fold; None: every value). The twin is within when its RMS error against
    the truth is at most the yardstick's RMS (``YARDSTICK_LIMIT``); a yardstick below float64
    resolution is floored there. RMS, not the maximum: where a few numbers dominate (the
    last stage's fused biases seen through a classifier's 10 outputs), the largest of a
    few correlated values swings 4x from one direction to the next (measured 0.27..1.04x
    over 12 directions for an exact fused CIFAR net), while the RMS stays put; the largest
    errors and their ratio are reported beside it. None when there is nothing to judge.
    """
    def cells(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, np.float64)
        return a.ravel() if ring is None else _ring_split(a, ring)[1]

    kept = [(cells(t), cells(a), [cells(y) for y in ys]) for t, a, ys in zip(truth, twin, yards, strict=True)]
    kept = [k for k in kept if k[0].size]
    if not kept:
        return None
    t = [k[0] for k in kept]
    a = [k[1] for k in kept]
    scale = max(float(np.abs(v).max()) for v in t) or 1.0
    twin_max, twin_rms = _vs_float64(a, t)
    moved = [_vs_float64([k[2][d] for k in kept], a) for d in range(len(kept[0][2]))]
    yard_max, yard_rms = max(m for m, _ in moved), max(r for _, r in moved)
    rms_ratio = twin_rms / max(yard_rms, FP64_FLOOR * _rms(t), np.finfo(np.float64).tiny)
    max_ratio = twin_max / max(yard_max, FP64_FLOOR * scale, np.finfo(np.float64).tiny)
    ratio = rms_ratio
    return {"twin": {"max_abs": twin_max, "max_rel": twin_max / scale, "rms": twin_rms},
            "yardstick": {"max_abs": yard_max, "max_rel": yard_max / scale, "rms": yard_rms, "draws": len(moved)},
            "rms_ratio": rms_ratio, "max_ratio": max_ratio, "ratio": ratio,
            "within": bool(np.isfinite(ratio) and ratio <= YARDSTICK_LIMIT)}


def _probe_report(name: str, c: dict[str, list], probes: ProbeSet, exact: bool, options: CheckOptions) -> dict:
    """One probe's float32 figures (overall, border ring, interior, vs float64) and its float64 verdict."""
    judged = compare(c["o32"], c["o64"], c["a32"], options)
    ref_max = judged["ref_max_abs"]
    err_list = [np.abs(a.astype(np.float64) - o) for a, o in zip(c["a32"], c["o32"], strict=True)]
    flat_err = np.concatenate([e.ravel() for e in err_list])
    ring = probes.rings.get(name)
    border, interior = zip(*(_ring_split(e, ring) for e in err_list), strict=True)
    border_v, interior_v = np.concatenate(border), np.concatenate(interior)
    cos = min(_cosine(a, o) for a, o in zip(c["a32"], c["o32"], strict=True))
    spatial = c["o32"][0].ndim == 4
    # Float32 cannot show agreement finer than both runs' own rounding (max rel can never exceed this sum);
    # after an approximate fold, the adapted net's rounding where it is judged (the interior).
    own = judged["fp64"]["adapted"] if exact else max(
        (float(v.max()) for v in (_ring_split(np.abs(a.astype(np.float64) - t), ring)[1] for a, t in
                                  zip(c["a32"], c["o64"], strict=True)) if v.size), default=0.0)
    floor = (judged["fp64"]["original"] + own) / ref_max
    rec = {
        "name": name,
        "path": _probe_path(probes, name),
        "shape": [1, *c["o32"][0].shape[1:]],
        "ref_max_abs": ref_max,
        "max_abs": judged["max_abs"],
        "max_rel": judged["max_rel"],
        "mean_abs": judged["mean_abs"],
        "median_abs": float(np.median(flat_err)),
        "p99_abs": float(np.percentile(flat_err, 99)),
        "cosine": cos,
        "ring": ring if spatial else None,
        "border": _stats(border_v, ref_max) if spatial else None,
        "interior": _stats(interior_v, ref_max),
        "fp64": judged["fp64"],
        "float32_floor": floor,
        "tolerance": max(options.tolerance, floor),
    }
    finite = all(np.all(np.isfinite(a)) for a in c["a32"] + c["a64"])
    if exact:
        rec["float64_twin"] = against_yardstick(c["o64"], c["a64"], c["y64"])
        rec["passed"] = bool(finite and rec["float64_twin"]["within"])
    else:  # approximate fold: away from the padding it must still be the same function
        rec["float64_twin"] = against_yardstick(c["o64"], c["a64"], c["y64"], ring) if spatial and ring is not None else None
        rec["passed"] = None if rec["float64_twin"] is None else bool(finite and rec["float64_twin"]["within"])
    return rec


def _error_maps(collected: dict[str, dict[str, list]]) -> tuple[dict | None, dict | None]:
    """The stem's mean error per pixel (first batch) and a log10 histogram of the output's errors."""
    heatmap = None
    if "stem" in collected:
        c = collected["stem"]
        err = np.abs(c["a32"][0].astype(np.float64) - c["o32"][0])
        if err.ndim == 4:
            heatmap = {"probe": "stem", "values": err.mean(axis=(0, 1)).tolist()}
    c = collected["output"]
    flat_err = np.concatenate([np.abs(a.astype(np.float64) - o).ravel() for a, o in zip(c["a32"], c["o32"], strict=True)])
    nonzero = flat_err[flat_err > 0]  # exact zeros have no log: counted apart, not clamped into a spike
    counts, edges = np.histogram(np.log10(nonzero), bins=40) if nonzero.size else ([], [])
    return heatmap, {"probe": "output", "edges": np.asarray(edges, dtype=float).tolist(),
                     "counts": np.asarray(counts, dtype=int).tolist(), "zeros": int(flat_err.size - nonzero.size)}


def _tolerance_notes(notes: list[str], tolerance: dict, probe_reports: list[dict], exact: bool,
                     options: CheckOptions) -> bool:
    """Say where float32 cannot show the asked tolerance, where it rounds more, and when float32 weights cannot
    settle it (appended to ``notes``; ``tolerance["raised"]`` set). Returns whether the check is conclusive."""
    asked = options.tolerance
    raised = [p for p in probe_reports if p["tolerance"] > asked]
    judged = [p for p in probe_reports if p.get("float64_twin")]
    chaotic = [p["name"] for p in judged if p["float64_twin"]["yardstick"]["max_rel"] > INCONCLUSIVE_ABOVE]
    if chaotic:
        notes.append(
            f"INCONCLUSIVE at {', '.join(chaotic)}: moving the original's float32 numbers by one ulp moves it by more "
            f"than {INCONCLUSIVE_ABOVE:g} relative there (the one-ulp yardstick), so float32 weights cannot pin this "
            "function down finer; the check shows the adapted net is within that, not that it computes the same "
            "function to float32 precision")
    if raised:
        tolerance["raised"] = {p["name"]: p["tolerance"] for p in raised}
        notes.append(
            "equivalence cannot be shown finer than float32 rounding: at " + ", ".join(
                f"{p['name']} the original's own float32 error against float64 is max rel "
                f"{p['fp64']['original'] / p['ref_max_abs']:.1e} and the adapted net's "
                f"{p['float32_floor'] - p['fp64']['original'] / p['ref_max_abs']:.1e}" for p in raised)
            + f", together above the tolerance {asked:.0e}; the two float32 runs can differ by that sum, which is "
              "the tolerance there. The verdict rests on the float64 twin against the one-ulp yardstick")
    rounder = [p for p in judged if exact and p["passed"] and p["fp64"]["ratio"] > options.fp64_factor]
    if rounder:
        notes.append(
            "the adapted net rounds more in float32 than the original at " + ", ".join(
                f"{p['name']} (RMS error against float64 {p['fp64']['ratio']:.1f}x the original's)" for p in rounder)
            + ": its float32 operations come in another order (folded, fused), not a different function: its float64 "
              "twin is within " + ", ".join(f"{p['float64_twin']['ratio']:.2f}x" for p in rounder)
            + " of the one-ulp yardstick there")
    return not chaotic


def _approximate_note(probe_reports: list[dict]) -> str:
    stem = next((p for p in probe_reports if p["name"] == "stem"), None)
    border = stem["border"]["max_rel"] if stem and stem["border"] else float("nan")
    judged = [p["name"] for p in probe_reports if p["passed"] is not None]
    return (f"fold=conv is approximate: the input shift went into the first conv's bias, so zero padding means "
            f"black in the adapted net but the mean colour in the original; stem border max rel {border:.2e}, "
            f"final output max rel {probe_reports[-1]['max_rel']:.2e}. Judged on the interiors the padding "
            f"cannot reach ({', '.join(judged) or 'none'}); the rest is information.")


def _labelled_accuracy(ref: Reference, source: InputSpec, candidate: _Candidate,
                       labelled: tuple[np.ndarray, np.ndarray], say: Callable[[str], None]) -> dict:
    raw, labels = labelled
    say(f"classifying {len(raw)} labelled images with both pipelines")
    o = run_probes(ref.net32, source.normalize(raw), ProbeSet("", [], {}, {}))["output"]
    a = run_probes(candidate.net, candidate.target.normalize(raw), ProbeSet("", [], {}, {}))["output"]
    return {"n": int(len(labels)), "accuracy_original": float(np.mean(o.argmax(1) == labels)),
            "accuracy_adapted": float(np.mean(a.argmax(1) == labels)), "top1_agreement": float(np.mean(o.argmax(1) == a.argmax(1)))}


def check(original, source: str | InputSpec, adapted, target: str | InputSpec | None = None,
          options: CheckOptions | None = None, *, ref: Reference | None = None,
          progress: Callable[[str], None] | None = None) -> CheckReport:
    """Compare ``original`` (fed ``source``-normalized images) with ``adapted`` (fed ``target``).

    ``adapted`` is an :class:`~bbadapt.core.rewrite.Adapted` or a net (then ``target`` is needed).
    ``options``: images, sizes, tolerance ... (:class:`CheckOptions`).
    ``ref``: a :func:`reference` of the same original and source, to reuse.
    Returns the forward sections as a :class:`~bbadapt.verify.check_report.CheckReport` (its
    verdict is decided there; ``.to_dict()`` is the dict of ``docs/report-schema.md``, and it
    reads like that dict).
    """
    say = progress or (lambda _msg: None)
    options = options or CheckOptions()
    source = parse_spec(source)
    candidate = _Candidate.of(adapted, target)
    if ref is None:
        ref = reference(original, source, options, interiors=not candidate.exact, progress=say)
    else:
        ref = _shared_reference(ref, original, source, options)
    collected = _run_candidate(ref, candidate, say)
    probe_reports = [_probe_report(name, collected[name], ref.probes, candidate.exact, options)
                     for name in ref.probes.names()]
    heatmap, histogram = _error_maps(collected)
    tolerance = {"max_rel": options.tolerance, "fp64_factor": options.fp64_factor, "yardstick": YARDSTICK,
                 "yardstick_limit": YARDSTICK_LIMIT}
    notes: list[str] = []
    conclusive = _tolerance_notes(notes, tolerance, probe_reports, candidate.exact, options)
    if not candidate.exact:
        notes.append(_approximate_note(probe_reports))
    classification = _agreement(collected["output"])
    if options.labelled is not None:
        classification["labelled"] = _labelled_accuracy(ref, source, candidate, options.labelled, say)
    ratios = [p["float64_twin"]["ratio"] for p in probe_reports if p.get("float64_twin")]
    return CheckReport(
        exact=candidate.exact, probes=tuple(Probe.from_dict(p) for p in probe_reports),
        forward_reasons=tuple(_forward_reasons(probe_reports, candidate.exact)), tolerance=tolerance,
        notes=tuple(notes), worst_max_rel=max(p["max_rel"] for p in probe_reports),
        worst_yardstick_ratio=max(ratios) if ratios else None, decided_by=DECIDED_BY, conclusive=conclusive,
        source=source.to_string(), target=candidate.target.to_string(), fold=candidate.fold, bn=candidate.bn,
        inputs=tuple(ref.inputs), classification=classification, heatmap=heatmap, histogram=histogram)


def _rms(arrays: list[np.ndarray]) -> float:
    return float(np.sqrt(np.mean(np.concatenate([np.square(a.astype(np.float64)).ravel() for a in arrays]))))


def _vs_float64(fp32: list[np.ndarray], fp64: list[np.ndarray]) -> tuple[float, float]:
    """Max abs and RMS error of float32 results against the float64 reference."""
    diffs = [a.astype(np.float64) - r for a, r in zip(fp32, fp64, strict=True)]
    return max(float(np.abs(d).max()) for d in diffs), _rms(diffs)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest per-image cosine similarity."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(den > 0, num / np.where(den > 0, den, 1), np.where(np.abs(a - b).max(1) == 0, 1.0, 0.0))
    return float(cos.min())


def _agreement(out: dict[str, list]) -> dict | None:
    """Top-1/top-5 agreement when the final output is class scores."""
    o = np.concatenate([v.reshape(len(v), -1) for v in out["o32"]])
    a = np.concatenate([v.reshape(len(v), -1) for v in out["a32"]])
    if out["o32"][0].ndim != 2 or o.shape[1] < 2:
        return None
    k = min(5, o.shape[1])
    top5 = [set(np.argsort(-x)[:k]) == set(np.argsort(-y)[:k]) for x, y in zip(o, a, strict=True)]
    return {"n": int(len(o)), "top1_agreement": float(np.mean(o.argmax(1) == a.argmax(1))), "top5_agreement": float(np.mean(top5))}


def _forward_reasons(probes: list[dict], exact: bool) -> list[str]:
    """Why the forward check fails, probe by probe (the float32 figures inform, they do not decide).

    Evidence for :func:`~bbadapt.verify.check_report.decide`, which turns it into the verdict."""
    reasons = []
    for p in probes:
        if p["passed"] is False and p.get("float64_twin"):
            twin = p["float64_twin"]
            where = "" if exact else " interior"
            reasons.append(f"{p['name']}:{where} differs from the original in float64: the adapted net's float64 twin's "
                           f"RMS error is {twin['rms_ratio']:.1f}x the one-ulp yardstick's (max rel "
                           f"{twin['twin']['max_rel']:.2e}, {twin['max_ratio']:.1f}x its largest): more than float32 "
                           "representation")
    if not exact and not any(p["passed"] is not None for p in probes):
        reasons.append("approximate fold and no probe interior to judge (input too small)")
    if not all(math.isfinite(p["max_abs"]) for p in probes):
        reasons.append("non-finite values in the outputs")
    return reasons
