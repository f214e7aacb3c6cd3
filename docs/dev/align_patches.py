"""Development analysis of docs/results.md (fifteenth session): where in the target view does a trained VaLR-S
model's alignment succeed or fail? Teacher-forced on validation records in the checkpoint's own layout, every
latent segment's projected grid is compared patch by patch (1 - cos, the training loss before averaging) with
its target view's teacher features, and the patches are grouped

- by position in the teacher's patch grid (a map, printed as rows), and
- by how far the target patch's raw feature is from its image's mean patch (quartiles of 1 - cos): the patches
  nearest the mean are the empty floor, the farthest the objects.

    .venv/bin/python docs/dev/align_patches.py RUN [RUN ...] [--records FILE] [--n 96]

RUN is a finished `valr demo` output directory (its valr_s variant and feature cache are read, with
RUN/chains/val.jsonl) or an OUT of docs/dev/variant_from_stage1.py (OUT/train.json's checkpoint, OUT/features,
and the records given by --records). Prints one block per RUN and writes RUN/eval/align_patches.json.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from valr.checkpoint import load_checkpoint
from valr.demo import teacher_forced_batches
from valr.teachers import FeatureCache, build_teacher


def locate(run: Path, records: Path | None) -> tuple[str, Path, Path]:
    """(checkpoint, feature cache, validation records) of a demo run or a variant_from_stage1.py output."""
    if (run / "valr_s" / "done.json").is_file():
        ckpt = json.loads((run / "valr_s" / "done.json").read_text())["result"]["checkpoint"]
        return ckpt, run / "valr_s" / "features", records or run / "chains" / "val.jsonl"
    if (run / "train.json").is_file() and records:
        return json.loads((run / "train.json").read_text())["checkpoint"], run / "features", records
    raise SystemExit(f"{run}: neither a demo run with a finished valr_s nor a variant output (train.json) given "
                     "--records")


def patch_losses(run: Path, n: int, records: Path | None = None, batch: int = 16) -> dict:
    ckpt, features, records = locate(run, records)
    loaded = load_checkpoint(ckpt)
    aligner = loaded.aligner
    teacher = build_teacher(loaded.config.teachers[0], loaded.backbone)
    own, grid_shape, raw = [], None, []
    for _, b, out, feats in teacher_forced_batches(loaded, teacher, records, FeatureCache(str(features), teacher),
                                                   n, batch):
        for row, (j, s) in enumerate(out.segment_owner):
            target = b.segment_targets[j][s]
            if target is None:
                continue
            f, grid = feats[Path(target)]
            f = f.float()
            with torch.no_grad():
                own.append(aligner.patch_losses(teacher.name, out.latent_states[row:row + 1], f[None], grid)[0])
            raw.append(f)
            grid_shape = tuple(grid)
    losses, feats = torch.stack(own), torch.stack(raw)  # (S, P), (S, P, D)
    dist_mean = 1 - F.cosine_similarity(feats, feats.mean(1, keepdim=True).expand_as(feats), dim=-1)  # (S, P)
    edges = torch.quantile(dist_mean.flatten(), torch.tensor([0.25, 0.5, 0.75]))
    bucket = torch.bucketize(dist_mean, edges)
    by_q = {f"q{q + 1}": {"loss": float(losses[bucket == q].mean()),
                          "dist_to_mean": float(dist_mean[bucket == q].mean())} for q in range(4)}
    return {"segments": losses.shape[0], "loss": float(losses.mean()), "grid": grid_shape,
            "loss_map": losses.mean(0).reshape(grid_shape).tolist(), "by_distance_to_mean": by_q,
            # per position: the share of object-like patches (upper half of the distances) and their loss
            "object_share_map": (bucket >= 2).float().mean(0).reshape(grid_shape).tolist(),
            "object_loss_map": (torch.where(bucket >= 2, losses, 0).sum(0) / (bucket >= 2).sum(0).clamp(min=1)
                                ).reshape(grid_shape).tolist(),
            "quartile_edges": edges.tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--n", type=int, default=96, help="validation records per run")
    ap.add_argument("--records", type=Path, help="validation records (default RUN/chains/val.jsonl)")
    args = ap.parse_args()
    for run in args.runs:
        res = patch_losses(run, args.n, args.records)
        (run / "eval").mkdir(exist_ok=True)
        (run / "eval" / "align_patches.json").write_text(json.dumps(res, indent=1))
        print(f"{run}: {res['segments']} segments, loss {res['loss']:.3f}, grid {res['grid']}")
        for q, v in res["by_distance_to_mean"].items():
            print(f"  {q} (target 1-cos to its image's mean patch {v['dist_to_mean']:.3f}): loss {v['loss']:.3f}")
        for name in ("loss_map", "object_share_map", "object_loss_map"):
            print(f"  {name}:")
            for r in res[name]:
                print("   " + " ".join(f"{x:.2f}" for x in r))


if __name__ == "__main__":
    main()
