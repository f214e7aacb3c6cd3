"""Scoring generations against the test records: accuracy overall, by chain length, family and step position,
where a lookup chain first goes wrong (:func:`lookup_error`), the answer-prior baseline and the issue's
targets (:func:`check_targets`)."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from valr.demo.config import TARGET_NS


def key_kind(words: Iterable[str]) -> str:
    """What a content key names: "colour", "shape", "colour_shape" (both words) or "" (neither)."""
    from valr.synth.world import COLOURS, SHAPES

    words = set(words)
    return "_".join(k for k, names in (("colour", COLOURS), ("shape", SHAPES)) if words & set(names))


_LATENT_MARKUP = re.compile(r"<latent>\[\d+ latent positions\]</latent>|<latent>|</latent>")


_LOOKUP_STEP = re.compile(r"#\d+ view (?P<view>\d+) (?:(?P<key>[a-z ]+?) at )?row \d+ col \d+: ")


# why a lookup chain (chase, where, tally) went wrong, by its first wrong step: the view its head names, the
# move (by address or by content: the question's instruction for that step), the key's type (colour or shape:
# also the question's) or value (copied from the step before), or the right lookup landing on the wrong cell or
# object; "unreadable" for a step that is not a lookup at all, "missing" for a chain that stopped early
LOOKUP_ERRORS = ("view", "move", "key_type", "key_value", "found", "unreadable", "missing")


def said_steps(raw: str | None) -> list[str]:
    """The reasoning steps of a generated text, one per line, latent segments and the answer line left out."""
    text = _LATENT_MARKUP.sub("", raw or "")
    return [x.strip() for x in text.split("\n") if x.strip() and not x.strip().startswith("Answer")]


def lookup_error(gold: str, said: str | None) -> str | None:
    """Why ``said`` is not the lookup step ``gold`` (a :data:`LOOKUP_ERRORS` kind), or None when they agree or
    ``gold`` is not a lookup step."""
    g = _LOOKUP_STEP.match(gold)
    if g is None or said == gold:
        return None
    if said is None:
        return "missing"
    m = _LOOKUP_STEP.match(said)
    if m is None:
        return "unreadable"
    gk, sk = g.group("key"), m.group("key")
    if g.group("view") != m.group("view"):
        return "view"
    if (gk is None) != (sk is None):
        return "move"
    if gk is not None and gk != sk:
        return "key_type" if key_kind(gk.split()) != key_kind(sk.split()) else "key_value"
    return "found"


def score_predictions(test_file: Path, pred_file: Path, limit: int | None = None) -> dict[str, Any]:
    """Accuracy overall, by N, by family; per-step accuracy by step position; (length, score) pairs; per
    family, how often the whole generated chain equals the gold one (``chain_right_by_family``) and the accuracy
    of the answers that follow such a chain (``accuracy_given_chain_right``: does the model compute the answer
    from right steps?); and, over the chains made of lookup steps (chase, where, tally), why the first wrong step is
    wrong (``lookup_chain_errors``: kind -> {step position: chains}, see :func:`lookup_error`)."""
    from valr.data import load_records
    from valr.eval.benchmarks import load_records_benchmark
    from valr.eval.predictions import Prediction
    from valr.eval.scoring import item_scores

    items = load_records_benchmark(test_file, load_media=False)
    records = {r.id: r for r in load_records(test_file)}
    if limit is not None:
        items = items[:limit]
    lines = {}
    for x in pred_file.read_text().splitlines():
        if x.strip():
            o = json.loads(x)
            lines[str(o["id"])] = o
    preds = {rid: Prediction(rid, str(o["prediction"]), o.get("raw"), 0,
                             {k: v for k, v in o.items() if k not in ("id", "prediction", "raw")})
             for rid, o in lines.items()}
    scores = item_scores("records", items, preds)
    by_n: dict[int, list[float]] = defaultdict(list)
    by_family: dict[str, list[float]] = defaultdict(list)
    step_right: dict[int, list[float]] = defaultdict(list)  # position -> [step i right | steps < i right]
    step_any: dict[int, list[float]] = defaultdict(list)  # position -> [step i right] (unconditional)
    chain_right: dict[str, list[float]] = defaultdict(list)  # family -> [every step right]
    first_error: dict[str, Counter] = defaultdict(Counter)  # lookup chains: kind -> {position of the first wrong step}
    lookup_chains = 0
    given_chain: dict[str, list[float]] = defaultdict(list)  # family -> [answer score | every step right]
    pairs_tokens, pairs_positions, segs = [], [], []
    per_item: dict[str, tuple[int, float]] = {}  # id -> (chain length, score): paired comparisons (stats)
    for it, s in zip(items, scores, strict=True):
        n, family = int(it.meta["n_steps"]), str(it.meta["family"])
        by_n[n].append(s.score)
        by_family[family].append(s.score)
        o = lines.get(it.id, {})
        said = said_steps(o.get("raw"))
        gold = [st.text.strip() for st in records[it.id].steps]
        ok_prefix = True
        lookup = all(_LOOKUP_STEP.match(g) for g in gold)
        lookup_chains += lookup
        for i, g in enumerate(gold, start=1):
            right = float(i <= len(said) and said[i - 1] == g)
            step_any[i].append(right)
            if ok_prefix:
                step_right[i].append(right)
                ok_prefix = right == 1.0
                if lookup and not ok_prefix:
                    first_error[lookup_error(g, said[i - 1] if i <= len(said) else None)][str(i)] += 1
        chain_right[family].append(float(ok_prefix and len(said) == len(gold)))
        if chain_right[family][-1]:
            given_chain[family].append(s.score)
        if "generated_tokens" in o:
            pairs_tokens.append((float(o["generated_tokens"]), s.score))
            pairs_positions.append((float(o["generated_positions"]), s.score))
            segs.append((n, o.get("latent_segments", 0)))
        per_item[str(it.id)] = (n, s.score)

    def mean(v):
        return sum(v) / len(v) if v else None

    return {
        "accuracy": mean([s.score for s in scores]),
        "n": len(scores),
        "accuracy_by_n": {str(n): mean(v) for n, v in sorted(by_n.items())},
        "count_by_n": {str(n): len(v) for n, v in sorted(by_n.items())},
        "accuracy_by_family": {f: mean(v) for f, v in sorted(by_family.items())},
        "step_accuracy_by_position": {str(i): mean(v) for i, v in sorted(step_right.items())},
        "step_accuracy_unconditional": {str(i): mean(v) for i, v in sorted(step_any.items())},
        "chain_right_by_family": {f: mean(v) for f, v in sorted(chain_right.items())},
        "accuracy_given_chain_right": {f: mean(v) for f, v in sorted(given_chain.items())},
        "lookup_chain_errors": {"chains": lookup_chains,
                                **{k: dict(sorted(first_error[k].items(), key=lambda x: int(x[0])))
                                   for k in LOOKUP_ERRORS if k in first_error}},
        "mean_generated_tokens": mean([x for x, _ in pairs_tokens]),
        "mean_generated_positions": mean([x for x, _ in pairs_positions]),
        "latent_segments_per_step": (sum(s for _, s in segs) / max(1, sum(n for n, _ in segs))) if segs else None,
        "_pairs_tokens": pairs_tokens,
        "_pairs_positions": pairs_positions,
        "_items": per_item,
    }


def prior_baseline(world_dir: Path, split_file: Path, limit: int | None = None) -> dict[str, Any]:
    """The answer-prior reference: answer every item with the most common training answer of its family and N
    (a letter for multiple choice, the median total for counts), without looking at the images or the question.
    A variant near this level has learned the answer format, not the task."""
    import statistics

    from valr.data import load_records
    from valr.eval.benchmarks import load_records_benchmark
    from valr.eval.scoring import item_scores

    by_key: dict[tuple[str, int], list[str]] = defaultdict(list)
    for r in load_records(world_dir / "train.jsonl"):
        by_key[(r.meta["family"], int(r.meta["n_steps"]))].append(r.answer)
    guess = {}
    for key, answers in by_key.items():
        if all(a.isdigit() for a in answers):
            guess[key] = str(int(statistics.median(int(a) for a in answers)))
        else:
            guess[key] = max(sorted(set(answers)), key=answers.count)
    items = load_records_benchmark(split_file, load_media=False)
    if limit is not None:
        items = items[:limit]
    preds = {it.id: guess.get((str(it.meta["family"]), int(it.meta["n_steps"])), "A") for it in items}
    scores = item_scores("records", items, preds)
    by_n: dict[int, list[float]] = defaultdict(list)
    for it, sc in zip(items, scores, strict=True):
        by_n[int(it.meta["n_steps"])].append(sc.score)
    return {"accuracy": sum(sc.score for sc in scores) / len(scores),
            "accuracy_by_n": {str(n): sum(v) / len(v) for n, v in sorted(by_n.items())},
            "count_by_n": {str(n): len(v) for n, v in sorted(by_n.items())}}


def _long_chain_accuracy(m: dict[str, Any]) -> float | None:
    num = sum(m["accuracy_by_n"][str(n)] * m["count_by_n"][str(n)] for n in TARGET_NS if str(n) in m["accuracy_by_n"])
    den = sum(m["count_by_n"][str(n)] for n in TARGET_NS if str(n) in m["count_by_n"])
    return num / den if den else None


def check_targets(variants: dict[str, dict[str, Any]], n_hi: int = 8) -> dict[str, Any]:
    """The issue's four targets, computed from one run's (or the seed-mean) accuracies. None = not measurable."""
    out: dict[str, Any] = {}
    sft, va, no = variants.get("sft"), variants.get("valr_s"), variants.get("latent_no_align")
    if sft and va:
        a, b = va.get("accuracy_long", _long_chain_accuracy(va) if "count_by_n" in va else None), \
            sft.get("accuracy_long", _long_chain_accuracy(sft) if "count_by_n" in sft else None)
        if a is not None and b is not None:
            out["valr_s_beats_sft_by_5pts_on_long"] = {"valr_s": a, "sft": b, "gap": a - b, "met": a - b >= 0.05,
                                                       "ns": list(TARGET_NS)}

        def ratio(m):
            lo, hi = m["accuracy_by_n"].get("1"), m["accuracy_by_n"].get(str(n_hi))
            return hi / lo if lo else None

        ra, rb = ratio(va), ratio(sft)
        if ra is not None and rb is not None:
            out["valr_s_falls_less_with_n"] = {"valr_s_ratio": ra, "sft_ratio": rb, "difference": ra - rb,
                                               "met": ra - rb >= 0.15, "ratio": f"acc(N={n_hi})/acc(N=1)"}
    if sft and no:
        d = no["accuracy"] - sft["accuracy"]
        out["no_align_within_2pts_of_sft"] = {"latent_no_align": no["accuracy"], "sft": sft["accuracy"],
                                              "difference": d, "met": abs(d) <= 0.02}
    frac = (va or {}).get("data_fraction", {})
    small = [v for k, v in frac.items() if float(k) < 1.0]
    if sft and small:
        key = min(frac, key=float)
        a, b = frac[key]["accuracy"], frac[key].get("sft_accuracy", sft["accuracy"])  # a summary: the same seeds
        out["valr_s_small_data_matches_sft_full"] = {"fraction": float(key), "valr_s": a, "sft": b,
                                                     "difference": a - b, "met": a >= b}
        if "seeds" in frac[key]:
            out["valr_s_small_data_matches_sft_full"]["seeds"] = frac[key]["seeds"]
    return out
