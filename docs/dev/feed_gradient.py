"""Development analysis of docs/results.md (item 68): how the latent feed scales the gradients that reach the
language model. A slot's state is the normalised sum of its fed input and what its own layers add; with the
paper's feed the input is a final post-norm state (RMS about 1 times the norm's weight), far larger than the
input embeddings, so the slot's own computation may be a small change to a vector that fast mode detaches,
with a gradient divided by that scale in the norms that follow: this script measures how much.

For one checkpoint, a training config (its `valr` section names the teachers and the layout) and the first
``--limit`` records, it prints per feed and mode:
- the norm of the alignment loss's and of the CE's gradient on the language model's weights (one batch);
- the fed vectors' RMS against the input embeddings' RMS;
- the mean cosine between each slot's alignment-layer state and the vector fed in at that slot (1: the slot
  passes its input on unchanged).

    .venv/bin/python docs/dev/feed_gradient.py RECORDS CHECKPOINT TRAIN_CONFIG [--limit 16]
        [--feeds hidden,embedding_rms,pause] [--modes fast,exact]
"""

import argparse
import dataclasses
import json

import torch

from valr.checkpoint import load_checkpoint
from valr.data import LayoutConfig, load_records, make_batch
from valr.tokens import LatentTokenIds
from valr.train import Objective
from valr.trainer import load_train_config


def grad_norm(loss: torch.Tensor, params: list[torch.Tensor]) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(sum(g.square().sum() for g in grads if g is not None)) ** 0.5


def measure(loaded, config, records: list, feed: str, mode: str) -> dict[str, float]:
    """One feed and mode on a loaded checkpoint (its weights are only read: the gradients are not stored)."""
    bb, tok = loaded.backbone, loaded.tokenizer
    cfg = dataclasses.replace(config, latent_feed=feed, train_mode=mode)
    torch.manual_seed(0)  # the same fresh projector for every feed and mode
    objective = Objective(bb, cfg)
    batch = make_batch(records, tok, bb, LayoutConfig(k=cfg.k, latent_after=cfg.latent_after),
                       LatentTokenIds.from_tokenizer(tok))
    parts = objective.stage2(batch)
    llm = [p for n, p in bb.model.named_parameters() if "visual" not in n]
    out = parts.output
    emb_rms = float(bb.model.get_input_embeddings().weight.detach().square().mean().sqrt())
    return {"align_grad": grad_norm(parts.align, llm) if cfg.lambda_align > 0 else 0.0,
            "ce_grad": grad_norm(parts.ce, llm), "align": float(parts.align), "ce": float(parts.ce),
            "fed_rms": float(out.latent_inputs.detach().square().mean().sqrt()), "embedding_rms": emb_rms,
            "state_vs_input_cos": float(torch.nn.functional.cosine_similarity(
                out.latent_states.detach(), out.latent_inputs.detach(), dim=-1).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records")
    ap.add_argument("checkpoint")
    ap.add_argument("train_config", help="a stage-2 train_config.yaml (teachers, K, layer, layout)")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--feeds", default="hidden,embedding_rms,pause")
    ap.add_argument("--modes", default="fast,exact")
    args = ap.parse_args()
    config = load_train_config(args.train_config).valr
    records = load_records(args.records)[:args.limit]
    loaded = load_checkpoint(args.checkpoint)
    for feed in args.feeds.split(","):
        for mode in args.modes.split(","):
            row = measure(loaded, config, records, feed, mode)
            print(json.dumps({"checkpoint": args.checkpoint, "feed": feed, "mode": mode,
                              **{k: round(v, 5) for k, v in row.items()}}), flush=True)


if __name__ == "__main__":
    main()
