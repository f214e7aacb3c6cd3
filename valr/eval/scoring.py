"""Scoring: VSI-Bench's official rule reproduced exactly, and multiple-choice accuracy for the other suites.

VSI-Bench (as in thinking-in-space / lmms-eval ``vsibench/utils.py``):

* Answer token: ``prediction.split(" ")[0].rstrip(".").strip()``, i.e. the text before the first *space*
  character, trailing periods removed, then surrounding whitespace removed. This is token rule ``"official"``
  (the default). It differs from a whitespace split when the prediction starts with a space or has a newline
  or tab before the first space (``" B"`` -> ``""``, ``"B\\nreason"`` -> ``"B\\nreason"``), so a clean,
  extracted prediction is expected (see ``valr.eval.extract``). Token rule ``"whitespace"`` uses
  ``prediction.split()[0]`` instead, for raw outputs.
* Multiple choice: case-insensitive exact match of the token with the ground-truth letter, 1.0 or 0.0.
* Numeric: Mean Relative Accuracy. Token and ground truth go through Python ``float`` (an unparsable
  prediction scores 0; so do ``nan``/``inf``, for which every comparison below is false).
  ``e = abs(pred - gt) / gt`` and ``MRA = mean over theta of [e <= 1 - theta]`` with theta in
  ``MRA_THRESHOLDS``. The official code builds the thresholds with ``numpy.linspace(0.5, 0.95, 10)``, whose
  ninth value is ``0.8999999999999999``, not ``0.9``; the tuple below holds those exact floats, so
  ``e == 0.1`` passes that threshold (``1 - 0.8999999999999999 = 0.10000000000000009``) just as in the
  official scores (e.g. gt 10, pred 11 -> 0.9). The ground truth must be finite and > 0 (the official code
  divides by it and crashes on 0; a negative one would make every threshold pass): anything else raises
  ``ValueError``.
* Aggregation: mean per question type; the three ``object_rel_direction_{easy,medium,hard}`` means are
  averaged into one task ``object_rel_direction``; overall = unweighted mean of the task scores. Tasks with no
  item in the data are left out and the overall is the mean over the tasks present (on the full benchmark all
  8 are present, so this equals the official number; the official code instead divides the direction sum by 3
  and counts it even when a sub-type or the whole task is absent).

Other benchmarks score multiple choice leniently: ``choice_letter`` takes the first whitespace token and
strips brackets, asterisks and trailing punctuation (``"(B)"``, ``"**B**"``, ``"b."`` all read as ``B``), then
compares case-insensitively. Numeric items use MRA as above. Their overall is the micro average over items,
except BLINK (mean of the sub-task accuracies, as in the official ``evaluate.py``) and CV-Bench (official
formula ``((ADE20K + COCO) / 2 + Omni3D) / 2`` over per-source accuracies). MMVP also reports pair accuracy
(a pair of questions 1-2, 3-4, ... counts only when both are right), the metric of the MMVP paper.

All scores are fractions in [0, 1]. An item without a prediction scores 0 and is counted in ``n_missing``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from valr.eval.benchmarks import EvalItem, canonical_name
from valr.eval.extract import Judge, extract_answer

if TYPE_CHECKING:
    from valr.eval.predictions import Prediction

TokenRule = Literal["official", "whitespace"]

# Exactly numpy.linspace(0.5, 0.95, 10) as built by the official code (note the ninth value).
MRA_THRESHOLDS: tuple[float, ...] = (
    0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.8999999999999999, 0.95,
)

VSI_MC_TYPES: tuple[str, ...] = (
    "object_rel_direction_easy",
    "object_rel_direction_medium",
    "object_rel_direction_hard",
    "object_rel_distance",
    "route_planning",
    "obj_appearance_order",
)
VSI_NUMERIC_TYPES: tuple[str, ...] = (
    "object_abs_distance",
    "object_counting",
    "object_size_estimation",
    "room_size_estimation",
)
VSI_DIRECTION_TYPES: tuple[str, ...] = VSI_MC_TYPES[:3]
VSI_DIRECTION_TASK = "object_rel_direction"
# Task order of the VSI-Bench paper's table: 4 numeric (MRA) then 4 multiple choice (accuracy).
VSI_TASKS: tuple[str, ...] = (
    "object_counting",
    "object_abs_distance",
    "object_size_estimation",
    "room_size_estimation",
    "object_rel_distance",
    VSI_DIRECTION_TASK,
    "route_planning",
    "obj_appearance_order",
)

_CHOICE_STRIP = "()[]{}<>*_`'\".,:;!?"


def answer_token(prediction: str, rule: TokenRule = "official") -> str:
    """The answer token VSI-Bench scores (rules in the module docstring)."""
    if rule == "official":
        return prediction.split(" ")[0].rstrip(".").strip()
    if rule == "whitespace":
        parts = prediction.split()
        return parts[0].rstrip(".").strip() if parts else ""
    raise ValueError(f"unknown token rule {rule!r}; use 'official' or 'whitespace'")


def exact_match(prediction: str, answer: str, rule: TokenRule = "official") -> float:
    """VSI-Bench multiple choice: 1.0 when the answer token equals the letter, ignoring case."""
    return 1.0 if answer_token(prediction, rule).lower() == answer.lower() else 0.0


def to_float(text: str) -> float | None:
    """Python ``float`` of the text, or None when it does not parse (``nan``/``inf`` do parse)."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def mean_relative_accuracy(pred: float | None, gt: float) -> float:
    """MRA of one numeric prediction: the fraction of thresholds theta with ``|pred-gt|/gt <= 1 - theta``."""
    if not math.isfinite(gt) or gt <= 0:
        raise ValueError(f"MRA needs a finite ground truth > 0, got {gt!r}")
    if pred is None:
        return 0.0
    error = abs(pred - gt) / gt
    hits = sum(1 for theta in MRA_THRESHOLDS if error <= 1 - theta)
    return hits / len(MRA_THRESHOLDS)


