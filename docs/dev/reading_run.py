"""Development runs of docs/results.md (twenty-sixth session, item 71): the demo's reading task under the image
bottleneck for thousands of steps, the alignment learned first. Items 67-68 gave the reading task 300-1,500
steps; on the cell toy (item 70) the text read its latents 1,000-2,000 steps after the alignment was learned.

    .venv/bin/python docs/dev/reading_run.py RUN RECORDS OUT [--align-first N] [--steps S] [--lambda-align L]
                                             [--save-every E] [key=value ...]
    .venv/bin/python docs/dev/reading_run.py RUN RECORDS OUT --report [--limit 32] [--since STEP] [--rows FILE]

RUN is a `valr demo` output directory whose stage 0 has finished (its teacher is the alignment target); RECORDS a
directory written by `docs/dev/reading_records.py` (train.jsonl, read_val.jsonl); OUT a new directory. Trains
from RUN's last stage-0 model (or ``--start CHECKPOINT``), under the bottleneck: with ``--align-first N`` first
N steps on the alignment alone (OUT/align_first), then S steps of CE plus lambda x alignment (OUT/read), saving
every E steps and keeping every checkpoint, so `docs/dev/image_paths.py` can measure each. The learning-rate
schedule is that of S steps; a stopped run goes on from its last checkpoint when the same command is run
again (the trainer resumes). Keys are DemoConfig fields (latent_feed, train_mode,
k, ...); the paper's feed, fast mode and 1-D positions by default.

``--report`` trains nothing: for the starting model under the bottleneck and per saved checkpoint of OUT
(the warm-up's, then the reading run's) it prints the training alignment and CE (means over the 50 steps up to
it) and `image_paths.py`'s measures on the first LIMIT records of RECORDS/read_val.jsonl: the text's change and
its CE with own and swapped images, and the share of object words read right with own and swapped images. A
text that reads its latents parts the two.
"""

import argparse
import json
from pathlib import Path

from image_paths import image_paths  # docs/dev, beside this script

from valr.data import load_records
from valr.demo.config import DemoConfig
from valr.demo.stages import _train
from valr.synth.teacher import teacher_spec
from valr.trainer import read_log


def stage0_model(run: Path) -> Path:
    """The checkpoint stage 1 starts from: stage 1's cache key names it by fingerprint, so take the last stage-0
    stage that finished (extensions after the main phase)."""
    done = []  # (when it finished, its checkpoint)
    for marker in run.glob("stage0*/done.json"):
        result = json.loads(marker.read_text()).get("result", {})
        if "checkpoint" in result:  # not the reading checks
            done.append((marker.stat().st_mtime, result["checkpoint"]))
    if not done:
        raise SystemExit(f"{run}: no finished stage-0 stage with a checkpoint; run `valr demo --out {run}` first")
    return Path(max(done)[1])


def report(start: Path, out: Path, records: Path, limit: int, since: int = 0, rows: Path | None = None) -> None:
    """One line for the starting model under the bottleneck, then one per checkpoint of OUT/align_first and
    OUT/read, in training order; with ``since``, only the checkpoints at that many steps in all or more. With
    ``rows``, each line is also appended to that JSON-lines file (for `docs/dev/reading_plot.py`)."""
    val = load_records(records / "read_val.jsonl")[:limit]
    if not since:
        emit(f"start {start}", {"part": "start", "step": 0, "in_all": 0, "records": len(val)},
             image_paths(str(start), val, bottleneck=True), rows)
    offset = 0
    for part in ("align_first", "read"):
        run = out / part / "run"
        if not run.is_dir():
            continue
        history = read_log(run)
        last = max((h["step"] for h in history), default=0)
        saved = [(int(c.name.split("-")[1]), c / "model") for c in sorted((run / "checkpoints").glob("step-*[0-9]"))]
        if (run / "final").is_dir() and last not in [s for s, _ in saved]:  # a finished run's last step
            saved.append((last, run / "final"))
        for step, ckpt in saved:
            if offset + step < since:
                continue
            train = window_mean(history, step, 50)
            emit(f"{part} step {step} (in all {offset + step}): train align {train['align']:.4f} ce "
                 f"{train['ce']:.4f};", {"part": part, "step": step, "in_all": offset + step, "records": len(val),
                                         "train_align": train["align"], "train_ce": train["ce"]},
                 image_paths(str(ckpt), val), rows)
        offset += last


def window_mean(history: list[dict], end: int, width: int) -> dict[str, float]:
    """The training alignment and CE, each a mean over the ``width`` steps up to step ``end``."""
    window = [h for h in history if end - width < h["step"] <= end]
    return {k: sum(h[k] for h in window) / len(window) for k in ("align", "ce")}


def emit(head: str, where: dict[str, object], r: dict[str, float], rows: Path | None) -> None:
    print(f"{head} text change {r['text_change']:.4f}, CE own {r['ce_own']:.4f} swapped {r['ce_swapped']:.4f}, "
          f"objects own {r['object_own']:.3f} swapped {r['object_swapped']:.3f}", flush=True)
    if rows:
        keep = ("text_change", "ce_own", "ce_swapped", "object_own", "object_swapped")
        with rows.open("a") as f:
            f.write(json.dumps({**where, **{k: r[k] for k in keep}}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("records", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--start", type=Path, help="train from this checkpoint instead of RUN's stage-0 model")
    ap.add_argument("--align-first", type=int, default=0, metavar="N")
    ap.add_argument("--steps", type=int, default=3000, metavar="S")
    ap.add_argument("--lambda-align", type=float, default=2.5, metavar="L", help="0: the unaligned control")
    ap.add_argument("--save-every", type=int, default=250, metavar="E")
    ap.add_argument("--report", action="store_true", help="measure OUT's checkpoints instead of training")
    ap.add_argument("--limit", type=int, default=32, help="--report: validation records measured")
    ap.add_argument("--rows", type=Path, metavar="FILE", help="--report: also append each line to this JSON-lines file")
    ap.add_argument("--since", type=int, default=0, metavar="STEP",
                    help="--report: only the checkpoints at STEP steps in all (warm-up included) or later")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    a = ap.parse_intermixed_args()  # overrides before or after the options
    model = a.start or stage0_model(a.run)
    if a.report:
        return report(model, a.out, a.records, a.limit, a.since, a.rows)
    seed = json.loads((a.run / "world" / "key.json").read_text())["key"]["seed"]
    cfg = DemoConfig(seed=seed, image_bottleneck=True).with_overrides(a.overrides)
    teachers = [teacher_spec(a.run / "teacher", image_size=112)] if a.lambda_align else []
    common = dict(data=a.records / "train.jsonl", stage=2, lr=cfg.stage2_lr, teachers=teachers,
                  val_data=a.records / "read_val.jsonl", save_every=a.save_every, keep_last=10_000)
    if a.align_first:
        if not a.lambda_align:
            raise SystemExit("--align-first trains the alignment alone: it needs --lambda-align above 0")
        first = _train(cfg, a.out / "align_first", model=model, steps=a.align_first, lambda_align=a.lambda_align,
                       ce_weight=0.0, **common)
        model = Path(first["checkpoint"])
    res = _train(cfg, a.out / "read", model=model, steps=a.steps, lambda_align=a.lambda_align, **common)
    print(json.dumps({k: v for k, v in res.items() if k != "curve"}, indent=1))


if __name__ == "__main__":
    main()
