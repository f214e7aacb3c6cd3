"""Several seeds: run them (:func:`run_seeds`) or merge seeds that ran apart (:func:`merge_runs`), and summarise
them into means, spreads, targets on the means and seed-mean figures (:func:`summarize`)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from valr.demo.config import VARIANTS, DemoConfig
from valr.demo.pipeline import run_demo
from valr.demo.report import dump_json, pack_pairs, plot_all, plot_differences, unpack_pairs
from valr.demo.scoring import check_targets
from valr.demo.stages import _log
from valr.demo.stats import mean_std as _mean_std
from valr.demo.stats import seed_uncertainty
from valr.tiny import QWEN2_ROPE_THETA


def _fraction_means(runs: dict[str, dict[str, Any]], seeds: list[str]) -> dict[str, dict[str, Any]]:
    """VaLR-S's data-efficiency runs, each fraction averaged over the seeds that ran it (a seed may have run
    without ``data_fraction``), with those ``seeds`` and SFT's mean on them (``sft_accuracy``), which the target
    compares against: both sides over the same seeds."""
    fracs = {s: runs[s]["variants"].get("valr_s", {}).get("data_fraction", {}) for s in seeds}
    out: dict[str, dict[str, Any]] = {}
    for key in sorted({k for f in fracs.values() for k in f}, key=float):
        have = [s for s in seeds if key in fracs[s]]
        vs = [fracs[s][key] for s in have]
        by_n = [k for k in vs[0].get("accuracy_by_n", {}) if all(k in v.get("accuracy_by_n", {}) for v in vs)]
        out[key] = {"accuracy": _mean_std([v["accuracy"] for v in vs])[0],
                    "accuracy_by_n": {k: _mean_std([v["accuracy_by_n"][k] for v in vs])[0] for k in by_n},
                    "seeds": [int(s) for s in have]}
        if all("sft" in runs[s]["variants"] for s in have):
            out[key]["sft_accuracy"] = _mean_std([runs[s]["variants"]["sft"]["accuracy"] for s in have])[0]
    return out


def _sum_counts(dicts: list[dict[str, Any]]) -> dict[str, Any]:
    """Nested dicts of counts added key by key (``{"chains": 300, "move": {"6": 3}}`` over seeds)."""
    out: dict[str, Any] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = _sum_counts([out.get(k, {}), v]) if isinstance(v, dict) else out.get(k, 0) + v
    return out


def summarize(runs: dict[str, dict[str, Any]], command: str | None = None) -> dict[str, Any]:
    """Several seeds' results -> {"runs", "means", "std", "targets" (on the means and per seed)}."""
    seeds = sorted(runs, key=int)
    means: dict[str, Any] = {}
    stds: dict[str, Any] = {}
    names = [n for n in VARIANTS if all(n in runs[s]["variants"] for s in seeds)]
    for n in names:
        ms: dict[str, Any] = {}
        sd: dict[str, Any] = {}
        vs = [runs[s]["variants"][n] for s in seeds]
        for key in ("accuracy", "accuracy_long"):
            vals = [v[key] for v in vs if v.get(key) is not None]
            if len(vals) == len(vs):
                ms[key], sd[key] = _mean_std(vals)
        for key in ("accuracy_by_n", "accuracy_by_k", "step_accuracy_by_position", "accuracy_by_family"):
            if all(key in v for v in vs):
                common = [k for k in vs[0][key] if all(k in v[key] and v[key][k] is not None for v in vs)]
                ms[key] = {k: _mean_std([v[key][k] for v in vs])[0] for k in common}
                sd[key] = {k: _mean_std([v[key][k] for v in vs])[1] for k in common}
        if n == "valr_s":
            fr = _fraction_means(runs, seeds)
            if fr:
                ms["data_fraction"] = fr
        if all("lookup_chain_errors" in v for v in vs):  # counts: summed over the seeds, not averaged
            ms["lookup_chain_errors"] = _sum_counts([v["lookup_chain_errors"] for v in vs])
        means[n] = ms
        stds[n] = sd
    if all("prior_baseline" in runs[s] for s in seeds):
        pv = [runs[s]["prior_baseline"] for s in seeds]
        means_prior = {"accuracy": _mean_std([p["accuracy"] for p in pv])[0],
                       "accuracy_by_n": {k: _mean_std([p["accuracy_by_n"][k] for p in pv])[0]
                                         for k in pv[0]["accuracy_by_n"]}}
    else:
        means_prior = None
    per_seed = {s: runs[s].get("targets", {}) for s in seeds}
    reading_mean = None
    if all("reading" in runs[s] for s in seeds):
        stages = [n for n in runs[seeds[0]]["reading"] if all(n in runs[s]["reading"] for s in seeds)]
        def mean_of(values: list[Any]) -> Any:
            """Floats averaged; dicts (per family) per shared key; lists (grid maps) per element, if one shape."""
            if isinstance(values[0], dict):
                keys = [k for k in values[0] if all(k in v for v in values)]
                return {k: mean_of([v[k] for v in values]) for k in keys}
            if isinstance(values[0], list):
                if any(len(v) != len(values[0]) for v in values):
                    return None
                return [mean_of(list(column)) for column in zip(*values, strict=True)]
            return _mean_std(values)[0]

        reading_mean = {n: {k: mean_of([runs[s]["reading"][n][k] for s in seeds])
                            for k in runs[seeds[0]]["reading"][n] if all(k in runs[s]["reading"][n] for s in seeds)}
                        for n in stages}
    return {
        "command": command,
        "seeds": [int(s) for s in seeds],
        "runs": runs,
        "means": means,
        "std": stds,
        "prior_baseline_mean": means_prior,
        "reading_mean": reading_mean,
        "targets_on_means": check_targets(means, n_hi=runs[seeds[0]]["config"]["n_max"]),
        "targets_per_seed": per_seed,
        # each comparison's per-seed differences and a Student-t interval over the seeds (training noise included)
        "uncertainty": seed_uncertainty({s: runs[s] for s in seeds}),
        "stage_seconds_mean": {k: _mean_std([runs[s]["stage_seconds"].get(k, 0.0) for s in seeds])[0]
                               for k in runs[seeds[0]]["stage_seconds"]},
        "total_seconds": {s: runs[s]["total_seconds"] for s in seeds},
        "length_pairs_seeds": [int(s) for s in seeds if runs[s].get("length_pairs")],
    }


