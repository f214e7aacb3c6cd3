"""Scoring rules: VSI-Bench's official MRA / exact match and aggregation, and the perception aggregations."""

from __future__ import annotations

import numpy as np
import pytest

from valr.eval.benchmarks import EvalItem
from valr.eval.predictions import Prediction
from valr.eval.scoring import (
    MRA_THRESHOLDS,
    VSI_TASKS,
    answer_token,
    choice_letter,
    exact_match,
    mc_accuracy,
    mean_relative_accuracy,
    mra_score,
    score,
)


def _official_mra(pred: float, target: float) -> float:
    """The official thinking-in-space formula, written out with numpy as that code does."""
    num_pts = (0.95 - 0.5) / 0.05 + 2
    conf = np.linspace(0.5, 0.95, int(num_pts))
    return float((abs(pred - target) / target <= 1 - conf).mean())


def test_thresholds_are_the_official_linspace_values() -> None:
    assert MRA_THRESHOLDS == tuple(float(x) for x in np.linspace(0.5, 0.95, 10))
    assert MRA_THRESHOLDS[8] == 0.8999999999999999  # not 0.9: this changes e == 0.1 cases


@pytest.mark.parametrize(("pred", "expected"), [
    (100, 1.0),      # e = 0
    (105, 1.0),      # e = 0.05 <= 1 - 0.95 = 0.050000000000000044
    (95, 1.0),
    (105.01, 0.9),   # just past the 0.95 threshold
    (110, 0.9),      # e = 0.1 <= 0.10000000000000009 (theta 0.8999999999999999)
    (110.01, 0.8),
    (115, 0.8),      # e = 0.15 <= 0.15000000000000002
    (115.01, 0.7),
    (120, 0.6),      # e = 0.2 > 1 - 0.8 = 0.19999999999999996: fails theta 0.8 too
    (125, 0.6),      # e = 0.25 <= 0.25
    (130, 0.5),      # e = 0.3 <= 0.30000000000000004
    (135, 0.4),      # e = 0.35 <= 0.35
    (140, 0.3),      # e = 0.4 <= 0.4
    (145, 0.1),      # e = 0.45 > 1 - 0.55 = 0.44999999999999996
    (150, 0.1),      # e = 0.5 <= 0.5
    (150.01, 0.0),
    (50, 0.1),
    (49.99, 0.0),
    (0, 0.0),
    (-5, 0.0),
    (200, 0.0),
])
def test_mra_every_threshold_boundary_gt_100(pred: float, expected: float) -> None:
    assert mean_relative_accuracy(float(pred), 100.0) == expected
    assert _official_mra(float(pred), 100.0) == expected


def test_mra_e_exactly_one_tenth_matches_official_not_literal_thresholds() -> None:
    # 1/10 = 0.1 passes theta 0.8999999999999999; with a literal 0.9 it would fail and give 0.8.
    assert mean_relative_accuracy(11.0, 10.0) == 0.9
    assert mra_score("11", "10") == 0.9


def test_mra_matches_official_on_a_grid() -> None:
    rng = np.random.default_rng(0)
    for gt in (1.0, 2.5, 3.0, 7.0, 10.0, 0.3):
        preds = list(gt * (1 + np.arange(-60, 61) / 100)) + list(rng.uniform(0, 2 * gt, 200))
        for p in preds:
            assert mean_relative_accuracy(float(p), gt) == _official_mra(float(p), gt), (p, gt)


def test_mra_unparsable_nan_inf_score_zero() -> None:
    assert mra_score("three", "3") == 0.0
    assert mra_score("", "3") == 0.0
    assert mra_score("nan", "3") == 0.0
    assert mra_score("inf", "3") == 0.0
    assert mra_score("-inf", "3") == 0.0
    assert mean_relative_accuracy(None, 3.0) == 0.0


@pytest.mark.parametrize("gt", [0.0, -1.0, float("nan"), float("inf")])
def test_mra_rejects_non_positive_or_non_finite_ground_truth(gt: float) -> None:
    with pytest.raises(ValueError, match="finite ground truth > 0"):
        mean_relative_accuracy(1.0, gt)


def test_mra_rejects_non_numeric_ground_truth() -> None:
    with pytest.raises(ValueError, match="not a number"):
        mra_score("1", "n/a")


def test_answer_token_official_and_whitespace() -> None:
    assert answer_token("B. because") == "B"
    assert answer_token("B..") == "B"
    assert answer_token("3.5 meters") == "3.5"
    assert answer_token("") == ""
    assert answer_token(" B") == ""           # official splits on ' ' only
    assert answer_token("B\nreason") == "B\nreason"
    assert answer_token(" B", "whitespace") == "B"
    assert answer_token("B.\nreason", "whitespace") == "B"
    assert answer_token("   ", "whitespace") == ""
    with pytest.raises(ValueError):
        answer_token("B", "bogus")  # type: ignore[arg-type]


