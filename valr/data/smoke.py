"""A self-contained smoke set-up for training on CPU: a tiny random Qwen2.5-VL, a tiny random DINOv2 teacher,
small PNGs (a coloured square on grey) and records about them. Used by tests, the throughput benchmark and the
``configs/tiny`` configs (``valr data make-smoke runs/smoke``). Deterministic for a given seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
PLACES = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}


def _image(color: str, place: str, side: int, rng: np.random.Generator) -> Image.Image:
    a = np.full((side, side, 3), 128, dtype=np.uint8) + rng.integers(0, 12, (side, side, 3), dtype=np.uint8)
    r, c = PLACES[place]
    h = side // 2
    a[r * h + h // 4: r * h + 3 * h // 4, c * h + h // 4: c * h + 3 * h // 4] = COLORS[color]
    return Image.fromarray(a)


def write_smoke_records(root: str | Path, n_train: int = 24, n_val: int = 8, seed: int = 0, side: int = 56,
                        ) -> dict[str, Path]:
    """Images under root/images and root/train.jsonl, root/val.jsonl. Every fourth record has two views with
    per-step targets; the others have one view (default target: image 0)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colors, places = list(COLORS), list(PLACES)
    out: dict[str, Path] = {}
    for split, n in (("train", n_train), ("val", n_val)):
        lines = []
        for i in range(n):
            color, place = colors[rng.integers(4)], places[rng.integers(4)]
            name = f"{split}_{i:04d}"
            _image(color, place, side, rng).save(root / "images" / f"{name}.png")
            if i % 4 == 3:
                color2, place2 = colors[rng.integers(4)], places[rng.integers(4)]
                _image(color2, place2, side, rng).save(root / "images" / f"{name}_b.png")
                rec = {"id": name, "images": [f"images/{name}.png", f"images/{name}_b.png"],
                       "question": "What colour is the square in the second view?",
                       "steps": [{"text": f"In the first view the square is {color}.", "target": 0},
                                 {"text": f"In the second view the square is in the {place2}.", "target": 1},
                                 {"text": f"It is {color2}.", "target": 1}],
                       "answer": color2}
            else:
                rec = {"id": name, "images": [f"images/{name}.png"],
                       "question": "Where is the square and what colour is it?",
                       "steps": [f"The square is in the {place}.", f"It is {color}."],
                       "answer": f"{color}, {place}"}
            lines.append(json.dumps(rec))
        path = root / f"{split}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        out[split] = path
    return out


def write_tiny_teacher(path: str | Path, image_size: int = 56, hidden: int = 32) -> Path:
    """A random DINOv2 with a 4x4 patch grid at ``image_size`` (ViT-style teacher for the ``hf`` kind)."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    enc = Dinov2Model(Dinov2Config(image_size=image_size, patch_size=image_size // 4, hidden_size=hidden,
                                   num_hidden_layers=1, num_attention_heads=2, intermediate_size=2 * hidden))
    enc.save_pretrained(path)
    return Path(path)


def write_smoke_setup(root: str | Path, n_train: int = 24, n_val: int = 8, seed: int = 0, shape="tiny",
                      k: int = 4, side: int = 56) -> dict[str, Path]:
    """root/model (tiny Qwen2.5-VL checkpoint), root/teacher (tiny DINOv2), images and records."""
    from valr.checkpoint import save_checkpoint
    from valr.config import ValrConfig
    from valr.tiny import build_tiny

    root = Path(root)
    paths = write_smoke_records(root, n_train, n_val, seed, side)
    model, tok, ip = build_tiny("small", shape, seed=seed)
    layers = model.config.get_text_config().num_hidden_layers
    save_checkpoint(root / "model", model, tok, ip, ValrConfig(k=k, align_layer=max(1, layers // 2),
                                                               projector_width=64))
    paths["model"] = root / "model"
    paths["teacher"] = write_tiny_teacher(root / "teacher")
    return paths


def make_smoke_main(args) -> int:
    paths = write_smoke_setup(args.out, n_train=args.n_train, n_val=args.n_val, seed=args.seed)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0
