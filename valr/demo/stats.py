"""How sure the demo's comparisons are: a paired bootstrap over one seed's test questions (the test split is
sampled, so one seed's difference has a sampling error), and a Student-t interval over seeds (training differs
by seed, which the bootstrap does not see). Both are needed to read a 5-point target on a 400-question split."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from valr.demo.scoring import TARGET_NS

# one seed's comparisons: (name, variant a, variant b, chain lengths or None for all): a - b
PAIRS = (("valr_s_vs_sft_long", "valr_s", "sft", TARGET_NS),
         ("latent_no_align_vs_sft", "latent_no_align", "sft", None),
         ("valr_s_vs_sft", "valr_s", "sft", None),
         ("valr_s_vs_latent_no_align", "valr_s", "latent_no_align", None))  # what the alignment adds


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0.0 for a single value)."""
    m = sum(values) / len(values)
    sd = (sum((x - m) ** 2 for x in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return m, sd


def paired_difference(a: Mapping[str, tuple[int, float]], b: Mapping[str, tuple[int, float]],
                      ns: Iterable[int] | None = None, n_boot: int = 4000, seed: int = 0) -> dict[str, Any]:
    """Mean score of ``a`` minus ``b`` over the same questions (``{id: (chain length, score)}``, restricted to
    chain lengths ``ns`` when given), with a 95% percentile interval from resampling the questions (paired: one
    draw picks a question for both)."""
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))[:3]
        raise ValueError(f"paired difference needs the same questions on both sides; {len(set(a) ^ set(b))} differ "
                         f"(e.g. {only}): evaluate both variants on the same split and eval_limit")
    keep = set(ns) if ns is not None else None
    ids = sorted(i for i in a if keep is None or a[i][0] in keep)
    if not ids:
        raise ValueError(f"no questions with chain lengths {sorted(keep or ())} to compare")
    d = np.array([a[i][1] - b[i][1] for i in ids], dtype=np.float64)
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"difference": float(d.mean()), "ci95": [float(lo), float(hi)], "n": len(ids),
            "mean_a": float(np.mean([a[i][1] for i in ids])), "mean_b": float(np.mean([b[i][1] for i in ids]))}


def paired_comparisons(items: Mapping[str, Mapping[str, tuple[int, float]]],
                       extra: Iterable[tuple[str, str, str, tuple[int, ...] | None]] = ()) -> dict[str, Any]:
    """Every comparison of :data:`PAIRS` (and ``extra`` ones, in the same form) whose two variants were evaluated
    on questions of its chain lengths (``items``: variant -> its questions; a short-chain run such as --quick
    has no long-chain comparison)."""
    def has(x: str, ns: tuple[int, ...] | None) -> bool:
        return x in items and any(ns is None or n in ns for n, _ in items[x].values())

    return {name: {"a": x, "b": y, **paired_difference(items[x], items[y], ns)}
            for name, x, y, ns in (*PAIRS, *extra) if has(x, ns) and y in items}


@functools.lru_cache(maxsize=256)
def t_quantile(df: int, p: float = 0.975) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF, which is the
    integral of the density by Simpson's rule; accurate to about 1e-6 for the 95% intervals used here)."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float) -> float:
        # substitute x = tan(u): the density times sec^2 is smooth on [0, atan(x)] even for df = 1
        m, top = 400, math.atan(x)
        h = top / m
        f = [c * (1 + math.tan(u) ** 2 / df) ** (-(df + 1) / 2) / math.cos(u) ** 2
             for u in (i * h for i in range(m + 1))]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def seed_interval(values: list[float], half_width: float = 0.05) -> dict[str, Any]:
    """Mean of per-seed values with a 95% Student-t interval over seeds, and how many seeds a 95% interval of
    ``half_width`` would take at this spread (``seeds_for_half_width``; None below two seeds or at zero spread)."""
    n = len(values)
    mean, sd = mean_std(values)
    out: dict[str, Any] = {"values": list(values), "mean": mean, "sd": None, "ci95": None,
                           "seeds_for_half_width": None, "half_width": half_width}
    if n < 2:
        return out
    w = t_quantile(n - 1) * sd / math.sqrt(n)
    out.update(sd=sd, ci95=[mean - w, mean + w])
    if sd > 0:
        k = 2
        while t_quantile(k - 1) * sd / math.sqrt(k) > half_width and k < 10_000:
            k += 1
        out["seeds_for_half_width"] = k
    return out


def seed_uncertainty(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per comparison of :data:`PAIRS`: each seed's difference (with its paired interval where the seed's
    results carry one) and the Student-t interval over the seeds."""
    out: dict[str, Any] = {}
    for name, x, y, ns in PAIRS:
        have = [s for s in runs if x in runs[s]["variants"] and y in runs[s]["variants"]]
        if not have:
            continue
        key = "accuracy_long" if ns else "accuracy"
        diffs = {s: runs[s]["variants"][x][key] - runs[s]["variants"][y][key] for s in have}
        out[name] = {"a": x, "b": y, "on": f"N in {list(ns)}" if ns else "all",
                     "per_seed": {s: {"difference": d,
                                      "ci95": runs[s].get("paired", {}).get(name, {}).get("ci95")}
                                  for s, d in diffs.items()},
                     "over_seeds": seed_interval(list(diffs.values()))}
    return out
