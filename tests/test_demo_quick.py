"""`valr demo --quick` end to end through the real command line: it completes, writes results.json with the
documented keys, report.md and the figures, and a rerun reuses every finished stage."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import yaml

VARIANTS = ("sft", "latent_no_align", "latent_pause", "valr_s", "valr_m")


def _run(out, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "valr.cli", "demo", "--quick", "--out", str(out), *extra],
                          capture_output=True, text=True, env=env, timeout=170)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, time.perf_counter() - t0


def _frac(x):
    return isinstance(x, float) and 0.0 <= x <= 1.0


def test_demo_quick_writes_documented_files(tmp_path):
    out = tmp_path / "demo"
    proc, _ = _run(out, "--seed", "3")
    res = json.loads((out / "results.json").read_text())

    assert res["seed"] == 3 and res["quick"] is True
    assert isinstance(res["config"], dict) and res["config"]["k"] >= 1
    assert res["stage_seconds"] and all(isinstance(s, (int, float)) and s >= 0 for s in res["stage_seconds"].values())
    for stage in ("world", "chains", "teacher", "stage0_one_view", "stage0", "stage0_find_one_view",
                  "stage0_find_one_view2", "stage0_find",
                  "stage1", "sft", "latent_no_align", "latent_pause", "valr_s", "valr_m"):
        assert stage in res["stage_seconds"], stage
    assert set(VARIANTS) <= set(res["variants"])
    n_max = res["config"]["n_max"]
    for name in VARIANTS:
        v = res["variants"][name]
        assert _frac(v["accuracy"]), (name, v["accuracy"])
        assert set(v["accuracy_by_n"]) == {str(n) for n in range(1, n_max + 1)}
        assert all(_frac(a) for a in v["accuracy_by_n"].values())
        assert v["n"] == res["config"]["n_test"]
    valr_s = res["variants"]["valr_s"]
    assert set(valr_s["accuracy_by_k"]) == {str(k) for k in res["config"]["test_ks"]} | {str(res["config"]["k"])}
    assert all(_frac(a) for a in valr_s["accuracy_by_k"].values())
    assert "1.0" in valr_s["data_fraction"] and str(res["config"]["data_fraction"]) in valr_s["data_fraction"]
    assert all(_frac(f["accuracy"]) for f in valr_s["data_fraction"].values())
    # paired differences over the same test questions (no 6-8-step chains in quick mode: no long comparison)
    frac = f"valr_s_f{round(100 * res['config']['data_fraction'])}_vs_sft"
    assert set(res["paired"]) == {"latent_no_align_vs_sft", "valr_s_vs_sft", "valr_s_vs_latent_no_align", frac}
    p = res["paired"]["valr_s_vs_sft"]
    assert p["difference"] == pytest.approx(valr_s["accuracy"] - res["variants"]["sft"]["accuracy"])
    assert p["ci95"][0] <= p["difference"] <= p["ci95"][1] and p["n"] == res["config"]["n_test"]
    assert (p["a"], p["b"]) == ("valr_s", "sft") and p["mean_a"] == pytest.approx(valr_s["accuracy"])
    assert "How sure" in (out / "report.md").read_text()
    # the alignment loss is measured for the aligned variants only
    assert res["training"]["valr_s"]["align_last"] > 0 and "align_last" not in res["training"]["sft"]
    # the pause-token control: the same stage 2 without the feedback (and without alignment)
    pause_cfg = (out / "latent_pause" / "run" / "train_config.yaml").read_text()
    assert "latent_feed: pause" in pause_cfg and "lambda_align: 0.0" in pause_cfg
    assert "latent_feed: hidden" in (out / "latent_no_align" / "run" / "train_config.yaml").read_text()
    # after the finding stages, stage 0 below the reading target gets its extension (a toy model never reads),
    # on the finding stage's mix of read and find records, then is checked again
    checks = res["stage0_reading_checks"]
    assert [c["after"] for c in checks] == ["stage0_find", "stage0_more1"]
    assert checks[0]["all_views"] < res["config"]["stage0_read_target"] and "stage0_more1" in res["training"]
    assert "stage0_find/read_find.jsonl" in (out / "stage0_more1" / "run" / "train_config.yaml").read_text()
    # the finding stages train at their own batch, the second one-view round from the first's model
    round2 = (out / "stage0_find_one_view2" / "run" / "train_config.yaml").read_text()
    assert "per_device_batch_size: 4" in round2 and "stage0_find_one_view/run/final" in round2
    # beside it, the loss of a projector that only predicts the mean teacher feature
    assert 0 < res["variants"]["valr_s"]["training"]["align_of_mean_feature"]["percept"] < 2
    assert 0 < res["variants"]["valr_s"]["training"]["align_of_position_mean"]["percept"] < 2  # centred, per cell
    assert "align_of_mean_feature" not in res["variants"]["sft"]["training"]
    # the held-out reading probe covers every stage up to the variants, own and swapped images
    assert {"vision", "stage0_one_view", "stage0", "stage0_find_one_view", "stage0_find_one_view2", "stage0_find",
            "stage1", "sft", "valr_s"} <= set(res["reading"])
    # does each latent segment carry its step's view? (the variant with a projector only)
    views = res["reading"]["valr_s"].pop("segment_views")
    assert {"picks_view", "align_own", "align_other"} <= set(views) and _frac(views["picks_view"])
    grid = views.pop("align_own_map")  # where in the teacher's grid the latents render their view
    assert len(grid) > 1 and all(len(r) == len(grid[0]) and all(0 <= x <= 2 for x in r) for r in grid)
    assert abs(sum(map(sum, grid)) / (len(grid) * len(grid[0])) - views["align_own"]) < 1e-4
    assert "by row of the teacher's grid" in (out / "report.md").read_text()
    assert any(key.startswith("picks_view/") and key.endswith(("/first", "/later")) for key in views)
    for name, probe in res["reading"].items():
        tokens = probe.pop("step_tokens", None)
        assert (tokens is not None) == (name in ("stage1", "sft", "latent_no_align", "valr_s")), name
        assert tokens is None or ({"chase/first_view", "chase/first_cell", "chase/first_object"} <= set(tokens)
                                  and all(_frac(a) for a in tokens.values()))
        finding = {key for key in probe if key.startswith("find_by_")}  # finding a cell by content, by its key
        assert finding and finding <= {"find_by_colour", "find_by_shape", "find_by_colour_shape"}, finding
        assert set(probe) - finding == {"one_view", "all_views", "one_view_swapped_images",
                                        "all_views_swapped_images", "find_cells", "find_whole_cells"}
        assert all(_frac(a) for a in probe.values())
    assert res["targets"] == {}  # quick mode makes no accuracy claims
    assert (out / "report.md").read_text().startswith("# valr demo report")
    for fig in ("accuracy_per_variant.png", "accuracy_by_n.png", "accuracy_by_length.png", "accuracy_by_k.png"):
        assert (out / "figures" / fig).stat().st_size > 1000, fig
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(printed) == set(VARIANTS)
    # stage 1 on trains on the chains stage's records: by default chase and tally with fixed options, which draw
    # other scenes than the world's, rendered in the chains directory
    from valr.data import load_records

    chains = load_records(out / "chains" / "train.jsonl")
    chase = [r for r in chains if r.meta["family"] == "chase"]
    assert chase and all(r.question.split("\n")[2] == "which row is the last object in?" for r in chase)
    assert all(img.is_relative_to((out / "chains").resolve()) and img.stat().st_nlink == 1
               for r in chains for img in r.images)
    assert "chains" in res["stage_seconds"] and (out / "chains" / "find_val.jsonl").is_file()

    # a rerun reuses every stage: nothing is trained or generated again, also in a copy of the run directory
    # (stage keys hold no paths of it)
    moved = out.parent / "moved"
    shutil.copytree(out, moved, symlinks=True)
    _, secs = _run(moved, "--seed", "3")
    again = json.loads((moved / "results.json").read_text())
    assert set(again["reused_stages"]) == set(again["stage_seconds"])
    assert again["variants"]["valr_s"]["accuracy"] == valr_s["accuracy"]
    assert again["stage_seconds"] == res["stage_seconds"]
    assert secs < 60
    # the data-efficiency runs are a side branch: without them every other stage, the reading probe included, is
    # the same (so they can be added to, or left out of, a finished run at their own cost only)
    _run(out, "--seed", "3", "data_fraction=0")
    unfractioned = json.loads((out / "results.json").read_text())
    assert set(unfractioned["reused_stages"]) == set(unfractioned["stage_seconds"]) and unfractioned["reused_stages"]
    assert "eval/reading" in unfractioned["reused_stages"]
    assert list(unfractioned["variants"]["valr_s"]["data_fraction"]) == ["1.0"]
    # early stopping for the data-efficiency runs: new stages beside the old ones, each returning its model of
    # lowest validation CE; nothing else runs again
    _run(out, "--seed", "3", "fraction_best=true")
    best = json.loads((out / "results.json").read_text())
    assert set(best["stage_seconds"]) - set(best["reused_stages"]) == {"stage1_f25_best", "valr_s_f25_best",
                                                                       "eval/valr_s_f25_best"}
    for name in ("stage1_f25_best", "valr_s_f25_best"):
        assert 1 <= best["training"][name]["best"]["step"] <= best["training"][name]["steps"], name
        assert (out / name / "run" / "best" / "valr_best.json").is_file()
    assert "valr_s_f25_best_vs_sft" in best["paired"]
    kept = best["variants"]["valr_s"]["data_fraction"]["0.25"]["kept_steps"]
    assert kept == {n: best["training"][n]["best"]["step"] for n in ("stage1_f25_best", "valr_s_f25_best")}
    assert "lowest val CE" in (out / "report.md").read_text()
    # a validation run evaluates beside the test evaluations (stages named by split), so the test run after it
    # reuses every stage again
    _run(out, "--seed", "3", "data_fraction=0", "eval_split=val")
    val = json.loads((out / "results.json").read_text())
    evals = {s for s in val["stage_seconds"] if s.startswith("eval/val/")}
    assert val["eval_split"] == "val" and "eval/val/sft" in evals and not evals & set(val["reused_stages"])
    assert val["variants"]["sft"]["n"] == val["config"]["n_val"]
    _run(out, "--seed", "3", "data_fraction=0")
    again = json.loads((out / "results.json").read_text())
    assert set(again["reused_stages"]) == set(again["stage_seconds"]) and again["eval_split"] == "test"

    # focus targets: only the aligned variants (and what reads them) train again, on the focus records; here one
    # after another in this process (variant_workers=1; the runs above trained them two at a time)
    _run(out, "--seed", "3", "step_targets=focus", "variant_workers=1")
    focus = json.loads((out / "results.json").read_text())
    assert {"stage1", "sft", "latent_no_align", "teacher"} <= set(focus["reused_stages"])
    assert not {"focus", "valr_s", "valr_m"} & set(focus["reused_stages"])
    assert "focus/train.jsonl" in (out / "valr_s" / "run" / "train_config.yaml").read_text()
    assert "chains/train.jsonl" in (out / "latent_no_align" / "run" / "train_config.yaml").read_text()
    targets = [s.target.file for r in load_records(out / "focus" / "train.jsonl") for s in r.steps]
    assert targets and all(t is not None and t.is_file() for t in targets)
    assert _frac(focus["reading"]["valr_s"]["segment_views"]["picks_view"])

    # drawn options (recipes 1-5), here with tally steps that keep the tally: the chains and what trains on them
    # run again, perception is kept; the chains are the world's own scenes and questions in the current text
    # format, over the world's image files (hard links, not a second copy)
    _run(out, "--seed", "3", "fixed_options=false", "tally_counts=true")
    drawn = json.loads((out / "results.json").read_text())
    assert {"world", "teacher", "stage0"} <= set(drawn["reused_stages"])
    assert not {"chains", "stage1", "sft", "valr_s"} & set(drawn["reused_stages"])
    world, chains = (load_records(out / d / "train.jsonl") for d in ("world", "chains"))
    assert [r.question for r in chains] == [r.question for r in world]
    tally = [s.text for r in chains if r.meta["family"] == "tally" for s in r.steps]
    assert tally and all(re.search(r", \w+ \d+$", t) for t in tally)
    img = chains[0].images[0]
    assert img.is_relative_to((out / "chains").resolve())
    assert img.stat().st_ino == (out / "world" / img.relative_to((out / "chains").resolve())).stat().st_ino

    # the image bottleneck and latent grid positions retrain the latent variants only, and their checkpoints carry
    # both to evaluation
    blocked_args = ("fixed_options=false", "tally_counts=true", "image_bottleneck=true", "latent_positions=grid")
    _run(out, "--seed", "3", *blocked_args)
    blocked = json.loads((out / "results.json").read_text())
    assert {"stage1", "sft", "eval/sft"} <= set(blocked["reused_stages"])
    assert not {"latent_no_align", "valr_s"} & set(blocked["reused_stages"])
    for name, on in (("sft", False), ("latent_no_align", True), ("valr_s", True)):
        meta = json.loads((out / name / "run" / "final" / "valr_config.json").read_text())
        assert meta["valr"]["image_bottleneck"] is on, name
        assert meta["valr"]["latent_positions"] == ("grid" if on else "text"), name

    # alignment first: the aligned variants start from a stage 2 on the alignment alone; the unaligned latents
    # and everything before stage 2 are kept
    _run(out, "--seed", "3", *blocked_args, "align_first_steps=3")
    first = json.loads((out / "results.json").read_text())
    assert {"stage1", "sft", "latent_no_align", "eval/latent_no_align"} <= set(first["reused_stages"])
    assert not {"align_first", "valr_s", "valr_m"} & set(first["reused_stages"])
    assert first["training"]["align_first"]["steps"] == 3
    warm = yaml.safe_load((out / "align_first" / "run" / "train_config.yaml").read_text())
    assert warm["valr"]["ce_weight"] == 0.0 and warm["model"].endswith("stage1/run/final")
    for name in ("valr_s", "valr_m"):
        cfg = yaml.safe_load((out / name / "run" / "train_config.yaml").read_text())
        assert cfg["valr"]["ce_weight"] == 1.0 and cfg["model"].endswith("align_first/run/final"), name