def plot_summary(summary: dict[str, Any], fig_dir: Path) -> list[str]:
    first = summary["runs"][str(summary["seeds"][0])]
    results = {"variants": summary["means"], "config": first["config"],
               "prior_baseline": summary.get("prior_baseline_mean"),
               "title": f"accuracy per variant, mean of seeds {summary['seeds']} (error bar: std over seeds)"}
    lrep = None
    # the length analysis pools the items of all seeds on shared bucket edges
    from valr.eval.length import length_report

    pooled: dict[str, list] = defaultdict(list)
    for s in summary["seeds"]:
        for n, packed in summary["runs"][str(s)].get("length_pairs", {}).items():
            pooled[n] += unpack_pairs(packed)
    if pooled:
        lrep = length_report(pooled, n_buckets=8)
    written = plot_all(results, fig_dir, lrep, errors=summary["std"])
    diff = plot_differences(summary.get("uncertainty", {}), fig_dir)
    return written + [diff] if diff else written


def run_seeds(out: str | Path, seeds: list[int], quick: bool = False, summary_path: str | Path | None = None,
              figures: str | Path | None = None, command: str | None = None, scale: float = 1.0,
              overrides: list[str] = ()) -> dict[str, Any]:
    """Run the demo for each seed into ``out/seed-S`` (each cached on its own), then summarise."""
    out = Path(out)
    runs = {}
    for s in seeds:
        _log(f"=== seed {s} ===")
        runs[str(s)] = load_run(run_demo(out / f"seed-{s}", seed=s, quick=quick, scale=scale, overrides=overrides),
                                out / f"seed-{s}")
    return write_summary(runs, command, out / "summary.json", summary_path,
                         figures=Path(figures) if figures else out / "figures")


def write_summary(runs: dict[str, dict[str, Any]], command: str | None, *paths: str | Path | None,
                  figures: Path | None = None) -> dict[str, Any]:
    """Summarise ``runs``, draw the seed-mean figures into ``figures`` and write the summary to each path given."""
    summary = summarize(runs, command)
    if figures is not None:
        summary["figures"] = plot_summary(summary, figures)
    text = dump_json(summary)
    written = []
    for p in paths:
        if p:
            Path(p).parent.mkdir(parents=True, exist_ok=True)
            Path(p).write_text(text)
            written.append(str(p))
    _log(f"summary of seeds {summary['seeds']}: {' and '.join(written)}")
    return summary


