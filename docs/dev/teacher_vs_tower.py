"""What the perception teacher knows that the MLLM's own visual tokens do not (docs/results.md, eleventh session).

    .venv/bin/python docs/dev/teacher_vs_tower.py RUN [CHECKPOINT ...] [--images 800]

RUN is a `valr demo` output directory with a finished teacher and vision stage. For every cell of a view (one
teacher patch and one merged visual token each) a ridge regression maps one description of the cell to another,
fitted on training images and scored on validation images as R^2 (the share of the target's variance it
predicts, pooled over dimensions). The descriptions: the teacher's features (centred per image, as the alignment
uses them), the MLLM's visual tokens (RUN's vision stage, and any CHECKPOINT given, e.g. the stage-1 model), and
the cell's labels one-hot (presence, shape, colour, size, row, column, view). If the visual tokens predict the
teacher's features about as well as the teacher predicts itself, the alignment adds no information the image
tokens lack; it can only move that information next to the step.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from valr.checkpoint import load_checkpoint
from valr.synth.dataset import load_labels
from valr.synth.teacher import teacher_spec
from valr.teachers import SelfVisionTeacher, TeacherSpec, build_teacher


def encode(teacher, paths: list[Path], batch: int = 64) -> np.ndarray:
    rows = []
    for i in range(0, len(paths), batch):
        images = []
        for p in paths[i:i + batch]:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        rows += [f.numpy() for f, _ in teacher.encode(images)]
    return np.stack(rows)  # images x cells x dim


def one_hot(labels: dict[str, np.ndarray], idx: np.ndarray, views: np.ndarray) -> np.ndarray:
    g = labels["present"].shape[-1]
    parts = []
    for key in ("present", "shape", "colour", "size"):
        v = labels[key][idx].reshape(len(idx), g * g).astype(np.int64) + 1  # -1 (empty cell) -> class 0
        parts.append(np.eye(int(v.max()) + 1)[v])
    cell = np.arange(g * g)
    parts.append(np.broadcast_to(np.eye(g)[cell // g], (len(idx), g * g, g)))
    parts.append(np.broadcast_to(np.eye(g)[cell % g], (len(idx), g * g, g)))
    parts.append(np.repeat(np.eye(int(views.max()) + 1)[views][:, None], g * g, axis=1))
    return np.concatenate(parts, axis=-1).astype(np.float32)


def ridge(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, alpha: float = 1e-2) -> np.ndarray:
    """Ridge regression fitted on (x_tr, y_tr) (cells flattened, inputs standardised); predictions for x_va."""
    x_tr, y_tr, x_va = (a.reshape(-1, a.shape[-1]).astype(np.float64) for a in (x_tr, y_tr, x_va))
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    xt, xv = (x_tr - mu) / sd, (x_va - mu) / sd
    ym = y_tr.mean(0)
    w = np.linalg.solve(xt.T @ xt + alpha * len(xt) * np.eye(xt.shape[1]), xt.T @ (y_tr - ym))
    return xv @ w + ym


def ridge_r2(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray) -> float:
    y_va = y_va.reshape(-1, y_va.shape[-1]).astype(np.float64)
    ym = y_tr.reshape(-1, y_tr.shape[-1]).mean(0)
    return float(1 - ((y_va - ridge(x_tr, y_tr, x_va)) ** 2).sum() / ((y_va - ym) ** 2).sum())


def probe_accuracy(x_tr: np.ndarray, x_va: np.ndarray, labels: dict[str, np.ndarray], tr: np.ndarray,
                   va: np.ndarray) -> dict[str, float]:
    """Linear read-out (ridge on one-hot, argmax) of each label from the features; shape, colour and size over
    occupied cells only."""
    out = {}
    occupied = labels["present"][va].reshape(-1)
    for key in ("present", "shape", "colour", "size"):
        y_tr = labels[key][tr].reshape(-1).astype(np.int64) + 1
        y_va = labels[key][va].reshape(-1).astype(np.int64) + 1
        pred = ridge(x_tr, np.eye(int(max(y_tr.max(), y_va.max())) + 1)[y_tr], x_va).argmax(-1)
        keep = np.ones_like(occupied) if key == "present" else occupied
        out[key] = round(float((pred == y_va)[keep].mean()), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("checkpoints", nargs="*", type=Path, help="more MLLMs whose visual tokens to compare")
    ap.add_argument("--images", type=int, default=800, help="training images for the fit (validation: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    world = args.run / "world"
    labels = load_labels(world)
    rng = np.random.default_rng(0)
    train = rng.permutation(np.nonzero(labels["split"] == "train")[0])[:args.images]
    val = np.nonzero(labels["split"] == "val")[0]
    paths = {s: [world / str(labels["paths"][i]) for i in idx] for s, idx in (("train", train), ("val", val))}
    views = {s: np.array([int(Path(p).stem.rsplit("_v", 1)[1]) for p in paths[s]]) for s in paths}

    feats: dict[str, dict[str, np.ndarray]] = {"labels": {s: one_hot(labels, idx, views[s])
                                                          for s, idx in (("train", train), ("val", val))}}
    teacher = build_teacher(teacher_spec(args.run / "teacher"))
    feats["teacher"] = {s: encode(teacher, paths[s]) for s in paths}
    feats["teacher"] = {s: f - f.mean(1, keepdims=True) for s, f in feats["teacher"].items()}  # centred targets
    models = {"vision": args.run / "vision" / "model", **{c.parent.parent.name if c.name == "final" else c.name: c
                                                         for c in args.checkpoints}}
    for name, ckpt in models.items():
        tower = SelfVisionTeacher(TeacherSpec(name=name, kind="self"), load_checkpoint(ckpt).backbone)
        feats[f"tokens:{name}"] = {s: encode(tower, paths[s]) for s in paths}

    def r2(src: str, dst: str) -> float:
        return round(ridge_r2(feats[src]["train"], feats[dst]["train"], feats[src]["val"], feats[dst]["val"]), 4)

    out = {"run": str(args.run), "train_images": len(train), "val_images": len(val), "r2": {}}
    for dst in feats:
        out["r2"][dst] = {src: r2(src, dst) for src in feats}
    out["linear_read_out"] = {src: probe_accuracy(feats[src]["train"], feats[src]["val"], labels, train, val)
                              for src in feats if src != "labels"}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
