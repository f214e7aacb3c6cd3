"""Development analysis of docs/results.md (twenty-ninth session, item 74): what each latent slot holds about its
own cell, layer by layer. The aligned text reads the named cell's colour from its slot every time and its size
no better than chance (item 74); is the size not in the slot, or not read from it?

For every step with a latent segment, the 16 slots' residual states after each decoder layer (index 0: the fed
inputs; teacher-forced, fast mode, the slots filled as in training, under the checkpoint's own mask) are paired
with the cell labels of the step's target view (the world's labels.npz). A ridge read-out per label and layer,
fitted on the steps of the first ``--train`` training records and scored on the validation records' steps:
presence over all cells, size, colour and shape over occupied cells (chance about 1/2, 1/6 and 1/5).

    .venv/bin/python docs/dev/slot_probe.py TRAIN_RECORDS VAL_RECORDS CHECKPOINT [CHECKPOINT ...] [--train 200]
                                            [--limit 152]
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from slot_lookup import CellLabels, teacher_forced_pass  # docs/dev, beside this script
from teacher_vs_tower import ridge

from valr.checkpoint import load_checkpoint
from valr.data import LayoutConfig, load_records, make_batch
from valr.tokens import LatentTokenIds


@torch.no_grad()
def slot_states(loaded, records: list) -> tuple[np.ndarray, np.ndarray]:
    """(segments x 16, layers + 1, D) slot states and (segments x 16, 4) their cells' label classes."""
    bb, tok, cfg = loaded.backbone, loaded.tokenizer, loaded.config
    lat = LatentTokenIds.from_tokenizer(tok)
    layout = LayoutConfig(k=cfg.k, latent_after=cfg.latent_after)
    labels, states, classes = None, [], []
    for rec in records:
        batch = make_batch([rec], tok, bb, layout, lat)
        hidden = teacher_forced_pass(bb, batch, cfg.align_layer, True, output_hidden_states=True).hidden_states
        hidden = torch.stack(hidden)[:, 0]  # (layers + 1, L, D)
        for start, image in zip(batch.segment_starts[0], batch.segment_targets[0], strict=True):
            if image is None:
                continue
            labels = labels or CellLabels(tok, image.parents[2])
            states.append(hidden[:, start:start + batch.k].transpose(0, 1).float().numpy())
            classes.append(labels.classes(image).T)
    return np.concatenate(states), np.concatenate(classes)


def read_out(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray) -> dict[str, float]:
    """Per label the validation accuracy of a ridge read-out fitted on one-hot targets (argmax)."""
    out = {}
    for j, key in enumerate(CellLabels.KEYS):
        keep_tr = np.ones(len(y_tr), bool) if j == 0 else y_tr[:, 0] == 1
        keep_va = np.ones(len(y_va), bool) if j == 0 else y_va[:, 0] == 1
        n = int(max(y_tr[keep_tr, j].max(), y_va[keep_va, j].max())) + 1
        pred = ridge(x_tr[keep_tr], np.eye(n)[y_tr[keep_tr, j]], x_va[keep_va]).argmax(-1)
        out[key] = round(float((pred == y_va[keep_va, j]).mean()), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("train_records", type=Path, help="records the read-out is fitted on (a reading run's train.jsonl)")
    ap.add_argument("val_records", type=Path, help="records to score it on (e.g. read_val.jsonl)")
    ap.add_argument("checkpoints", type=Path, nargs="+", help="latent models")
    ap.add_argument("--train", type=int, default=200, help="training records used (the first TRAIN)")
    ap.add_argument("--limit", type=int, default=152, help="validation records used (the first LIMIT)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, val = load_records(args.train_records)[:args.train], load_records(args.val_records)[:args.limit]
    for ckpt in args.checkpoints:
        loaded = load_checkpoint(ckpt)
        (x_tr, y_tr), (x_va, y_va) = slot_states(loaded, train), slot_states(loaded, val)
        layers = [read_out(x_tr[:, li], y_tr, x_va[:, li], y_va) for li in range(x_tr.shape[1])]
        row = {"checkpoint": str(ckpt), "train_slots": len(x_tr), "val_slots": len(x_va),
               "occupied_val": round(float(y_va[:, 0].mean()), 4), "by_layer": layers}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
