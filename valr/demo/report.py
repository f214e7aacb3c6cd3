"""The demo's written outputs: ``results.json`` (compact JSON, packed length pairs), ``report.md`` and the
figures (accuracy per variant, by chain length, by generated length, by test-time K, by step position)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from valr.demo.config import VARIANTS


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_all(results: dict[str, Any], fig_dir: Path, length_report: dict[str, Any] | None,
             errors: dict[str, Any] | None = None) -> list[str]:
    """The four figures of the issue plus the per-step accuracy curve; returns the written file names."""
    plt = _plt()
    fig_dir.mkdir(parents=True, exist_ok=True)
    written = []
    variants = results["variants"]
    names = [v for v in VARIANTS if v in variants]
    extra = {}
    frac = variants.get("valr_s", {}).get("data_fraction", {})
    for key, m in frac.items():
        if float(key) < 1.0:  # a summary's fraction may come from fewer seeds: name them and SFT's mean on them
            on = (f"\nseeds {', '.join(map(str, m['seeds']))}; sft {100 * m['sft_accuracy']:.1f}"
                  if "seeds" in m and "sft_accuracy" in m else "")
            extra[f"valr_s ({float(key):.0%} data){on}"] = m
    err = errors or {}

    def finish(ax, xlabel: str, title: str, ylabel: str = "test accuracy (%)"):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(fig_dir / name, dpi=100)
        plt.close(fig)
        written.append(name)

    # 1. accuracy per variant
    fig, ax = plt.subplots(figsize=(6, 3.6))
    labels = names + list(extra)
    vals = [100 * variants[n]["accuracy"] for n in names] + [100 * m["accuracy"] for m in extra.values()]
    yerr = [100 * err.get(n, {}).get("accuracy", 0.0) for n in names] + [0.0] * len(extra)
    ax.bar(range(len(labels)), vals, yerr=yerr if any(yerr) else None, capsize=3,
           color=["#999999", "#d98c3f", "#2e8b57", "#1f5f8b", "#7fbf9f"][:len(labels)])
    for i, v in enumerate(vals):
        ax.text(i, v + 1, f"{v:.1f}", ha="center", fontsize=8)
    if results.get("prior_baseline"):
        ax.axhline(100 * results["prior_baseline"]["accuracy"], color="#cc3333", linestyle=":",
                   label="answer prior (no model)")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xticks(range(len(labels)), labels, rotation=15, fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(results.get("title", "accuracy per variant"), fontsize=9)
    save(fig, "accuracy_per_variant.png")

    # 2. accuracy by N
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for n in names + list(extra):
        m = variants.get(n) or extra[n]
        xs = sorted(int(k) for k in m["accuracy_by_n"])
        ys = [100 * m["accuracy_by_n"][str(x)] for x in xs]
        e = err.get(n, {}).get("accuracy_by_n")
        if e:
            ax.errorbar(xs, ys, yerr=[100 * e.get(str(x), 0) for x in xs], marker="o", capsize=2, label=n)
        else:
            ax.plot(xs, ys, marker="o", label=n, linestyle="--" if n in extra else "-")
    if results.get("prior_baseline"):
        pb = results["prior_baseline"]["accuracy_by_n"]
        xs = sorted(int(k) for k in pb)
        ax.plot(xs, [100 * pb[str(x)] for x in xs], color="#cc3333", linestyle=":", label="answer prior")
    finish(ax, "chain length N (reasoning steps)", "accuracy by chain length (dilution curve)")
    save(fig, "accuracy_by_n.png")

    # 3. accuracy by generated length
    if length_report:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for n, res in length_report["models"].items():
            pts = [((b["lo"] + b["hi"]) / 2, 100 * b["accuracy"]) for b in res["buckets"] if b["n"] >= 5]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", label=n)
        finish(ax, "generated length (text tokens, markers included; buckets with >= 5 items)",
               "accuracy by generated length (paper Fig. 2 analysis)")
        save(fig, "accuracy_by_length.png")

    # 4. accuracy vs test-time K
    by_k = variants.get("valr_s", {}).get("accuracy_by_k")
    if by_k:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        xs = sorted(int(k) for k in by_k)
        ys = [100 * by_k[str(x)] for x in xs]
        e = err.get("valr_s", {}).get("accuracy_by_k")
        ax.errorbar(xs, ys, yerr=[100 * e.get(str(x), 0) for x in xs] if e else None, marker="o", capsize=2,
                    color="#2e8b57", label="valr_s")
        if "sft" in variants:
            ax.axhline(100 * variants["sft"]["accuracy"], color="#999999", linestyle=":", label="sft")
        ax.axvline(results["config"]["k"], color="#cccccc", linestyle="--", label="training K")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        finish(ax, "latent positions per segment at test time (K)", "VaLR-S: accuracy vs test-time K")
        save(fig, "accuracy_by_k.png")

    # 5. per-step accuracy by step position (given the earlier steps right)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for n in names:
        m = variants[n].get("step_accuracy_by_position")
        if m:
            xs = sorted(int(k) for k in m)
            ax.plot(xs, [100 * m[str(x)] for x in xs], marker="o", label=n)
    finish(ax, "step position i", "per-step lookup accuracy by position",
           ylabel="step i exactly right | steps < i right (%)")
    save(fig, "step_accuracy_by_position.png")
    return written


def _xerr(center: float, ci: list[float] | None) -> list[list[float]] | None:
    """An interval around ``center`` (fractions) as matplotlib's asymmetric error bar in points."""
    return [[100 * (center - ci[0])], [100 * (ci[1] - center)]] if ci else None


