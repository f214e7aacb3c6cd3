"""Development figure of docs/results.md (item 77): runs of `docs/dev/bottleneck_toy.py` side by side, so that when
each run's alignment is learned and when its text begins to read its latents can be seen rather than read off a
table.

    .venv/bin/python docs/dev/toy_plot.py OUT.png --run LABEL JSON NAME [--run LABEL JSON NAME ...] [--pairs]

JSON is a results file in docs/results/ whose ``runs`` hold the toy's reports (``columns`` and ``rows``, as
`toy-4x4-item71.json`), NAME a run in it. Panels, per validation report: the alignment loss, the gap between
the CE with swapped images and with the record's own images (above zero where the text reads its latents), and
the colour accuracy (chance 25%), a 5-report running mean. ``--pairs`` draws the runs two by two (e.g. one
seed at two settings): the second of each pair dashed, in the first's colour.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from toy_log import ce_gaps, columns  # noqa: E402  (docs/dev, beside this script)


def running_mean(values: list[float], width: int = 5) -> list[float]:
    windows = (values[max(0, i - width + 1):i + 1] for i in range(len(values)))
    return [sum(w) / len(w) for w in windows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the PNG to write")
    ap.add_argument("--run", nargs=3, action="append", required=True, metavar=("LABEL", "JSON", "NAME"),
                    help="a curve: its legend label, a results JSON file and the run's name in it")
    ap.add_argument("--pairs", action="store_true", help="the runs come in pairs: draw each second run dashed, "
                    "in the colour of the run before it")
    args = ap.parse_args()
    if args.pairs and len(args.run) % 2:
        ap.error(f"--pairs needs an even number of --run, got {len(args.run)}")
    files = {path: json.loads(Path(path).read_text())["runs"] for _, path, _ in args.run}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, (label, path, name) in enumerate(args.run):
        # a pair shares its colour; its second run is dashed
        style = {"color": f"C{(i // 2 if args.pairs else i) % 10}", "ls": "--" if args.pairs and i % 2 else "-"}
        runs = files[path]
        if name not in runs:
            raise SystemExit(f"{path}: no run {name!r}; it holds {sorted(runs)}")
        col = columns(runs[name])
        if col["align"][0] is not None:  # an aligned run
            axes[0].plot(col["step"], col["align"], label=label, **style)
        axes[1].plot(col["step"], ce_gaps(col), label=label, **style)
        axes[2].plot(col["step"], running_mean(col["accuracy"]), label=label, **style)
    axes[0].set(title="alignment loss (validation)", xlabel="step", yscale="log")
    axes[1].set(title="CE swapped images - CE own images", xlabel="step")
    axes[2].set(title="colour accuracy (5-report mean; chance 0.25)", xlabel="step", ylim=(0, 1))
    axes[2].axhline(0.25, color="grey", lw=0.8, ls=":")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
