"""Development runs of docs/results.md (seventh session): one variant trained from a finished demo run's stage-1
model with other latent settings, scored on the validation split (nothing here touches the test split).

    .venv/bin/python docs/dev/variant_from_stage1.py RUN OUT [key=value ...]

RUN is a `valr demo` output directory with a finished stage 1 (e.g. runs/study6/seed-1); OUT a new directory.
Keys are DemoConfig fields (k, align_layer, lambda_align, center_targets, latent_after, stage2_steps, ...) plus
``start=CHECKPOINT`` (train from it instead of stage 1), ``data=FILE`` (train records instead of
RUN/chains/train.jsonl) and ``eval=FILE`` (validation records instead of RUN/chains/val.jsonl, e.g. rewritten
the same way as ``data``; next to it, so its image paths resolve), ``model=CHECKPOINT`` (score a model trained
elsewhere, e.g. one of the demo's variants, with the same settings; no training). ``k=0`` trains plain CoT (the
SFT variant) and evaluates with latents off. Writes OUT/train.json and OUT/result.json: the training summary,
`step_tokens`, `segment_views` and the evaluation. `valr demo` itself reruns only the variants when latent
settings change, but it cannot start from another run's stage 1 or train on rewritten records; this script can.
"""

import json
import sys
import time
from pathlib import Path

from valr import demo
from valr.checkpoint import load_checkpoint
from valr.demo.pipeline import _run_eval
from valr.demo.stages import _train
from valr.synth.teacher import teacher_spec

run, out = Path(sys.argv[1]), Path(sys.argv[2])
extra = dict(a.split("=", 1) for a in sys.argv[3:] if a.split("=", 1)[0] in ("start", "data", "eval", "model"))
seed = json.loads((run / "world" / "key.json").read_text())["key"]["seed"]  # readable before the demo finishes
cfg = demo.DemoConfig(seed=seed, eval_split="val").with_overrides(
    [a for a in sys.argv[3:] if a.split("=", 1)[0] not in extra])
cdir = run / "chains"
start = extra.get("start") or json.loads((run / "stage1" / "done.json").read_text())["result"]["checkpoint"]
out.mkdir(parents=True, exist_ok=True)
# the validation loss during training: next to eval=FILE when that directory has one, else the run's
val_small = Path(extra["eval"]).parent / "val_small.jsonl" if "eval" in extra else cdir / "val_small.jsonl"
val_small = val_small if val_small.is_file() else cdir / "val_small.jsonl"
if "model" in extra and not (out / "train.json").exists():
    (out / "train.json").write_text(json.dumps({"checkpoint": extra["model"], "config": cfg.to_dict()}, indent=1))
if not (out / "train.json").exists():
    t0 = time.time()
    lam = cfg.lambda_align if cfg.k else 0.0
    teachers = [teacher_spec(run / "teacher", image_size=112)] if lam > 0 else []
    res = _train(cfg, out, model=Path(start), data=Path(extra.get("data") or cdir / "train.jsonl"),
                      stage=2 if cfg.k else 1, steps=cfg.stage2_steps, lr=cfg.stage2_lr, lambda_align=lam,
                      teachers=teachers, val_data=val_small)
    res.update(seconds=time.time() - t0, config=cfg.to_dict())
    if teachers:
        res["mean_feature_loss"] = demo.cache_alignment_baselines(out / "features", center=cfg.center_targets)
    (out / "train.json").write_text(json.dumps(res, indent=1))
res = json.loads((out / "train.json").read_text())
loaded = load_checkpoint(res["checkpoint"])
val = Path(extra.get("eval") or cdir / "val.jsonl")
steps = demo.step_token_accuracy(loaded, val, n=128, k=cfg.k, layer=cfg.align_layer)
views = demo.segment_view_accuracy(loaded, val, out / "features") if cfg.k else {}
_run_eval(cfg, res["checkpoint"], val, out / "eval", "model" if cfg.k else "off", cfg.k or 4)
scores = demo.score_predictions(val, out / "eval" / "predictions.jsonl")
(out / "result.json").write_text(json.dumps({"train": res, "step_tokens": steps, "segment_views": views,
                                              "eval": scores}, indent=1))
print(json.dumps({"accuracy": scores["accuracy"], "by_family": scores["accuracy_by_family"],
                  "segment_views": views}, indent=1))
