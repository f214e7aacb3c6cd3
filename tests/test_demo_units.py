"""The demo's pieces that need no training: stage caching, stage-0 records, scoring by N and by step position,
the targets and the multi-seed summary."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from valr.demo import DemoConfig, Stages, check_targets, read_records, score_predictions, shade_views, summarize
from valr.synth.dataset import make_world_dataset


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    make_world_dataset(out, seed=5, n_train=12, n_val=4, n_test=8, n_range=(1, 3))
    return out


def test_stages_reuse_and_invalidate(tmp_path):
    st = Stages(tmp_path)
    calls = []

    def fn(d):
        calls.append(d)
        (d / "x").write_text("1")
        return {"v": len(calls)}

    assert st.run("a", {"p": 1}, fn) == {"v": 1}
    assert Stages(tmp_path).run("a", {"p": 1}, fn) == {"v": 1}  # reused, not rerun
    assert len(calls) == 1
    st2 = Stages(tmp_path)
    assert st2.run("a", {"p": 2}, fn) == {"v": 2}  # other settings: the stage reruns from scratch
    assert st2.reused == [] and "a" in st2.seconds
    # an interrupted stage with the same settings keeps its directory (a trainer resumes there)
    (tmp_path / "b").mkdir()
    st3 = Stages(tmp_path)

    def crash(d):
        (d / "partial").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        st3.run("b", {"q": 1}, crash)
    seen = []
    Stages(tmp_path).run("b", {"q": 1}, lambda d: seen.append((d / "partial").is_file()) or {})
    assert seen == [True]


def test_read_records_read_real_cells_of_training_scenes(world):
    from valr.data import load_records
    from valr.synth.dataset import load_labels, scene_from_labels

    f = world / "read_test.jsonl"
    n = read_records(world, f, seed=0)
    recs = load_records(f)
    assert n == len(recs) > 0
    labels = load_labels(world)
    kinds = set()
    for r in recs:
        assert all(p.parent.name == "train" for p in r.images)  # training scenes only
        assert r.answer == str(len(r.steps)) and len(r.steps) >= 1
        assert [s.text.split()[0] for s in r.steps] == [f"#{i + 1}" for i in range(len(r.steps))]
        assert r.question.startswith("read #1 ")
        if len(r.images) == 1:  # one view: "#i row R col C: size colour shape"
            kinds.add("one")
            assert all(s.text.split()[1] == "row" for s in r.steps)
        else:  # all views, the CoT's lookup format, checked against the scene
            kinds.add("all")
            scene = scene_from_labels(labels, r, world)
            for s in r.steps:
                head, said = s.text.split(": ")
                _, _, v, _, row, _, col = head.split()
                assert scene.obj(int(v) - 1, int(row) - 1, int(col) - 1).describe() == said
                assert s.target.image_index == int(v) - 1
    assert kinds == {"one", "all"}


def test_shade_views_marks_each_view_and_is_idempotent(world, tmp_path):
    import shutil

    import numpy as np
    from PIL import Image

    w = tmp_path / "w"
    shutil.copytree(world, w)
    first = shade_views(w, 20, 0)
    assert first > 0
    assert shade_views(w, 20, 0) == 0  # nothing left to shade
    for v in range(4):
        a = np.asarray(Image.open(next((w / "images" / "train").glob(f"*_v{v}.png"))))
        assert tuple(a[1, 1]) == (40, 40 + 20 * v, 40)  # a background pixel of the top-left cell


def test_score_predictions_by_n_and_step_position(world, tmp_path):
    from valr.data import load_records

    recs = load_records(world / "test.jsonl")
    lines = []
    for i, r in enumerate(recs):
        steps = [s.text for s in r.steps]
        if i % 2 == 1 and len(steps) > 1:
            steps[0] = "view 9 row 9 col 9: nothing"  # a wrong first step, right answer
        raw = "".join(f"<latent>[4 latent positions]</latent>{s}\n" for s in steps) + f"Answer: {r.answer}"
        lines.append({"id": r.id, "prediction": r.answer if i % 4 != 3 else "Z", "raw": raw,
                      "generated_tokens": 10 * len(steps), "generated_positions": 16 * len(steps),
                      "latent_segments": len(steps), "finished": True})
    pf = tmp_path / "predictions.jsonl"
    pf.write_text("".join(json.dumps(x) + "\n" for x in lines))
    m = score_predictions(world / "test.jsonl", pf)
    assert m["n"] == len(recs)
    assert set(m["accuracy_by_n"]) <= {"1", "2", "3"}
    expected = sum(0.0 if i % 4 == 3 else 1.0 for i in range(len(recs))) / len(recs)
    assert m["accuracy"] == pytest.approx(expected)
    # step 1 is wrong exactly where it was replaced; later steps are only counted after a right prefix
    wrong_first = sum(1 for i, r in enumerate(recs) if i % 2 == 1 and len(r.steps) > 1)
    assert m["step_accuracy_by_position"]["1"] == pytest.approx(1 - wrong_first / len(recs))
    assert m["step_accuracy_by_position"].get("2", 1.0) == 1.0
    assert m["latent_segments_per_step"] == pytest.approx(1.0)
    # per question (chain length, score), which the paired comparisons resample
    assert set(m["_items"]) == {str(r.id) for r in recs}
    assert sum(sc for _, sc in m["_items"].values()) / len(recs) == pytest.approx(m["accuracy"])
    assert all(m["_items"][str(r.id)][0] == len(r.steps) for r in recs)
    # per family: whole chains right, and the answers after a right chain (i % 4 == 3 answered "Z")
    for fam in m["chain_right_by_family"]:
        idx = [i for i, r in enumerate(recs) if r.meta["family"] == fam]
        right = [i for i in idx if not (i % 2 == 1 and len(recs[i].steps) > 1)]
        assert m["chain_right_by_family"][fam] == pytest.approx(len(right) / len(idx))
        if right:
            assert m["accuracy_given_chain_right"][fam] == pytest.approx(
                sum(i % 4 != 3 for i in right) / len(right))
    # why lookup chains went wrong: the replaced first step is no lookup step at all
    from valr.demo import lookup_error

    lookup = [i for i, r in enumerate(recs) if all(lookup_error(s.text, "x") for s in r.steps)]
    broken = sum(1 for i in lookup if i % 2 == 1 and len(recs[i].steps) > 1)
    assert lookup and m["lookup_chain_errors"]["chains"] == len(lookup)
    assert {k: v for k, v in m["lookup_chain_errors"].items() if k != "chains"} == (
        {"unreadable": {"1": broken}} if broken else {})


def test_lookup_error_names_what_the_first_wrong_step_got_wrong():
    from valr.demo import lookup_error

    gold = "#2 view 4 blue at row 4 col 3: large blue triangle"
    assert lookup_error(gold, gold) is None
    assert lookup_error(gold, "#2 view 4 row 4 col 3: large blue triangle") == "move"  # by address, not content
    assert lookup_error(gold, "#2 view 4 triangle at row 4 col 3: large blue triangle") == "key_type"
    assert lookup_error(gold, "#2 view 4 red at row 1 col 1: large red cube") == "key_value"
    assert lookup_error(gold, "#2 view 4 blue at row 1 col 3: small blue ball") == "found"
    assert lookup_error(gold, "#2 view 1 blue at row 1 col 3: small blue ball") == "view"  # the head's view
    assert lookup_error(gold, "Answer: A") == "unreadable" and lookup_error(gold, None) == "missing"
    address = "#1 view 3 row 3 col 1: large blue cross"
    assert lookup_error(address, "#1 view 3 blue cross at row 3 col 1: large blue cross") == "move"
    assert lookup_error("#1 view 4 small: 4, total 4", "#1 view 4 small: 3, total 3") is None  # a count step


def _variant(acc, by_n, counts=None):
    counts = counts or {k: 10 for k in by_n}
    return {"accuracy": acc, "accuracy_by_n": by_n, "count_by_n": counts}


def test_check_targets_reports_numbers_and_verdicts():
    by_n_sft = {str(n): 0.9 - 0.08 * (n - 1) for n in range(1, 9)}
    by_n_valr = {str(n): 0.9 - 0.02 * (n - 1) for n in range(1, 9)}
    v = {"sft": _variant(0.6, by_n_sft), "latent_no_align": _variant(0.61, by_n_sft),
         "valr_s": {**_variant(0.8, by_n_valr), "data_fraction": {"1.0": {"accuracy": 0.8},
                                                                  "0.25": {"accuracy": 0.65}}}}
    t = check_targets(v, n_hi=8)
    assert t["valr_s_beats_sft_by_5pts_on_long"]["met"] is True
    assert t["valr_s_beats_sft_by_5pts_on_long"]["gap"] == pytest.approx(0.36)
    assert t["no_align_within_2pts_of_sft"]["met"] is True
    assert t["valr_s_falls_less_with_n"]["difference"] == pytest.approx(0.76 / 0.9 - 0.34 / 0.9)
    assert t["valr_s_small_data_matches_sft_full"]["met"] is True
    v["latent_no_align"]["accuracy"] = 0.5
    assert check_targets(v)["no_align_within_2pts_of_sft"]["met"] is False


def _seed_run(seed, a):
    vs = {n: {**_variant(a + d, {"1": a + d, "2": a}), "accuracy_long": a}
          for n, d in (("sft", 0.0), ("latent_no_align", 0.01), ("valr_s", 0.1))}
    vs["valr_s"]["accuracy_by_k"] = {"1": a, "4": a + 0.1}
    vs["valr_s"]["data_fraction"] = {"1.0": {"accuracy": a + 0.1, "accuracy_by_n": {"1": a}},
                                     "0.25": {"accuracy": a, "accuracy_by_n": {"1": a}}}
    return {"seed": seed, "config": {"seed": seed, "n_max": 2, "k": 16}, "variants": vs, "targets": {},
            "stage_seconds": {"x": 1.0}, "total_seconds": 10.0,
            "reading": {"stage0": {"all_views": a, "one_view": 2 * a}, "sft": {"step_tokens": {"chase/first_view": a}},
                        "valr_s": {"segment_views": {"picks_view": a, "align_own_map": [[a, 2 * a], [0.0, a]]}}},
            "length_pairs": {n: {"tokens": [10 + seed, 40, 90], "scores": [1.0, a, 0.0]} for n in vs}}


def test_summarize_means_over_seeds():
    runs = {"0": _seed_run(0, 0.4), "1": _seed_run(1, 0.6)}
    runs["0"]["variants"]["sft"]["lookup_chain_errors"] = {"chains": 10, "move": {"6": 2}}
    runs["1"]["variants"]["sft"]["lookup_chain_errors"] = {"chains": 10, "move": {"6": 1, "7": 1}, "found": {"1": 1}}
    s = summarize(runs, "valr demo --seeds 0,1")
    assert s["means"]["sft"]["lookup_chain_errors"] == {"chains": 20, "move": {"6": 3, "7": 1}, "found": {"1": 1}}
    assert "lookup_chain_errors" not in s["means"]["valr_s"]  # not every seed has them
    assert s["seeds"] == [0, 1]
    assert s["means"]["sft"]["accuracy"] == pytest.approx(0.5)
    assert s["means"]["valr_s"]["accuracy_by_k"]["4"] == pytest.approx(0.6)
    assert s["std"]["sft"]["accuracy"] == pytest.approx(0.1414, abs=1e-3)
    assert s["means"]["valr_s"]["data_fraction"]["0.25"]["accuracy"] == pytest.approx(0.5)
    assert "no_align_within_2pts_of_sft" in s["targets_on_means"]
    u = s["uncertainty"]["latent_no_align_vs_sft"]  # +0.01 on both seeds: no spread, so no seed count
    assert [d["difference"] for d in u["per_seed"].values()] == pytest.approx([0.01, 0.01])
    assert u["over_seeds"]["ci95"] == pytest.approx([0.01, 0.01]) and u["over_seeds"]["seeds_for_half_width"] is None
    assert s["uncertainty"]["valr_s_vs_sft_long"]["on"] == "N in [6, 7, 8]"
    assert set(s["runs"]) == {"0", "1"}
    assert s["reading_mean"]["stage0"] == pytest.approx({"all_views": 0.5, "one_view": 1.0})
    assert s["reading_mean"]["sft"]["step_tokens"] == pytest.approx({"chase/first_view": 0.5})
    views = s["reading_mean"]["valr_s"]["segment_views"]  # grid maps average cell by cell
    assert views["picks_view"] == pytest.approx(0.5) and views["align_own_map"] == [[pytest.approx(0.5), 1.0],
                                                                                   [0.0, pytest.approx(0.5)]]


def test_read_records_vary_their_length_so_no_item_sits_at_a_fixed_distance(world):
    from valr.data import load_records

    f = world / "read_len_test.jsonl"
    read_records(world, f, seed=0, per_scene=8, cells=(2, 5))
    lengths = [len(r.steps) for r in load_records(f) if len(r.images) > 1]
    assert set(lengths) == {2, 3, 4, 5}  # every length of the range, and only those
    with pytest.raises(ValueError, match="cells"):
        read_records(world, f, seed=0, cells=(3, 2))


def test_find_records_name_a_unique_object_and_answer_with_its_cell(world):
    from valr.data import load_records
    from valr.demo import find_records
    from valr.synth.dataset import load_labels, scene_from_labels

    f = world / "find_test.jsonl"
    assert find_records(world, f, seed=0, per_scene=3, items=(1, 4)) > 0
    labels = load_labels(world)
    recs = load_records(f)
    assert {len(r.steps) for r in recs} <= {1, 2, 3, 4}
    for r in recs:
        scene = scene_from_labels(labels, r, world)
        items = r.question.removeprefix("which cell: ").rstrip(".").split(", ")
        assert len(items) == len(r.steps)
        for i, (item, step) in enumerate(zip(items, r.steps, strict=True)):
            marker, *words, _, _, view = item.split()
            head, said = step.text.split(": ")
            _, _, v, *key, at, _, row, _, col = head.split()
            assert marker == head.split()[0] == f"#{i + 1}" and v == view
            assert key == words and at == "at"  # the step restates what it searched for
            assert set(words) <= set(said.split())  # the cell holds what the item names ...
            v0 = int(v) - 1
            matches = [(rr, cc) for rr, cc in scene.cells(v0)
                       if set(words) <= set(scene.obj(v0, rr, cc).describe().split())]
            assert matches == [(int(row) - 1, int(col) - 1)]  # ... and nothing else in that view does
            assert step.target.image_index == v0
    with pytest.raises(ValueError, match="items"):
        find_records(world, f, seed=0, items=(0, 2))


def test_mix_records_keeps_every_record_and_its_images(world, tmp_path):
    from valr.data import load_records
    from valr.demo import find_records, mix_records

    read_records(world, world / "read.jsonl", seed=0)
    find_records(world, world / "find.jsonl", seed=0)
    mixed = load_records(mix_records([world / "read.jsonl", world / "find.jsonl"], tmp_path / "mix.jsonl", seed=0))
    ids = sorted(r.id for f in ("read.jsonl", "find.jsonl") for r in load_records(world / f))
    assert sorted(r.id for r in mixed) == ids and all(p.is_file() for r in mixed for p in r.images)


def test_one_view_find_records_find_within_the_one_image(world):
    from valr.data import load_records
    from valr.demo import find_records
    from valr.synth.dataset import load_labels, scene_from_labels

    f = world / "find_one_view.jsonl"
    find_records(world, f, seed=0, per_scene=2, one_view=True)
    recs = load_records(f)
    one = [r for r in recs if len(r.images) == 1]
    assert one and len(one) < len(recs)  # every other record
    labels = load_labels(world)
    for r in one:
        scene = scene_from_labels(labels, r, world)  # a one-image record's scene has that view only
        assert "view" not in r.question and all(s.target.image_index == 0 for s in r.steps)
        for i, (item, step) in enumerate(zip(r.question.removeprefix("which cell: ").rstrip(".").split(", "),
                                             r.steps, strict=True)):
            marker, *words = item.split()
            head, said = step.text.split(": ")
            m, *key, at, _, row, _, col = head.split()
            assert m == marker == f"#{i + 1}" and key == words and at == "at"
            assert said == scene.obj(0, int(row) - 1, int(col) - 1).describe()
            assert set(words) <= set(said.split())


def test_one_view_reads_keep_single_view_records_with_valid_paths(world, tmp_path):
    from valr.data import load_records
    from valr.demo import one_view_reads

    src = world / "read_test_one.jsonl"
    read_records(world, src, seed=0)
    dst = one_view_reads(src, tmp_path / "stage" / "one.jsonl")
    every, one = load_records(src), load_records(dst)
    assert [r.id for r in one] == [r.id for r in every if len(r.images) == 1] and one
    assert all(p.is_file() for r in one for p in r.images)  # paths still resolve from the new directory


def test_read_records_for_the_probe_use_only_validation_scenes(world):
    from valr.data import load_records

    f = world / "read_val_test.jsonl"
    assert read_records(world, f, seed=0, split="val") > 0
    assert {p.parent.name for r in load_records(f) for p in r.images} == {"val"}


def test_demo_overrides_change_the_recipe_and_reject_bad_keys():
    from valr.config import ConfigError

    base = DemoConfig()
    c = base.with_overrides(["stage0_steps=600", "stage2_lr=2e-3", "teacher.steps=50", "test_ks=[1, 4]",
                             "data_fraction=0", "eval_limit=100"])
    assert (c.stage0_steps, c.stage2_lr, c.teacher.steps, c.test_ks, c.data_fraction, c.eval_limit) == (
        600, 0.002, 50, (1, 4), 0.0, 100)
    assert isinstance(c.data_fraction, float)
    assert base.stage0_steps == DemoConfig().stage0_steps != 600  # the original is untouched
    # a regex that YAML would read as a comment stays the text written; null still means None
    assert base.with_overrides([r"latent_after=#\d+ view \d+"]).latent_after == r"#\d+ view \d+"
    assert base.with_overrides([r"latent_after=#\d+", "latent_after=null"]).latent_after is None
    assert base.with_overrides(["step_targets=focus"]).step_targets == "focus"
    assert base.with_overrides(["latent_feed=embedding_rms"]).latent_feed == "embedding_rms"
    assert base.with_overrides(["latent_positions=grid"]).latent_positions == "grid"
    from valr.demo.pipeline import model_key

    theta = base.with_overrides(["rope_theta=10"])
    assert theta.rope_theta == 10.0 and "rope_theta" not in model_key(base)  # older stage-0 keys still match
    assert model_key(theta) == {**model_key(base), "rope_theta": 10.0}
    assert (base.with_overrides(["k=20", "aligned_latents=16"]).aligned_latents, base.with_overrides(["k=0"]).k) \
        == (16, 0)  # k = 0 (plain CoT, docs/dev's SFT runs) needs no grid
    for bad, words in [("stage0_stepz=3", "unknown key"), ("stage0_steps=abc", "expected int"),
                       ("valr_m=1", "expected bool"), ("teacher.stepz=1", "unknown key"), ("seed=3", "--seed"),
                       ("stage0_steps", "key=value"), ("step_targets=crop", "one of"),
                       ("latent_feed=unit", "one of"), ("latent_positions=rows", "latent_positions.*one of"),
                       ("rope_theta=1", "rope_theta=1.*above 1"),
                       ("aligned_latents=5", "square grid"),
                       ("k=20", "e.g. 16 of K=20")]:
        with pytest.raises(ConfigError, match=words):
            base.with_overrides([bad])


def test_finding_accuracy_scores_whole_cells_by_what_the_step_looks_for(monkeypatch):
    from valr.demo import probes

    def step(text: str, wrong: set[int]):
        words = text.split()
        return None, 0, words, [False] + [t not in wrong for t in range(1, len(words))]

    steps = [step("# 1 view 2 red at row 3 col 1 : large red cube", set()),
             step("# 2 view 1 cube at row 2 col 4 : small blue cube", {9}),  # col wrong
             step("# 3 red ring at row 1 col 1 : small red ring", {6, 8}),  # both wrong
             step("# 4 cube at row 4 col 4 : large green cube", {10})]  # only an object word wrong
    monkeypatch.setattr(probes, "teacher_forced_steps", lambda *a, **k: iter(steps))
    acc = probes.finding_accuracy(None, "unused")
    assert acc == {"find_cells": 5 / 8, "find_whole_cells": 2 / 4, "find_by_colour": 1.0, "find_by_shape": 0.5,
                   "find_by_colour_shape": 0.0}


def test_token_role_names_what_each_chain_token_carries():
    from valr.demo import token_role

    objects = {"large", "red", "cube"}
    words = "#2 view 3 row 1 col 4 : large red cube".split()  # the marker's digit carries nothing
    assert [token_role(p, w, objects) for p, w in zip(words, words[1:], strict=False)] == [
        None, "view", None, "cell", None, "cell", None, "object", "object", "object"]
    count = "#1 view 2 red : 3 , total 5".split()
    assert [token_role(p, w, objects, seen=":" in count[:i + 1]) for i, (p, w) in
            enumerate(zip(count, count[1:], strict=False))] == [None, "view", "key", None, "count", None, None, "count"]
    found = "#2 view 3 red cube at row 1 col 4 : large red cube".split()
    assert [token_role(p, w, objects, seen=":" in found[:i + 1]) for i, (p, w) in
            enumerate(zip(found, found[1:], strict=False))] == [
        None, "view", "key", "key", None, None, "cell", None, "cell", None, "object", "object", "object"]
    tally = "#2 view 3 row 1 col 4 : large red cube , red 2".split()  # tally_counts: the running count
    assert [token_role(p, w, objects) for p, w in zip(tally, tally[1:], strict=False)][-3:] == [None, "object", "count"]


def test_dump_json_keeps_flat_lists_on_one_line_and_round_trips():
    from valr.demo import dump_json

    obj = {"pairs": {"tokens": [1, 2, 3], "scores": [0.5, None, 1.0]}, "nested": [[1, 2], {"a": []}], "empty": {},
           "text": 'say "x"', "ks": (1, 4)}
    text = dump_json(obj)
    assert '"tokens": [1, 2, 3]' in text and '"ks": [1, 4]' in text
    assert json.loads(text) == json.loads(json.dumps(obj))


def _write_run(path, run):
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(run))
    return path


def test_merge_runs_gathers_seeds_run_apart_and_refuses_mixed_recipes(tmp_path):
    from valr.config import ConfigError
    from valr.demo import merge_runs, summarize

    a = _write_run(tmp_path / "a", _seed_run(0, 0.4))
    b = _write_run(tmp_path / "b", _seed_run(1, 0.6))
    runs = merge_runs([a, b / "results.json"])  # a directory or its results.json
    assert sorted(runs) == ["0", "1"]
    summary = summarize(runs, "merged")
    assert summary["means"]["sft"]["accuracy"] == pytest.approx(0.5)
    assert summary["length_pairs_seeds"] == [0, 1]
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    c = _write_run(tmp_path / "c", _seed_run(2, 0.5))
    assert sorted(merge_runs([tmp_path / "summary.json", c])) == ["0", "1", "2"]  # an earlier summary's seeds
    with pytest.raises(ConfigError, match="seed 0 is in both .*a.results.json and .*summary.json"):
        merge_runs([a, b, tmp_path / "summary.json"])
    other = _seed_run(3, 0.5)
    other["config"]["k"] = 4
    d = _write_run(tmp_path / "d", other)
    with pytest.raises(ConfigError, match="another recipe.*k: 16 vs 4"):
        merge_runs([a, d])
    newer = _seed_run(5, 0.5)
    newer["config"]["fixed_options"] = False  # an option added since seed 0 ran, as it ran without it
    assert sorted(merge_runs([a, _write_run(tmp_path / "f", newer)])) == ["0", "5"]
    newer["config"]["fixed_options"] = True
    with pytest.raises(ConfigError, match="fixed_options"):
        merge_runs([a, _write_run(tmp_path / "g", newer)])
    # results written before an option existed ran as ABSENT_MEANS says, whatever its default is now
    from valr.demo import ABSENT_MEANS, DemoConfig

    assert set(ABSENT_MEANS) <= set(DemoConfig().to_dict())
    older = _seed_run(6, 0.5)
    older["config"]["fixed_options"] = False  # recipe 5 with the key written out: the same as without it
    assert sorted(merge_runs([a, _write_run(tmp_path / "h", older)])) == ["0", "6"]
    quick = {**_seed_run(4, 0.5), "quick": True}
    with pytest.raises(ConfigError, match="quick"):
        merge_runs([_write_run(tmp_path / "e", quick)])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        merge_runs([tmp_path / "bad.json"])
    with pytest.raises(ConfigError, match="no such results file"):
        merge_runs([tmp_path / "missing"])


def test_merge_pairs_the_data_fraction_target_with_the_seeds_that_ran_it(tmp_path):
    from valr.demo import merge_runs, summarize

    with_frac = _seed_run(0, 0.4)
    with_frac["config"]["data_fraction"] = 0.25
    without = _seed_run(1, 0.6)
    without["config"]["data_fraction"] = 0.0
    del without["variants"]["valr_s"]["data_fraction"]["0.25"]
    with_frac["config"].pop("variant_workers", None)  # a run from before the option, one after another
    without["config"]["variant_workers"] = 2  # how the variants ran is not part of the recipe
    with_frac["config"]["pause_control"] = True  # the pause-token control beside the same variants
    with_frac["config"]["fraction_best"] = True  # which model the fraction runs kept is not the recipe either
    with_frac["variants"]["latent_pause"] = with_frac["variants"]["sft"]
    runs = merge_runs([_write_run(tmp_path / "a", with_frac), _write_run(tmp_path / "b", without)])
    s = summarize(runs)
    assert "latent_pause" not in s["means"] and "latent_pause" in s["runs"]["0"]["variants"]  # one seed is no mean
    frac = s["means"]["valr_s"]["data_fraction"]
    assert frac["1.0"]["seeds"] == [0, 1] and frac["1.0"]["accuracy"] == pytest.approx(0.6)
    assert frac["0.25"] == {"accuracy": pytest.approx(0.4), "accuracy_by_n": {"1": pytest.approx(0.4)},
                            "seeds": [0], "sft_accuracy": pytest.approx(0.4)}
    # seed 0's VaLR-S on 25% against seed 0's SFT (0.4 vs 0.4), not against the mean of both seeds' SFT (0.5)
    t = s["targets_on_means"]["valr_s_small_data_matches_sft_full"]
    assert (t["sft"], t["met"], t["seeds"]) == (pytest.approx(0.4), True, [0])


def test_demo_merge_command_writes_the_summary_and_seed_mean_figures(tmp_path, capsys):
    from valr.cli import main

    a = _write_run(tmp_path / "a", _seed_run(0, 0.4))
    b = _write_run(tmp_path / "b", _seed_run(1, 0.6))
    out = tmp_path / "study"
    assert main(["demo", "--merge", str(a), str(b), "--out", str(out), "--summary", str(tmp_path / "s.json")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads((tmp_path / "s.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["runs"]["1"]["length_pairs"]["sft"]["tokens"] == [11, 40, 90]
    assert any(f.endswith("accuracy_by_length.png") for f in summary["figures"])
    assert "differences.png" in summary["figures"]  # the comparisons over seeds
    assert all((out / "figures" / f.split("/")[-1]).is_file() for f in summary["figures"])
    assert main(["demo", "--merge", str(a), "--out", str(out), "k=4"]) == 2
    assert "drop key=value overrides" in capsys.readouterr().err


def test_run_seeds_summarises_each_seeds_results_with_their_length_pairs(tmp_path, monkeypatch):
    from valr.demo import seeds

    def fake_run_demo(out, seed, **_):
        run = _seed_run(seed, 0.4 + 0.2 * seed)
        del run["length_pairs"]  # results written before they carried them: read from the evaluations instead
        metrics = out / "eval" / "sft" / "metrics.json"
        metrics.parent.mkdir(parents=True)
        metrics.write_text(json.dumps({"_pairs_tokens": [[12, 1.0], [30, 0.0]]}))
        return run

    monkeypatch.setattr(seeds, "run_demo", fake_run_demo)
    summary = seeds.run_seeds(tmp_path, [0, 1], summary_path=tmp_path / "copy.json", command="valr demo --seeds 0,1")
    assert summary["seeds"] == [0, 1] and summary["means"]["sft"]["accuracy"] == pytest.approx(0.5)
    assert summary["runs"]["0"]["length_pairs"] == {"sft": {"tokens": [12, 30], "scores": [1.0, 0.0]}}
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads((tmp_path / "copy.json").read_text())


def _stage_job(tag: str, d):
    """A stand-in training stage for ``Stages.run_parallel`` (module level, so a spawned process can run it)."""
    if tag == "bad":
        raise ValueError("bad stage")
    (d / "run").mkdir()
    (d / "run" / "history.jsonl").write_text('{"step": 1}\n')
    return {"tag": tag, "pid": os.getpid()}


def test_stages_survive_a_move_and_keep_what_keyed_a_teacher_path(tmp_path):
    """A run directory can be moved or copied: keys hold no paths (refused), and a stage written when the aligned
    variants' keys held the teacher's absolute path still matches its settings, finished or interrupted, and
    keeps its stored fingerprint, which later stages' keys hold."""
    import shutil

    calls = []

    def fn(d):
        calls.append(d)
        return {"v": len(calls)}

    with pytest.raises(ValueError, match="holds a 'path'"):
        Stages(tmp_path / "x").run("a", {"teachers": [{"name": "t", "path": "/x/teacher"}]}, fn)
    key = {"teachers": [{"name": "t", "kind": "hf", "image_size": 112}], "steps": 3}
    old_key = {"teachers": [{"name": "t", "kind": "hf", "path": "/elsewhere/run/teacher/model", "image_size": 112}],
               "steps": 3}
    # as the earlier code left them: a finished stage and an interrupted one (with a checkpoint to resume from)
    run = tmp_path / "run"
    for name, finished in (("done", True), ("half", False)):
        (run / name / "ckpt").mkdir(parents=True)
        (run / name / "key.json").write_text(json.dumps({"fingerprint": f"old-{name}", "key": old_key}))
        if finished:
            (run / name / "done.json").write_text(json.dumps({"fingerprint": "old-done", "seconds": 5.0,
                                                              "result": {"v": 0}}))
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    for root in (run, moved):
        st = Stages(root)
        assert st.run("done", key, fn) == {"v": 0} and st.reused == ["done"] and not calls
        assert st.fps["done"] == "old-done"  # the identity later stages were keyed on
        assert st.run("half", key, lambda d: sorted(p.name for p in d.iterdir())) == ["ckpt", "key.json"]
        assert st.fps["half"] == "old-half"
    st = Stages(moved)  # other settings still rerun from scratch
    assert st.run("done", {**key, "steps": 4}, fn) == {"v": 1} and st.fps["done"] != "old-done"
    assert not (moved / "done" / "ckpt").exists()


