"""The built-in world's perception teacher: a small ViT trained on the world's dense per-cell labels, then frozen.

It plays DINOv3's role in the laptop demo (no pretrained ViT can be downloaded here): a vision encoder whose
patch features carry what the scene *contains*, cell by cell. Architecture: a transformers ``Dinov2Model``
built from a config (no weights downloaded) with ``patch_size = image_size / grid``, so its patch grid is the
world's cell grid (112 px, 28 px patches: 4x4 patches, one per cell, plus the CLS token).

Training: the patch features of ``last_hidden_state`` feed one linear head per label: object presence (2
classes), shape (5), colour (6) and size (2); attribute losses count only occupied cells. The images are the
training split's views listed in ``labels.npz``; the validation split's views measure per-cell accuracy. After
training the heads are dropped and the encoder is written as a standard Hugging Face directory (config.json,
model.safetensors, preprocessor_config.json with the normalisation), which :class:`valr.teachers.HFVisionTeacher`
loads through ``TeacherSpec(kind="hf", path=...)`` exactly like a downloaded DINOv3. Preprocessing here is the
teacher's own (resize to ``image_size``, bicubic; ImageNet mean/std), so training and feature extraction see
identical pixels.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from valr.teachers import IMAGENET_MEAN, IMAGENET_STD, TeacherSpec

N_CLASSES = {"present": 2, "shape": 5, "colour": 6, "size": 2}


@dataclass(frozen=True)
class TeacherTrainConfig:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 2
    steps: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_encoder(cfg: TeacherTrainConfig, image_size: int, grid: int):
    """A random ``Dinov2Model`` whose patch grid is ``grid`` x ``grid`` at ``image_size`` px."""
    from transformers import Dinov2Config, Dinov2Model

    if image_size % grid:
        raise ValueError(f"image_size {image_size} is not a multiple of the grid {grid}")
    config = Dinov2Config(image_size=image_size, patch_size=image_size // grid, num_channels=3,
                          hidden_size=cfg.hidden, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                          mlp_ratio=cfg.mlp_ratio, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                          drop_path_rate=0.0)
    torch.manual_seed(cfg.seed)
    return Dinov2Model(config)


def pixels(image: Image.Image, image_size: int) -> torch.Tensor:
    """The teacher's preprocessing (same as ``HFVisionTeacher._pixels`` with ImageNet statistics)."""
    im = image.convert("RGB").resize((image_size, image_size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def _load_split(world_dir: Path, labels: dict[str, np.ndarray], split: str, image_size: int, limit: int | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    rows = np.nonzero(labels["split"] == split)[0]
    if limit is not None:
        rows = rows[:limit]
    if len(rows) == 0:
        raise ValueError(f"labels.npz has no {split!r} images")
    xs = []
    for i in rows:
        with Image.open(world_dir / str(labels["paths"][i])) as im:
            xs.append(pixels(im, image_size))
    ys = {"present": torch.from_numpy(labels["present"][rows].astype(np.int64)).flatten(1)}
    for key in ("shape", "colour", "size"):
        ys[key] = torch.from_numpy(labels[key][rows].astype(np.int64)).flatten(1)
    return torch.stack(xs), ys


class _Heads(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in N_CLASSES.items()})

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: h(feats) for k, h in self.heads.items()}


def _patches(encoder, x: torch.Tensor, n_cells: int) -> torch.Tensor:
    out = encoder(pixel_values=x).last_hidden_state
    return out[:, out.shape[1] - n_cells:]


def _loss(logits: dict[str, torch.Tensor], ys: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = F.cross_entropy(logits["present"].flatten(0, 1), ys["present"].flatten())
    occupied = ys["present"].flatten() == 1
    for key in ("shape", "colour", "size"):
        if occupied.any():
            loss = loss + F.cross_entropy(logits[key].flatten(0, 1)[occupied], ys[key].flatten()[occupied])
    return loss


@torch.no_grad()
def cell_accuracy(encoder, heads: _Heads, x: torch.Tensor, ys: dict[str, torch.Tensor], batch: int = 256
                  ) -> dict[str, float]:
    """Per-cell accuracy of each label (attributes on occupied cells) and of the whole cell (all labels right)."""
    n_cells = ys["present"].shape[1]
    preds: dict[str, list[torch.Tensor]] = {k: [] for k in N_CLASSES}
    for i in range(0, len(x), batch):
        logits = heads(_patches(encoder, x[i:i + batch], n_cells))
        for k in N_CLASSES:
            preds[k].append(logits[k].argmax(-1))
    p = {k: torch.cat(v) for k, v in preds.items()}
    occ = ys["present"] == 1
    out = {"present": float((p["present"] == ys["present"]).float().mean())}
    cell_ok = p["present"] == ys["present"]
    for k in ("shape", "colour", "size"):
        right = p[k] == ys[k]
        out[k] = float(right[occ].float().mean()) if occ.any() else 1.0
        cell_ok = cell_ok & (right | ~occ)
    out["cell"] = float(cell_ok.float().mean())
    return out


def train_perception_teacher(world_dir: str | Path, out_dir: str | Path, cfg: TeacherTrainConfig = TeacherTrainConfig(),
                             progress: bool = True, val_limit: int | None = 1024) -> dict[str, Any]:
    """Train the teacher on ``world_dir`` (a ``make_world_dataset`` directory); write ``out_dir/model``.

    Returns metrics: per-cell validation accuracy per label, final loss, steps and seconds.
    """
    from tqdm import tqdm

    from valr.synth.dataset import load_labels

    world_dir, out_dir = Path(world_dir), Path(out_dir)
    manifest = json.loads((world_dir / "manifest.json").read_text())
    image_size, grid = manifest["config"]["world"]["image_size"], manifest["config"]["world"]["grid"]
    labels = load_labels(world_dir)
    t0 = time.perf_counter()
    x_train, y_train = _load_split(world_dir, labels, "train", image_size)
    x_val, y_val = _load_split(world_dir, labels, "val", image_size, val_limit)
    encoder = build_encoder(cfg, image_size, grid)
    torch.manual_seed(cfg.seed)
    heads = _Heads(cfg.hidden)
    params = list(encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    gen = torch.Generator().manual_seed(cfg.seed)
    n_cells = grid * grid
    encoder.train()
    losses = []
    bar = tqdm(range(cfg.steps), desc="teacher", unit="step", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        idx = torch.randint(len(x_train), (cfg.batch_size,), generator=gen)
        xb = x_train[idx]
        if torch.rand((), generator=gen) < 0.5:  # a horizontal flip is a relabelled scene: mirror the labels too
            xb = xb.flip(-1)
            yb = {k: v[idx].view(-1, grid, grid).flip(-1).flatten(1) for k, v in y_train.items()}
        else:
            yb = {k: v[idx] for k, v in y_train.items()}
        loss = _loss(heads(_patches(encoder, xb, n_cells)), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    encoder.eval()
    acc = cell_accuracy(encoder, heads, x_val, y_val)
    model_dir = out_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(model_dir)
    (model_dir / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "size": image_size,
         "note": "valr perception teacher: resize to size (bicubic), scale to [0,1], normalise"}, indent=2))
    return {"val_cell_accuracy": acc, "final_loss": float(np.mean(losses[-20:])), "steps": cfg.steps,
            "n_train_images": len(x_train), "n_val_images": len(x_val), "grid": [grid, grid],
            "dim": cfg.hidden, "params_m": sum(p.numel() for p in encoder.parameters()) / 1e6,
            "seconds": time.perf_counter() - t0, "config": cfg.to_dict()}


def teacher_spec(out_dir: str | Path, name: str = "percept", image_size: int = 112) -> TeacherSpec:
    """The ``TeacherSpec`` that loads a trained teacher from ``out_dir`` (what stage 2 configs point at)."""
    return TeacherSpec(name=name, kind="hf", path=str(Path(out_dir).resolve() / "model"), image_size=image_size)
