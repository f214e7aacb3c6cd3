"""Development table of docs/results.md (item 78): variants trained by `docs/dev/variant_from_stage1.py` side by side,
in the rows item 51 reported, with paired bootstrap differences on the same questions.

    .venv/bin/python docs/dev/compare_variants.py LABEL=OUT [LABEL=OUT ...] [--json FILE]

OUT is a variant_from_stage1 output directory (its result.json). Prints a markdown table: accuracy, by chain
length (N = 1, the longest N, N = 6-8) and by family; the lookup chains' first wrong step by kind (with the step
positions); how often a segment picks its view (chance: one over the views); the alignment loss first -> last
window of training beside the mean-feature projector's loss. Then every variant against the first
(`valr.demo.stats.paired_difference`: a 95% interval over resampled questions, one seed's sampling error only).
``--json FILE`` also writes there the table, the differences and each run's result.json (without the
(length, score) pairs of its plots; with its per-question scores, so that later runs can be paired with it).
"""

import argparse
import json
from pathlib import Path

from valr.demo.config import TARGET_NS
from valr.demo.stats import paired_difference


def pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def first_errors(errors: dict) -> str:
    """'15 move (steps 2-6), 4 found' from score_predictions' lookup_chain_errors."""
    parts = []
    for kind, by_pos in sorted(((k, v) for k, v in errors.items() if k != "chains"),
                               key=lambda kv: -sum(kv[1].values())):
        pos = sorted(int(p) for p in by_pos)
        where = f"step {pos[0]}" if len(pos) == 1 else f"steps {pos[0]}-{pos[-1]}"
        parts.append(f"{sum(by_pos.values())} {kind.replace('_', ' ')} ({where})")
    return ", ".join(parts) or "none"


def rows(result: dict) -> dict[str, str]:
    ev, train, views = result["eval"], result["train"], result.get("segment_views") or {}
    items = ev["_items"].values()
    longest = max(int(n) for n in ev["accuracy_by_n"])
    long_scores = [s for n, s in items if n in TARGET_NS]
    fams = ev["accuracy_by_family"]
    align = (f"{train['align_first']:.3f} -> {train['align_last']:.3f} (mean feature "
             f"{train['mean_feature_loss']:.3f})" if "align_first" in train and "mean_feature_loss" in train else "")
    return {
        "accuracy": f"**{pct(ev['accuracy'])}**",
        f"N = 1 / N = {longest} / N = 6-8": " / ".join([pct(ev["accuracy_by_n"].get("1")),
                                                         pct(ev["accuracy_by_n"][str(longest)]),
                                                         pct(sum(long_scores) / len(long_scores))
                                                         if long_scores else ""]),
        " / ".join(fams): " / ".join(f"{100 * v:.0f}" for v in fams.values()),
        f"lookup chains' first wrong step (of {ev['lookup_chain_errors']['chains']})":
            first_errors(ev["lookup_chain_errors"]),
        "segments pick their view": pct(views.get("picks_view")),
        "alignment loss first -> last": align,
        "validation CE, last / best (its step)": (f"{train['val']['val/ce']:.4f} / {train['best']['val/ce']:.4f} "
                                                  f"({train['best']['step']})" if "best" in train else ""),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="LABEL=OUT")
    ap.add_argument("--json", type=Path, help="also write the table and the differences here")
    args = ap.parse_args()
    runs, outs = {}, {}
    for arg in args.runs:
        label, sep, out = arg.partition("=")
        if not sep:
            ap.error(f"{arg!r}: give LABEL=OUT, e.g. layer3=runs/chains_l3")
        path = Path(out) / "result.json"
        if not path.is_file():
            ap.error(f"{path} not found: is {out} a finished docs/dev/variant_from_stage1.py output?")
        runs[label], outs[label] = json.loads(path.read_text()), out
    table = {label: rows(r) for label, r in runs.items()}
    names = list(dict.fromkeys(k for t in table.values() for k in t))
    print("| | " + " | ".join(table) + " |")
    print("|---|" + "---|" * len(table))
    for name in names:
        print(f"| {name} | " + " | ".join(t.get(name, "") for t in table.values()) + " |")
    base, *others = runs
    diffs = {}
    for label in others:
        a, b = runs[label]["eval"]["_items"], runs[base]["eval"]["_items"]
        for scope, ns in (("all", None), ("N = 6-8", TARGET_NS)):
            d = paired_difference(a, b, ns)
            diffs[f"{label} - {base}, {scope}"] = d
            print(f"{label} - {base}, {scope}: {100 * d['difference']:+.1f} points "
                  f"(95% {100 * d['ci95'][0]:+.1f} to {100 * d['ci95'][1]:+.1f}, {d['n']} questions)")
    if args.json:
        results = {label: {**r, "eval": {k: v for k, v in r["eval"].items() if not k.startswith("_pairs")}}
                   for label, r in runs.items()}
        args.json.write_text(json.dumps({"runs": outs, "table": table, "differences": diffs, "results": results},
                                        indent=1))


if __name__ == "__main__":
    main()
