"""Diagnostics: traces reproduce generation, attention masses are exact, interventions and their effects,
collapse statistics, and the `valr diagnose` / `valr scale` commands on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from valr.cli import main
from valr.diagnostics import collapse as collapse_mod
from valr.diagnostics import dilution as dilution_mod
from valr.diagnostics import faithfulness as faith_mod
from valr.diagnostics.common import (
    attention_mass,
    build_probe,
    build_trace,
    forward_trace,
    generate,
    generation_config,
    load_samples,
    load_subject,
)
from valr.diagnostics.dilution import sample_dilution


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two tiny checkpoints (one with a trained-shape projector for the 'self' teacher, one without) and a
    records file whose steps target the input images."""
    from valr.align import Aligner
    from valr.checkpoint import save_checkpoint
    from valr.config import ValrConfig
    from valr.teachers import TeacherSpec
    from valr.tiny import build_tiny

    root = tmp_path_factory.mktemp("diag")
    model, tok, ip = build_tiny(seed=0)
    hidden = model.config.get_text_config().hidden_size
    cfg = ValrConfig(k=4, align_layer=2, projector_width=16, teachers=[TeacherSpec(name="self", kind="self")])
    torch.manual_seed(0)
    valr = save_checkpoint(root / "valr", model, tok, ip, cfg, Aligner(hidden, {"self": hidden}, 16))
    plain = save_checkpoint(root / "plain", *build_tiny(seed=1), ValrConfig(k=4, align_layer=2))
    rng = np.random.default_rng(0)
    for name, (w, h) in {"a": (56, 56), "b": (84, 56), "c": (56, 56)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{name}.png")
    rows = [
        {"id": "r0", "images": ["a.png", "b.png"], "question": "Which view has the cube?",
         "steps": [{"text": "view 1 has a ball", "target": 0}, {"text": "view 2 has a cube", "target": 1}],
         "answer": "B", "meta": {"options": ["view 1", "view 2"]}},
        {"id": "r1", "images": ["c.png", "a.png"], "question": "How many cubes?",
         "steps": [{"text": "view 2 has two", "target": 1}], "answer": "2"},
        {"id": "r2", "images": ["b.png"], "question": "Is it red?",
         "steps": [{"text": "view 1 is red", "target": 0}], "answer": "A", "meta": {"options": ["yes", "no"]}},
        {"id": "r3", "images": [], "question": "Say a number.", "steps": [], "answer": "3"},
    ]
    data = root / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, valr, plain, data


@pytest.mark.parametrize("grid", [0, 2])
def test_trace_follows_the_image_bottleneck(setup, grid):
    """Under the image bottleneck the trace's forward reproduces generation (each fed latent is the hidden state
    before it) and no text position puts attention on an image token; likewise with latent grid positions."""
    _, valr, _, data = setup
    subject = load_subject(valr, policy="force", k=4)
    subject.backbone.image_bottleneck = True
    subject.backbone.latent_grid_side = grid
    samples = load_samples(data)
    results = generate(subject, samples, generation_config(subject, 14), batch_size=4)
    checked = 0
    for s, r in zip(samples, results, strict=True):
        trace = build_trace(subject, s, r)
        fw = forward_trace(subject, trace, attentions=True)
        for i, kind in enumerate(trace.kinds):
            if kind == "latent":
                torch.testing.assert_close(fw.final[trace.prompt_len + i - 1], trace.embeds[trace.prompt_len + i],
                                           atol=1e-5, rtol=1e-4)
                checked += 1
        image = trace.image_of_column >= 0
        text = [trace.prompt_len + i for i, kind in enumerate(trace.kinds) if kind != "latent"]
        if bool(image.any()) and text:
            assert float(attention_mass(fw.attentions, torch.tensor(text), image).max()) < 1e-6
    assert checked > 0


def test_attention_mass_hand_built():
    attn = torch.zeros(2, 2, 3, 3)  # (layers, heads, query, key)
    attn[0, 0, 2] = torch.tensor([0.5, 0.25, 0.25])
    attn[0, 1, 2] = torch.tensor([0.1, 0.2, 0.7])
    attn[1, :, 2] = torch.tensor([0.0, 1.0, 0.0])
    attn[:, :, 1, :2] = 0.5
    attn[:, :, 0, 0] = 1.0
    keys = torch.tensor([True, False, True])
    got = attention_mass(attn, torch.tensor([2, 1]), keys)
    torch.testing.assert_close(got, torch.tensor([[(0.75 + 0.8) / 2, 0.5], [0.0, 0.5]]))
    total = attention_mass(attn, torch.arange(3), torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(total, torch.ones(2, 3))


def test_trace_reproduces_generation_and_masses_sum_to_one(setup):
    root, valr, _, data = setup
    subject = load_subject(valr, policy="force", k=4)
    samples = load_samples(data)
    results = generate(subject, samples, generation_config(subject, 14), batch_size=4)
    assert sum(r.latent_segments for r in results) > 0
    read_latents = 0
    for s, r in zip(samples, results, strict=True):
        trace = build_trace(subject, s, r)
        assert trace.n_generated == r.generated_positions
        assert trace.embeds.shape[0] == trace.prompt_len + r.generated_positions
        fw = forward_trace(subject, trace, layer=2, attentions=True)
        # every fed latent is the final hidden state of the position before it, as in generation
        for i, kind in enumerate(trace.kinds):
            if kind == "latent":
                torch.testing.assert_close(fw.final[trace.prompt_len + i - 1], trace.embeds[trace.prompt_len + i],
                                           atol=1e-5, rtol=1e-4)
        # the sdpa forward (generation's) and the eager one agree
        plain = forward_trace(subject, trace)
        torch.testing.assert_close(plain.final, fw.final, atol=1e-5, rtol=1e-4)
        q = torch.arange(trace.prompt_len, trace.prompt_len + trace.n_generated)
        total = attention_mass(fw.attentions, q, torch.ones(fw.attentions.shape[-1], dtype=torch.bool))
        torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)
        d = sample_dilution(subject, s, r, None)
        assert d["max_total_error"] < 1e-5
        assert all(0.0 <= m <= 1.0 for m in d["mass"])
        if not s.images:
            assert all(m == 0.0 for m in d["mass"])
        for m, t in zip(d["mass"], d["target_mass"], strict=True):
            assert t is None or t <= m + 1e-6
        # latent masses: by hand from the attention rows (layers, heads averaged), own segment within all latents
        seg_cols = {}
        for j, g in enumerate(trace.segments):
            if g >= 0:
                seg_cols.setdefault(g, []).append(trace.prompt_len + j)
        every = sorted(c for cols in seg_cols.values() for c in cols)
        att, seen = fw.attentions, -1
        for i, kind in enumerate(trace.kinds):
            seen = max(seen, trace.segments[i])
            row = att[:, :, trace.prompt_len + i]  # (layers, heads, keys)
            want = float(row[:, :, every].sum(-1).mean()) if every else 0.0
            assert d["latent_mass"][i] == pytest.approx(want, abs=1e-6)
            if kind in ("step", "answer") and seen >= 0:
                own = float(row[:, :, seg_cols[seen]].sum(-1).mean())
                assert d["segment_mass"][i] == pytest.approx(own, abs=1e-6)
                assert 0.0 < d["segment_mass"][i] <= d["latent_mass"][i] + 1e-6
            else:
                assert d["segment_mass"][i] is None
        read_latents += sum(m is not None for m in d["segment_mass"])
        # latents belong to the line they precede; steps beyond the record's have no target
        for i, kind in enumerate(trace.kinds):
            line = trace.lines[i]
            if kind != "answer" and line < len(s.targets):
                assert trace.targets[i] == s.targets[line]
            else:
                assert trace.targets[i] == (None, None)
    assert read_latents > 0  # some text came after a segment


def test_dilution_command_compares_two_models(setup, tmp_path, capsys):
    root, valr, plain, data = setup
    out = tmp_path / "dil"
    args = ["diagnose", "dilution", "--model", str(valr), "--model", str(plain), "--label", "valr", "--label",
            "plain", "--data", str(data), "--out", str(out), "--latent-policy", "force", "--k", "4",
            "--max-new-tokens", "12", "--min-count", "1"]
    assert main(args) == 0
    rep = json.loads((out / "dilution.json").read_text())
    assert set(rep["models"]) == {"valr", "plain"} and (out / "dilution.png").stat().st_size > 1000
    v, p = rep["models"]["valr"], rep["models"]["plain"]
    assert v["max_total_error"] < 1e-5 and v["n_samples"] == 4
    assert v["by_kind"]["latent"]["cos"] is not None and v["by_kind"]["step"]["mass"] > 0
    assert 0 < v["by_kind"]["step"]["segment_mass"] <= v["by_kind"]["step"]["latent_mass"] <= 1
    assert v["segment_alignment"]["n"] > 0 and v["segment_alignment"]["target"] is not None
    assert 0.0 <= v["segment_alignment"]["picks_target"] <= 1.0
    assert p["by_kind"]["latent"]["cos"] is None and "no trained projector" in p["probe"]["note"]
    assert [x["position"] for x in v["by_position"]] == list(range(len(v["by_position"])))
    assert "[dilution]" in capsys.readouterr().out
    # the plain model probed through the other checkpoint's projector
    out2 = tmp_path / "dil2"
    assert main(["diagnose", "dilution", "--model", str(plain), "--data", str(data), "--out", str(out2),
                 "--latent-policy", "force", "--max-new-tokens", "8", "--projector-from", str(valr), "--limit",
                 "2"]) == 0
    rep2 = json.loads((out2 / "dilution.json").read_text())
    assert rep2["models"]["plain"]["probe"]["projector_from"] == str(valr)


def test_segment_alignment_summary_counts_segments_that_pick_their_target():
    def sample(segments):
        return {"kinds": ["latent"], "lines": [0], "mass": [0.5], "mass_layers": [[0.5]], "target_mass": [None],
                "cos": [None], "latent_mass": [0.1], "segment_mass": [None], "max_total_error": 0.0,
                "segments": segments}

    segs = [{"segment": 0, "line": 0, "target": 0.9, "other": 0.5, "picks_target": True},
            {"segment": 1, "line": 1, "target": 0.6, "other": 0.5, "picks_target": False},  # one other beat it
            {"segment": 0, "line": 0, "target": 0.2, "other": 0.4, "picks_target": False}]
    rep = dilution_mod.aggregate([sample(segs[:2]), sample(segs[2:])], n_layers=1, min_count=1)
    sa = rep["segment_alignment"]
    assert sa["n"] == 3 and sa["picks_target"] == pytest.approx(1 / 3)
    assert sa["target"] == pytest.approx((0.9 + 0.6 + 0.2) / 3) and sa["other"] == pytest.approx(0.5 - 0.1 / 3)


@torch.no_grad()
def test_segment_alignment_scores_the_grid_and_targets_the_projector_was_trained_on():
    """The probe's per-segment score is the mean cosine between the projected grid of the first ``slots`` latents
    and the (centred, where trained so) teacher patches, computed here by hand."""
    from valr.align import Aligner
    from valr.diagnostics.common import Probe

    torch.manual_seed(0)
    states, feats, grid = torch.randn(9, 8), torch.randn(9, 5) + 2.0, (3, 3)
    weights, scores = Aligner(8, {"t": 5}, width=16).state_dict(), {}
    for center, slots in ((False, 0), (True, 0), (True, 4)):  # one projector, read three ways
        aligner = Aligner(8, {"t": 5}, width=16, center=center, slots=slots)
        aligner.load_state_dict(weights)
        if slots:  # the first 4 latents as a 2 x 2 grid, upsampled to the teacher's 3 x 3
            x = states[:4].reshape(1, 2, 2, 8).permute(0, 3, 1, 2)
            x = torch.nn.functional.interpolate(x, size=grid, mode="bilinear", align_corners=False)
            cells = x.flatten(2).transpose(1, 2)[0]
        else:  # all 9 latents are the 3 x 3 grid, row by row
            cells = states
        pred = aligner.projectors["t"](cells)
        want = feats - feats.mean(0, keepdim=True) if center else feats
        expected = float(torch.nn.functional.cosine_similarity(pred, want, dim=-1).mean())
        got = dilution_mod._segment_alignment(Probe("t", None, aligner, layer=1, source=""), states, feats, grid)
        assert got == pytest.approx(expected, abs=1e-5)
        scores[center, slots] = got
    assert len({round(v, 4) for v in scores.values()}) == 3  # centring and slots each change the score


def test_probe_teacher_override(setup):
    _, valr, _, _ = setup
    subject = load_subject(valr, policy="force")
    probe, note = build_probe(subject, "self=self")
    assert probe is not None and probe.name == "self"
    probe, note = build_probe(subject, "other")
    assert probe is None and "no projector for teacher 'other'" in note


def test_identity_intervention_has_no_effect_and_noise_has_one(setup):
    _, valr, _, data = setup
    subject = load_subject(valr, policy="force", k=4)
    samples = load_samples(data)
    cfg = generation_config(subject, 16)
    baseline = generate(subject, samples, cfg, batch_size=4)
    rep = faith_mod.faithfulness(subject, samples, cfg, baseline, ["none", "noise", "zero", "shuffle", "image"],
                                 batch_size=4)
    none = rep["interventions"]["none"]
    assert none["answer_changed"] == 0 and none["output_changed"] == 0 and none["accuracy_drop"] == 0
    assert rep["interventions"]["noise"]["output_changed"] > 0
    assert rep["interventions"]["zero"]["output_changed"] > 0
    assert rep["interventions"]["shuffle"]["output_changed_with_latents"] > 0
    # r3 has no images: no donor of the same image count, its latents stay as they are
    assert rep["interventions"]["image"]["unreplaced_positions"] > 0
    # the flag: with a threshold nothing reaches, the latents count as ignored; with 0 they matter
    strict = faith_mod.faithfulness(subject, samples, cfg, baseline, ["none"], threshold=2.0)
    assert strict["flag"] is None  # only the control ran: nothing to judge
    ignored = faith_mod.faithfulness(subject, samples, cfg, baseline, ["zero"], threshold=2.0)
    assert ignored["flag"] == "latents_ignored"


class _LatentReader:
    """A stand-in generator whose answer reads its one fed latent: "A" when it is the model's own vector (all
    ones), "B" otherwise. So the answers depend on the latents exactly, and the effect sizes are known."""

    def __call__(self, prompts, cfg):
        from valr.generate import GenerationResult

        out = []
        for b, _ in enumerate(prompts):
            own = torch.ones(4)
            fed = cfg.latent_hook(b, 0, 0, own) if cfg.latent_hook is not None else own
            same = torch.equal(fed, own)
            text = "Answer: A" if same else "Answer: B"
            out.append(GenerationResult(text, text, [1, 2] if same else [1, 3], [], 1, 3, [fed[None]], True))
        return out


def test_effects_are_measured_exactly_when_answers_depend_on_latents():
    from valr.diagnostics.common import Sample, Subject
    from valr.eval.benchmarks import EvalItem

    samples = [Sample(EvalItem(f"q{i}", "records", "t", "Which?", [], "A", "mc", ["x", "y"]), [], [])
               for i in range(4)]
    subject = Subject("reader", Path("."), None, _LatentReader(), 1, "force")
    from valr.generate import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=4, latent_policy="force", k=1, return_latents=True)
    baseline = generate(subject, samples, cfg, batch_size=3)
    rep = faith_mod.faithfulness(subject, samples, cfg, baseline, ["none", "noise", "zero", "shuffle"], batch_size=3)
    assert rep["baseline"]["accuracy"] == 1.0 and rep["n_with_latents"] == 4
    none = rep["interventions"]["none"]
    assert none["answer_changed"] == 0 and none["accuracy_drop"] == 0 and none["output_changed"] == 0
    for name in ("noise", "zero"):
        r = rep["interventions"][name]
        assert r["answer_changed"] == 1.0 and r["accuracy"] == 0.0 and r["accuracy_drop"] == 1.0
    # shuffled latents are other samples' own vectors, identical here: no effect, exactly
    assert rep["interventions"]["shuffle"]["answer_changed"] == 0
    assert rep["flag"] is None and rep["max_answer_changed_with_latents"] == 1.0
    only_shuffle = faith_mod.faithfulness(subject, samples, cfg, baseline, ["shuffle"])
    assert only_shuffle["flag"] == "latents_ignored"


