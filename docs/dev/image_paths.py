"""Development analysis of docs/results.md (twenty-second session, item 67): how much of a latent model's text and
latents changes when every record's images are swapped for the next record's? Teacher-forced, fast mode, the
checkpoint's own layout (the image bottleneck included: there the text reaches the images only through its
latents). Printed per checkpoint: the relative change (norm of the difference over the norm) of the text's last
hidden states at the labelled positions, of the latent states at the alignment layer, and the CE with own and
swapped images, and the share of object words (size, colour, shape) predicted right with own and with swapped
images (argmax, teacher-forced). A text that reads its latents changes when they do.

With --gradient it prints instead, for the first 8 records, the norm of the CE's gradient on the vision tower in
fast and in exact mode: under the bottleneck only the latents connect the tower to the text, and fast mode
detaches the slots' fed-back inputs.

    .venv/bin/python docs/dev/image_paths.py RECORDS CHECKPOINT [CHECKPOINT ...] [--limit 32] [--gradient]
                                             [--bottleneck]

--bottleneck measures checkpoints trained without the image bottleneck under it.
"""

import argparse
from pathlib import Path

import torch

from valr.checkpoint import load_checkpoint
from valr.data import LayoutConfig, load_records, make_batch
from valr.demo.probes import object_hits, object_token_ids, with_swapped_images
from valr.engine import forward_latent
from valr.tokens import LatentTokenIds


def _load(ckpt: str, bottleneck: bool):
    """The checkpoint's backbone, tokenizer, config, latent token ids and its own latent layout."""
    loaded = load_checkpoint(ckpt)
    if bottleneck:  # a model trained without the bottleneck, measured under it
        loaded.backbone.image_bottleneck = True
    cfg = loaded.config
    return (loaded.backbone, loaded.tokenizer, cfg, LatentTokenIds.from_tokenizer(loaded.tokenizer),
            LayoutConfig(k=cfg.k, latent_after=cfg.latent_after))


def image_paths(ckpt: str, records: list, bottleneck: bool = False, batch: int = 16) -> dict[str, float]:
    bb, tok, cfg, lat, layout = _load(ckpt, bottleneck)
    objects = object_token_ids(tok)
    sums = dict.fromkeys(("text_diff", "text", "latent_diff", "latent", "ce_own", "ce_swapped", "tokens",
                          "object_own", "object_swapped", "objects"), 0.0)
    with torch.no_grad():
        for i in range(0, len(records), batch):
            own = records[i:i + batch]
            batches = [make_batch(rs, tok, bb, layout, lat) for rs in (own, with_swapped_images(own))]
            outs = [forward_latent(bb, b, cfg.align_layer, "fast") for b in batches]
            labelled = batches[0].labels != -100
            text = [o.hidden[labelled] for o in outs]
            sums["text_diff"] += float((text[0] - text[1]).square().sum())
            sums["text"] += float(text[0].square().sum())
            sums["latent_diff"] += float((outs[0].latent_states - outs[1].latent_states).square().sum())
            sums["latent"] += float(outs[0].latent_states.square().sum())
            for name, o in zip(("own", "swapped"), outs, strict=True):
                sums["ce_" + name] += float(o.loss_ce) * o.n_label_tokens
                right, count = object_hits(bb, o.hidden, batches[0].labels, objects)
                sums["object_" + name] += right
            sums["tokens"] += outs[0].n_label_tokens
            sums["objects"] += count
    return {"text_change": (sums["text_diff"] / sums["text"]) ** 0.5,
            "latent_change": (sums["latent_diff"] / sums["latent"]) ** 0.5,
            "ce_own": sums["ce_own"] / sums["tokens"], "ce_swapped": sums["ce_swapped"] / sums["tokens"],
            "object_own": sums["object_own"] / max(sums["objects"], 1),
            "object_swapped": sums["object_swapped"] / max(sums["objects"], 1)}



def vision_gradient(ckpt: str, records: list, bottleneck: bool = False) -> dict[str, float]:
    bb, tok, cfg, lat, layout = _load(ckpt, bottleneck)
    batch = make_batch(records, tok, bb, layout, lat)
    vision = [p for n, p in bb.model.named_parameters() if "visual" in n]
    out = {}
    for mode in ("fast", "exact"):
        for p in vision:
            p.requires_grad_(True)
            p.grad = None
        o = forward_latent(bb, batch, cfg.align_layer, mode)
        o.loss_ce.backward()
        out[f"ce_{mode}"] = float(o.loss_ce.detach())
        out[f"vision_grad_{mode}"] = float(torch.stack([p.grad.norm() for p in vision if p.grad is not None]).norm())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", type=Path)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--gradient", action="store_true", help="the vision tower's gradient, fast against exact")
    ap.add_argument("--bottleneck", action="store_true", help="measure under the image bottleneck whatever the "
                    "checkpoint was trained with")
    args = ap.parse_args()
    records = load_records(args.records)[:args.limit]
    for ckpt in args.checkpoints:
        r = (vision_gradient(ckpt, records[:8], args.bottleneck) if args.gradient
             else image_paths(ckpt, records, args.bottleneck))
        print(ckpt, " ".join(f"{k} {v:.4f}" for k, v in r.items()), flush=True)


if __name__ == "__main__":
    main()
