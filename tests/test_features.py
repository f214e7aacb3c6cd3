"""`valr features`: precompute, resume (skip cached), report failures; training reads the cache and refuses one
made by another encoder or resolution."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from valr.cli import main
from valr.data.smoke import write_smoke_setup
from valr.teachers import FeatureCache, FeatureCacheMismatch, HFVisionTeacher
from valr.tiny import TinyShape
from valr.trainer import load_train_config, train

SMALL = TinyShape(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64, vision_depth=1, vision_hidden=16,
                  vision_heads=1)


def test_features_precompute_resume_train_and_mismatch(tmp_path, capsys, monkeypatch):
    smoke = write_smoke_setup(tmp_path / "smoke", n_train=8, n_val=4, shape=SMALL)
    root = smoke["train"].parent
    # a records file whose targets include a missing and an unreadable image (they parse fine)
    (root / "broken.png").write_bytes(b"nope")
    extra = [{"id": "gone", "images": ["images/train_0000.png"], "question": "q", "answer": "a",
              "steps": [{"text": "x", "target": "images/gone.png"}]},
             {"id": "broken", "images": ["images/train_0000.png"], "question": "q", "answer": "a",
              "steps": [{"text": "x", "target": "broken.png"}]}]
    with_bad = root / "with_bad.jsonl"
    with_bad.write_text(smoke["train"].read_text() + "".join(json.dumps(e) + "\n" for e in extra))
    cfg = dict(model=str(smoke["model"]), train_data=str(with_bad), val_data=str(smoke["val"]),
               output_dir=str(tmp_path / "run"), stage=2, max_steps=2, per_device_batch_size=2, grad_accum=1,
               num_workers=0, progress=False, tensorboard=False, save_every=0,
               valr={"k": 1, "align_layer": 1, "projector_width": 16, "feature_cache": str(tmp_path / "cache"),
                     "teachers": [{"name": "dino", "path": str(smoke["teacher"]), "image_size": 56}]})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    n_images = len({p.name for p in (root / "images").iterdir()})  # every smoke image is some step's target

    assert main(["features", "--config", str(config), "--batch-size", "5", "--shard-size", "4", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"{n_images} encoded, 0 skipped as cached, 2 failed" in out
    assert "predicting the mean feature gives alignment loss" in out
    assert "gone.png: cannot read" in out and f"(used by {with_bad}:9 (record 'gone'))" in out
    assert "broken.png: cannot read image" in out and "(record 'broken')" in out
    meta = json.loads((tmp_path / "cache" / "dino" / "meta.json").read_text())
    assert meta["image_size"] == 56 and meta["teacher_id"].startswith("hf:") and meta["dim"] == 32
    assert len(list((tmp_path / "cache" / "dino").glob("shard-*.safetensors"))) == -(-n_images // 4)

    # rerun: everything already there (resumable), nothing re-encoded
    assert main(["features", "--config", str(config), "--quiet"]) == 1
    assert f"0 encoded, {n_images} skipped as cached, 2 failed" in capsys.readouterr().out

    # training reads the cache: with the teacher's encoder disabled and fallback=error it still runs
    def no_encoding(self, images):
        raise AssertionError("training encoded an image although the cache has it")

    monkeypatch.setattr(HFVisionTeacher, "encode", no_encoding)
    final = train(load_train_config(config, [f"train_data={smoke['train']}", "feature_fallback=error"]))
    assert (final / "projectors.safetensors").is_file()
    monkeypatch.undo()

    # the same teacher name at another resolution: refused when training starts, before any step
    other = [f"train_data={smoke['train']}", f"output_dir={tmp_path / 'run2'}",
             "valr.teachers=[{name: dino, path: " + str(smoke["teacher"]) + ", image_size: 28}]"]
    with pytest.raises(FeatureCacheMismatch, match=r"made by encoder .*image_size=56.*this run is encoder "
                                                    r".*image_size=28"):
        train(load_train_config(config, other))
    assert not (tmp_path / "run2" / "history.jsonl").exists()
    assert main(["features", "--config", str(config), *other, "--quiet"]) == 2
    assert "delete" in capsys.readouterr().err


def test_cache_dtype_round_trip_matches_reads(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    from valr.teachers import TeacherSpec

    enc = Dinov2Model(Dinov2Config(image_size=28, patch_size=14, hidden_size=8, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=16))
    t = HFVisionTeacher(TeacherSpec(name="d", image_size=28), model=enc)
    cache = FeatureCache(tmp_path, t, shard_size=2, dtype="float16")
    x = torch.randn(4, 8)
    cache.put_key("k1", x, (2, 2))
    assert torch.equal(cache.get_key("k1")[0], cache.round_trip(x))  # pending
    cache.flush()
    again = FeatureCache(tmp_path, t)
    assert again.dtype == torch.float16 and torch.equal(again.get_key("k1")[0], cache.round_trip(x))
    assert again.get_key("k1")[1] == (2, 2) and again.get_key("missing") is None
