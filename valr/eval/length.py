"""Accuracy against generated (thinking) length: per-item (length, score) pairs bucketed by length.

Buckets are fixed-width, not quantiles, so that several models share one x axis and a bucket means the same
length range for all of them. Default: ``n_buckets`` (10) equal buckets from 0 to the largest length over all
models, the width rounded up to an integer. ``width`` fixes the width instead, or ``edges`` gives explicit
edges. Bucket ``i`` holds lengths in ``[edges[i], edges[i+1])``, the last bucket also its upper edge; lengths
outside ``[edges[0], edges[-1]]`` are counted in ``n_out_of_range`` and not bucketed. A bucket's accuracy is
the mean score of its items (MRA counts fractionally), ``None`` when it is empty.

The plot (matplotlib, Agg backend) draws one line per model: accuracy (%) at each non-empty bucket's centre.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DEFAULT_BUCKETS = 10


def bucket_edges(lengths: Sequence[float], *, width: float | None = None,
                 n_buckets: int = DEFAULT_BUCKETS) -> list[float]:
    """Fixed-width edges from 0 covering every length (rule in the module docstring)."""
    if not lengths:
        raise ValueError("no lengths to bucket")
    if any(x < 0 or not math.isfinite(x) for x in lengths):
        raise ValueError("lengths must be finite and >= 0")
    top = max(lengths)
    if width is None:
        if n_buckets < 1:
            raise ValueError(f"n_buckets must be >= 1, got {n_buckets}")
        width = max(1, math.ceil(top / n_buckets))
    elif width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    count = max(1, math.ceil(top / width))
    return [i * width for i in range(count + 1)]


def accuracy_by_length(pairs: Sequence[tuple[float, float]], edges: Sequence[float]) -> dict[str, Any]:
    """Bucket (length, score) pairs by ``edges``: per-bucket n and mean score, plus overall figures."""
    edges = list(edges)
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ValueError(f"edges must be at least two increasing numbers, got {edges}")
    sums = [0.0] * (len(edges) - 1)
    counts = [0] * (len(edges) - 1)
    out_of_range = 0
    for length, value in pairs:
        if length < edges[0] or length > edges[-1]:
            out_of_range += 1
            continue
        i = next((k for k in range(len(edges) - 1) if length < edges[k + 1]), len(edges) - 2)
        sums[i] += value
        counts[i] += 1
    buckets = [
        {"lo": edges[i], "hi": edges[i + 1], "n": counts[i],
         "accuracy": sums[i] / counts[i] if counts[i] else None}
        for i in range(len(edges) - 1)
    ]
    n = len(pairs)
    return {
        "buckets": buckets,
        "n": n,
        "n_out_of_range": out_of_range,
        "accuracy": sum(v for _, v in pairs) / n if n else None,
        "mean_length": sum(x for x, _ in pairs) / n if n else None,
    }


def length_report(series: Mapping[str, Sequence[tuple[float, float]]], *,
                  edges: Sequence[float] | None = None, width: float | None = None,
                  n_buckets: int = DEFAULT_BUCKETS) -> dict[str, Any]:
    """Accuracy by length for several models on shared edges (computed over all models unless given)."""
    if edges is None:
        lengths = [x for pairs in series.values() for x, _ in pairs]
        edges = bucket_edges(lengths, width=width, n_buckets=n_buckets)
    return {"edges": list(edges),
            "models": {name: accuracy_by_length(pairs, edges) for name, pairs in series.items()}}


def plot_length_report(report: Mapping[str, Any], path: str | Path, *, title: str | None = None,
                       xlabel: str = "generated length (tokens)") -> Path:
    """Draw accuracy (%) against bucket centre, one line per model, and save a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=150)
    for name, res in report["models"].items():
        pts = [((b["lo"] + b["hi"]) / 2, 100 * b["accuracy"]) for b in res["buckets"] if b["n"]]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", label=f"{name} (n={res['n']})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_xlim(report["edges"][0], report["edges"][-1])
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if report["models"]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _parse_prediction_arg(value: str) -> tuple[str, Path]:
    label, sep, file = value.partition("=")
    if sep and label and file:
        return label, Path(file)
    return Path(value).stem, Path(value)


def length_main(argv: list[str]) -> int:
    """``valr eval length``: accuracy against generated length for one or more predictions files."""
    from valr.eval.benchmarks import BenchmarkError, load_benchmark
    from valr.eval.predictions import PredictionsError, read_predictions
    from valr.eval.scoring import item_scores

    parser = argparse.ArgumentParser(
        prog="valr eval length",
        description="Accuracy by generated length (fixed-width buckets), as JSON and a PNG plot.")
    parser.add_argument("--benchmark", required=True)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--predictions", required=True, nargs="+", metavar="[LABEL=]FILE",
                        help="predictions JSONL per model; LABEL names its curve (default: the file name)")
    parser.add_argument("--out", required=True, type=Path,
                        help="output prefix: writes PREFIX.json and PREFIX.png")
    parser.add_argument("--length-field", default="generated_length",
                        help="predictions field holding the generated length (default: generated_length)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--width", type=float, help="bucket width")
    group.add_argument("--edges", help="explicit comma-separated bucket edges")
    parser.add_argument("--buckets", type=int, default=DEFAULT_BUCKETS, help="number of buckets (default 10)")
    parser.add_argument("--title")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        edges = [float(x) for x in args.edges.split(",")] if args.edges else None
        items = load_benchmark(args.benchmark, args.data, load_media=False)
        series: dict[str, list[tuple[float, float]]] = {}
        for spec in args.predictions:
            label, file = _parse_prediction_arg(spec)
            preds = read_predictions(file)
            scores = {s.id: s.score for s in item_scores(args.benchmark, items, preds) if not s.missing}
            bad = [f"{file}:{p.line}" for p in preds.values()
                   if p.id in scores and not _is_length(p.extra.get(args.length_field))]
            if bad:
                raise ValueError(f"{len(bad)} prediction(s) without a numeric {args.length_field!r} field, "
                                 f"e.g. {', '.join(bad[:5])}; write the generated token count there or "
                                 "pass --length-field")
            series[label] = [(float(preds[i].extra[args.length_field]), v) for i, v in scores.items()]
        report = length_report(series, edges=edges, width=args.width, n_buckets=args.buckets)
    except (BenchmarkError, PredictionsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path = args.out.with_name(args.out.name + ".json")
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    png = plot_length_report(report, args.out.with_name(args.out.name + ".png"), title=args.title)
    for name, res in report["models"].items():
        cells = "  ".join(f"[{b['lo']:g},{b['hi']:g}): " + ("-" if b["accuracy"] is None else
                                                         f"{100 * b['accuracy']:.1f}% (n={b['n']})")
                          for b in res["buckets"])
        print(f"{name}: {cells}")
    print(f"wrote {json_path} and {png}")
    return 0


def _is_length(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and value >= 0
