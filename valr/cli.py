"""The ``valr`` command line. Run ``valr --help`` or ``valr COMMAND --help``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download


def _tiny(args: argparse.Namespace) -> int:
    from valr.checkpoint import save_checkpoint
    from valr.config import ValrConfig
    from valr.tiny import build_tiny

    model, tok, ip = build_tiny(args.tokenizer, args.shape, seed=args.seed)
    layers = model.config.get_text_config().num_hidden_layers
    cfg = ValrConfig(k=args.k, align_layer=max(1, layers // 2), projector_width=64)
    out = save_checkpoint(args.out, model, tok, ip, cfg)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote a random tiny Qwen2.5-VL ({n / 1e6:.2f} M parameters, vocabulary {len(tok)}) to {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from valr.checkpoint import load_checkpoint
    from valr.data.images import load_image
    from valr.generate import GenerationConfig, Generator, Prompt

    loaded = load_checkpoint(args.model)
    images = [load_image(Path(p)) for p in args.image]
    k = args.k if args.k is not None else loaded.config.k
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, latent_policy=args.latent_policy, k=k,
                           do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           seed=args.seed, step_delimiter=loaded.config.step_delimiter,
                           return_latents=args.return_latents)
    gen = Generator(loaded.backbone, loaded.tokenizer)
    try:
        (res,) = gen([Prompt(args.prompt, images)], cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        out = {"text": res.text, "answer_text": res.answer_text, "prompt_token_ids": res.prompt_token_ids,
               "token_ids": res.token_ids, "latent_segments": res.latent_segments,
               "generated_positions": res.generated_positions, "finished": res.finished, "k": k,
               "latent_policy": args.latent_policy}
        if res.latents is not None:
            out["latents"] = [seg.tolist() for seg in res.latents]
        print(json.dumps(out))
    else:
        print(res.text)
        print(f"\n[{res.latent_segments} latent segment(s) of K={k}; {len(res.token_ids)} tokens; "
              f"{res.generated_positions} generated positions]", file=sys.stderr)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from valr import bench

    return bench.main(args)


def _demo_command() -> str | None:
    """The command line as typed, for a summary's record of how it was made."""
    return "valr demo " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["demo"] else None


def _print_means(summary: dict) -> None:
    print(json.dumps({n: round(m["accuracy"], 4) for n, m in summary["means"].items() if "accuracy" in m}))


