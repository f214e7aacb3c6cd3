"""One stage-2 training step (fast mode, and exact with ``--exact``) against one plain CoT step, on a trained demo
model and its records.

`valr bench train` uses a random 45 M model with one image and 6 steps per record; this measures the shape the demo
trains (its 3.5 M model, four views, up to 8 steps, K = 16 after each step's head, batch 16), where the latent loop's
per-round costs weigh more. Both steps run forward, cross-entropy and backward on the same records; the median of
the timed batches is reported, and the ratios fast / plain (and exact / plain).

    .venv/bin/python bench/demo_step.py runs/study6/seed-1 [--model CKPT] [--batches 6] [--threads 1] [--exact]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from valr.checkpoint import load_checkpoint
from valr.data import LayoutConfig, load_records, make_batch
from valr.engine import forward_latent, forward_plain
from valr.tokens import LatentTokenIds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a `valr demo` output directory (its chains/ and stage1/ are read)")
    ap.add_argument("--model", type=Path, help="checkpoint to time (default: the run's stage-1 model)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=6, help="batches timed after one warm-up batch")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--layer", type=int, default=4)
    ap.add_argument("--latent-after", default=r"#\d+ view \d+")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--exact", action="store_true", help="also time exact mode (gradients through the recurrence)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = args.model or Path(json.loads((args.run / "stage1" / "done.json").read_text())["result"]["checkpoint"])
    loaded = load_checkpoint(model)
    loaded.model.train()
    records = load_records(args.run / "chains" / "train.jsonl")
    latent = LatentTokenIds.from_tokenizer(loaded.tokenizer)
    layouts = {"plain": (LayoutConfig(k=0), None),
               "fast": (LayoutConfig(k=args.k, latent_after=args.latent_after), latent)}
    if args.exact:
        layouts["exact"] = layouts["fast"]
    times: dict[str, list[float]] = {name: [] for name in layouts}
    for i in range(args.batches + 1):
        chunk = records[i * args.batch:(i + 1) * args.batch]
        batches: dict[int, object] = {}  # fast and exact share one layout: build it once per chunk
        for name, (cfg, ids) in layouts.items():
            if id(cfg) not in batches:
                batches[id(cfg)] = make_batch(chunk, loaded.tokenizer, loaded.backbone, cfg, ids)
            batch = batches[id(cfg)]
            start = time.perf_counter()
            if name == "plain":
                out = forward_plain(loaded.backbone, batch)
                loss = out.loss_ce
            else:
                out = forward_latent(loaded.backbone, batch, args.layer, name)
                loss = out.loss_ce + out.latent_states.pow(2).mean() * 1e-3  # the alignment states get a gradient
            loss.backward()
            loaded.model.zero_grad(set_to_none=True)
            if i:
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(json.dumps({"model": str(model), "batch": args.batch, "threads": args.threads,
                      "seconds": {k: round(v, 3) for k, v in med.items()},
                      "ratios": {f"{k}_time": round(v / med["plain"], 3) for k, v in med.items() if k != "plain"}}))


if __name__ == "__main__":
    main()
