"""Development analysis of docs/results.md (twenty-first session, item 66): when a step names the object at a
given cell ("#2 view 4 row 4 col 1: large cyan ball"), does the token before the object's first word attend to
that cell? For a latent model the candidates are the 16 slots of the step's own latent segment (the aligned
grid, row-major); for a plain model (SFT) the 16 visual tokens of the step's view. Teacher-forced, one record at
a time (latent slots filled as in fast-mode training), eager attention, heads averaged. Per layer it prints the
share of the candidates' attention that goes to the named cell, how often the named cell gets the most, and the
candidates' share of all attention; chance for the first two is 1/16. ``--per-head``: per layer and head.

    .venv/bin/python docs/dev/slot_lookup.py RECORDS [CHECKPOINT ...] [--plain CHECKPOINT ...] [--limit N] [--per-head]

RECORDS is a records file of the demo world (e.g. a run's chains/val.jsonl); the CHECKPOINTs are latent models
(stage 2), those after --plain plain ones (stage 1, SFT).
"""

import argparse
import json
import re
from pathlib import Path

import torch

from valr.backbones.base import additive_mask
from valr.checkpoint import load_checkpoint
from valr.data import LayoutConfig, load_records, make_batch
from valr.diagnostics.common import eager_attention
from valr.engine import decoder_inputs, forward_latent, full_mask
from valr.tokens import LatentTokenIds

ADDRESSED = re.compile(r"^#\d+ view (\d+) row (\d+) col (\d+): ")  # the cell is given, the object is read


def attentions_with_latents(bb, batch, layer: int, latent: bool) -> torch.Tensor:
    """Eager attention weights, (layers, B, heads, L, L), of one teacher-forced pass over ``batch`` in which each
    latent slot holds what fast-mode training feeds it (under the image bottleneck, its mask)."""
    with torch.no_grad():
        embeds, positions = decoder_inputs(bb, batch)
        if latent:
            out = forward_latent(bb, batch, layer, "fast")
            for seg, (b, s) in enumerate(out.segment_owner):
                start = batch.segment_starts[b][s]
                embeds[b, start:start + batch.k] = out.latent_inputs[seg]
        mask = full_mask(bb, batch)
        if mask.dim() == 4:
            mask = additive_mask(mask, embeds.dtype)
        with eager_attention(bb.model):
            att = bb.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                        output_attentions=True, use_cache=False).attentions
    return torch.stack(att)


def lookups(ckpt: Path, records: Path, limit: int, latent: bool, per_head: bool = False) -> dict:
    loaded = load_checkpoint(ckpt)
    bb, tok, cfg = loaded.backbone, loaded.tokenizer, loaded.config
    lat = LatentTokenIds.from_tokenizer(tok) if latent else None
    layout = LayoutConfig(k=cfg.k if latent else 0, latent_after=cfg.latent_after if latent else None)
    colon = tok.convert_tokens_to_ids(":")
    share, top, mass, n = None, None, None, 0
    for rec in load_records(records)[:limit]:
        batch = make_batch([rec], tok, bb, layout, lat)
        att = attentions_with_latents(bb, batch, cfg.align_layer, latent)[:, 0]  # (layers, heads, L, L)
        att = att if per_head else att.mean(1, keepdim=True)
        images = (batch.input_ids[0] == bb.image_token_id).nonzero().flatten().tolist()
        for i, step in enumerate(rec.steps):
            m = ADDRESSED.match(step.text)
            if not m:
                continue
            view, row, col = (int(x) - 1 for x in m.groups())
            q = next(p for p in batch.step_positions[0][i] if int(batch.input_ids[0, p]) == colon)
            if latent:
                side = round(batch.k ** 0.5)
                start = batch.segment_starts[0][i]
                cands = list(range(start, start + batch.k))
            else:
                per = len(images) // len(rec.images)
                side = round(per ** 0.5)
                cands = images[view * per:(view + 1) * per]
            a = att[:, :, q, cands]  # (layers, heads or 1, 16)
            right = row * side + col
            s = a[..., right] / a.sum(-1)
            t = (a.argmax(-1) == right).float()
            share, top = (s, t) if share is None else (share + s, top + t)
            mass = a.sum(-1) if mass is None else mass + a.sum(-1)
            n += 1
    def r(x: torch.Tensor) -> list:
        rows = [[round(float(v) / max(n, 1), 4) for v in layer] for layer in x]
        return rows if per_head else [layer[0] for layer in rows]

    return {"lookups": n, "share_on_named_cell": r(share), "named_cell_top": r(top), "candidates_share": r(mass)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", type=Path)
    ap.add_argument("checkpoints", type=Path, nargs="*", help="latent models")
    ap.add_argument("--plain", type=Path, nargs="+", default=[], help="plain models (stage 1, SFT)")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--per-head", action="store_true", help="one value per layer and head instead of heads averaged")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for ckpt, latent in [(c, True) for c in args.checkpoints] + [(c, False) for c in args.plain]:
        print(ckpt, json.dumps(lookups(ckpt, args.records, args.limit, latent, args.per_head)), flush=True)


if __name__ == "__main__":
    main()