def test_parallel_stages_keep_the_finished_ones_and_raise_the_failure(tmp_path):
    import functools

    from valr.demo import Stages

    jobs = [(n, {"steps": 1, "n": n}, functools.partial(_stage_job, n)) for n in ("a", "bad", "b")]
    with pytest.raises(ValueError, match="bad stage"):
        Stages(tmp_path).run_parallel(jobs, 2)
    assert (tmp_path / "a" / "done.json").is_file() and (tmp_path / "b" / "done.json").is_file()
    assert not (tmp_path / "bad" / "done.json").exists()
    again = Stages(tmp_path)
    res = again.run_parallel([j for j in jobs if j[0] != "bad"], 2)
    assert {n: r["tag"] for n, r in res.items()} == {"a": "a", "b": "b"} and sorted(again.reused) == ["a", "b"]
    assert os.getpid() not in {r["pid"] for r in res.values()}  # they ran in other processes


def test_stage_workers_end_when_the_demo_is_killed(tmp_path):
    """A killed demo (SIGKILL, so nothing of it runs after) leaves no stage worker training on: each worker ends
    once its parent is gone."""
    import signal
    import subprocess
    import time

    proc = Path("/proc")
    if not proc.is_dir():
        pytest.skip("needs /proc to tell a finished worker from a zombie")
    (tmp_path / "slowjob.py").write_text(
        "import os, time\n"
        "def job(d):\n"
        "    (d.parent / 'worker.pid').write_text(str(os.getpid()))\n"
        "    time.sleep(120)\n")
    demo = ("import sys; from pathlib import Path; import slowjob; from valr.demo.stages import Stages\n"
            "Stages(Path(sys.argv[1]) / 'run').run_parallel([('a', {'steps': 1}, slowjob.job)], 1)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen([sys.executable, "-c", demo, str(tmp_path)], env=env, stderr=subprocess.DEVNULL)
    pid_file = tmp_path / "run" / "worker.pid"
    deadline = time.time() + 120
    while not (pid_file.is_file() and pid_file.read_text()) and time.time() < deadline and parent.poll() is None:
        time.sleep(0.2)
    assert pid_file.is_file(), "the stage worker never started"
    worker = int(pid_file.read_text())

    def running(pid: int) -> bool:
        try:
            status = (proc / str(pid) / "status").read_text()
        except OSError:
            return False
        return "\nState:\tZ" not in status

    assert running(worker)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 30
    while running(worker) and time.time() < deadline:
        time.sleep(0.2)
    assert not running(worker), "the stage worker went on after the demo was killed"


def test_progress_ignores_an_interrupted_runs_history(tmp_path):
    """A stage still waiting for a worker may hold an earlier, interrupted run's history.jsonl (its trainer trims it
    on start); its bar must not show that run's steps."""
    import time

    from valr.demo.stages import _history_step

    hist = tmp_path / "history.jsonl"
    hist.write_text('{"step": 1}\n{"step": 16}\n{"step": 17, "lo')  # the last line half written
    old = time.time() - 3600
    os.utime(hist, (old, old))
    assert _history_step(hist) == 16
    assert _history_step(hist, since=time.time()) is None
    assert _history_step(tmp_path / "missing.jsonl") is None


def test_fraction_stages_named_from_the_recipe_alone():
    """The data-efficiency stages exist only for a fraction in (0, 1), and their names come from it (the reading
    probe's key and the results read them from the recipe, so a resumed run agrees with the first)."""
    from valr.demo.pipeline import fraction_stages

    assert fraction_stages(DemoConfig()) is None  # default: off
    assert fraction_stages(DemoConfig().with_overrides(["data_fraction=1.0"])) is None
    assert fraction_stages(DemoConfig().with_overrides(["data_fraction=0.25"])) == ("stage1_f25", "valr_s_f25")
    assert fraction_stages(DemoConfig().with_overrides(["data_fraction=0.5"])) == ("stage1_f50", "valr_s_f50")
    best = DemoConfig().with_overrides(["data_fraction=0.25", "fraction_best=true"])
    assert fraction_stages(best) == ("stage1_f25_best", "valr_s_f25_best")  # beside the runs that kept their last


def test_evaluations_are_named_by_split_and_old_validation_ones_move_to_their_name(tmp_path):
    from valr.demo.pipeline import _file_by_split, eval_stage_name

    assert eval_stage_name("test", "sft") == "eval/sft"  # unchanged, so finished test runs keep their stages
    assert eval_stage_name("val", "valr_s_k4") == "eval/val/valr_s_k4"
    for label, split in (("sft", "val"), ("valr_s", "test")):  # as written before stages were named by split
        d = tmp_path / "eval" / label
        d.mkdir(parents=True)
        (d / "key.json").write_text(json.dumps({"fingerprint": "f", "key": {"split": split}}))
        (d / "done.json").write_text("{}")
        _file_by_split(tmp_path, label)
    assert (tmp_path / "eval" / "val" / "sft" / "done.json").is_file() and not (tmp_path / "eval" / "sft").exists()
    assert (tmp_path / "eval" / "valr_s" / "done.json").is_file()  # a test evaluation stays where it is
    _file_by_split(tmp_path, "latent_no_align")  # nothing there: nothing happens
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["val", "valr_s"]
