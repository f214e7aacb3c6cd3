"""Training throughput: stage 2 (latent segments + REPA) against stage 1 (plain CoT SFT), measured in the same run.

Runs the real trainer (``valr train``) on a small-but-real Qwen2.5-VL (random weights, 112x112 images) for a few
steps per configuration, once as one process and once as two processes under ``accelerate launch`` (DDP, gloo
on CPU), and reads the per-step timings the trainer writes to ``history.jsonl``. Stage 2 reads its teacher
features from a cache precomputed with ``valr features`` (the recommended set-up), so teacher encoding is not
timed. Reports steps/s, records/s and positions/s (tokens incl. latent slots) and the ratios stage 2 / stage 1 at
the same process count.

    python bench/train_throughput.py                  # defaults: K=16, 8 timed steps after 2 warm-up steps
    python bench/train_throughput.py --quick --json   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from valr.trainer import read_log

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(config: Path, procs: int, threads: int, out: Path) -> float:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    if procs == 1:
        cmd = [sys.executable, "-m", "valr.cli", "train", "--config", str(config), f"output_dir={out}"]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs/accelerate/ddp.yaml"), "--num_processes", str(procs), "--main_process_port",
               str(_free_port()), "-m", "valr.cli", "train", "--config", str(config), f"output_dir={out}"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"training failed ({' '.join(cmd)}):\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def _rates(out: Path, warmup: int, global_batch: int) -> dict[str, float]:
    rows = read_log(out)[warmup:]
    secs = sum(r["time_s"] for r in rows)
    return {"steps_per_s": len(rows) / secs, "records_per_s": len(rows) * global_batch / secs,
            "tokens_per_s": sum(r["tokens"] for r in rows) / secs, "s_per_step": secs / len(rows)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per configuration")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    ap.add_argument("--k", type=int, default=16, help="latent positions per segment (paper: 16)")
    ap.add_argument("--batch", type=int, default=2, help="per-process batch size")
    ap.add_argument("--procs", default="1,2", help="process counts to measure")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per process (1: tiny models run best on one thread, and 1 vs 2 processes "
                         "then compares one core with two)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few steps (smoke test)")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup, args.k, args.hidden, args.layers = 2, 1, 4, 64, 2
    from valr.data.smoke import write_smoke_setup
    from valr.tiny import TinyShape

    procs = [int(p) for p in args.procs.split(",")]
    cores = os.cpu_count() or 1
    heads = max(2, args.hidden // 64)
    shape = TinyShape(hidden=args.hidden, layers=args.layers, heads=heads, kv_heads=max(1, heads // 2),
                      intermediate=args.hidden * 3, vision_depth=2, vision_hidden=64, vision_heads=2)
    steps = args.steps + args.warmup
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = steps * args.batch * max(procs)
        smoke = write_smoke_setup(tmp / "data", n_train=n, n_val=0, shape=shape, k=args.k, side=112)
        base = dict(model=str(smoke["model"]), train_data=str(smoke["train"]), max_steps=steps,
                    per_device_batch_size=args.batch, grad_accum=1, lr_llm=1e-5, lr_projector=1e-5,
                    save_every=0, num_workers=1, progress=False, tensorboard=False, preflight="quick")
        valr = {"k": args.k, "align_layer": max(1, args.layers // 2), "projector_width": 256,
                "feature_cache": str(tmp / "features"),
                "teachers": [{"name": "dino", "path": str(smoke["teacher"]), "image_size": 56}]}
        configs = {}
        for stage in (1, 2):
            cfg = dict(base, stage=stage, **({"valr": valr} if stage == 2 else {}))
            configs[stage] = tmp / f"stage{stage}.yaml"
            configs[stage].write_text(yaml.safe_dump(cfg))
        subprocess.run([sys.executable, "-m", "valr.cli", "features", "--config", str(configs[2]), "--quiet"],
                       cwd=ROOT, check=True, capture_output=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        for p in procs:
            threads = args.threads
            for stage in (1, 2):
                out = tmp / f"run-p{p}-s{stage}"
                wall = _run(configs[stage], p, threads, out)
                r = _rates(out, args.warmup, args.batch * p)
                r["wall_s"] = wall
                results[f"p{p}-stage{stage}"] = r
    print(f"machine: {cores} CPU cores, load average {os.getloadavg()[0]:.1f}; {args.threads} thread(s) per "
          f"process; model hidden {args.hidden}, "
          f"{args.layers} layers, K={args.k}, per-process batch {args.batch}, {args.steps} timed steps "
          f"(+{args.warmup} warm-up)")
    print(f"{'config':<14}{'s/step':>9}{'steps/s':>9}{'records/s':>11}{'tokens/s':>10}")
    for name, r in results.items():
        print(f"{name:<14}{r['s_per_step']:>9.3f}{r['steps_per_s']:>9.3f}{r['records_per_s']:>11.2f}"
              f"{r['tokens_per_s']:>10.0f}")
    ratios = {}
    for p in procs:
        s1, s2 = results[f"p{p}-stage1"], results[f"p{p}-stage2"]
        for key in ("steps_per_s", "tokens_per_s"):
            ratios[f"p{p}_stage2_over_stage1_{key}"] = s2[key] / s1[key]
    if 1 in procs:
        for p in procs:
            if p != 1:
                for stage in (1, 2):
                    ratios[f"stage{stage}_records_per_s_p{p}_over_p1"] = (
                        results[f"p{p}-stage{stage}"]["records_per_s"] / results[f"p1-stage{stage}"]["records_per_s"])
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    if args.json:
        print(json.dumps({"results": results, "ratios": ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