def test_exact_match_case_insensitive() -> None:
    assert exact_match("b", "B") == 1.0
    assert exact_match("B.", "B") == 1.0
    assert exact_match("(B)", "B") == 0.0   # official rule: no bracket stripping
    assert exact_match("C", "B") == 0.0
    assert exact_match("", "B") == 0.0


def test_lenient_choice_letter() -> None:
    assert choice_letter("(B)") == "B"
    assert choice_letter("**b**") == "B"
    assert choice_letter("  B. the chair") == "B"
    assert choice_letter("") == ""
    assert mc_accuracy("(a)", "(A)") == 1.0
    assert mc_accuracy("Bananas", "B") == 0.0
    assert mc_accuracy("", "A") == 0.0


def _item(i: str, task: str, answer: str, kind: str, benchmark: str = "vsibench", **meta: object) -> EvalItem:
    return EvalItem(id=i, benchmark=benchmark, task=task, question="q", images=[], answer=answer, kind=kind,
                    options=["A. x", "B. y", "C. z", "D. w"] if kind == "mc" else [], meta=dict(meta))


VSI_ITEMS = [
    _item("c1", "object_counting", "10", "numeric"),
    _item("c2", "object_counting", "10", "numeric"),
    _item("d1", "object_abs_distance", "2.0", "numeric"),
    _item("s1", "object_size_estimation", "50", "numeric"),
    _item("r1", "room_size_estimation", "100", "numeric"),
    _item("e1", "object_rel_direction_easy", "A", "mc"),
    _item("e2", "object_rel_direction_easy", "B", "mc"),
    _item("m1", "object_rel_direction_medium", "C", "mc"),
    _item("h1", "object_rel_direction_hard", "D", "mc"),
    _item("rd", "object_rel_distance", "B", "mc"),
    _item("rp", "route_planning", "A", "mc"),
    _item("ao", "obj_appearance_order", "C", "mc"),
]
VSI_PREDS = {
    "c1": "10", "c2": "11",              # counting: (1.0 + 0.9) / 2 = 0.95
    "d1": "3",                            # e = 0.5 -> 0.1
    # s1 missing -> 0
    "r1": "abc",                          # unparsable -> 0
    "e1": "A", "e2": "C",                 # easy 0.5
    "m1": "C",                            # medium 1.0
    "h1": "A",                            # hard 0.0 -> direction (0.5 + 1 + 0) / 3 = 0.5
    "rd": "B. it is closer",              # 1.0
    "rp": " A",                           # official token "" -> 0.0 (whitespace rule: 1.0)
    "ao": "c",                            # 1.0
    "zz": "A",                            # unknown id
}


def test_vsibench_aggregation_hand_computed() -> None:
    result = score("vsibench", VSI_ITEMS, VSI_PREDS)
    assert result["tasks"] == pytest.approx({
        "object_counting": 0.95, "object_abs_distance": 0.1, "object_size_estimation": 0.0,
        "room_size_estimation": 0.0, "object_rel_distance": 1.0, "object_rel_direction": 0.5,
        "route_planning": 0.0, "obj_appearance_order": 1.0,
    })
    assert list(result["tasks"]) == list(VSI_TASKS)
    assert result["overall"] == pytest.approx((0.95 + 0.1 + 0 + 0 + 1 + 0.5 + 0 + 1) / 8)  # 0.44375
    assert result["question_types"]["object_rel_direction_easy"] == 0.5
    assert result["question_types"]["object_rel_direction_hard"] == 0.0
    assert result["n"] == 12
    assert result["n_missing"] == 1
    assert result["n_unknown_predictions"] == 1
    assert result["counts"]["object_counting"] == 2
    assert "debiased" not in result


def test_vsibench_whitespace_token_rule() -> None:
    result = score("vsibench", VSI_ITEMS, VSI_PREDS, token_rule="whitespace")
    assert result["tasks"]["route_planning"] == 1.0
    assert result["overall"] == pytest.approx(4.55 / 8)


def test_vsibench_direction_averages_sub_type_means_not_items() -> None:
    items = [_item("e1", "object_rel_direction_easy", "A", "mc"),
             _item("e2", "object_rel_direction_easy", "A", "mc"),
             _item("e3", "object_rel_direction_easy", "A", "mc"),
             _item("h1", "object_rel_direction_hard", "A", "mc")]
    result = score("vsibench", items, {"e1": "A", "e2": "A", "e3": "A", "h1": "B"})
    # item mean would be 0.75; the official rule averages sub-type means: (1.0 + 0.0) / 2 (medium absent)
    assert result["tasks"] == {"object_rel_direction": 0.5}
    assert result["overall"] == 0.5


