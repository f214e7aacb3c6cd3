"""Checkpoints: a standard Hugging Face directory plus valr's own two files.

Layout of a checkpoint directory::

    config.json, model.safetensors (or shards), generation_config.json   -- the MLLM (save_pretrained)
    tokenizer.json, tokenizer_config.json, chat_template.jinja           -- tokenizer, latent tokens included
    preprocessor_config.json                                             -- image processor
    valr_config.json                                                     -- method settings + projector shapes
    projectors.safetensors                                               -- REPA projectors (stage 2 only)

Any tool that reads HF checkpoints (``AutoModelForImageTextToText.from_pretrained``) loads the model; the
projectors are only needed to continue training. Loading never unpickles (safetensors only) and never runs
remote code; it also works on a raw Qwen2.5-VL download, adding the latent tokens when they are missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer, PreTrainedModel

from valr.align import Aligner
from valr.backbones import Backbone, backbone_for, set_layout
from valr.config import ValrConfig
from valr.tokens import QWEN_VL_CHAT_TEMPLATE, add_latent_tokens

VALR_CONFIG = "valr_config.json"
PROJECTORS = "projectors.safetensors"


@dataclass
class Loaded:
    model: PreTrainedModel
    tokenizer: object
    image_processor: object
    backbone: Backbone
    config: ValrConfig
    aligner: Aligner | None


def save_checkpoint(path: str | Path, model: PreTrainedModel, tokenizer, image_processor,
                    config: ValrConfig | None = None, aligner: Aligner | None = None) -> Path:
    """Write a checkpoint directory atomically (to ``path.tmp`` first, then renamed over ``path``)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    image_processor.save_pretrained(tmp)
    meta = {"valr": (config or ValrConfig()).to_dict()}
    if aligner is not None:
        meta["projectors"] = {
            name: {"in": p.net[0].in_features, "width": p.net[0].out_features, "out": p.net[-1].out_features}
            for name, p in aligner.projectors.items()
        }
        save_file({k: v.detach().cpu().contiguous() for k, v in aligner.state_dict().items()},
                  str(tmp / PROJECTORS))
    (tmp / VALR_CONFIG).write_text(json.dumps(meta, indent=2, default=str))
    if path.exists():
        import shutil

        old = path.with_name(path.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    ) -> Loaded:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json); pass a local checkpoint "
                                "directory, e.g. one written by `valr tiny --out DIR` or a downloaded Qwen2.5-VL")
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, trust_remote_code=False,
                                                        use_safetensors=True, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE
    add_latent_tokens(tokenizer, model)
    image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    config, aligner = ValrConfig(), None
    meta = {}
    if (path / VALR_CONFIG).is_file():
        meta = json.loads((path / VALR_CONFIG).read_text())
        config = ValrConfig.from_dict(meta.get("valr", {}), str(path / VALR_CONFIG))
    backbone = backbone_for(model, image_processor=image_processor)
    try:
        set_layout(backbone, config)  # validates the file's latent options (feed, positions)
    except ValueError as e:
        raise ValueError(f"{path / VALR_CONFIG}: {e}; fix the file") from None
    if meta:
        shapes = meta.get("projectors")
        if shapes and (path / PROJECTORS).is_file():
            widths = {s["width"] for s in shapes.values()}
            aligner = Aligner.for_config(backbone.hidden_size, {n: s["out"] for n, s in shapes.items()}, config,
                                         widths.pop())
            aligner.load_state_dict(load_file(str(path / PROJECTORS)))
            aligner.to(device)
    return Loaded(model, tokenizer, image_processor, backbone, config, aligner)
