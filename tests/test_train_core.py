"""The trainer in-process: config loading, pre-flight errors, stage-2 learning, gradient checkpointing, NaN guard,
data fraction, LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from valr.config import ConfigError
from valr.data.smoke import write_smoke_setup
from valr.tiny import TinyShape
from valr.trainer import NonFiniteLoss, TrainConfig, TrainError, TrainModule, load_train_config, read_log, train

SMALL = TinyShape(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64, vision_depth=1, vision_hidden=16,
                  vision_heads=1)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return write_smoke_setup(tmp_path_factory.mktemp("smoke"), n_train=8, n_val=4, shape=SMALL)


def _cfg(smoke, out, stage=2, **kw) -> TrainConfig:
    base = dict(model=str(smoke["model"]), train_data=str(smoke["train"]), output_dir=str(out), stage=stage,
                max_steps=2, per_device_batch_size=2, grad_accum=1, lr_llm=1e-3, lr_projector=1e-3, save_every=0,
                num_workers=0, progress=False, tensorboard=False, warmup_ratio=0.0,
                valr={"k": 1, "align_layer": 1, "projector_width": 16,
                      "teachers": [{"name": "dino", "path": str(smoke["teacher"]), "image_size": 56}]})
    base.update(kw)
    from valr.trainer import train_config_from_dict

    return train_config_from_dict(base)


def _weights(final):
    w = load_file(str(final / "model.safetensors"))
    if (final / "projectors.safetensors").is_file():
        w.update({f"proj.{k}": v for k, v in load_file(str(final / "projectors.safetensors")).items()})
    return w


def test_config_yaml_unknown_keys_with_lines_and_coercion(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: m\ntrain_data: t.jsonl\nlr_llm: 1e-5\nlearning_rate: 3\nvalr:\n  k: 4\n  lamda: 1\n")
    with pytest.raises(ConfigError) as err:
        load_train_config(p)
    msg = str(err.value)
    assert f"{p}:4: unknown key 'learning_rate'" in msg and f"{p}:7: unknown key 'valr.lamda'" in msg
    p.write_text("model: m\ntrain_data: t.jsonl\nlr_llm: 1e-5\nvalr:\n  k: 4\n")
    cfg = load_train_config(p, ["valr.lambda_align=0.25", "max_steps=7", "stage=2"])
    assert cfg.lr_llm == 1e-5 and isinstance(cfg.lr_llm, float)  # YAML reads 1e-5 as a string
    assert (cfg.valr.k, cfg.valr.lambda_align, cfg.max_steps, cfg.stage) == (4, 0.25, 7, 2)
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        load_train_config(p, ["nope=1"])
    with pytest.raises(ConfigError, match="nan_policy='maybe'"):
        load_train_config(p, ["nan_policy=maybe"])
    with pytest.raises(ConfigError, match=r"valr.train_mode='slow' is not one of \['exact', 'fast'\]"):
        load_train_config(p, ["valr.train_mode=slow"])
    with pytest.raises(ConfigError, match="perfect square"):
        load_train_config(p, ["stage=2", "valr.k=8"])
    with pytest.raises(ConfigError, match="valr.latent_feed='unit' is not one of .*'hidden', the paper's"):
        load_train_config(p, ["valr.latent_feed=unit"])
    with pytest.raises(ConfigError, match="valr.latent_positions='rows' is not one of"):
        load_train_config(p, ["valr.latent_positions=rows"])
    with pytest.raises(ConfigError, match="perfect square"):  # grid positions need a grid, in stage 1 too
        load_train_config(p, ["valr.k=8", "valr.latent_positions=grid"])


def test_stage2_loss_decreases_on_tiny_overfit_set(smoke, tmp_path):
    cfg = _cfg(smoke, tmp_path / "run", max_steps=14, lr_llm=3e-3, lr_projector=3e-3, per_device_batch_size=4,
               data_fraction=0.5, val_data=str(smoke["val"]), tensorboard=True, log_every=7)
    final = train(cfg)
    rows = read_log(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 15))
    first, last = rows[0], rows[-1]
    assert last["loss"] < first["loss"] - 0.3 and last["ce"] < first["ce"] and last["align"] < first["align"]
    assert {"align/dino", "latent_norm", "lr/llm", "lr/projector", "grad_norm"} <= set(last)
    assert (final / "config.json").is_file() and (final / "projectors.safetensors").is_file()
    assert (tmp_path / "run" / "eval.jsonl").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "run" / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/ce", "train/align", "train/align/dino", "train/latent_norm", "lr/llm",
            "lr/projector", "perf/tokens_per_s", "val/ce"} <= tags
    # an existing run is not overwritten by accident; resume of a finished run is a no-op
    with pytest.raises(TrainError, match="--resume"):
        train(cfg)
    assert train(cfg, resume=True) == final


def test_alignment_only_stage2_trains_on_the_alignment_alone(smoke, tmp_path):
    """valr.ce_weight=0: the logged loss is lambda x align at every step, and the alignment falls."""
    valr = {"k": 1, "align_layer": 1, "projector_width": 16, "lambda_align": 0.5, "ce_weight": 0.0,
            "teachers": [{"name": "dino", "path": str(smoke["teacher"]), "image_size": 56}]}
    train(_cfg(smoke, tmp_path / "run", max_steps=6, lr_llm=3e-3, lr_projector=3e-3, valr=valr))
    rows = read_log(tmp_path / "run")
    for r in rows:
        assert r["loss"] == pytest.approx(0.5 * r["align"], rel=1e-5) and r["ce"] > 0
    assert rows[-1]["align"] < rows[0]["align"]
    with pytest.raises(TrainError, match="with both 0 stage 2 has nothing to train"):
        train(_cfg(smoke, tmp_path / "none", valr={**valr, "lambda_align": 0.0, "teachers": []}))


def test_rescaled_latent_feed_is_trained_and_saved(smoke, tmp_path):
    """valr.latent_feed reaches the engine (the logged fed-latent norm is the embedding table's RMS x sqrt(D) at
    step 1, whatever the source checkpoint says) and the final checkpoint, which then generates the same way."""
    from valr.checkpoint import load_checkpoint

    cfg = _cfg(smoke, tmp_path / "r", max_steps=1)
    cfg.valr.latent_feed = "embedding_rms"
    final = train(cfg)
    source = load_checkpoint(smoke["model"])
    assert source.backbone.latent_feed == "hidden"
    table = source.model.get_input_embeddings().weight.detach()
    expected = float(table.pow(2).mean().sqrt() * table.shape[1] ** 0.5)
    assert read_log(tmp_path / "r")[0]["latent_norm"] == pytest.approx(expected, rel=1e-4)
    assert load_checkpoint(final).backbone.latent_feed == "embedding_rms"
    # a library user's objective decides too, and says so when it changes what the checkpoint fed
    from valr.config import ValrConfig
    from valr.train import Objective

    loaded = load_checkpoint(final)
    with pytest.warns(UserWarning, match="fed 'embedding_rms'.*config says 'hidden'"):
        Objective(loaded.backbone, ValrConfig(k=1, lambda_align=0.0))
    assert loaded.backbone.latent_feed == "hidden"


def test_aligned_latents_are_trained_and_saved(smoke, tmp_path):
    """valr.aligned_latents: K=5 latents of which the first 4 form the 2 x 2 grid; the trainer checks the pair, and
    the checkpoint's projectors keep reading the same grid."""
    from valr.checkpoint import load_checkpoint

    with pytest.raises(ConfigError, match="aligned_latents=3 latents cannot form a square grid"):
        _cfg(smoke, tmp_path / "bad", valr={"k": 5, "aligned_latents": 3})
    cfg = _cfg(smoke, tmp_path / "a", max_steps=2)
    cfg.valr.k, cfg.valr.aligned_latents = 5, 4
    final = train(cfg)
    assert all(r["align"] > 0 for r in read_log(tmp_path / "a"))
    loaded = load_checkpoint(final)
    assert (loaded.config.k, loaded.config.aligned_latents, loaded.aligner.slots) == (5, 4, 4)