def test_derangement_and_replay():
    perm = faith_mod.derangement(6, seed=1, groups=[0, 0, 0, 1, 1, 2])
    assert perm[5] is None
    assert all(j is not None and j != i for i, j in enumerate(perm[:5]))
    assert sorted(perm[:3]) == [0, 1, 2] and sorted(perm[3:5]) == [3, 4]
    donors = [[torch.ones(2, 3), 2 * torch.ones(2, 3)], None]
    replay = faith_mod.Replay(donors)
    v = torch.zeros(3)
    assert float(replay(0, 3, 1, v)[0]) == 2.0  # segment 3 of 2: cyclic
    assert replay(1, 0, 0, v) is v and replay.unreplaced == 1
    noise = faith_mod.noise_hook(0)
    x = torch.randn(5)
    y = noise(0, 0, 0, x)
    assert torch.allclose(y.norm(), x.norm()) and torch.equal(y, noise(0, 0, 0, x)) and not torch.equal(y, x)


def test_collapse_statistics():
    same = torch.randn(1, 4, 8).expand(3, 4, 8)
    stats = collapse_mod.latent_statistics([[same[i].clone()] for i in range(3)])
    assert stats["cross_sample"] == pytest.approx(1.0, abs=1e-5)
    torch.manual_seed(0)
    rand = collapse_mod.latent_statistics([[torch.randn(4, 256)] for _ in range(5)])
    assert abs(rand["cross_sample"]) < 0.1 and abs(rand["along_segment"]) < 0.2
    assert rand["effective_rank"] > 10
    flat = collapse_mod.latent_statistics([[torch.ones(4, 8) * (i + 1)] for i in range(3)])
    assert flat["along_segment"] == pytest.approx(1.0) and flat["latent_norm_by_slot"][0] == pytest.approx(
        np.mean([np.sqrt(8) * (i + 1) for i in range(3)]))
    assert collapse_mod.latent_statistics([None, []]) == {"n_latents": 0}


