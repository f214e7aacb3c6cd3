"""``valr eval score``: score a predictions file against a benchmark, without a model or any video decode.

Prints a table of the overall and per-task scores (as percentages); with ``--json`` the last line of stdout is
one JSON object holding the full result (scores as fractions in [0, 1]). Exit status 0 on success, 2 on a
usage or data error (the message, on stderr, names the file and line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from valr.eval.benchmarks import BenchmarkError, canonical_name, load_benchmark
from valr.eval.predictions import PredictionsError, read_predictions
from valr.eval.scoring import score


def read_id_list(path: str | Path) -> list[str]:
    """Ids from a text file (one per line), a JSON list, or a parquet/JSONL/JSON table with an ``id`` field.

    A VSI-Bench debiased parquet can be passed as is: its ``id`` column is read.
    """
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: id list not found")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        if "id" not in names:
            raise BenchmarkError(f"{path}: parquet has no 'id' column (columns: {names})")
        return [str(v) for v in pq.read_table(path, columns=["id"]).column("id").to_pylist()]
    text = path.read_text(encoding="utf-8")
    if suffix in (".json", ".jsonl"):
        ids: list[str] = []
        if suffix == ".json":
            data = json.loads(text)
            rows = data if isinstance(data, list) else [data]
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        for i, row in enumerate(rows, start=1):
            value = row.get("id") if isinstance(row, dict) else row
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise BenchmarkError(f"{path}: entry {i} has no string or integer id ({row!r})")
            ids.append(str(value))
        return ids
    return [line.strip() for line in text.splitlines() if line.strip()]


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:6.2f}"


def format_table(result: dict[str, Any]) -> str:
    """A readable table of a ``score`` result (percentages)."""
    rows: list[tuple[str, str, str]] = []
    counts = result.get("counts", {})
    for task, value in result["tasks"].items():
        n = counts.get(task)
        if n is None and result["benchmark"] == "vsibench":
            n = sum(c for t, c in counts.items() if t.startswith(task + "_"))
        rows.append((task, _pct(value), str(n if n is not None else "")))
    for key in ("question_types", "sources", "types", "l2_categories"):
        for name, value in result.get(key, {}).items():
            if name not in result["tasks"]:
                rows.append((f"  {key[:-1] if key != 'l2_categories' else 'l2'}: {name}", _pct(value),
                             str(counts.get(name, ""))))
    width = max([len(r[0]) for r in rows] + [len("overall")])
    lines = [f"{result['benchmark']}: n={result['n']}, missing={result['n_missing']}, "
             f"unknown predictions={result['n_unknown_predictions']}",
             f"{'task':<{width}}  {'score':>6}  {'n':>5}"]
    lines += [f"{name:<{width}}  {value:>6}  {n:>5}" for name, value, n in rows]
    lines.append(f"{'overall':<{width}}  {_pct(result['overall']):>6}")
    if "pair_accuracy" in result:
        pair = _pct(result["pair_accuracy"])
        lines.append(f"{'pair accuracy':<{width}}  {pair:>6}  {result['n_pairs']:>5}")
    lines.append(f"({result['overall_rule']})")
    if "debiased" in result:
        deb = result["debiased"]
        lines.append(f"{'debiased overall':<{width}}  {_pct(deb['overall']):>6}  {deb['n']:>5}")
        if deb.get("n_ids_not_found"):
            lines.append(f"  ({deb['n_ids_not_found']} debiased id(s) match no item)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="valr eval score",
                                     description="Score a predictions JSONL file against a benchmark.")
    parser.add_argument("--benchmark", required=True,
                        help="vsibench, blink, mmvp, mmstar, vstar, cvbench or records")
    parser.add_argument("--data", required=True, type=Path, help="the benchmark's data file or directory")
    parser.add_argument("--predictions", required=True, type=Path,
                        help="JSONL with 'id' and 'prediction' (or 'raw') per line")
    parser.add_argument("--json", action="store_true",
                        help="print the result as one JSON object on the last line")
    parser.add_argument("--debiased-ids", type=Path,
                        help="ids of a debiased subset (text, JSON, JSONL or parquet with an 'id' column)")
    parser.add_argument("--video-root", type=Path, help="VSI-Bench video root (not opened when scoring)")
    parser.add_argument("--extract", action="store_true",
                        help="re-extract every answer from the 'raw' field (valr.eval.extract rules)")
    parser.add_argument("--token-rule", choices=("official", "whitespace"), default="official",
                        help="how the answer token is read: official VSI-Bench split on ' ' (default) or any "
                             "whitespace")
    return parser


def score_main(argv: list[str]) -> int:
    """Entry point of ``valr eval score``; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help or a usage error: argparse has printed the message
        return int(e.code or 0)
    try:
        name = canonical_name(args.benchmark)
        opts: dict[str, Any] = {"load_media": False}
        if args.video_root is not None:
            opts["video_root"] = args.video_root
        items = load_benchmark(name, args.data, **opts)
        predictions = read_predictions(args.predictions)
        if predictions and not any(it.id in predictions for it in items):
            raise PredictionsError(f"{args.predictions}: none of the {len(predictions)} prediction ids "
                                   f"matches an item of {name} in {args.data}; check --benchmark and --data")
        debiased = read_id_list(args.debiased_ids) if args.debiased_ids is not None else None
        result = score(name, items, predictions, debiased_ids=debiased, token_rule=args.token_rule,
                       extract=args.extract)
    except (BenchmarkError, PredictionsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result["n_unknown_predictions"]:
        print(f"warning: {result['n_unknown_predictions']} prediction(s) have ids that match no item; they "
              "were not scored", file=sys.stderr)
    print(format_table(result))
    if args.json:
        print(json.dumps(result, sort_keys=False))
    return 0
