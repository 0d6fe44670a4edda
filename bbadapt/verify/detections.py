"""Do two detectors agree? One rule for every engine and file format (numpy only: no mxnet, no torch).

A detector's output is ``(class ids, scores, boxes)`` for a batch, image 0 compared; class id -1 marks padding
(GluonCV). Partners are matched, not compared by rank, because near-tied scores may come out in either order.
"""

from __future__ import annotations

import numpy as np

SCORE_TOL = 1e-4  # softmax outputs in [0, 1]; float32 reassociation (fused BN) moves them ~1e-6
BOX_TOL = 1e-2  # pixels; box coordinates are O(100) px, float32 relative error ~1e-6 gives ~1e-4 px
BOX_REL_TOL = 1e-5  # export checks: boxes within box_tol + 1e-5 of the coordinate (random heads throw boxes to 1e7 px)
FP64_FACTOR = 2.0  # the forward check's factor (bbadapt.verify.equivalence.CheckOptions.fp64_factor)


def detections(output) -> np.ndarray:
    """Valid detections of image 0 as rows ``(class id, score, x1, y1, x2, y2)``, sorted."""
    ids, scores, boxes = (np.asarray(o.asnumpy() if hasattr(o, "asnumpy") else o, dtype=np.float64)[0]
                          for o in output[:3])
    rows = np.concatenate([ids.reshape(-1, 1), scores.reshape(-1, 1), boxes.reshape(-1, 4)], axis=1)
    rows = rows[rows[:, 0] >= 0]
    return rows[np.lexsort((-rows[:, 1], rows[:, 0]))]


def compare_detections(a, b, score_tol: float = SCORE_TOL, box_tol: float = BOX_TOL, box_rel_tol: float = 0.0) -> dict:
    """Do two detectors' outputs agree? Each detection of ``a`` must have a partner in ``b``.

    Two empty outputs agree; callers that need evidence check ``count_a``.

    Partners share the class, their scores differ by at most ``score_tol`` and their boxes
    by at most ``box_tol`` px (+ ``box_rel_tol`` times the coordinate: float32 boxes far
    outside the image, as random heads give, differ by ulps of 1e7) per coordinate. Near-tied
    scores may come out in either order, so partners are matched (greedily, best box first)
    rather than compared by rank.
    """
    da, db = detections(a), detections(b)
    used = np.zeros(len(db), dtype=bool)
    score_diff, box_diff, unmatched = 0.0, 0.0, 0
    for row in da:
        cand = np.where(~used & (db[:, 0] == row[0]) & (np.abs(db[:, 1] - row[1]) <= score_tol))[0]
        if len(cand) == 0:
            unmatched += 1
            continue
        dist = np.max(np.abs(db[cand, 2:] - row[2:]) - box_rel_tol * np.abs(row[2:]), axis=1)
        best = cand[int(np.argmin(dist))]
        if dist.min() > box_tol:
            unmatched += 1
            continue
        used[best] = True
        score_diff = max(score_diff, abs(db[best, 1] - row[1]))
        box_diff = max(box_diff, float(np.max(np.abs(db[best, 2:] - row[2:]))))
    return {"count_a": len(da), "count_b": len(db), "unmatched": unmatched, "max_abs_score_diff": score_diff,
            "max_abs_box_diff_px": box_diff, "score_tol": score_tol, "box_tol_px": box_tol, "box_rel_tol": box_rel_tol,
            "passed": unmatched == 0 and len(da) == len(db)}


def float64_opinion(candidate, reference32, reference64, box_rel_tol: float = 0.0) -> dict:
    """Missing partners between ``candidate`` and ``reference32``: the reference run in float64 judges.

    Two float32 implementations of one detector round differently, and a random or barely trained head
    has near-tied scores, so a few detections can swap places across an NMS or top-k boundary. The
    truth is then the reference in float64; the matching tolerances are raised to ``FP64_FACTOR``
    times how far the reference's own float32 detections move from it (partners found at 1e-2 score /
    1 px), and every candidate detection must find a partner in the float64 ones. A candidate that
    computes something else still fails: it is as far from the float64 run as from the float32 one.
    """
    own = compare_detections(reference32, reference64, score_tol=1e-2, box_tol=1.0, box_rel_tol=box_rel_tol)
    score_tol = max(SCORE_TOL, FP64_FACTOR * own["max_abs_score_diff"])
    box_tol = max(BOX_TOL, FP64_FACTOR * own["max_abs_box_diff_px"])
    judged = compare_detections(candidate, reference64, score_tol=score_tol, box_tol=box_tol, box_rel_tol=box_rel_tol)
    return {"reference_fp32_vs_fp64": {k: own[k] for k in ("unmatched", "max_abs_score_diff", "max_abs_box_diff_px")},
            "candidate_vs_reference_fp64": judged, "passed": judged["passed"]}
