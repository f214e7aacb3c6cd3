"""Development figure of docs/results.md (item 72): runs of `docs/dev/reading_run.py` side by side, so that the
step at which a text begins to read its latents can be seen rather than read off a table.

    .venv/bin/python docs/dev/reading_plot.py OUT.png --run LABEL RUN_OUT ROWS [--run LABEL RUN_OUT ROWS ...]

RUN_OUT is a reading run's OUT directory (its training history), ROWS the JSON-lines file its ``--report --rows``
wrote. Steps are counted in all (an alignment warm-up included). Panels: the training CE and alignment (100-step
means of the reading stage), and per checkpoint on held-out reading records the CE and the share of object words
read right, each with own images (solid) and with swapped ones (dashed). Where the two part, the text reads
its latents.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from reading_run import window_mean  # docs/dev, beside this script  # noqa: E402

from valr.trainer import read_log  # noqa: E402


def means(run_out: Path, every: int = 100) -> tuple[list[int], list[float], list[float]]:
    """(step in all, CE, alignment) of the reading stage, each a mean over ``every`` steps."""
    warm = run_out / "align_first" / "run"
    offset = max((h["step"] for h in read_log(warm)), default=0)  # 0 without a warm-up
    hist = read_log(run_out / "read" / "run")
    steps, ce, align = [], [], []
    for end in range(every, hist[-1]["step"] + 1, every):
        m = window_mean(hist, end, every)
        steps.append(offset + end)
        ce.append(m["ce"])
        align.append(m["align"])
    return steps, ce, align


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("png", type=Path)
    ap.add_argument("--run", nargs=3, action="append", required=True, metavar=("LABEL", "RUN_OUT", "ROWS"))
    a = ap.parse_args()
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for i, (label, run_out, rows_file) in enumerate(a.run):
        colour = f"C{i}"
        steps, ce, align = means(Path(run_out))
        axes[0].plot(steps, ce, color=colour, label=label)
        if any(align):
            axes[1].plot(steps, align, color=colour, label=label)
        rows = [json.loads(x) for x in Path(rows_file).read_text().splitlines() if x.strip()]
        rows = sorted((r for r in rows if r["part"] != "align_first"), key=lambda r: r["in_all"])
        x = [r["in_all"] for r in rows]
        for ax, own, swapped in ((axes[2], "ce_own", "ce_swapped"), (axes[3], "object_own", "object_swapped")):
            ax.plot(x, [r[own] for r in rows], color=colour, marker="o", ms=3, label=f"{label}, own images")
            ax.plot(x, [r[swapped] for r in rows], color=colour, ls="--", marker="x", ms=3,
                    label=f"{label}, swapped images")
    titles = ("training CE (100-step means)", "training alignment (1 - cos)", "held-out CE", "object words right")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step (warm-up included)", fontsize=8)
        ax.legend(fontsize=7)
    axes[0].set_ylim(0, 0.6)
    axes[2].set_ylim(0, 0.6)
    fig.tight_layout()
    fig.savefig(a.png, dpi=110)
    print(f"wrote {a.png}")


if __name__ == "__main__":
    main()
