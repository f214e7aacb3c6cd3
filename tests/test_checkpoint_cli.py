"""Checkpoints round-trip; the command line works end to end."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from valr.align import Aligner
from valr.checkpoint import load_checkpoint, save_checkpoint
from valr.cli import main
from valr.config import ConfigError, ValrConfig, load_config
from valr.generate import GenerationConfig, Generator, Prompt


def test_save_load_generate_identical(tiny, image_dir, tmp_path):
    model, tok, ip, bb, latent = tiny
    aligner = Aligner(bb.hidden_size, {"dino": 12}, width=16)
    save_checkpoint(tmp_path / "ck", model, tok, ip, ValrConfig(k=4, align_layer=2), aligner)
    files = {p.name for p in (tmp_path / "ck").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "valr_config.json",
            "projectors.safetensors"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)  # nothing to unpickle
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.config.k == 4 and loaded.config.align_layer == 2
    for a, b in zip(aligner.state_dict().values(), loaded.aligner.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    prompts = [Prompt("What is left of the cube?", [Image.open(image_dir / "a.png")])]
    cfg = GenerationConfig(max_new_tokens=12, latent_policy="force", k=4, return_latents=True)
    before = Generator(bb, tok)(prompts, cfg)[0]
    after = Generator(loaded.backbone, loaded.tokenizer)(prompts, cfg)[0]
    assert before.token_ids == after.token_ids and before.prompt_token_ids == after.prompt_token_ids
    torch.testing.assert_close(torch.cat(before.latents), torch.cat(after.latents))
    # other tools read it as a standard HF checkpoint
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "ck", local_files_only=True)
    assert type(hf).__name__ == "Qwen2_5_VLForConditionalGeneration"


def test_latent_feed_travels_with_the_checkpoint(tiny, image_dir, tmp_path):
    """A model trained with rescaled latents is generated from with rescaled latents, with no flag to remember."""
    model, tok, ip, bb, latent = tiny
    save_checkpoint(tmp_path / "ck", model, tok, ip, ValrConfig(k=4, latent_feed="embedding_rms"))
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.config.latent_feed == loaded.backbone.latent_feed == "embedding_rms"
    prompts = [Prompt("What is left of the cube?", [Image.open(image_dir / "a.png")])]
    cfg = GenerationConfig(max_new_tokens=12, latent_policy="force", k=4, return_latents=True)
    bb.latent_feed = "embedding_rms"
    here = Generator(bb, tok)(prompts, cfg)[0]
    there = Generator(loaded.backbone, loaded.tokenizer)(prompts, cfg)[0]
    torch.testing.assert_close(torch.cat(here.latents), torch.cat(there.latents))
    meta = json.loads((tmp_path / "ck" / "valr_config.json").read_text())
    meta["valr"]["latent_feed"] = "unit"
    (tmp_path / "ck" / "valr_config.json").write_text(json.dumps(meta))
    bad_feed = (r"valr_config.json: valr.latent_feed='unit' is not one of \['hidden', .*\] "
                r"\('hidden', the paper's .*\); fix the file")
    with pytest.raises(ValueError, match=bad_feed):
        load_checkpoint(tmp_path / "ck")


def test_cli_tiny_and_generate_json(tmp_path, image_dir, capsys):
    assert main(["tiny", "--out", str(tmp_path / "m"), "--k", "4"]) == 0
    capsys.readouterr()
    code = main(["generate", "--model", str(tmp_path / "m"), "--image", str(image_dir / "a.png"), "--image",
                 str(image_dir / "b.png"), "--prompt", "Count the objects.", "--latent-policy", "force", "--k", "4",
                 "--max-new-tokens", "8", "--return-latents", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"text", "prompt_token_ids", "token_ids", "latent_segments", "generated_positions"} <= set(out)
    assert out["latent_segments"] >= 1 and all(len(seg) == 4 for seg in out["latents"])
    assert out["generated_positions"] == len(out["token_ids"]) + sum(len(seg) for seg in out["latents"])
    assert len(out["token_ids"]) <= 8


def test_cli_missing_model_and_image_errors(tmp_path, image_dir):
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        main(["generate", "--model", str(tmp_path), "--prompt", "x"])
    main(["tiny", "--out", str(tmp_path / "m")])
    with pytest.raises(ValueError, match="does not exist"):
        main(["generate", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "none.png"), "--prompt", "x"])


def test_config_yaml_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("k: 9\nteachers:\n  - {name: dinov3, path: /models/dinov3}\n")
    cfg = load_config(path, ["lambda_align=0.25", "align_layer=4"])
    assert (cfg.k, cfg.lambda_align, cfg.align_layer) == (9, 0.25, 4)
    assert cfg.teachers[0].name == "dinov3" and cfg.teachers[0].kind == "hf"
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lamda'\]"):
        load_config(path, ["lamda=1"])
    with pytest.raises(ConfigError, match=r"teachers\[0\].*unknown key"):
        load_config(None, ["teachers=[{name: a, size: 3}]"])


def test_help_explains(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    assert "--latent-policy" in text and "force" in text


def test_latent_positions_travel_with_the_checkpoint(tiny, tmp_path):
    """A model trained with latent grid positions is loaded with them (side from its K), and a bad value in the
    file names the file."""
    model, tok, ip, bb, latent = tiny
    save_checkpoint(tmp_path / "ck", model, tok, ip, ValrConfig(k=9, latent_positions="grid", image_bottleneck=True))
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.backbone.latent_grid_side == 3 and loaded.backbone.image_bottleneck
    meta = json.loads((tmp_path / "ck" / "valr_config.json").read_text())
    meta["valr"]["latent_positions"] = "rows"
    (tmp_path / "ck" / "valr_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"valr_config.json: valr.latent_positions='rows'.*fix the file"):
        load_checkpoint(tmp_path / "ck")
