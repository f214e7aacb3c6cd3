"""Development check of docs/results.md (twenty-second session, item 67): can a fresh tiny model learn to pass
image information to its text through its latents alone? Each record's image is one uniform colour (red, blue,
green or yellow) and its one step says the colour ("It is red."), so only the image tells the step what to write.
A tiny random Qwen2.5-VL (`valr.tiny`) trains its language model (the vision tower frozen, as in the demo) on
random batches of 8 with AdamW, gradient clipped to 1, and every 50 steps prints the CE of the 8 validation
records with their own images and with each record's images swapped for the next one's. The text has learned
to read the colour where the two part.

    .venv/bin/python docs/dev/bottleneck_toy.py [--mode fast|exact] [--no-bottleneck] [--k 4]
                                                [--feed hidden|embedding_rms|pause] [--lr 1e-3] [--steps 300]
"""

import argparse
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from valr.backbones import backbone_for
from valr.data import LayoutConfig, make_batch, parse_record
from valr.demo.probes import with_swapped_images
from valr.engine import forward_latent
from valr.tiny import build_tiny
from valr.tokens import LatentTokenIds

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (220, 220, 30)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("fast", "exact"), default="fast")
    ap.add_argument("--no-bottleneck", action="store_true")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--feed", choices=("hidden", "embedding_rms", "pause"), default="hidden")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = random.Random(0)
    images = Path(tempfile.mkdtemp())
    for name, rgb in COLOURS.items():
        Image.fromarray(np.full((56, 56, 3), rgb, dtype=np.uint8)).save(images / f"{name}.png")
    model, tok, ip = build_tiny(seed=0)
    bb = backbone_for(model, image_processor=ip)
    bb.image_bottleneck = not args.no_bottleneck
    bb.latent_feed = args.feed
    lat = LatentTokenIds.from_tokenizer(tok)
    layout = LayoutConfig(k=args.k)

    def record(colour: str, i: int):
        return parse_record({"id": f"{colour}{i}", "images": [f"{colour}.png"], "question": "Which colour?",
                             "steps": [{"text": f"It is {colour}.", "target": 0}], "answer": "A"}, root=images)

    def ce(records) -> float:
        with torch.no_grad():
            return float(forward_latent(bb, make_batch(records, tok, bb, layout, lat), 2, "fast").loss_ce)

    val = [record(c, 0) for c in COLOURS] * 2
    for n, p in model.named_parameters():
        p.requires_grad_("visual" not in n)  # the vision tower stays frozen
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    for step in range(args.steps + 1):
        if step % 50 == 0:
            print(f"step {step}: CE own images {ce(val):.4f}, swapped {ce(with_swapped_images(val)):.4f}", flush=True)
        if step == args.steps:
            break
        batch = make_batch([record(rng.choice(list(COLOURS)), step) for _ in range(8)], tok, bb, layout, lat)
        loss = forward_latent(bb, batch, 2, args.mode).loss_ce
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()


if __name__ == "__main__":
    main()