def plot_differences(uncertainty: dict[str, Any], fig_dir: Path, name: str = "differences.png") -> str | None:
    """Each comparison's per-seed differences (bars: the seed's paired 95% interval over its test questions,
    where its results carry one) and their mean with the 95% Student-t interval over seeds, in points, with the
    +-5-point lines of the targets. Returns the file name, or None without comparisons."""
    if not uncertainty:
        return None
    plt = _plt()
    fig_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 1.5 + 0.8 * len(uncertainty)))
    for row, u in enumerate(uncertainty.values()):
        y = len(uncertainty) - 1 - row
        seeds = list(u["per_seed"].items())
        for j, (s, d) in enumerate(seeds):
            dy = 0.12 * (j - (len(seeds) - 1) / 2)
            ax.errorbar(100 * d["difference"], y + 0.25 + dy, xerr=_xerr(d["difference"], d.get("ci95")), fmt="o",
                        ms=4, capsize=2, color="#7f7f7f",
                        label="one seed (bar: paired 95% over its questions)" if row == j == 0 else None)
            ax.annotate(f"s{s}", (100 * d["difference"], y + 0.25 + dy), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
        o = u["over_seeds"]
        ax.errorbar(100 * o["mean"], y - 0.15, xerr=_xerr(o["mean"], o["ci95"]), fmt="s", ms=6, capsize=3,
                    color="#1f5f8b",
                    label="mean of seeds (bar: 95% Student t)" if row == 0 else None)
    for x, style in ((0, "-"), (5, ":"), (-5, ":")):
        ax.axvline(x, color="#cc3333" if x else "#333333", linestyle=style, linewidth=0.8)
    ax.set_yticks(range(len(uncertainty)),
                  [f"{k}\n({u['a']} - {u['b']}, {u['on']})" for k, u in reversed(list(uncertainty.items()))],
                  fontsize=7)
    ax.set_xlabel("difference in accuracy (points)")
    ax.set_title("how sure: per-seed differences and their mean over seeds", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(fig_dir / name, dpi=100)
    plt.close(fig)
    return name


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def write_report(results: dict[str, Any], path: Path, fig_names: list[str]) -> None:
    v = results["variants"]
    names = [n for n in VARIANTS if n in v]
    ns = sorted({int(k) for n in names for k in v[n]["accuracy_by_n"]})
    quick_note = ", QUICK smoke run: no accuracy claims" if results["quick"] else ""
    lines = [f"# valr demo report (seed {results['seed']}{quick_note})",
             "", f"Machine: {results['machine']}.  Total {results['total_seconds']:.0f} s.", "",
             f"## Accuracy on the {results.get('eval_split', 'test')} split (%)", "",
             "| variant | overall | " + " | ".join(f"N={n}" for n in ns) + " | N>=6 |",
             "|---|---|" + "---|" * len(ns) + "---|"]
    for n in names:
        m = v[n]
        lines.append(f"| {n} | {_pct(m['accuracy'])} | " + " | ".join(_pct(m['accuracy_by_n'].get(str(x))) for x in ns)
                     + f" | {_pct(m.get('accuracy_long'))} |")
    prior = results.get("prior_baseline")
    if prior:
        lines.append(f"| answer prior (no model) | {_pct(prior['accuracy'])} | "
                     + " | ".join(_pct(prior['accuracy_by_n'].get(str(x))) for x in ns)
                     + f" | {_pct(prior.get('accuracy_long'))} |")
    for key, m in v.get("valr_s", {}).get("data_fraction", {}).items():
        if float(key) < 1.0:
            lines.append(f"| valr_s ({float(key):.0%} data) | {_pct(m['accuracy'])} | "
                         + " | ".join(_pct(m['accuracy_by_n'].get(str(x))) for x in ns)
                         + f" | {_pct(m.get('accuracy_long'))} |")
    by_k = v.get("valr_s", {}).get("accuracy_by_k")
    if by_k:
        lines += ["", "VaLR-S accuracy by test-time K: " + ", ".join(f"K={k}: {_pct(a)}" for k, a in by_k.items())]
    if "learned_the_task" in results:
        lines += ["", "Learned the task (best variant >= 5 points above the answer prior): "
                  f"{'yes' if results['learned_the_task'] else 'NO -- the comparisons below are at the prior level'}"]
    dep = {n: m.get("image_dependence") for n, m in v.items() if m.get("image_dependence")}
    if dep:
        lines += ["", "Image dependence (validation CE with own vs swapped images; gap ~0 = images ignored): "
                  + ", ".join(f"{n} {d['ce_own_images']:.3f}/{d['ce_swapped_images']:.3f}" for n, d in dep.items())]
    step1 = {n: m.get("step_accuracy_by_position", {}).get("1") for n, m in v.items()}
    lines += ["", "First reasoning step exactly right: " + ", ".join(f"{n} {_pct(a)}" for n, a in step1.items())]
    errs = {n: m["lookup_chain_errors"] for n, m in v.items() if m.get("lookup_chain_errors", {}).get("chains")}
    if errs:
        lines += ["", "Lookup chains (chase, where, tally) by their first wrong step, what it got wrong (chains; "
                  "`kind: {step position: chains}`): "
                  + "; ".join(f"{n} of {e['chains']}: " + (", ".join(f"{k} {json.dumps(e[k])}" for k in e
                                                                   if k != "chains") or "none")
                              for n, e in errs.items())]
    views = results.get("reading", {}).get("valr_s", {}).get("segment_views", {})
    if views.get("align_own_map"):
        rows = " / ".join(f"{sum(r) / len(r):.2f}" for r in views["align_own_map"])
        lines += ["", f"VaLR-S latent segments, teacher-forced on validation records: pick their view "
                  f"{_pct(views.get('picks_view'))}% of the time; alignment loss against their view "
                  f"{views['align_own']:.3f} (other views {views['align_other']:.3f}), by row of the teacher's "
                  f"grid {rows} (a row left at the no-image level is one the latents do not render)"]
    lines += ["", "## Targets", ""]
    for name, t in results.get("targets", {}).items():
        shown = {k: (round(x, 4) if isinstance(x, float) else x) for k, x in t.items()}
        lines.append(f"- {name}: {'MET' if t.get('met') else 'not met'} {json.dumps(shown)}")
    if "valr_s_small_data_matches_sft_full" not in results.get("targets", {}):
        lines.append("- valr_s_small_data_matches_sft_full: not measured (rerun with data_fraction=0.25)")
    if results.get("paired"):
        lines += ["", "How sure (a - b in points, 95% interval from resampling this split's questions, paired; one "
                  "seed, so training noise is not in it): "
                  + "; ".join(f"{name} {100 * p['difference']:+.1f} [{100 * p['ci95'][0]:+.1f}, "
                              f"{100 * p['ci95'][1]:+.1f}] over {p['n']}" for name, p in results["paired"].items())]
    lines += ["", "## Training", "", "| stage | steps | ce first -> last | align first -> last | seconds |",
              "|---|---|---|---|---|"]
    for name, t in results.get("training", {}).items():
        ce = f"{t.get('ce_first', float('nan')):.3f} -> {t.get('ce_last', float('nan')):.3f}"
        al = (f"{t['align_first']:.3f} -> {t['align_last']:.3f}" if t.get("align_last") else "-")
        steps = f"{t.get('steps')}" + (f" (kept {t['best']['step']}: lowest val CE)" if t.get("best") else "")
        lines.append(f"| {name} | {steps} | {ce} | {al} | {results['stage_seconds'].get(name, 0):.0f} |")
    lines += ["", "Stage seconds: " + ", ".join(f"{k} {s:.0f}" for k, s in results["stage_seconds"].items()), ""]
    for f in fig_names:
        lines.append(f"![{f}](figures/{f})")
    path.write_text("\n".join(lines) + "\n")


def dump_json(obj: Any, indent: int = 2) -> str:
    """JSON indented like ``json.dumps(indent=2)`` except that a list holding no list or object stays on one line,
    so a results file's per-item lists (``length_pairs``) and short vectors (``test_ks``) stay small in git."""
    def enc(o: Any, level: int) -> str:
        pad, end = " " * (indent * (level + 1)), " " * (indent * level)
        if isinstance(o, dict) and o:
            items = [f"{pad}{json.dumps(k if isinstance(k, str) else json.dumps(k))}: {enc(v, level + 1)}"
                     for k, v in o.items()]
            return "{\n" + ",\n".join(items) + "\n" + end + "}"
        if isinstance(o, (list, tuple)) and any(isinstance(x, (dict, list, tuple)) for x in o):
            return "[\n" + ",\n".join(pad + enc(x, level + 1) for x in o) + "\n" + end + "]"
        return json.dumps(o, default=str)

    return enc(obj, 0) + "\n"


def pack_pairs(pairs: list) -> dict[str, list[float]]:
    """(generated tokens, score) pairs as two parallel lists (one line each in :func:`dump_json`)."""
    return {"tokens": [x for x, _ in pairs], "scores": [y for _, y in pairs]}


def unpack_pairs(packed: dict[str, list[float]]) -> list[tuple[float, float]]:
    return list(zip(packed["tokens"], packed["scores"], strict=True))