def mra_score(prediction: str, answer: str, rule: TokenRule = "official") -> float:
    """VSI-Bench numeric score of a prediction string against a ground-truth string."""
    gt = to_float(answer)
    if gt is None:
        raise ValueError(f"numeric ground truth {answer!r} is not a number")
    return mean_relative_accuracy(to_float(answer_token(prediction, rule)), gt)


def choice_letter(prediction: str) -> str:
    """The option letter a short prediction names, leniently: ``"(B)"``, ``"**b**"``, ``"B."`` -> ``"B"``."""
    parts = prediction.split()
    return parts[0].strip(_CHOICE_STRIP).upper() if parts else ""


def mc_accuracy(prediction: str, answer: str) -> float:
    """Lenient multiple-choice accuracy used outside VSI-Bench."""
    letter = choice_letter(prediction)
    return 1.0 if letter and letter == choice_letter(answer) else 0.0


@dataclass(frozen=True)
class ItemScore:
    """One item's score; ``missing`` means no prediction was given (scored 0)."""

    id: str
    task: str
    kind: str
    score: float
    missing: bool = False
    meta: Mapping[str, Any] = field(default_factory=dict)


def score_item(item: EvalItem, prediction: str | None, *, official: bool,
               token_rule: TokenRule = "official") -> ItemScore:
    """Score one item. ``official`` selects VSI-Bench's exact-match rule for multiple choice."""
    if prediction is None:
        return ItemScore(item.id, item.task, item.kind, 0.0, missing=True, meta=item.meta)
    try:
        if item.kind == "numeric":
            value = mra_score(prediction, item.answer, token_rule)
        elif official:
            value = exact_match(prediction, item.answer, token_rule)
        else:
            value = mc_accuracy(prediction, item.answer)
    except ValueError as e:
        raise ValueError(f"item {item.id!r} ({item.benchmark}/{item.task}): {e}") from None
    return ItemScore(item.id, item.task, item.kind, value, meta=item.meta)


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _group(scores: Iterable[ItemScore], key: Callable[[ItemScore], Any]) -> dict[str, list[float]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for s in scores:
        groups[str(key(s))].append(s.score)
    return dict(groups)


def _by_task(scores: Iterable[ItemScore]) -> dict[str, list[float]]:
    return _group(scores, lambda s: s.task)


def _by_meta(scores: Iterable[ItemScore], field_name: str) -> dict[str, float]:
    groups = _group(scores, lambda s: s.meta.get(field_name, ""))
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def aggregate_vsibench(scores: Iterable[ItemScore]) -> dict[str, Any]:
    """VSI-Bench aggregation (question types -> 8 tasks -> overall), rules in the module docstring."""
    scores = list(scores)
    groups = _by_task(scores)
    by_type = {t: sum(v) / len(v) for t, v in groups.items()}
    unknown = sorted(set(by_type) - set(VSI_MC_TYPES) - set(VSI_NUMERIC_TYPES))
    if unknown:
        raise ValueError(f"unknown VSI-Bench question type(s) {unknown}; known: "
                         f"{sorted(VSI_MC_TYPES + VSI_NUMERIC_TYPES)}")
    tasks: dict[str, float] = {}
    for task in VSI_TASKS:
        if task == VSI_DIRECTION_TASK:
            value = _mean(by_type[t] for t in VSI_DIRECTION_TYPES if t in by_type)
        else:
            value = by_type.get(task)
        if value is not None:
            tasks[task] = value
    return {
        "overall": _mean(tasks.values()),
        "overall_rule": "mean of the VSI-Bench task scores present; 4 MRA + 4 accuracy on the full set",
        "tasks": tasks,
        "question_types": {t: by_type[t] for t in sorted(by_type)},
        "counts": {t: len(groups[t]) for t in sorted(groups)},
        "n": len(scores),
        "n_missing": sum(s.missing for s in scores),
    }


def aggregate_accuracy(scores: Iterable[ItemScore], *, overall: str = "micro") -> dict[str, Any]:
    """Per-task means and an overall that is the item mean (``micro``) or the task mean (``task_mean``)."""
    scores = list(scores)
    groups = _by_task(scores)
    tasks = {t: sum(v) / len(v) for t, v in sorted(groups.items())}
    if overall == "micro":
        total, rule = _mean(s.score for s in scores), "mean over items"
    elif overall == "task_mean":
        total, rule = _mean(tasks.values()), "mean of the per-task accuracies"
    else:
        raise ValueError(f"unknown overall rule {overall!r}")
    return {
        "overall": total,
        "overall_rule": rule,
        "tasks": tasks,
        "counts": {t: len(v) for t, v in sorted(groups.items())},
        "n": len(scores),
        "n_missing": sum(s.missing for s in scores),
    }


def aggregate_cvbench(scores: Iterable[ItemScore]) -> dict[str, Any]:
    """CV-Bench: per task, per source and the official combined accuracy."""
    scores = list(scores)
    out = aggregate_accuracy(scores)
    sources = _by_meta(scores, "source")
    out["sources"], out["types"] = sources, _by_meta(scores, "type")
    ade, coco, omni = sources.get("ADE20K"), sources.get("COCO"), sources.get("Omni3D")
    if ade is not None and coco is not None and omni is not None:
        out["overall"] = ((ade + coco) / 2 + omni) / 2
        out["overall_rule"] = "CV-Bench official: ((ADE20K + COCO) / 2 + Omni3D) / 2"
    else:
        out["overall_rule"] = "mean over items (a CV-Bench source is absent: no official formula)"
    return out


def aggregate_mmvp(scores: Iterable[ItemScore]) -> dict[str, Any]:
    """MMVP: question accuracy as overall, plus pair accuracy over questions (1, 2), (3, 4), ..."""
    scores = list(scores)
    out = aggregate_accuracy(scores)
    pairs: dict[int, list[float]] = defaultdict(list)
    for s in scores:
        index = s.meta.get("index")
        if isinstance(index, int):
            pairs[(index - 1) // 2].append(s.score)
    complete = [v for v in pairs.values() if len(v) == 2]
    out["pair_accuracy"] = _mean(1.0 if min(v) == 1.0 else 0.0 for v in complete)
    out["n_pairs"] = len(complete)
    return out


def aggregate_mmstar(scores: Iterable[ItemScore]) -> dict[str, Any]:
    """MMStar: accuracy per category (the tasks) and per l2_category."""
    scores = list(scores)
    return {**aggregate_accuracy(scores), "l2_categories": _by_meta(scores, "l2_category")}


_AGGREGATORS: dict[str, Callable[[list[ItemScore]], dict[str, Any]]] = {
    "vsibench": aggregate_vsibench,
    "mmstar": aggregate_mmstar,
    "blink": lambda s: aggregate_accuracy(s, overall="task_mean"),
    "cvbench": aggregate_cvbench,
    "mmvp": aggregate_mmvp,
}


def aggregate(benchmark: str, scores: Iterable[ItemScore]) -> dict[str, Any]:
    """Aggregate item scores with the benchmark's rule (micro accuracy when it has no special one)."""
    return _AGGREGATORS.get(benchmark, aggregate_accuracy)(list(scores))


def resolve_prediction(item: EvalItem, value: str | Prediction | None, *, extract: bool = False,
                       judge: Judge | None = None) -> str | None:
    """The answer string to score: the ``prediction``, or one extracted from ``raw`` when there is no
    prediction or ``extract`` is set (``valr.eval.extract`` rules). None means missing."""
    if value is None or isinstance(value, str):
        return value
    if value.raw is not None and (extract or value.prediction is None):
        return extract_answer(value.raw, item.kind, item.options, question=item.question, judge=judge)
    return value.prediction


def item_scores(benchmark: str, items: Iterable[EvalItem], predictions: Mapping[str, str | Prediction], *,
                token_rule: TokenRule = "official", extract: bool = False,
                judge: Judge | None = None) -> list[ItemScore]:
    """Per-item scores (for length analysis and error inspection), same rules as ``score``."""
    official = canonical_name(benchmark) == "vsibench"
    return [score_item(it, resolve_prediction(it, predictions.get(it.id), extract=extract, judge=judge),
                       official=official, token_rule=token_rule)
            for it in items]


def score(benchmark: str, items: Iterable[EvalItem], predictions: Mapping[str, str | Prediction], *,
          debiased_ids: Iterable[str] | None = None, token_rule: TokenRule = "official",
          extract: bool = False, judge: Judge | None = None) -> dict[str, Any]:
    """Score predictions (by item id) against a benchmark's items.

    Returns ``overall``, ``tasks`` (per-task scores) and the benchmark's extra breakdowns, ``n``,
    ``n_missing`` (items with no prediction, scored 0), ``n_unknown_predictions`` (predictions whose id is no
    item; they are not scored) and, when ``debiased_ids`` is given, ``debiased``: the same aggregation over
    those items only (with ``n_ids_not_found`` for listed ids that are no item).
    """
    name = canonical_name(benchmark)
    items = list(items)
    per_item = item_scores(name, items, predictions, token_rule=token_rule, extract=extract, judge=judge)
    result: dict[str, Any] = {"benchmark": name, **aggregate(name, per_item)}
    known = {it.id for it in items}
    result["n_unknown_predictions"] = sum(1 for pid in predictions if pid not in known)
    if debiased_ids is not None:
        wanted = {str(i) for i in debiased_ids}
        subset = [s for s in per_item if s.id in wanted]
        result["debiased"] = {**aggregate(name, subset), "n_ids_not_found": len(wanted - known)}
    return result
