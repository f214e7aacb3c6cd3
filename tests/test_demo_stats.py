"""The demo's uncertainty: paired bootstrap over one split's questions, Student-t interval over seeds."""

from __future__ import annotations

import math

import pytest

from valr.demo.stats import paired_comparisons, paired_difference, seed_interval, seed_uncertainty, t_quantile


@pytest.mark.parametrize("df, table", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622),
                                       (30, 2.0423), (10_000, 1.9602)])
def test_t_quantile_matches_the_printed_table(df, table):
    assert t_quantile(df) == pytest.approx(table, abs=2e-4)


def test_t_quantile_other_levels_and_bad_df():
    assert t_quantile(5, 0.95) == pytest.approx(2.0150, abs=2e-4)
    assert t_quantile(2, 0.5) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="df >= 1"):
        t_quantile(0)


def _items(scores, ns):
    return {f"q{i}": (n, s) for i, (n, s) in enumerate(zip(ns, scores, strict=True))}


def test_paired_difference_is_the_mean_difference_with_a_resampled_interval():
    ns = [1, 6, 7, 8] * 25
    b = _items([float(i % 2) for i in range(100)], ns)
    a = _items([1.0] * 100, ns)  # right everywhere: +0.5 overall
    p = paired_difference(a, b)
    assert p["difference"] == pytest.approx(0.5) and p["n"] == 100
    assert p["mean_a"] == pytest.approx(1.0) and p["mean_b"] == pytest.approx(0.5)
    lo, hi = p["ci95"]
    # the bootstrap's spread is the difference's standard error: sd of 0/1 halves is 0.5, over 100 questions
    assert lo < 0.5 < hi and (hi - lo) / 2 == pytest.approx(1.96 * 0.5 / 10, rel=0.15)
    same = paired_difference(b, b)  # paired: identical answers differ by exactly zero in every resample
    assert same["difference"] == 0.0 and same["ci95"] == [0.0, 0.0]
    long = paired_difference(a, b, ns=(6, 7, 8))
    assert long["n"] == 75
    assert paired_difference(a, b, seed=3) == paired_difference(a, b, seed=3)  # seeded: reproducible


def test_paired_difference_refuses_different_questions():
    a = _items([1.0, 0.0], [1, 2])
    b = {"q0": (1, 1.0), "other": (2, 0.0)}
    with pytest.raises(ValueError, match="same questions"):
        paired_difference(a, b)
    with pytest.raises(ValueError, match="chain lengths"):
        paired_difference(a, a, ns=(9,))


def test_paired_comparisons_cover_the_evaluated_pairs_only():
    items = {"sft": _items([0.0, 1.0], [6, 1]), "valr_s": _items([1.0, 1.0], [6, 1])}
    out = paired_comparisons(items)
    assert set(out) == {"valr_s_vs_sft_long", "valr_s_vs_sft"}  # no latent_no_align evaluated
    assert out["valr_s_vs_sft_long"]["difference"] == 1.0 and out["valr_s_vs_sft_long"]["n"] == 1
    assert (out["valr_s_vs_sft"]["a"], out["valr_s_vs_sft"]["b"]) == ("valr_s", "sft")  # names, not the means
    assert out["valr_s_vs_sft"]["difference"] == 0.5
    short = {n: _items([1.0], [2]) for n in ("sft", "valr_s")}  # no chain of 6-8 steps: no long comparison
    assert set(paired_comparisons(short)) == {"valr_s_vs_sft"}


def test_seed_interval_uses_student_t_and_counts_the_seeds_a_half_width_needs():
    v = [-0.201, 0.044, 0.029]
    out = seed_interval(v)
    mean = sum(v) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / 2)
    assert out["mean"] == pytest.approx(mean) and out["sd"] == pytest.approx(sd)
    assert out["ci95"] == pytest.approx([mean - 4.3027 * sd / math.sqrt(3), mean + 4.3027 * sd / math.sqrt(3)],
                                        abs=1e-4)
    k = out["seeds_for_half_width"]
    assert t_quantile(k - 1) * sd / math.sqrt(k) <= 0.05 < t_quantile(k - 2) * sd / math.sqrt(k - 1)
    one = seed_interval([0.1])
    assert one["mean"] == 0.1 and one["ci95"] is None and one["seeds_for_half_width"] is None


def test_seed_uncertainty_reads_each_seeds_paired_interval_when_it_has_one():
    def run(sft, valr, paired=None):
        v = {"sft": {"accuracy": sft, "accuracy_long": sft}, "valr_s": {"accuracy": valr, "accuracy_long": valr}}
        return {"variants": v, **({"paired": paired} if paired else {})}

    runs = {"0": run(0.5, 0.4), "1": run(0.4, 0.5, {"valr_s_vs_sft_long": {"ci95": [-0.05, 0.25]}})}
    u = seed_uncertainty(runs)
    assert set(u) == {"valr_s_vs_sft_long", "valr_s_vs_sft"}
    long = u["valr_s_vs_sft_long"]
    assert long["per_seed"]["0"] == {"difference": pytest.approx(-0.1), "ci95": None}
    assert long["per_seed"]["1"]["ci95"] == [-0.05, 0.25]
    assert long["over_seeds"]["mean"] == pytest.approx(0.0)