def test_data_fraction_takes_the_first_records(smoke, tmp_path):
    cfg = _cfg(smoke, tmp_path / "r", stage=1, data_fraction=0.5, max_steps=1, per_device_batch_size=4)
    state = json.loads((train(cfg) / "valr_train_state.json").read_text())
    assert state["n_train_records"] == 4
    cfg = _cfg(smoke, tmp_path / "r2", stage=1, data_fraction=0.25, per_device_batch_size=4)
    with pytest.raises(TrainError, match=r"2 training record\(s\) \(data_fraction=0.25\) are fewer than one"):
        train(cfg)


@pytest.mark.parametrize("stage, mode", [(1, "exact"), (2, "fast"), (2, "exact")])
def test_gradient_checkpointing_gives_identical_weights(smoke, tmp_path, stage, mode):
    runs = []
    for gc in (False, True):
        cfg = _cfg(smoke, tmp_path / f"gc{gc}", stage=stage, gradient_checkpointing=gc,
                   valr={"k": 1, "align_layer": 1, "projector_width": 16, "train_mode": mode, "teachers": [
                       {"name": "dino", "path": str(smoke["teacher"]), "image_size": 56}]})
        runs.append(_weights(train(cfg)))
    a, b = runs
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = load_file(str(smoke["model"] / "model.safetensors"))
    assert any(not torch.equal(before[k], a[k]) for k in before)  # it did train


