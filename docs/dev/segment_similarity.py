"""Development analysis of docs/results.md (twenty-first session, item 66): how alike are the K latent states of
one segment? For each latent checkpoint, the alignment-layer states of every segment of the first 32 records
(teacher-forced, fast mode, the checkpoint's own layout and positions) are centred over segments, and the mean
cosine between different slots of the same segment is printed. Higher: the slots are harder to tell apart.

    .venv/bin/python docs/dev/segment_similarity.py RECORDS CHECKPOINT [CHECKPOINT ...]
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from valr.checkpoint import load_checkpoint
from valr.data import LayoutConfig, load_records, make_batch
from valr.engine import forward_latent
from valr.tokens import LatentTokenIds


def within_segment_cosine(ckpt: str, records: list, batch: int = 16) -> float:
    loaded = load_checkpoint(ckpt)
    bb, tok, cfg = loaded.backbone, loaded.tokenizer, loaded.config
    lat = LatentTokenIds.from_tokenizer(tok)
    other = ~torch.eye(cfg.k, dtype=torch.bool)
    sims = []
    with torch.no_grad():
        for i in range(0, len(records), batch):
            b = make_batch(records[i:i + batch], tok, bb, LayoutConfig(k=cfg.k, latent_after=cfg.latent_after), lat)
            states = forward_latent(bb, b, cfg.align_layer, "fast").latent_states  # (segments, K, D)
            unit = F.normalize(states - states.mean(0, keepdim=True), dim=-1)
            sims.append((unit @ unit.transpose(1, 2))[:, other].mean())
    return float(torch.stack(sims).mean())


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    records = load_records(Path(sys.argv[1]))[:32]
    for ckpt in sys.argv[2:]:
        print(ckpt, round(within_segment_cosine(ckpt, records), 4), flush=True)


if __name__ == "__main__":
    main()