def test_collapse_and_faithfulness_commands(setup, tmp_path):
    _, valr, plain, data = setup
    out = tmp_path / "all"
    assert main(["diagnose", "all", "--model", str(valr), "--data", str(data), "--out", str(out), "--latent-policy",
                 "force", "--k", "4", "--max-new-tokens", "10", "--interventions", "none,zero", "--min-count",
                 "1"]) == 0
    for name in ("dilution", "faithfulness", "collapse"):
        assert (out / f"{name}.json").is_file() and (out / f"{name}.png").is_file()
    col = json.loads((out / "collapse.json").read_text())["models"]["valr"]
    assert col["n_latents"] > 0 and col["norm_ratio"] > 0 and col["token_embedding_norm"]["vocabulary_mean"] > 0
    fa = json.loads((out / "faithfulness.json").read_text())["models"]["valr"]
    assert set(fa["interventions"]) == {"none", "zero"}
    # policy off: no latents to intervene on
    out2 = tmp_path / "off"
    assert main(["diagnose", "faithfulness", "--model", str(plain), "--data", str(data), "--out", str(out2),
                 "--latent-policy", "off", "--max-new-tokens", "6", "--interventions", "zero"]) == 0
    assert json.loads((out2 / "faithfulness.json").read_text())["models"]["plain"]["flag"] == "no_latents"
    assert main(["diagnose", "faithfulness", "--model", str(plain), "--data", str(data), "--out", str(out2),
                 "--interventions", "bogus"]) == 2


