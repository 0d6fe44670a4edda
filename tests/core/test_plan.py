"""The plan protocol: typed steps whose JSON is the manifests' "plan" list, unchanged since 0.1.0."""

import json
from pathlib import Path

import pytest

import bbadapt
from bbadapt.core.plan import (
    Affine,
    FoldIntoBN,
    FoldIntoConv,
    Fuse,
    GlobalStats,
    InsertInputAffine,
    PlanStepError,
    StepResult,
    fold_used,
    from_records,
    input_step,
    step_from_dict,
    to_records,
)
from bbadapt.core.rewrite import apply_plan, clone
from bbadapt.core.trace import block_paths
from tests.conftest import calibrated

OLD_MANIFEST = Path(__file__).resolve().parents[1] / "data" / "bundles" / "cifar_resnet20_v1-affine-0.1.0" / "manifest.json"

RECORDS_AS_0_1_0_WROTE_THEM = [  # one of each op, keys in the order 0.1.0 wrote them
    {"op": "fuse", "conv": "features.1", "bn": "features.2"},
    {"op": "affine", "bn": "features.5.0.bn1", "why": "pre-activation: reads the output of Pooling, not of a conv"},
    {"op": "affine", "bn": "bn1"},
    {"op": "global_stats", "bn": "layer1.0.bn1"},
    {"op": "input_bn", "bn": "features.0", "conv": "features.1", "form": "affine", "exact": True},
    {"op": "input_bn", "bn": "features.0", "conv": "features.1", "form": "global-stats", "fix_gamma": False, "exact": True},
    {"op": "input_insert", "conv": "conv1", "exact": True},
    {"op": "input_conv", "conv": "conv1", "absorb_bn": None, "exact": False, "max_abs_shift": 2.1179039301310043},
    {"op": "input_conv", "conv": "features.1", "absorb_bn": "features.0", "exact": True, "max_abs_shift": 0.0},
]


@pytest.mark.parametrize("record", RECORDS_AS_0_1_0_WROTE_THEM, ids=lambda r: r["op"])
def test_every_record_reads_as_a_typed_step_and_writes_back_to_the_same_json(record):
    steps, results = from_records([record])
    assert json.dumps(to_records(steps, results)) == json.dumps([record])


def test_a_0_1_0_manifest_plan_round_trips_byte_for_byte():
    plan = json.loads(OLD_MANIFEST.read_text())["plan"]
    steps, results = from_records(plan)
    assert json.dumps(to_records(steps, results)) == json.dumps(plan)
    assert all(isinstance(s, (Fuse, Affine)) for s in steps[:-1]) and isinstance(steps[-1], InsertInputAffine)


def test_steps_are_typed_values():
    assert step_from_dict({"op": "fuse", "conv": "c", "bn": "b"}) == Fuse(conv="c", bn="b")
    assert step_from_dict({"op": "input_conv", "conv": "c", "absorb_bn": None}).reads_bn is None
    assert FoldIntoConv(conv="c", absorb_bn="d").reads_bn == "d" and Fuse(conv="c", bn="b").reads_bn == "b"
    assert InsertInputAffine(conv="c").reads_bn is None


@pytest.mark.parametrize("steps, fold", [
    ([Fuse("c", "b")], "none"),
    ([Fuse("c", "b"), InsertInputAffine("c")], "bn"),
    ([GlobalStats("b"), FoldIntoBN("d", "c", "global-stats")], "bn"),
    ([Affine("b"), FoldIntoConv("c", None)], "conv"),
])
def test_the_fold_used_is_read_off_the_input_step(steps, fold):
    assert fold_used(steps) == fold
    assert input_step(steps) == (None if fold == "none" else steps[-1])


@pytest.mark.parametrize("record, says", [
    ({"op": "fold_everything", "bn": "x"}, "unknown plan step 'fold_everything'"),
    ({"bn": "x"}, "unknown plan step None"),
    ("fuse", "not an object"),
    ({"op": "fuse", "conv": "c"}, "lacks 'bn'"),
    ({"op": "fuse", "conv": "c", "bn": 3}, "non-str 'bn'"),
    ({"op": "affine", "bn": "b", "scale": 2}, "unknown keys scale"),
    ({"op": "input_bn", "bn": "b", "conv": "c", "form": "magic"}, "unknown form 'magic'"),
    ({"op": "input_bn", "bn": "b", "conv": "c", "form": "global-stats", "fix_gamma": "yes"}, "non-bool 'fix_gamma'"),
    ({"op": "input_insert", "conv": "c", "exact": "yes"}, "non-boolean 'exact'"),
    ({"op": "input_conv", "conv": "c", "absorb_bn": None, "max_abs_shift": "big"}, "non-numeric 'max_abs_shift'"),
])
def test_a_step_bbadapt_does_not_write_is_refused_with_its_number(record, says):
    with pytest.raises(PlanStepError, match=f"^step 2: .*{says}"):
        from_records([{"op": "affine", "bn": "b"}, record])


def test_a_result_records_only_what_the_step_found_out():
    assert StepResult().to_dict() == {}
    assert StepResult(exact=True, health={"bn": "x"}).to_dict() == {"exact": True}  # health is stored apart


def test_replaying_a_recorded_plan_builds_the_same_structure_with_the_recorded_fix_gamma():
    """A global-stats data-BN fold decides fix_gamma from values; the record pins it for replays on other values."""
    adapted = bbadapt.adapt(calibrated("resnet18_v2"), "imagenet", "rgb255", bn="global-stats")
    record = next(r for r in adapted.plan if r["op"] == "input_bn")
    assert record["fix_gamma"] is True and list(record) == ["op", "bn", "conv", "form", "fix_gamma", "exact"]
    steps, results = from_records(adapted.plan)
    assert steps == adapted.steps[:-1] + [FoldIntoBN("features.0", "features.1", "global-stats", fix_gamma=True)]
    fresh = clone(calibrated("resnet18_v2", seed=1))
    replayed = apply_plan(fresh, steps, adapted.source, adapted.target)
    assert [type(b).__name__ for b in block_paths(fresh).values()] == [type(b).__name__ for b in block_paths(adapted.net).values()]
    assert [r.exact for r in replayed] == [r.exact for r in results]
    assert block_paths(fresh)["features.0"]._kwargs["fix_gamma"] is True