def _demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see valr/demo/__init__.py
    from valr.config import ConfigError
    from valr.demo import DemoConfig, run_demo, run_seeds

    if args.merge:
        return _demo_merge(args)
    try:
        DemoConfig.for_mode(args.quick, args.seed).with_overrides(args.overrides)
    except (ConfigError, TypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.seeds:
        try:
            seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError:
            print(f"error: --seeds {args.seeds!r}: give a comma-separated list of integers, e.g. 0,1,2",
                  file=sys.stderr)
            return 2
        _print_means(run_seeds(args.out, seeds, quick=args.quick, summary_path=args.summary, figures=args.figures,
                               command=_demo_command(), scale=args.scale, overrides=args.overrides))
        return 0
    if args.scale <= 0:
        print(f"error: --scale must be > 0, got {args.scale}", file=sys.stderr)
        return 2
    results = run_demo(args.out, seed=args.seed, quick=args.quick, scale=args.scale, overrides=args.overrides)
    print(json.dumps({n: round(v["accuracy"], 4) for n, v in results["variants"].items()}))
    print(f"wrote {Path(args.out) / 'results.json'}, {Path(args.out) / 'report.md'} and the figures under "
          f"{Path(args.out) / 'figures'}", file=sys.stderr)
    return 0


def _demo_merge(args: argparse.Namespace) -> int:
    """``valr demo --merge``: summarise seeds that ran apart, without training anything."""
    from valr.config import ConfigError
    from valr.demo import merge_runs, write_summary

    if args.overrides or args.seeds or args.quick:
        print("error: --merge only reads finished results: drop key=value overrides, --seeds and --quick",
              file=sys.stderr)
        return 2
    try:
        runs = merge_runs(args.merge)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    _print_means(write_summary(runs, _demo_command(), out / "summary.json", args.summary,
                               figures=Path(args.figures) if args.figures else out / "figures"))
    return 0


def _eval(args: argparse.Namespace, rest: list[str]) -> int:
    if args.eval_command == "score":
        from valr.eval.score_cmd import score_main

        return score_main(rest)
    if args.eval_command == "run":
        from valr.eval.run import run_main

        return run_main(rest)
    if args.eval_command == "length":
        from valr.eval.length import length_main

        return length_main(rest)
    print(f"unknown eval command {args.eval_command!r}; available: run, score, length", file=sys.stderr)
    return 2


def _train(args: argparse.Namespace) -> int:
    from valr.trainer import train_main

    return train_main(args)


def _features(args: argparse.Namespace) -> int:
    from valr.features import features_main

    return features_main(args)


def _data(args: argparse.Namespace) -> int:
    if args.data_command == "check":
        from valr.data.check import check_main

        return check_main(args)
    if args.data_command == "convert-llava":
        from valr.data.convert import convert_main

        return convert_main(args)
    from valr.data.smoke import make_smoke_main

    return make_smoke_main(args)


def _scale(args: argparse.Namespace) -> int:
    from valr.scale import scale_main

    return scale_main(args)


def _diagnose(args: argparse.Namespace) -> int:
    from valr.diagnostics.cli import diagnose_main

    return diagnose_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="valr",
        description="Vision-aligned Latent Reasoning for multimodal LLMs: train, run and evaluate models that "
                    "think in latent segments aligned to a vision encoder's features. Nothing is downloaded: "
                    "models and data come from local paths.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tiny", help="write a random tiny Qwen2.5-VL checkpoint for smoke tests",
                       description="Write a random Qwen2.5-VL-architecture checkpoint (standard HF directory with "
                                   "tokenizer, image processor and valr config) for smoke tests and examples.")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--tokenizer", choices=["small", "qwen"], default="small",
                   help="small: a 400-token byte-level BPE (fast); qwen: the real Qwen2.5 tokenizer (152k tokens)")
    t.add_argument("--shape", choices=["tiny", "bench"], default="tiny",
                   help="tiny: ~0.3 M parameters; bench: tens of millions (realistic CPU timings)")
    t.add_argument("--k", type=int, default=4, help="latent positions per segment stored in the valr config")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_tiny)

    g = sub.add_parser("generate", help="generate with latent reasoning from a checkpoint",
                       description="Generate an answer, entering latent mode according to --latent-policy. "
                                   "Prints the trace (latent segments shown as <latent>[K latent positions]"
                                   "</latent>), or one JSON object with --json.")
    g.add_argument("--model", required=True, help="checkpoint directory")
    g.add_argument("--image", action="append", default=[], help="an input image (repeat for several, in order)")
    g.add_argument("--prompt", required=True, help="the question")
    g.add_argument("--latent-policy", choices=["model", "force", "off"], default="model",
                   help="model: latent mode when the model emits <latent>; force: also before the answer and after "
                        "every step delimiter; off: never (plain decoding)")
    g.add_argument("--k", type=int, default=None, help="latent positions per segment (default: the checkpoint's K)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="budget of generated tokens (markers included)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    g.add_argument("--return-latents", action="store_true", help="include the latent vectors in --json output")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=_generate)

    b = sub.add_parser("bench", help="benchmarks: decode speed and training-step cost vs baselines",
                       description="Benchmarks printing ratios against a baseline measured in the same run.")
    b.add_argument("which", choices=["decode", "train"],
                   help="decode: time per generated position vs model.generate; train: stage-2 step vs SFT step")
    b.add_argument("--json", action="store_true", help="print one JSON object with a 'ratios' object on the last line")
    b.add_argument("--quick", action="store_true", help="small sizes (smoke run, numbers not meaningful)")
    b.add_argument("--repeats", type=int, default=3, help="timed repetitions (the median is reported)")
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    b.add_argument("--batch", type=int, default=None, help="train: records per step (default 4; 2 with --quick)")
    b.set_defaults(func=_bench)

    d = sub.add_parser(
        "demo", help="the built-in spatial world: SFT vs latents vs VaLR end to end (train, evaluate, report)",
        description="Generate the built-in spatial world, train the perception teacher and the tiny Qwen2.5-VL "
                    "variants (SFT, latents without alignment, VaLR-S; VaLR-S on 25% of the data with "
                    "data_fraction=0.25; VaLR-M with the model's own vision tower as second teacher in --quick, "
                    "off in the full budget), "
                    "evaluate them on the test split and write OUT/results.json, OUT/report.md and OUT/figures/. "
                    "Every finished stage is cached under OUT, so a rerun reuses it. The variants train two at a "
                    "time (variant_workers=2). Full mode: about 2 hours 25 minutes on 2 CPU cores alone, longer "
                    "beside other work (over the 30-minute aim, docs/results.md); --quick: a smoke run of a "
                    "few minutes whose accuracies mean nothing.")
    d.add_argument("--quick", action="store_true", help="toy sizes: checks the pipeline, makes no accuracy claims")
    d.add_argument("--out", default="runs/demo", help="output directory (stages cached here; default runs/demo)")
    d.add_argument("--seed", type=int, default=0, help="seed of the world, the models and the data order")
    d.add_argument("--seeds", help="run several seeds (comma list, e.g. 0,1,2) into OUT/seed-S and write "
                                   "OUT/summary.json (per-seed results under 'runs', plus means)")
    d.add_argument("--merge", nargs="+", metavar="PATH",
                   help="train nothing: summarise seeds that ran apart (other machines or days) into OUT/summary.json "
                        "and the seed-mean figures. Each PATH is a demo output directory, its results.json or an "
                        "earlier summary; all must be one recipe (configs equal but for the seed)")
    d.add_argument("--summary", help="with --seeds or --merge: also write the summary JSON to this path")
    d.add_argument("--figures", help="with --seeds or --merge: directory for the seed-mean figures "
                                     "(default OUT/figures)")
    d.add_argument("--scale", type=float, default=1.0,
                   help="multiply every training stage's steps (more compute, same recipe; default 1: full mode)")
    d.add_argument("overrides", nargs="*", metavar="key=value",
                   help="change the recipe (fields of valr.demo.DemoConfig), e.g. stage0_steps=600 "
                        "data_fraction=0 teacher.steps=200; applied after --scale and part of every stage's cache "
                        "key")
    d.set_defaults(func=_demo)

    tr = sub.add_parser("train", help="train stage 1 (CoT SFT) or stage 2 (VaLR) from a YAML config",
                        description="Train from a YAML config (see configs/ and docs/training.md). Runs as is or "
                                    "under `accelerate launch` (DDP, FSDP, DeepSpeed ZeRO-2). Checkpoints go to "
                                    "OUTPUT_DIR/checkpoints, the final model to OUTPUT_DIR/final.")
    tr.add_argument("--config", required=True, help="YAML file of TrainConfig keys (valr: section for the method)")
    tr.add_argument("overrides", nargs="*", metavar="key=value",
                    help="override config keys, e.g. max_steps=100 valr.lambda_align=0.25")
    tr.add_argument("--resume", action="store_true",
                    help="continue from the newest checkpoint in output_dir (exactly: same final weights)")
    tr.set_defaults(func=_train)

    fe = sub.add_parser("features", help="precompute teacher features of all step-target images into the cache",
                        description="Encode every step-target image of the config's train/val records with each "
                                    "teacher and store the patch features in valr.feature_cache (sharded "
                                    "safetensors). Resumable; prints done / skipped / failed per teacher.")
    fe.add_argument("--config", required=True, help="the training YAML (teachers, feature_cache, data)")
    fe.add_argument("overrides", nargs="*", metavar="key=value")
    fe.add_argument("--batch-size", type=int, default=16, help="images per encoder call")
    fe.add_argument("--shard-size", type=int, default=256, help="images per shard file")
    fe.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                    help="storage type of a new cache (an existing cache keeps its own)")
    fe.add_argument("--split", choices=["train", "val", "both"], default="both")
    fe.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
    fe.add_argument("--quiet", action="store_true", help="no progress bar")
    fe.set_defaults(func=_features)

    da = sub.add_parser("data", help="records tools: check, convert-llava, make-smoke",
                        description="Validate records files, convert LLaVA-style data, write a smoke set-up.")
    dsub = da.add_subparsers(dest="data_command", required=True)
    dc = dsub.add_parser("check", help="validate every record; write clean and rejects files",
                         description="Report every bad record (file:line, id, reasons): unparsable lines, missing "
                                     "or undecodable images and target files, duplicate ids, and with --model and "
                                     "--max-length (or --config) laid-out sequences over max_length. Exit 1 when "
                                     "any record is bad.")
    dc.add_argument("file", help="records JSONL")
    dc.add_argument("--out-clean", type=Path, default=None, help="write the good records here")
    dc.add_argument("--out-rejects", type=Path, default=None, help="write the bad ones (with reasons) here")
    dc.add_argument("--model", default=None, help="checkpoint whose tokenizer/processor define the length")
    dc.add_argument("--max-length", type=int, default=None, help="longest laid-out sequence allowed")
    dc.add_argument("--k", type=int, default=None, help="latent positions per segment for the length check "
                                                        "(default: the checkpoint's; 0: plain CoT layout)")
    dc.add_argument("--config", default=None, help="take model, max_length and K from a training YAML")
    dc.add_argument("--workers", type=int, default=4, help="threads decoding images")
    dc.add_argument("--quiet", action="store_true", help="no progress bar")
    dv = dsub.add_parser("convert-llava", help="LLaVA-style conversation JSON with CoT answers -> records JSONL",
                         description="Convert [{id, image|images, conversations:[{from: human|gpt, value}]}] to "
                                     "records: question from the first human turn (<image> removed), steps and "
                                     "answer from the gpt turn after it. Unconvertible items go to "
                                     "OUT.rejects.jsonl with the reason.")
    dv.add_argument("src", help="LLaVA JSON (a list) or JSONL")
    dv.add_argument("out", help="records JSONL to write")
    dv.add_argument("--image-root", required=True, help="directory the items' image paths are relative to")
    dm = dsub.add_parser("make-smoke", help="write a tiny model, tiny teacher, images and records for CPU runs",
                         description="For configs/tiny/*.yaml: DIR/model, DIR/teacher, DIR/images, "
                                     "DIR/train.jsonl, DIR/val.jsonl.")
    dm.add_argument("out", help="directory (e.g. runs/smoke)")
    dm.add_argument("--n-train", type=int, default=24)
    dm.add_argument("--n-val", type=int, default=8)
    dm.add_argument("--seed", type=int, default=0)
    da.set_defaults(func=_data)

    sc = sub.add_parser("scale", help="sweep reasoning budget x latent K: accuracy vs thinking compute",
                        description="Generate a benchmark at every (steps, K) pair: min = max = steps reasoning "
                                    "steps (--budget max: at most), K latent positions per segment (K = 0: plain "
                                    "decoding). Writes OUT/scale.json (a row per model, K and steps) and "
                                    "OUT/scale.png (accuracy against generated positions, a line per model and K).")
    from valr.scale import add_arguments as _scale_arguments

    _scale_arguments(sc)
    sc.set_defaults(func=_scale)

    dg = sub.add_parser("diagnose", help="diagnostics: dilution, faithfulness, collapse (JSON + PNG)",
                        description="Diagnose latent reasoning on a records file: dilution (attention mass on image "
                                    "tokens and cosine to the teacher along the generation), faithfulness "
                                    "(interventions on latents), collapse and norms. See docs/diagnostics.md.")
    from valr.diagnostics.cli import add_arguments as _diagnose_arguments

    _diagnose_arguments(dg)
    dg.set_defaults(func=_diagnose)

    e = sub.add_parser("eval", help="evaluation: `valr eval run --help`, `valr eval score --help`, "
                                    "`valr eval length --help`", add_help=False)
    e.add_argument("eval_command", choices=["run", "score", "length"],
                   help="run: generate, resume and score a benchmark with a checkpoint; score: score a predictions "
                        "file offline; length: accuracy by generated length")
    e.set_defaults(func=None)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv[:1] == ["eval"]:
        args, rest = parser.parse_known_args(argv[:2])
        return _eval(args, argv[2:])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
