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


def _demo(args: argparse.Namespace) -> int:
    print("valr demo: not yet. The built-in spatial world and the SFT-vs-VaLR comparison are in progress "
          "(see the project's issue on the demo). Meanwhile: `valr tiny --out runs/tiny` then "
          "`valr generate --model runs/tiny --prompt 'Hello' --latent-policy force --k 4`.")
    return 0


def _eval(args: argparse.Namespace, rest: list[str]) -> int:
    if args.eval_command == "score":
        from valr.eval.score_cmd import score_main

        return score_main(rest)
    print(f"unknown eval command {args.eval_command!r}; available: score", file=sys.stderr)
    return 2


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
    b.set_defaults(func=_bench)

    d = sub.add_parser("demo", help="the built-in spatial world: SFT vs VaLR end to end (in progress)")
    d.add_argument("--quick", action="store_true")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo)

    e = sub.add_parser("eval", help="evaluation: `valr eval score --help`", add_help=False)
    e.add_argument("eval_command", choices=["score"], help="score: score a predictions file offline")
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