def test_vsibench_debiased_subset() -> None:
    result = score("vsibench", VSI_ITEMS, VSI_PREDS, debiased_ids=["c2", "e2", "m1", "nope"])
    deb = result["debiased"]
    assert deb["tasks"] == pytest.approx({"object_counting": 0.9, "object_rel_direction": 0.5})
    assert deb["overall"] == pytest.approx(0.7)
    assert deb["n"] == 3
    assert deb["n_ids_not_found"] == 1
    assert result["overall"] == pytest.approx(0.44375)


def test_vsibench_no_items() -> None:
    result = score("vsibench", [], {})
    assert result["overall"] is None
    assert result["tasks"] == {}


def test_vsibench_unknown_question_type_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown VSI-Bench question type"):
        score("vsibench", [_item("x", "object_color", "A", "mc")], {"x": "A"})


def test_prediction_objects_and_extraction_from_raw() -> None:
    items = [_item("a", "route_planning", "B", "mc"), _item("b", "object_counting", "4", "numeric")]
    preds = {"a": Prediction("a", None, raw="Let me think. A is wrong... The answer is (B)."),
             "b": Prediction("b", "5", raw="I count 4 chairs.")}
    # "5" against 4: e = 0.25 -> 0.6; the raw-only prediction is extracted: (B)
    assert score("vsibench", items, preds)["tasks"] == {"object_counting": 0.6, "route_planning": 1.0}
    forced = score("vsibench", items, preds, extract=True)
    assert forced["tasks"] == {"object_counting": 1.0, "route_planning": 1.0}


def test_blink_overall_is_mean_of_subtasks() -> None:
    items = [_item("1", "Counting", "A", "mc", "blink"), _item("2", "Counting", "A", "mc", "blink"),
             _item("3", "Counting", "A", "mc", "blink"), _item("4", "Jigsaw", "B", "mc", "blink")]
    result = score("blink", items, {"1": "(A)", "2": "A", "3": "B", "4": "B"})
    assert result["tasks"] == pytest.approx({"Counting": 2 / 3, "Jigsaw": 1.0})
    assert result["overall"] == pytest.approx((2 / 3 + 1) / 2)


def test_cvbench_official_formula() -> None:
    items = [
        _item("1", "Count", "A", "mc", "cvbench", source="ADE20K", type="2D"),
        _item("2", "Count", "A", "mc", "cvbench", source="ADE20K", type="2D"),
        _item("3", "Relation", "A", "mc", "cvbench", source="COCO", type="2D"),
        _item("4", "Depth", "A", "mc", "cvbench", source="Omni3D", type="3D"),
        _item("5", "Distance", "A", "mc", "cvbench", source="Omni3D", type="3D"),
        _item("6", "Distance", "A", "mc", "cvbench", source="Omni3D", type="3D"),
    ]
    preds = {"1": "A", "2": "B", "3": "A", "4": "A", "5": "B", "6": "B"}
    result = score("cv-bench", items, preds)
    assert result["sources"] == pytest.approx({"ADE20K": 0.5, "COCO": 1.0, "Omni3D": 1 / 3})
    assert result["overall"] == pytest.approx(((0.5 + 1.0) / 2 + 1 / 3) / 2)
    assert result["tasks"] == pytest.approx({"Count": 0.5, "Depth": 1.0, "Distance": 0.0, "Relation": 1.0})
    assert result["types"] == pytest.approx({"2D": 2 / 3, "3D": 1 / 3})


def test_mmvp_pair_accuracy() -> None:
    items = [_item(str(i), "mmvp", "A" if i % 2 else "B", "mc", "mmvp", index=i) for i in range(1, 7)]
    # pair (1, 2) right, pair (3, 4) half right, pair (5, 6) wrong and missing
    preds = {"1": "A", "2": "B", "3": "A", "4": "A", "5": "B"}
    result = score("mmvp", items, preds)
    assert result["overall"] == pytest.approx(3 / 6)
    assert result["pair_accuracy"] == pytest.approx(1 / 3)
    assert result["n_pairs"] == 3
    assert result["n_missing"] == 1


def test_generic_numeric_and_mc_micro_average() -> None:
    items = [_item("a", "mc", "A", "mc", "records"), _item("b", "numeric", "10", "numeric", "records")]
    result = score("records", items, {"a": "**A**", "b": "11"})
    assert result["tasks"] == pytest.approx({"mc": 1.0, "numeric": 0.9})
    assert result["overall"] == pytest.approx(0.95)