def load_run(results: dict[str, Any], run_dir: Path | None = None) -> dict[str, Any]:
    """One seed's results for a summary, with its ``length_pairs`` (read from ``run_dir``'s evaluations when the
    results predate them)."""
    if not results.get("length_pairs") and run_dir is not None:
        pairs = {}
        for n in VARIANTS:
            f = run_dir / "eval" / n / "metrics.json"
            if f.is_file():
                pairs[n] = pack_pairs(json.loads(f.read_text())["_pairs_tokens"])
        results = {**results, "length_pairs": pairs}
    return results


# keys of the config that may differ between the seeds of one study (everything else is the recipe): the seed,
# and data_fraction, which only adds the data-efficiency runs (stage 1 + VaLR-S on a fraction of the records) beside
# the same variants; the summary averages each fraction over the seeds that ran it (a seed of the full recipe takes
# about three hours on 2 cores with its variants one after another, the fraction runs about an hour more, so a
# session may leave them out); variant_workers, which says how the variants ran, not what they are; and
# pause_control, which only adds the pause-token control beside the same variants; fraction_best, which only says
# which model the data-efficiency runs keep
SEED_KEYS = ("seed", "data_fraction", "variant_workers", "pause_control", "fraction_best")


# how a run whose results predate an option ran without it (older results.json files lack the key)
ABSENT_MEANS: dict[str, Any] = {"fixed_options": False, "latent_feed": "hidden", "step_targets": "view",
                                "center_targets": False, "latent_after": None, "find_oneview_steps": 0,
                                "find_steps": 0, "vision_position_heads": False, "stage0_max_extensions": 0,
                                "tally_counts": False, "align_first_steps": 0,
                                "latent_positions": "text", "rope_theta": QWEN2_ROPE_THETA}


def merge_runs(paths: list[str | Path]) -> dict[str, dict[str, Any]]:
    """Seeds run apart (other machines, other days) gathered for one summary. Each path is a demo output directory,
    its ``results.json`` or a summary (``--summary`` / ``OUT/summary.json``: all its seeds). Every seed must come
    from the same recipe: a config that differs in anything but the seed is an error naming the keys, as is a seed
    given twice."""
    from valr.config import ConfigError

    runs: dict[str, dict[str, Any]] = {}
    origin: dict[str, str] = {}
    for raw in paths:
        p = Path(raw)
        f = p / "results.json" if p.is_dir() else p
        if not f.is_file():
            raise ConfigError(f"--merge {raw}: no such results file or demo output directory (a directory needs a "
                              "results.json: run `valr demo --out DIR` to the end first)")
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"--merge {f}: not valid JSON ({e})") from e
        if isinstance(data, dict) and isinstance(data.get("runs"), dict):
            found = {str(s): r for s, r in data["runs"].items()}
        elif isinstance(data, dict) and "seed" in data and "variants" in data and "config" in data:
            found = {str(data["seed"]): load_run(data, p if p.is_dir() else f.parent)}
        else:
            raise ConfigError(f"--merge {f}: neither a demo results.json (keys seed, config, variants) nor a summary "
                              "(key runs)")
        for seed, r in found.items():
            if r.get("quick"):
                raise ConfigError(f"--merge {f}: seed {seed} is a --quick smoke run; a study merges full runs only")
            if seed in runs:
                raise ConfigError(f"--merge: seed {seed} is in both {origin[seed]} and {f}; give each seed once")
            runs[seed], origin[seed] = r, str(f)
    if not runs:
        raise ConfigError("--merge: give at least one results file")
    # a key missing from an older results file is an option added since: it ran as ABSENT_MEANS says, or (for the
    # settings of a stage it did not have) as anything, read as today's default
    defaults = {**json.loads(json.dumps(DemoConfig().to_dict())), **ABSENT_MEANS}

    def recipe_of(r: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in {**defaults, **r["config"]}.items() if k not in SEED_KEYS}

    first = min(runs, key=int)
    recipe = recipe_of(runs[first])
    for seed, r in runs.items():
        other = recipe_of(r)
        diff = sorted(k for k in set(recipe) | set(other) if recipe.get(k, "<absent>") != other.get(k, "<absent>"))
        if diff:
            shown = ", ".join(f"{k}: {recipe.get(k, '<absent>')!r} vs {other.get(k, '<absent>')!r}" for k in diff[:6])
            raise ConfigError(f"--merge: seed {seed} ({origin[seed]}) ran another recipe than seed {first} "
                              f"({origin[first]}): {shown}; a summary averages one recipe's seeds")
    return runs
