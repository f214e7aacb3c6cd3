"""``valr diagnose {dilution,faithfulness,collapse,all}``: run diagnostics on one or more checkpoints.

Every command generates greedily on a records file (``--data``, the library's records JSONL: the built-in
world's ``test.jsonl``, or any records with step targets) with each ``--model`` and writes ``OUT/<name>.json``
(settings and one report per model) and ``OUT/<name>.png`` (the models compared in one figure). ``all`` runs
the three on one unperturbed generation per model. See ``docs/diagnostics.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

INTERVENTIONS = ("zero", "noise", "shuffle", "image")  # valr.diagnostics.faithfulness (kept light to import)
ALL_INTERVENTIONS = ("none",) + INTERVENTIONS
COMMANDS = ("dilution", "faithfulness", "collapse", "all")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("which", choices=COMMANDS, help="dilution: image attention and teacher similarity along the "
                   "generation; faithfulness: intervene on latents; collapse: latent similarity and norms; all")
    p.add_argument("--model", action="append", required=True, type=Path,
                   help="checkpoint directory (repeat to compare models in one figure)")
    p.add_argument("--label", action="append", default=[], help="a name per --model (default: from the path)")
    p.add_argument("--data", required=True, type=Path, help="records JSONL (e.g. the built-in world's test.jsonl)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--limit", type=int, default=64, help="first N records (default 64)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--latent-policy", action="append", choices=["model", "force", "off"], default=[],
                   help="once for all models or once per --model (default: model)")
    p.add_argument("--k", type=int, default=None, help="latent positions per segment (default: each checkpoint's)")
    p.add_argument("--teacher", default=None, metavar="NAME[=PATH]",
                   help="teacher for the cosine in dilution: a projector name of the checkpoint, optionally with an "
                        "HF encoder directory (or 'self') replacing the checkpoint config's path (default: the "
                        "checkpoint's first teacher with a projector)")
    p.add_argument("--projector-from", type=Path, default=None,
                   help="stage-2 checkpoint whose projectors (and teacher config) probe models that have none, "
                        "e.g. VaLR's for SFT (only meaningful when the models share an initialisation)")
    p.add_argument("--interventions", default=",".join(INTERVENTIONS),
                   help=f"comma-separated, of {', '.join(ALL_INTERVENTIONS)} (default: all but none)")
    p.add_argument("--threshold", type=float, default=0.05,
                   help="faithfulness: flag a model whose interventions change fewer answers than this fraction")
    p.add_argument("--min-count", type=int, default=5,
                   help="dilution: plot a position only where at least this many samples reach it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is much faster for tiny models on a busy "
                        "machine)")


def _labels(args: argparse.Namespace) -> list[str | None]:
    from valr.diagnostics.common import DiagnosticError

    if args.label and len(args.label) != len(args.model):
        raise DiagnosticError(f"{len(args.label)} --label for {len(args.model)} --model; give one per model or none")
    return list(args.label) or [None] * len(args.model)


def _policies(args: argparse.Namespace) -> list[str]:
    from valr.diagnostics.common import DiagnosticError

    if not args.latent_policy:
        return ["model"] * len(args.model)
    if len(args.latent_policy) == 1:
        return args.latent_policy * len(args.model)
    if len(args.latent_policy) != len(args.model):
        raise DiagnosticError("--latent-policy: give it once (all models) or once per --model")
    return list(args.latent_policy)


def run(args: argparse.Namespace) -> int:
    import torch

    from valr.diagnostics import collapse as collapse_mod
    from valr.diagnostics import dilution as dilution_mod
    from valr.diagnostics import faithfulness as faith_mod
    from valr.diagnostics.common import (
        DiagnosticError,
        build_probe,
        generate,
        generation_config,
        load_samples,
        load_subject,
        resolve_device,
        write_json,
    )

    for opt in ("limit", "batch_size", "max_new_tokens", "min_count"):
        if getattr(args, opt) < 1:
            raise DiagnosticError(f"--{opt.replace('_', '-')} must be >= 1")
    interventions = [x.strip() for x in args.interventions.split(",") if x.strip()]
    unknown = [x for x in interventions if x not in ALL_INTERVENTIONS]
    if unknown:
        raise DiagnosticError(f"unknown intervention(s) {unknown}; known: {', '.join(ALL_INTERVENTIONS)}")
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    samples = load_samples(args.data, args.limit)
    which = COMMANDS[:3] if args.which == "all" else (args.which,)
    reports: dict[str, dict[str, Any]] = {w: {} for w in which}
    notes: dict[str, str] = {}
    settings = {"data": str(args.data), "n_samples": len(samples), "max_new_tokens": args.max_new_tokens,
                "seed": args.seed, "models": {}}
    for path, label, policy in zip(args.model, _labels(args), _policies(args), strict=True):
        t0 = time.monotonic()
        subject = load_subject(path, label, policy=policy, k=args.k, device=device, dtype=dtype)
        subject.backbone.model.eval()
        cfg = generation_config(subject, args.max_new_tokens)
        baseline = generate(subject, samples, cfg, args.batch_size)
        settings["models"][subject.label] = {"path": str(path), "latent_policy": policy, "k": subject.k}
        log(f"{subject.label}: generated {len(samples)} samples ({sum(r.latent_segments for r in baseline)} latent "
            f"segments) in {time.monotonic() - t0:.0f}s")
        if "dilution" in which:
            probe, note = build_probe(subject, args.teacher, args.projector_from)
            if probe is None:
                notes[subject.label] = note
                log(f"{subject.label}: no teacher cosine: {note}")
            per = [d for s, r in zip(samples, baseline, strict=True)
                   if (d := dilution_mod.sample_dilution(subject, s, r, probe)) is not None]
            rep = dilution_mod.aggregate(per, subject.backbone.num_layers, args.min_count)
            rep["probe"] = {"teacher": probe.name, "projector_from": probe.source, "layer": probe.layer} \
                if probe is not None else {"note": note}
            reports["dilution"][subject.label] = rep
        if "collapse" in which:
            reports["collapse"][subject.label] = collapse_mod.collapse(subject, baseline)
        if "faithfulness" in which:
            reports["faithfulness"][subject.label] = faith_mod.faithfulness(
                subject, samples, cfg, baseline, interventions, seed=args.seed, batch_size=args.batch_size,
                threshold=args.threshold)
        log(f"{subject.label}: done in {time.monotonic() - t0:.0f}s")
        del subject
    args.out.mkdir(parents=True, exist_ok=True)
    plots = {"dilution": dilution_mod.plot, "faithfulness": faith_mod.plot, "collapse": collapse_mod.plot}
    for w in which:
        write_json(args.out / f"{w}.json", {"diagnostic": w, "settings": settings, "models": reports[w]})
        plots[w](reports[w], args.out / f"{w}.png", title=f"{w}: {', '.join(reports[w])}")
        print(f"wrote {args.out / (w + '.json')} and {args.out / (w + '.png')}")
    for w in which:
        print(summary(w, reports[w]))
    return 0


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def summary(which: str, reports: dict[str, dict[str, Any]]) -> str:
    """A short plain-text table of the headline numbers."""
    lines = [f"[{which}]"]
    for label, r in reports.items():
        if which == "dilution":
            k = r["by_kind"]
            lines.append(f"  {label}: image mass step={_fmt(k.get('step', {}).get('mass'))} "
                         f"latent={_fmt(k.get('latent', {}).get('mass'))} "
                         f"answer={_fmt(k.get('answer', {}).get('mass'))}; target-view mass "
                         f"step={_fmt(k.get('step', {}).get('target_mass'))}; latent mass step="
                         f"{_fmt(k.get('step', {}).get('latent_mass'))} (own segment "
                         f"{_fmt(k.get('step', {}).get('segment_mass'))}); cos step="
                         f"{_fmt(k.get('step', {}).get('cos'))} latent={_fmt(k.get('latent', {}).get('cos'))}; "
                         f"segment alignment target={_fmt(r['segment_alignment']['target'])} "
                         f"other={_fmt(r['segment_alignment']['other'])} "
                         f"picks target={_fmt(r['segment_alignment'].get('picks_target'))}")
        elif which == "faithfulness":
            parts = [f"{n}: ans {_fmt(v['answer_changed_with_latents'])} drop {_fmt(v['accuracy_drop'])}"
                     for n, v in r["interventions"].items()]
            lines.append(f"  {label}: acc {_fmt(r['baseline']['accuracy'])}, {r['n_with_latents']}/{r['n']} with "
                         f"latents; " + "; ".join(parts) + f"; flag={r['flag']}")
        else:
            lines.append(f"  {label}: {r.get('n_latents', 0)} latents; cross-sample cos {_fmt(r.get('cross_sample'))}"
                         f" (centered {_fmt(r.get('cross_sample_centered'))}), along segment "
                         f"{_fmt(r.get('along_segment'))}, eff. rank {_fmt(r.get('effective_rank'))}, norm ratio "
                         f"{_fmt(r.get('norm_ratio'))}")
    return "\n".join(lines)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def diagnose_main(args: argparse.Namespace) -> int:
    from valr.data.records import RecordError
    from valr.diagnostics.common import DiagnosticError
    from valr.eval.benchmarks import BenchmarkError

    try:
        return run(args)
    except (DiagnosticError, BenchmarkError, RecordError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
