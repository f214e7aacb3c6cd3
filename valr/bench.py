"""Benchmarks with their baselines measured in the same run (``valr bench decode|train``).

decode: time per generated position of valr generation (policy off; policy force with latent positions counted)
    over ``model.generate`` on the same model and prompts, batch 1 and 8. Ratio <= 1.05 is the goal.
train: one stage-2 step (exact and fast mode: forward, CE + REPA, backward) over a plain SFT step on the same
    records; time and peak memory. Peak memory is the largest total of live tensor bytes allocated during one step
    (activations, saved tensors, gradients), read from the PyTorch profiler's memory events.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch
from PIL import Image

BENCH_VOCAB = 16384


def _machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": "cpu"}


def _bench_model(quick: bool):
    from valr.backbones import backbone_for
    from valr.tiny import build_tiny

    model, tok, ip = build_tiny("small", "tiny" if quick else "bench", seed=0,
                                vocab_size=None if quick else BENCH_VOCAB)
    return model, tok, ip, backbone_for(model, image_processor=ip)


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(n)]


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_decode(quick: bool, repeats: int) -> dict:
    from valr.generate import GenerationConfig, Generator, Prompt
    from valr.tokens import LatentTokenIds

    model, tok, ip, bb = _bench_model(quick)
    gen = Generator(bb, tok)
    lat = LatentTokenIds.from_tokenizer(tok)
    steps = 16 if quick else 64
    k = 4 if quick else 16
    results, ratios = {}, {}
    for batch in (1, 8):
        prompts = [Prompt(f"Describe view {i} and count the objects.", [im]) for i, im in enumerate(_images(batch))]
        ids, mask, images, _ = gen.encode_prompts(prompts)
        mm = (ids == model.config.image_token_id).int()

        def hf(ids=ids, mask=mask, images=images, mm=mm):
            model.generate(input_ids=ids, attention_mask=mask, pixel_values=images.pixel_values,
                           image_grid_thw=images.grid_thw, mm_token_type_ids=mm, max_new_tokens=steps,
                           min_new_tokens=steps, do_sample=False, pad_token_id=tok.pad_token_id,
                           suppress_tokens=[lat.start, lat.end, lat.slot])

        hf_time = _median_time(hf, repeats) / steps
        off_cfg = GenerationConfig(max_new_tokens=steps, min_new_tokens=steps, latent_policy="off")
        off_time = _median_time(lambda cfg=off_cfg, p=prompts: gen(p, cfg), repeats) / steps
        # force: a latent segment before every line; positions = tokens + latent positions (per sample, max)
        force_cfg = GenerationConfig(max_new_tokens=steps, min_new_tokens=steps, latent_policy="force", k=k,
                                     step_delimiter=" ")  # random weights write no newlines: force often
        positions = max(r.generated_positions for r in gen(prompts, force_cfg))
        force_time = _median_time(lambda cfg=force_cfg, p=prompts: gen(p, cfg), repeats) / positions
        results[f"b{batch}"] = {"hf_generate_s_per_position": hf_time, "valr_off_s_per_position": off_time,
                                "valr_force_s_per_position": force_time, "force_positions": positions,
                                "steps": steps}
        ratios[f"off_b{batch}"] = off_time / hf_time
        ratios[f"force_b{batch}"] = force_time / hf_time
    n_params = sum(p.numel() for p in model.parameters())
    return {"benchmark": "decode", "params_m": n_params / 1e6, "k": k, "machine": _machine(), "results": results,
            "ratios": ratios}


def _train_records(quick: bool, batch: int):
    """``batch`` records with 6 steps of ~12 words and one 112 px image each, written to a temp dir."""
    import tempfile
    from pathlib import Path

    from valr.data.records import parse_record

    root = Path(tempfile.mkdtemp(prefix="valr-bench-"))
    recs = []
    for i, im in enumerate(_images(batch, seed=1)):
        im.save(root / f"{i}.png")
        steps = [f"Step {s + 1}: look at the object in row {s % 4} and column {(s + i) % 4} of the view."
                 for s in range(3 if quick else 6)]
        recs.append(parse_record({"id": str(i), "images": [f"{i}.png"], "question": "Which object is last?",
                                  "steps": steps, "answer": "B"}, root=root))
    return recs


def peak_step_memory(step) -> int:
    """Peak bytes of tensors allocated (and not yet freed) during one call of ``step``, from the profiler."""
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    finally:
        os.unlink(path)
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0)


def _train_variant(variant: str, quick: bool, repeats: int, batch_size: int) -> dict:
    """Time ``repeats`` steps of one variant (after a warm-up) and measure one step's peak memory."""
    from valr.align import Aligner
    from valr.data import LayoutConfig, make_batch
    from valr.engine import forward_latent, forward_plain
    from valr.tokens import LatentTokenIds

    model, tok, ip, bb = _bench_model(quick)
    model.train()
    k = 4 if quick else 16
    layer = max(1, bb.num_layers // 2)
    latent = LatentTokenIds.from_tokenizer(tok)
    recs = _train_records(quick, batch_size)
    teacher_dim, grid = 64, (8, 8)
    aligner = Aligner(bb.hidden_size, {"teacher": teacher_dim}, width=256)
    if variant == "sft":
        batch = make_batch(recs, tok, bb, LayoutConfig(k=0), None)
    else:
        batch = make_batch(recs, tok, bb, LayoutConfig(k=k), latent)
    n_segments = sum(len(s) for s in batch.segment_starts)
    feats = torch.randn(n_segments, grid[0] * grid[1], teacher_dim)

    def step():
        model.zero_grad(set_to_none=True)
        aligner.zero_grad(set_to_none=True)
        if variant == "sft":
            loss = forward_plain(bb, batch).loss_ce
        else:
            out = forward_latent(bb, batch, layer, variant)
            align, _ = aligner.loss(out.latent_states, {"teacher": [(i, feats[i], grid) for i in range(n_segments)]})
            loss = out.loss_ce + 0.5 * align
        loss.backward()

    seconds = _median_time(step, repeats)
    return {"seconds": seconds, "peak_bytes": peak_step_memory(step), "tokens": int(batch.attention_mask.sum()),
            "batch": batch.size, "latent_segments": n_segments}


def bench_train(quick: bool, repeats: int, batch_size: int) -> dict:
    results = {v: _train_variant(v, quick, repeats, batch_size) for v in ("sft", "fast", "exact")}
    sft = results["sft"]
    ratios = {f"{v}_{m}": results[v][key] / sft[key] for v in ("fast", "exact")
              for m, key in (("time", "seconds"), ("memory", "peak_bytes"))}
    return {"benchmark": "train", "k": 4 if quick else 16, "batch": batch_size, "machine": _machine(),
            "results": results, "ratios": ratios}


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.which == "decode":
        with torch.no_grad():
            report = bench_decode(args.quick, args.repeats)
    else:
        report = bench_train(args.quick, args.repeats, args.batch or (2 if args.quick else 4))
    for key, value in report["ratios"].items():
        print(f"{key:>14}: {value:.3f}")
    for name, row in report["results"].items():
        print(f"{name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if args.json:
        print(json.dumps(report))
    return 0
