"""Development run of docs/results.md (eighth session): a long stage 1 (plain CoT SFT) from a finished demo run's
stage-0 model, with a checkpoint every EVERY steps, each scored on the validation split: when do whole chains
become right, and when do the answers follow the right chains (``accuracy_given_chain_right``)?

    .venv/bin/python docs/dev/answers_along_stage1.py RUN OUT [steps=2000] [every=200] [phase=all|train|eval]
                                                       [data=FILE] [eval=FILE] [key=value ...]

RUN is a `valr demo` output directory with a finished stage 1 (e.g. runs/study6/seed-1); stage 1 restarts from
the model that RUN's stage 1 started from, with RUN's settings (batch, learning rate, warmup, cosine schedule)
over ``steps`` steps. Other keys are DemoConfig fields. ``phase=eval`` scores the checkpoints written so far and
can run beside ``phase=train`` (one thread each on two cores); both resume. Writes OUT/along.jsonl, one line per
scored checkpoint (step, accuracy, per family: accuracy, whole chain right, accuracy after a right chain).
Nothing here touches the test split.
"""

import json
import sys
from pathlib import Path

import yaml

from valr import demo
from valr.demo.pipeline import _run_eval
from valr.demo.stages import _train

run, out = Path(sys.argv[1]), Path(sys.argv[2])
ours = ("steps", "every", "phase", "data", "eval")
extra = dict(a.split("=", 1) for a in sys.argv[3:] if a.split("=", 1)[0] in ours)
steps, every, phase = int(extra.get("steps", 2000)), int(extra.get("every", 200)), extra.get("phase", "all")
seed = json.loads((run / "results.json").read_text())["seed"]
cfg = demo.DemoConfig(seed=seed, eval_split="val").with_overrides(
    [a for a in sys.argv[3:] if a.split("=", 1)[0] not in ours])
stage0 = yaml.safe_load((run / "stage1" / "run" / "train_config.yaml").read_text())["model"]
data = Path(extra.get("data") or run / "chains" / "train.jsonl")
val = Path(extra.get("eval") or run / "chains" / "val.jsonl")
out.mkdir(parents=True, exist_ok=True)

if phase in ("all", "train") and not (out / "train.json").exists():
    res = _train(cfg, out, model=Path(stage0), data=data, stage=1, steps=steps, lr=cfg.stage1_lr,
                      save_every=every, keep_last=steps // every + 1)
    (out / "train.json").write_text(json.dumps(res, indent=1))

if phase in ("all", "eval"):
    log = out / "along.jsonl"
    done = {json.loads(x)["step"] for x in log.read_text().splitlines() if x.strip()} if log.exists() else set()
    ckpts = {int(p.name.split("-")[1]): p / "model" for p in sorted((out / "run" / "checkpoints").glob("step-*"))}
    if (out / "train.json").exists():
        ckpts[steps] = Path(json.loads((out / "train.json").read_text())["checkpoint"])
    for step, path in sorted(ckpts.items()):
        if step in done or not (path / "model.safetensors").exists():
            continue
        edir = out / "eval" / f"step-{step:05d}"
        _run_eval(cfg, str(path), val, edir, "off", 4)
        s = demo.score_predictions(val, edir / "predictions.jsonl")
        row = {"step": step, "accuracy": s["accuracy"], "by_family": s["accuracy_by_family"],
               "chain_right": s["chain_right_by_family"], "given_chain_right": s["accuracy_given_chain_right"]}
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row))