def test_scale_command(tmp_path):
    from eval_fixtures import write_records_benchmark, write_tiny_checkpoint

    model = write_tiny_checkpoint(tmp_path / "ck")
    data = write_records_benchmark(tmp_path / "bench", n=3)
    out = tmp_path / "scale"
    args = ["scale", "--model", str(model), "--label", "tiny", "--data", str(data), "--out", str(out),
            "--steps", "1,free", "--k", "0,2", "--max-new-tokens", "10", "--batch-size", "2"]
    assert main(args) == 0
    rep = json.loads((out / "scale.json").read_text())
    assert [(r["k"], r["steps"]) for r in rep["rows"]] == [(0, 1), (0, "free"), (2, 1), (2, "free")]
    for r in rep["rows"]:
        assert r["n"] == 3 and 0 <= r["accuracy"] <= 1 and r["policy"] == ("off" if r["k"] == 0 else "force")
        if r["steps"] == 1:
            assert r["mean_steps"] <= 1
        if r["k"] == 0:
            assert r["mean_latent_segments"] == 0 and r["mean_generated_positions"] == r["mean_generated_tokens"]
    assert (out / "scale.png").stat().st_size > 1000
    cells = sorted(Path(out / "cells").rglob("*.jsonl"))
    assert len(cells) == 4
    before = [c.stat().st_mtime_ns for c in cells]
    assert main(args) == 0  # a rerun reuses every finished cell
    assert [c.stat().st_mtime_ns for c in cells] == before
    assert main(args[:-4] + ["--k", "x"]) == 2