def test_nan_guard_names_step_and_records(smoke, tmp_path, monkeypatch):
    real = TrainModule.forward

    def poisoned(self, batch, targets):
        out = real(self, batch, targets)
        if "train_0001" in batch.record_ids:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(TrainModule, "forward", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step \d+; batch record ids: rank 0: .*train_0001"):
        train(_cfg(smoke, tmp_path / "halt", stage=1, max_steps=4, data_fraction=1.0))
    final = train(_cfg(smoke, tmp_path / "skip", stage=1, max_steps=4, nan_policy="skip"))
    rows = read_log(tmp_path / "skip")
    assert sum(r["skipped"] for r in rows) >= 1 and len(rows) == 4
    assert all(torch.isfinite(v).all() for v in _weights(final).values())


def test_preflight_reports_bad_records_before_training(smoke, tmp_path):
    lines = smoke["train"].read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    rec = json.loads(lines[0])
    missing = dict(rec, id="missing", images=[str(smoke["train"].parent / "images" / "nope.png")])
    dangling = dict(rec, id="dangling", steps=[{"text": "x", "target": str(tmp_path / "gone.png")}],
                    images=[str(smoke["train"].parent / p) for p in rec["images"]])
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    corrupt = dict(rec, id="corrupt", images=[str(tmp_path / "corrupt.png")])
    good = [json.dumps(dict(json.loads(x), images=[str(smoke["train"].parent / p) for p in json.loads(x)["images"]],
                            steps=json.loads(x)["steps"])) for x in lines[:4] if "_b.png" not in x]
    bad.write_text("\n".join(good + [json.dumps(missing), json.dumps(dangling), json.dumps(corrupt)]) + "\n")
    with pytest.raises(TrainError) as err:
        train(_cfg(smoke, tmp_path / "o", stage=1, train_data=str(bad)))
    msg = str(err.value)
    n = len(good)
    assert f"{bad}:{n + 1} (record 'missing'): image file" in msg and "does not exist" in msg
    assert f"{bad}:{n + 2} (record 'dangling'): step 0: target image file" in msg
    assert f"{bad}:{n + 3} (record 'corrupt'): cannot read image" in msg
    assert not (tmp_path / "o" / "history.jsonl").exists()  # no step ran
    with pytest.raises(TrainError, match=r"train\.jsonl:1 \(record 'train_0000'\): .*over max_length=20"):
        train(_cfg(smoke, tmp_path / "o2", stage=1, max_length=20))
    bad.write_text("{not json\n" + good[0] + "\n")
    with pytest.raises(TrainError, match=rf"{bad}:1: not valid JSON"):
        train(_cfg(smoke, tmp_path / "o3", stage=1, train_data=str(bad)))


def test_lora_trains_adapters_and_saves_a_merged_standard_checkpoint(smoke, tmp_path):
    cfg = _cfg(smoke, tmp_path / "lora", stage=2, lora_r=4, lora_alpha=8, max_steps=3, save_every=2)
    final = train(cfg)
    w = _weights(final)
    before = load_file(str(smoke["model"] / "model.safetensors"))
    assert {k for k in w if not k.startswith("proj.")} == before.keys()  # merged: plain names, no peft needed
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(w[q], before[q])
    assert torch.equal(w["lm_head.weight"], before["lm_head.weight"])  # frozen outside the adapters
    # resume from the step-2 checkpoint (base model + trainable.safetensors): the same final weights
    import shutil

    shutil.copytree(tmp_path / "lora", tmp_path / "again", ignore=shutil.ignore_patterns("final"))
    assert (tmp_path / "again" / "checkpoints" / "step-00000002" / "trainable.safetensors").is_file()
    again = _weights(train(_cfg(smoke, tmp_path / "again", stage=2, lora_r=4, lora_alpha=8, max_steps=3,
                                save_every=2), resume=True))
    assert all(torch.equal(w[k], again[k]) for k in w)


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = [p for p in root.rglob("*.yaml") if p.parent.name != "accelerate"]
    assert len(files) >= 9
    for p in files:
        cfg = load_train_config(p)
        assert cfg.stage in (1, 2) and (cfg.stage == 1 or cfg.valr.teachers), p
    s = load_train_config(root / "qwen2_5_vl_7b" / "valr_s.yaml")
    assert (s.valr.k, s.valr.align_layer, s.valr.lambda_align, s.lr_llm, s.lr_projector) == (16, 12, 0.5, 2e-6, 1e-5)
    assert s.per_device_batch_size * s.grad_accum == 32 and s.weight_decay == 0.01 and s.warmup_ratio == 0.03


def test_cli_reports_config_errors(tmp_path, capsys):
    from valr.cli import main

    p = tmp_path / "c.yaml"
    p.write_text("model: m\ntrain_data: t.jsonl\nbatch_size: 4\n")
    assert main(["train", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"error: {p}:3: unknown key 'batch_size'" in err and "per_device_batch_size" in err
    p.write_text(f"model: {tmp_path / 'none'}\ntrain_data: {tmp_path / 'none.jsonl'}\n")
    assert main(["train", "--config", str(p), f"output_dir={tmp_path / 'o'}"]) == 2
    assert "records file not found" in capsys.readouterr().err


def test_objective_reads_a_backbone_without_latent_feed_as_hidden():
    """A third-party backbone without the attribute feeds hidden states; a config that says otherwise warns and
    sets it (the warning must not need the attribute it found missing)."""
    import types

    from valr.config import ValrConfig
    from valr.train import Objective

    bb = types.SimpleNamespace()
    with pytest.warns(UserWarning, match="fed 'hidden'.*config says 'embedding_rms'"):
        Objective(bb, ValrConfig(k=1, lambda_align=0.0, latent_feed="embedding_rms"))
    assert bb.latent_feed == "embedding_rms"


def test_keep_best_keeps_the_lowest_validation_ce_across_a_resume(smoke, tmp_path):
    """keep_best: output_dir/best is the model of the validation pass with the lowest CE (here a learning rate
    high enough to overshoot, so the best is not the last), also when the run is resumed."""
    import shutil

    out = tmp_path / "run"
    cfg = _cfg(smoke, out, stage=1, max_steps=4, lr_llm=0.3, val_data=str(smoke["val"]), eval_every=1,
               keep_best=True, save_every=1, keep_last=10, seed=1, scheduler="constant")
    final = train(cfg)
    evals = read_log(out, "eval.jsonl")
    assert [e["step"] for e in evals] == [1, 2, 3, 4]
    best = json.loads((out / "best" / "valr_best.json").read_text())
    assert best == min(evals, key=lambda e: e["val/ce"]) and best["step"] < 4, evals
    best_weights = _weights(out / "best")
    same_step = _weights(out / "checkpoints" / f"step-{best['step']:08d}" / "model")
    assert best_weights.keys() == same_step.keys() and all(torch.equal(best_weights[k], same_step[k])
                                                           for k in same_step)
    assert json.loads((final / "valr_train_state.json").read_text())["best"] == best

    def resume_from(step: int) -> dict:
        shutil.rmtree(final)
        for ck in (out / "checkpoints").iterdir():
            if int(ck.name.split("-")[1]) > step:
                shutil.rmtree(ck)
        train(cfg, resume=True)
        return json.loads((out / "best" / "valr_best.json").read_text())

    assert resume_from(2) == best  # the later, worse passes do not replace it
    assert all(torch.equal(a, b) for a, b in zip(_weights(out / "best").values(), best_weights.values(),
                                                  strict=True))
    (out / "best" / "valr_best.json").write_text(json.dumps({"step": 3, "val/ce": -1.0}))
    assert resume_from(2)["val/ce"] == -1.0  # a best written after the checkpoint is kept (the steps redo it)
    (out / "best").replace(out / "best.old")  # killed between write_best's two renames: the old one is found
    assert resume_from(2)["val/ce"] == -1.0 and not (out / "best.old").exists()
    with pytest.raises(ConfigError, match="keep_best: give val_data"):
        train(_cfg(smoke, tmp_path / "x", keep_best=True))


def test_read_log_skips_blank_lines_and_missing_files(tmp_path):
    assert read_log(tmp_path) == []
    (tmp_path / "eval.jsonl").write_text('{"step": 1}\n\n{"step": 2}\n')
    assert [r["step"] for r in read_log(tmp_path, "eval.jsonl")] == [1, 2]
