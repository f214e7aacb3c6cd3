"""``valr scale``: accuracy against thinking compute, over a grid of reasoning budgets and latent K.

Every cell (model, K, steps) generates the benchmark greedily (``valr.generate``) with:

* K = 0: latent policy ``off`` (plain decoding, no latent segments); K > 0: ``--latent-policy`` (default
  ``force``: a segment of K latent positions before every step) with K positions per segment;
* the reasoning budget ``steps``: with ``--budget exact`` (default) ``min_steps = max_steps = steps`` (an earlier
  answer is suppressed, the answer is forced after ``steps`` lines); with ``--budget max`` only
  ``max_steps = steps``; ``free`` in ``--steps`` means no budget (the model decides).

Thinking compute is ``generated_positions`` (tokens plus latent positions: decoder positions spent). Outputs:

* ``OUT/scale.json``: ``settings`` and ``rows``, one per cell: ``model``, ``k``, ``policy``, ``steps``,
  ``budget``, ``n``, ``accuracy`` (the benchmark's overall score, as ``valr eval`` scores it),
  ``mean_generated_positions``, ``mean_generated_tokens``, ``mean_steps`` (completed lines before the answer),
  ``mean_latent_segments``, ``answered`` (fraction whose answer line started), ``forced`` (fraction whose
  answer the budget forced), ``finished`` (fraction that ended by themselves before ``--max-new-tokens``).
* ``OUT/scale.png``: accuracy against mean generated positions, one line per model and K, points labelled by
  the step budget.
* ``OUT/cells/<settings hash>/<model>_k<K>_s<steps>.jsonl``: per-item lines of each finished cell; a rerun with
  the same settings reuses them (an interrupted sweep resumes cell by cell).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any


class ScaleError(ValueError):
    pass


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True, type=Path, help="checkpoint directory (repeatable)")
    p.add_argument("--label", action="append", default=[], help="a name per --model (default: from the path)")
    p.add_argument("--benchmark", default="records", help="benchmark name as in `valr eval run` (default records)")
    p.add_argument("--data", required=True, type=Path, help="the benchmark's data file or directory")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--steps", default="1,2,4,8", help="reasoning budgets, comma-separated; 'free' = no budget")
    p.add_argument("--k", default="0,4,16", help="latent positions per segment, comma-separated; 0 = no latents")
    p.add_argument("--budget", choices=["exact", "max"], default="exact",
                   help="exact: min = max = steps; max: at most steps (the model may answer earlier)")
    p.add_argument("--latent-policy", choices=["force", "model"], default="force",
                   help="policy for K > 0 (force: a segment before every step; model: where the model emits one)")
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def parse_list(text: str, what: str, allow_free: bool = False) -> list[int | str]:
    out: list[int | str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if allow_free and part == "free":
            out.append("free")
            continue
        try:
            value = int(part)
        except ValueError:
            raise ScaleError(f"--{what} {text!r}: {part!r} is not an integer" +
                             (" or 'free'" if allow_free else "")) from None
        if value < 0:
            raise ScaleError(f"--{what}: {value} is negative")
        out.append(value)
    if not out:
        raise ScaleError(f"--{what} is empty")
    return list(dict.fromkeys(out))


def cell_config(k: int, steps: int | str, args: argparse.Namespace, delimiter: str, answer_prefix: str):
    from valr.generate import GenerationConfig

    budget: dict[str, Any] = {}
    if steps != "free":
        budget = {"max_steps": steps, "min_steps": steps if args.budget == "exact" else 0}
    return GenerationConfig(max_new_tokens=args.max_new_tokens, latent_policy="off" if k == 0 else args.latent_policy,
                            k=max(k, 1), step_delimiter=delimiter, answer_prefix=answer_prefix, **budget)


def run_cell(generator, items, cfg, batch_size: int) -> list[dict[str, Any]]:
    from valr.eval.extract import extract_answer
    from valr.generate import Prompt

    lines = []
    for b in range(0, len(items), batch_size):
        batch = items[b:b + batch_size]
        results = generator([Prompt(it.question, it.load_images()) for it in batch], cfg)
        for it, r in zip(batch, results, strict=True):
            lines.append({"id": it.id, "prediction": extract_answer(r.answer_text, it.kind, it.options,
                                                                    question=it.question),
                          "generated_positions": r.generated_positions, "generated_tokens": len(r.token_ids),
                          "steps": r.steps, "answered": r.answered, "forced_answer": r.forced_answer,
                          "latent_segments": r.latent_segments, "finished": r.finished})
    return lines


def summarise(name: str, items, lines: list[dict[str, Any]]) -> dict[str, Any]:
    from valr.eval.scoring import score

    def avg(key: str) -> float:
        return sum(float(x[key]) for x in lines) / len(lines)

    result = score(name, items, {x["id"]: x["prediction"] for x in lines})
    return {"n": len(lines), "accuracy": result["overall"], "mean_generated_positions": avg("generated_positions"),
            "mean_generated_tokens": avg("generated_tokens"), "mean_steps": avg("steps"),
            "mean_latent_segments": avg("latent_segments"), "answered": avg("answered"),
            "forced": avg("forced_answer"), "finished": avg("finished")}


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    variants: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        variants.setdefault((r["model"], r["k"]), []).append(r)
    for (model, k), rs in variants.items():
        rs = sorted(rs, key=lambda r: r["mean_generated_positions"])
        xs = [r["mean_generated_positions"] for r in rs]
        ys = [100 * (r["accuracy"] or 0.0) for r in rs]
        ax.plot(xs, ys, marker="o", label=f"{model}, K={k}" if k else f"{model}, no latents")
        for x, y, r in zip(xs, ys, rs, strict=True):
            ax.annotate(str(r["steps"]), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("thinking compute: mean generated positions (tokens + latent positions)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if variants:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def run(args: argparse.Namespace) -> int:
    import torch

    from valr.checkpoint import load_checkpoint
    from valr.diagnostics.common import default_label, resolve_device
    from valr.eval.benchmarks import canonical_name, load_benchmark
    from valr.eval.run import items_fingerprint, model_fingerprint
    from valr.generate import Generator

    steps_list = parse_list(args.steps, "steps", allow_free=True)
    ks = parse_list(args.k, "k")
    for opt in ("batch_size", "max_new_tokens"):
        if getattr(args, opt) < 1:
            raise ScaleError(f"--{opt.replace('_', '-')} must be >= 1")
    if args.label and len(args.label) != len(args.model):
        raise ScaleError(f"{len(args.label)} --label for {len(args.model)} --model; give one per model or none")
    labels = list(args.label) or [default_label(m) for m in args.model]
    if len(set(labels)) != len(labels):
        raise ScaleError(f"model labels must differ, got {labels}; pass --label")
    name = canonical_name(args.benchmark)
    items = load_benchmark(name, args.data)
    items = items[:args.limit] if args.limit is not None else items
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    settings = {"benchmark": name, "data": str(args.data), "n_items": len(items), "steps": steps_list, "k": ks,
                "budget": args.budget, "latent_policy": args.latent_policy, "max_new_tokens": args.max_new_tokens,
                "dtype": args.dtype, "models": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    for path, label in zip(args.model, labels, strict=True):
        loaded = load_checkpoint(path, device=device, dtype=getattr(torch, args.dtype))
        gen = Generator(loaded.backbone, loaded.tokenizer)
        key = {"model": model_fingerprint(Path(path)), "items": items_fingerprint(items), "budget": args.budget,
               "policy": args.latent_policy, "max_new_tokens": args.max_new_tokens, "dtype": args.dtype}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        cells = args.out / "cells" / digest
        cells.mkdir(parents=True, exist_ok=True)
        settings["models"][label] = {"path": str(path), "cells": str(cells)}
        for k in ks:
            for steps in steps_list:
                cfg = cell_config(k, steps, args, loaded.config.step_delimiter, loaded.config.answer_prefix)
                file = cells / f"{label}_k{k}_s{steps}.jsonl"
                lines = None
                if file.is_file():
                    lines = [json.loads(x) for x in file.read_text().splitlines() if x.strip()]
                    if [x["id"] for x in lines] != [it.id for it in items]:
                        lines = None
                if lines is None:
                    t0 = time.monotonic()
                    lines = run_cell(gen, items, cfg, args.batch_size)
                    _write(file, "".join(json.dumps(x) + "\n" for x in lines))
                    print(f"{label} K={k} steps={steps}: {len(items)} items in {time.monotonic() - t0:.0f}s",
                          file=sys.stderr, flush=True)
                row = {"model": label, "k": k, "policy": cfg.latent_policy, "steps": steps, "budget": args.budget,
                       **summarise(name, items, lines)}
                rows.append(row)
                print(f"{label}\tK={k}\tsteps={steps}\taccuracy={row['accuracy']:.3f}\t"
                      f"positions={row['mean_generated_positions']:.1f}\tmean steps={row['mean_steps']:.2f}")
        del loaded, gen
    _write(args.out / "scale.json", json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    plot(rows, args.out / "scale.png", f"{name}: accuracy vs thinking compute ({args.budget} step budget)")
    print(f"wrote {args.out / 'scale.json'} and {args.out / 'scale.png'}", file=sys.stderr)
    return 0


def scale_main(args: argparse.Namespace) -> int:
    from valr.eval.benchmarks import BenchmarkError

    try:
        return run(args)
    except (ScaleError, BenchmarkError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
