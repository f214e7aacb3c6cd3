"""Two demo variants at once: stage-2 steps per second of one process on every thread against two processes on
an equal share each (what ``valr demo``'s ``variant_workers=2`` does with its variants).

Each process runs the same fast-mode stage-2 steps (forward, CE plus a small term on the alignment states,
backward) on the demo's records; the pair starts together behind a barrier. Reported: the median step time of
each arrangement and the throughput ratio (steps per second of the pair together / steps per second alone).

    .venv/bin/python bench/variant_workers.py runs/s12/seed-0 [--model CKPT] [--batches 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from pathlib import Path


def _steps(run: str, model: str | None, threads: int, batches: int, batch: int, k: int, layer: int,
           latent_after: str, barrier=None) -> list[float]:
    """Seconds of each timed step (one warm-up step first) in this process at ``threads`` threads."""
    import torch

    from valr.checkpoint import load_checkpoint
    from valr.data import LayoutConfig, load_records, make_batch
    from valr.engine import forward_latent
    from valr.tokens import LatentTokenIds

    torch.set_num_threads(threads)
    path = model or json.loads((Path(run) / "stage1" / "done.json").read_text())["result"]["checkpoint"]
    loaded = load_checkpoint(path)
    loaded.model.train()
    records = load_records(Path(run) / "chains" / "train.jsonl")
    latent = LatentTokenIds.from_tokenizer(loaded.tokenizer)
    cfg = LayoutConfig(k=k, latent_after=latent_after)
    prepared = [make_batch(records[i * batch:(i + 1) * batch], loaded.tokenizer, loaded.backbone, cfg, latent)
                for i in range(batches + 1)]
    if barrier is not None:
        barrier.wait()
    times = []
    for i, b in enumerate(prepared):
        start = time.perf_counter()
        out = forward_latent(loaded.backbone, b, layer, "fast")
        (out.loss_ce + out.latent_states.pow(2).mean() * 1e-3).backward()
        loaded.model.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a `valr demo` output directory (its chains/ and stage1/ are read)")
    ap.add_argument("--model", help="checkpoint to time (default: the run's stage-1 model)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=6, help="steps timed per process after one warm-up step")
    ap.add_argument("--threads", type=int, default=2, help="threads of the lone process (the pair gets half each)")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--layer", type=int, default=4)
    ap.add_argument("--latent-after", default=r"#\d+ view \d+")
    args = ap.parse_args()
    common = (args.run, args.model)
    shape = (args.batches, args.batch, args.k, args.layer, args.latent_after)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:  # alone, in a fresh process like the pair's
        alone = pool.apply(_steps, (*common, args.threads, *shape))
    half = max(1, args.threads // 2)
    with ctx.Manager() as manager, ctx.Pool(2) as pool:
        barrier = manager.Barrier(2)
        jobs = [pool.apply_async(_steps, (*common, half, *shape, barrier)) for _ in range(2)]
        pair = [j.get() for j in jobs]
    med_alone = statistics.median(alone)
    med_pair = [statistics.median(t) for t in pair]
    throughput = sum(1 / m for m in med_pair) / (1 / med_alone)
    print(json.dumps({"run": args.run, "batch": args.batch, "threads_alone": args.threads, "threads_each": half,
                      "seconds_alone": round(med_alone, 3), "seconds_each_in_pair": [round(m, 3) for m in med_pair],
                      "throughput_pair_over_alone": round(throughput, 3)}))


if __name__ == "__main__":
    main()
