"""``valr demo``: the built-in spatial world end to end -- SFT vs latents without alignment vs VaLR on one laptop.

Pipeline (every stage is cached under ``OUT/<stage>/`` with a ``done.json`` marker that records the stage's
settings fingerprint, its result and its measured seconds; a rerun reuses every finished stage whose settings
and upstream stages are unchanged, and redoes the rest; an interrupted training stage resumes from its last
checkpoint):

1. ``world``     the dataset (``valr.synth.dataset.make_world_dataset``): scenes of 4 views on a 4x4 cell grid,
                 questions whose every step is one lookup in one view (N = 1..n_max steps), labels.npz. Two
                 perception aids: the world's own ``cell_tint`` (a cell's row/col shade its background) and a
                 per-view background shade (:func:`shade_views`), so a visual token's pixels say where it is.
   ``chains``    the same scenes and questions written in the current text format, over the world's images
                 (hard links): stage 1 on trains and evaluates on these, so a change to how chains are written
                 reruns stage 1 on and not perception.
2. ``teacher``   the perception teacher (``valr.synth.teacher``): a small Dinov2Model trained on the per-cell
                 labels of the training views, frozen afterwards. It plays DINOv3's role.
3. ``vision``    a random tiny Qwen2.5-VL (transformers class, world tokenizer, latent tokens) whose own vision
                 tower is pretrained on the same dense labels (:func:`pretrain_vision`; the stand-in for the
                 pretrained ViT of a real MLLM).
4. ``stage0``    the language model learns to read cells by address ("read view 3 row 2 col 1, ..." ->
                 "view 3 row 2 col 1: large red cube") and to find them by content ("which cell: red in view 2"
                 -> "view 2 red at row 3 col 1: ..."), the two lookups every reasoning step uses; one view first,
                 then all views, then extensions while held-out reading is under target.
5. ``stage1``    chain-of-thought SFT on the training records (vision tower frozen from here on, as in the paper).
6. variants, each from the stage-1 checkpoint with the same number of steps and the same LR schedule:
   ``sft``              stage 1 continued (so SFT trains as long as stage 1 + stage 2 together),
   ``latent_no_align``  stage 2 with lambda = 0 (latent segments, no REPA),
   ``latent_pause``     (optional, ``pause_control=true``) stage 2 with K learned pause tokens in place of the
                        fed-back states, lambda = 0: the same extra positions without the feedback (a control),
   ``valr_s``           stage 2 with REPA to the perception teacher,
   ``valr_m``           (optional) REPA to the perception teacher and the MLLM's own vision tower ("QE"),
   ``stage1_f25`` + ``valr_s_f25``  stage 1 and VaLR-S on the first 25 % of the training records
                        (same number of steps: the paper's fixed-iteration data-scaling setting); off by
                        default, on with the override ``data_fraction=0.25`` (the 3-seed study) and in --quick.
7. ``eval/*``    greedy generation through ``valr eval run`` (the records benchmark: option letters scored
                 exactly, counts by MRA) on the test split; latent variants decode with ``--latent-policy model``
                 (they enter latent mode when they emit ``<latent>`` themselves), SFT with ``off``; VaLR-S also at
                 other test-time K.
8. ``results.json``, ``report.md`` and the figures: accuracy per variant, accuracy by chain length N (the
   dilution curve), accuracy by generated length (the paper's Fig. 2 analysis), accuracy vs test-time K, and
   per-step accuracy by step position.

All training goes through ``valr.trainer.train`` (the loop users run), all evaluation through ``valr eval run``.
Nothing here is tuned on the test split (development runs use ``eval_split="val"``). ``--quick`` runs the same
pipeline at toy sizes (a smoke test: its accuracies mean nothing).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Passive OpenMP waiting: on a shared 2-core machine, torch's 2 worker threads spin-waiting at every barrier make
# a step up to 5x slower as soon as another process takes a core (measured: 8.1 s active vs 1.8 s passive per
# step of a 4-layer width-128 transformer at batch 32). Takes effect only if torch is not imported yet.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from valr.synth.teacher import TeacherTrainConfig  # noqa: E402  (imports torch)

FORMAT = 1
VARIANTS = ("sft", "latent_no_align", "latent_pause", "valr_s", "valr_m")
TARGET_NS = (6, 7, 8)  # "long chains" for the N >= 6 target (all N >= 6 present in the test split)


@dataclass
class DemoConfig:
    seed: int = 0
    quick: bool = False
    # world
    n_train: int = 4000
    n_val: int = 300
    n_test: int = 400
    n_min: int = 1
    n_max: int = 8
    n_views: int = 4
    # chase and tally with the same four options in every question (valr.synth.questions). Recipe 6: with options
    # drawn per question (False, recipes 1-5) a 4-layer model answered chase and tally at chance after right chains
    # (docs/results.md items 31, 39). Changes the chains stage and what trains on it; perception (stage 0, teacher)
    # keeps the world's scenes
    fixed_options: bool = True
    # tally's steps keep the tally (``#3 view 1 row 2 col 2: small red ball, red 2``), so its answer is the colour
    # beside the largest count (without it the letter followed 57% of right tally chains: item 39); same questions
    tally_counts: bool = False
    cell_tint: int = 16  # the world's opt-in aid: a cell's row/col shade its background (red/blue channel)
    view_shade: int = 20  # demo aid: view v's background gets +v*view_shade in the green channel
    # the MLLM (Qwen2.5-VL architecture, tiny)
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    intermediate: int = 512
    vision_depth: int = 2
    vision_hidden: int = 128
    vision_heads: int = 4
    # perception teacher
    teacher: TeacherTrainConfig = field(default_factory=lambda: TeacherTrainConfig(steps=120, batch_size=32))
    # vision-tower pretraining (dense per-token labels) and stage 0 (reading cells by address)
    vision_steps: int = 100
    vision_lr: float = 2e-3
    # also train row/col/view heads on the vision tower, so a visual token's features say where it is (74% of
    # their variance; without them 0.7%). Without them reading by address starts faster (51% vs 37% of object
    # words after 300 steps), but a step that *finds* an object by colour or shape must then write the cell it
    # found, which only the token's features can tell; with them a 500 + 600 step stage 0 read 99.6%
    vision_position_heads: bool = True
    stage0_batch_size: int = 32
    stage0_oneview_steps: int = 400  # curriculum phase 1: read cells of one view (0: skip)
    stage0_steps: int = 500  # phase 2: read cells by view address among all views (held-out reading 81-87% after
    # 500 steps of this phase, 86-92% after the extensions, in the 3-seed study: docs/results.md)
    stage0_lr: float = 1e-3
    # stage 0 runs to competence: while the held-out reading probe (object words, all views, validation scenes) is
    # below the target, train stage0_extra_steps more all-view steps, at most stage0_max_extensions times
    stage0_read_target: float = 0.9
    stage0_extra_steps: int = 100
    stage0_max_extensions: int = 2
    # finding a cell by content ("which cell: #1 red in view 2" -> "#1 view 2 red at row 3 col 1: ..."), which
    # chains need for every colour or shape move and where's start: once stage 0's all-view phase has run,
    # find_oneview_rounds rounds of find_oneview_steps on one-view find records (each round its own learning-rate
    # schedule, from the last round's model), then find_steps on all-view find records mixed with the read
    # records, all at batch find_batch_size; then the reading checks and extensions (on that mix) as without them.
    # Each its own cached stage; 0 steps: skip. Like reading, finding is a late transition that some seeds reach
    # much later than others: one round of 800 steps at batch 32 found 16-57% of whole one-view cells (seeds 1, 0,
    # 2: 16 / 27 / 57%); two rounds of 1,600 at batch 16 found 95% on seed 1, 67% on seed 0 (by shape 24%)
    # (docs/results.md items 14-21). Mixed into stage 0 from the start, finding stayed at chance and reading
    # slowed (item 11). Recipe 7 turns them on (seed 0 found 6.8% of whole cells without them, 57.1% with them:
    # item 42), at about 35 more minutes per seed
    find_oneview_steps: int = 1600
    find_oneview_rounds: int = 2
    find_steps: int = 1000
    find_batch_size: int = 16
    # CoT training (optimizer steps; stages 1 and 2 use the same batch size)
    batch_size: int = 16
    # the chains are a late transition: whole chase / where / tally chains right 24 / 20 / 83% after 400 steps,
    # 95 / 87 / 100% after 1,600 (seed 1, validation; docs/results.md item 31), so the variants start from a
    # model that has learned its steps
    stage1_steps: int = 1600
    stage1_lr: float = 1e-3
    # recipe 8: at 300 steps the latent layout's cost was not yet paid back: the latent variants copied the earlier
    # step's content key 5-18% of the time against SFT's 58-69% (seed 0, validation, item 44) and with 900 steps
    # both came within 1.3 points of SFT (seed 1, validation, item 37); the alignment itself took hold by ~220
    # steps (item 26). SFT trains as long (stage 1 + the same steps)
    stage2_steps: int = 900
    stage2_lr: float = 1e-3  # = stage 1's: the new latent layout costs a CE jump to 3.6 at the start
    projector_lr: float = 1e-3
    warmup_ratio: float = 0.05
    num_workers: int = 1
    # the variants (SFT, latents without alignment, VaLR-S, ...) train from the same stage 1 and do not depend on
    # each other: this many train at once, each in its own process with an equal share of the CPU threads (on 2
    # cores two one-thread processes do 1.16-1.18 times the stage-2 steps per second of one two-thread process:
    # bench/variant_workers.py, docs/benchmarks.md). 1: one after another in this process. Not part of any cache key.
    variant_workers: int = 2
    # VaLR (recipe 4, docs/results.md seventh session): K = 16 latents, one per cell of the 4 x 4 grid (with K = 4
    # a 2 x 2 grid stands for 16 cells); aligned at the last layer, to centred teacher features (raw targets sat
    # at the mean-feature plateau in every setting tried); each segment after the step's head, which names the
    # view (placed before the step, the latents never worked out which view the step needs: they picked it 24-27%
    # of the time, chance 25%; after the head 79-86%); lambda 2.5 (0.5 had not moved the loss after 180 steps)
    k: int = 16
    align_layer: int = 4
    lambda_align: float = 2.5
    train_mode: str = "fast"
    projector_width: int = 256
    center_targets: bool = True  # valr.center_targets: align to each image's patch features minus their mean
    latent_after: str | None = r"#\d+ view \d+"  # valr.latent_after: each latent segment after the step's head
    # valr.aligned_latents: align only each segment's first this many latents (a square grid), leaving the other
    # k - aligned_latents free to carry the chain's state (docs/results.md What next 9); 0: all K (the paper)
    aligned_latents: int = 0
    # what the aligned variants' latents are pulled toward: "view" (the step's input view, as in the paper's
    # multi-view data) or "focus" (what the step finds, drawn alone: valr.synth.focus, like the paper's
    # interleaved images); the text and every other variant are the same either way
    step_targets: str = "view"
    # valr.latent_feed of the latent variants: "hidden" (the paper), "embedding_rms" (fed latents rescaled to the
    # token embeddings' scale; docs/results.md item 36) or "pause" (no feedback: K learned pause tokens, a control)
    latent_feed: str = "hidden"
    # the pause-token control (variant latent_pause: latent_feed=pause, lambda 0): do the latents help through
    # the feedback or only through K more positions? On seed 0 of recipe 8 pause tokens lost 6-9 points to the
    # fed-back latents (docs/results.md item 46). About 35 more minutes a seed here, so off by default
    pause_control: bool = False
    valr_m: bool = False
    # the data-efficiency runs (stage 1 + VaLR-S on this fraction of the records) cost 8 of the full mode's 32
    # minutes, so the default demo skips them (0) and the study turns them on with data_fraction=0.25
    data_fraction: float = 0.0
    # evaluation
    eval_batch_size: int = 50
    max_new_tokens: int = 140
    test_ks: tuple[int, ...] = (1, 4, 9, 16)
    eval_limit: int | None = None  # None: the whole split
    eval_split: str = "test"  # "val" for development runs (nothing is tuned on the test split)

    @classmethod
    def for_mode(cls, quick: bool, seed: int) -> DemoConfig:
        if not quick:
            return cls(seed=seed)
        return cls(seed=seed, quick=True, n_train=48, n_val=8, n_test=16, n_max=3, hidden=64, heads=4, kv_heads=2,
                   intermediate=128, vision_hidden=32, vision_heads=2,
                   teacher=TeacherTrainConfig(hidden=32, layers=1, heads=2, steps=8, batch_size=16),
                   vision_steps=4, stage0_batch_size=8, stage0_oneview_steps=3, stage0_steps=4, stage0_extra_steps=2,
                   stage0_max_extensions=1, find_oneview_steps=2, find_oneview_rounds=2, find_steps=2,
                   find_batch_size=4, batch_size=8,
                   stage1_steps=4,
                   stage2_steps=3, num_workers=0, projector_width=32, valr_m=True, pause_control=True,
                   data_fraction=0.25,
                   eval_batch_size=16,
                   max_new_tokens=40, test_ks=(1, 4))

    def scaled(self, factor: float) -> DemoConfig:
        """The same demo with every training stage ``factor`` times longer (more compute, same recipe)."""
        if factor == 1:
            return self
        names = ("vision_steps", "stage0_oneview_steps", "stage0_steps", "find_oneview_steps", "find_steps",
                 "stage1_steps", "stage2_steps")
        steps = {k: max(1, round(getattr(self, k) * factor)) if getattr(self, k) else 0 for k in names}
        return dataclasses.replace(self, **steps)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["test_ks"] = list(self.test_ks)
        return d

    def with_overrides(self, overrides: list[str]) -> DemoConfig:
        """This config with ``key=value`` overrides applied (``teacher.steps=200``, ``test_ks=[1,4]``); unknown
        keys and values of the wrong type are errors that name the key."""
        from valr.config import ConfigError, apply_overrides, build_dataclass

        if not overrides:
            return self
        for item in overrides:
            if item.split("=", 1)[0] in ("seed", "quick"):
                raise ConfigError(f"demo override {item!r}: use the --seed / --quick options instead")
        data = apply_overrides(self.to_dict(), list(overrides))
        for f in dataclasses.fields(self):
            old, value = getattr(self, f.name), data[f.name]
            if isinstance(old, float) and isinstance(value, str):  # YAML reads 2e-3 as a string
                try:
                    data[f.name] = value = float(value)
                except ValueError:
                    pass
            if old is None or value is None or f.name in ("teacher", "test_ks"):
                continue
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(old, float) else (
                isinstance(value, type(old)) and isinstance(value, bool) == isinstance(old, bool))
            if not ok:
                raise ConfigError(f"demo override {f.name}={value!r}: expected {type(old).__name__} like the "
                                  f"default {old!r}")
            if isinstance(old, float):
                data[f.name] = float(value)
        data["teacher"] = build_dataclass(TeacherTrainConfig, data["teacher"], "demo override teacher")
        data["test_ks"] = tuple(data["test_ks"])
        if data["variant_workers"] < 1:
            raise ConfigError(f"demo override variant_workers={data['variant_workers']}: expected 1 or more "
                              "(1 trains the variants one after another)")
        if data["step_targets"] not in STEP_TARGETS:
            raise ConfigError(f"demo override step_targets={data['step_targets']!r}: expected one of {STEP_TARGETS}")
        from valr.backbones.base import LATENT_FEEDS

        if data["latent_feed"] not in LATENT_FEEDS:
            raise ConfigError(f"demo override latent_feed={data['latent_feed']!r}: expected one of {LATENT_FEEDS}")
        from valr.align import latent_grid_side

        try:
            if data["k"]:  # 0: no latents (plain CoT)
                latent_grid_side(data["k"], data["aligned_latents"])
        except ValueError as e:
            raise ConfigError(f"demo overrides k={data['k']}, aligned_latents={data['aligned_latents']}: {e}") from None
        return build_dataclass(DemoConfig, data, "demo overrides")


STEP_TARGETS = ("view", "focus")

# ------------------------------------------------------------------------------------------------- stages


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _log(msg: str) -> None:
    print(f"[valr demo] {msg}", file=sys.stderr, flush=True)


class Stages:
    """Runs named stages once: ``OUT/<name>/done.json`` holds (fingerprint, result, seconds).

    A stage directory whose ``key.json`` names other settings is deleted before the stage reruns; one with the
    same settings but no ``done.json`` (an interrupted run) is kept, so a training stage resumes there.
    """

    def __init__(self, root: Path):
        self.root = root
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []
        self.fps: dict[str, str] = {}

    def run(self, name: str, key: dict[str, Any], fn) -> Any:
        found, d = self._open(name, key)
        if d is None:
            return found
        _log(f"{name}: running")
        t0 = time.perf_counter()
        result = fn(d)
        return self._close(name, d, result, time.perf_counter() - t0)

    def run_parallel(self, jobs: list[tuple[str, dict[str, Any], Callable[[Path], Any]]], workers: int) -> dict:
        """``run`` for independent stages, ``workers`` at a time, each in a fresh process with an equal share of
        this process's CPU threads (all of them for a lone stage). ``fn`` must be picklable (a module-level
        function or a ``functools.partial`` of one); it runs without its own progress bar, and one bar per running
        stage here follows the ``run/history.jsonl`` its trainer writes after every step (``total`` in the job's
        key: ``steps``). Finished stages are kept if another fails; the first failure is raised after the rest
        are done."""
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        import torch
        from tqdm import tqdm

        results: dict[str, Any] = {}
        todo = []
        for name, key, fn in jobs:
            found, d = self._open(name, key)
            if d is None:
                results[name] = found
            else:
                todo.append((name, key, fn, d))
        if not todo:
            return results
        workers = min(workers, len(todo))  # a lone stage gets every thread
        threads = max(1, torch.get_num_threads() // workers)
        _log(f"{', '.join(n for n, *_ in todo)}: running, {workers} at a time, {threads} thread(s) each")
        errors: list[BaseException] = []
        ctx = multiprocessing.get_context("spawn")  # no forked copies of this process's torch threads or state
        started = time.time()
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_set_threads,
                                 initargs=(threads,)) as pool:
            pending = {pool.submit(_timed, fn, d): (name, key, d) for name, key, fn, d in todo}
            bars: dict[str, Any] = {}
            while pending:
                done, _ = wait(pending, timeout=5, return_when=FIRST_COMPLETED)
                for fut in done:
                    name, _, d = pending.pop(fut)
                    if name in bars:
                        bars.pop(name).close()
                    try:
                        result, secs = fut.result()
                    except BaseException as exc:  # keep the others running; report after
                        _log(f"{name}: failed: {exc!r}")
                        errors.append(exc)
                        continue
                    results[name] = self._close(name, d, result, secs)
                for name, key, d in pending.values():
                    step = _history_step(d / "run" / "history.jsonl", since=started)
                    if step is None:
                        continue
                    if name not in bars:
                        bars[name] = tqdm(total=key.get("steps"), desc=name, unit="step", file=sys.stderr,
                                          dynamic_ncols=True)
                    bars[name].update(step - bars[name].n)
            for bar in bars.values():
                bar.close()
        if errors:
            raise errors[0]
        return results

    def _open(self, name: str, key: dict[str, Any]) -> tuple[Any, Path | None]:
        """(the finished stage's result, None), or (None, its fresh or resumable directory)."""
        d = self.root / name
        fp = _fingerprint({"format": FORMAT, "key": key})
        self.fps[name] = fp
        marker = d / "done.json"
        if marker.is_file():
            done = json.loads(marker.read_text())
            if done.get("fingerprint") == fp:
                self.seconds[name] = done["seconds"]
                self.reused.append(name)
                _log(f"{name}: reusing the finished stage ({done['seconds']:.0f} s when it ran)")
                return done["result"], None
        key_file = d / "key.json"
        if d.exists() and (not key_file.is_file() or json.loads(key_file.read_text()).get("fingerprint") != fp):
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        key_file.write_text(json.dumps({"fingerprint": fp, "key": key}, indent=2, default=str))
        return None, d

    def _close(self, name: str, d: Path, result: Any, secs: float) -> Any:
        self.seconds[name] = secs
        marker = d / "done.json"
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fps[name], "seconds": secs, "result": result}, indent=2,
                                  default=str))
        tmp.replace(marker)
        _log(f"{name}: done in {secs:.0f} s")
        return result


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _timed(fn: Callable[[Path], Any], d: Path) -> tuple[Any, float]:
    t0 = time.perf_counter()
    result = fn(d)
    return result, time.perf_counter() - t0


def _history_step(path: Path, since: float = 0.0) -> int | None:
    """The last step a trainer logged to its history.jsonl (None before the first, and for a file not written
    since ``since``: an interrupted earlier run's history, which the trainer trims when it starts)."""
    try:
        if path.stat().st_mtime < since:
            return None
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a line being written
    return None


# -------------------------------------------------------------------------------------------- data helpers


def shade_views(world_dir: Path, shade: int, tint: int) -> int:
    """Give each view its own background shade (green channel + view * shade) in place; returns images changed.

    A demo aid like the world's own ``cell_tint``: it makes *which view* a visual token belongs to visible in the
    token's pixels. Without it a tiny rope decoder must tell four identical-looking image runs apart by absolute
    position, which it does not learn in the demo's budget (measured: reading cells by address stayed at the
    blind loss for 1000 steps). Only background pixels change (objects and grid lines keep their colours, labels
    are untouched); idempotent, because shaded backgrounds no longer match the unshaded colour.
    """
    import numpy as np
    from PIL import Image

    from valr.synth.world import shade_background

    if shade <= 0:
        return 0
    changed = 0
    for p in sorted((world_dir / "images").rglob("*_v*.png")):
        v = int(p.stem.rsplit("_v", 1)[1])
        if v == 0:
            continue
        with Image.open(p) as im:
            a = np.asarray(im.convert("RGB")).copy()
        if shade_background(a, v, shade, tint):
            Image.fromarray(a).save(p, format="PNG", compress_level=6)
            changed += 1
    return changed


def _count_range(name: str, bounds: tuple[int, int]) -> tuple[int, int]:
    lo, hi = bounds
    if not 1 <= lo <= hi:
        raise ValueError(f"{name} must be a range 1 <= lo <= hi, got {bounds}")
    return lo, hi


def _world_scenes(world_dir: Path, split: str) -> list[tuple[Any, Any]]:
    """Each scene of ``split`` once, as (the first record that shows it, the scene rebuilt from the labels)."""
    from valr.data.records import load_records
    from valr.synth.dataset import load_labels, scene_from_labels

    labels = load_labels(world_dir)
    first: dict[tuple[str, ...], Any] = {}
    for rec in load_records(world_dir / f"{split}.jsonl"):
        first.setdefault(tuple(str(p) for p in rec.images), rec)
    return [(rec, scene_from_labels(labels, rec, world_dir)) for rec in first.values()]


def _write_shuffled(recs: list, rng: Any, dst: Path) -> int:
    """Write ``recs`` to ``dst`` in an order drawn from ``rng`` (image paths rewritten so they still resolve)."""
    from valr.data.records import write_records

    order = rng.permutation(len(recs))
    write_records([recs[i] for i in order], dst)
    return len(recs)


def read_records(world_dir: Path, out_file: Path, seed: int, per_scene: int = 4, cells: tuple[int, int] = (1, 8),
                 split: str = "train") -> int:
    """Stage-0 records: read given cells. Per scene of ``split`` (training scenes for stage 0; validation scenes
    for the held-out reading probe), ``per_scene`` records alternate between one view ("read #1 row 2 col 3, ..."
    -> "#1 row 2 col 3: large red cube") and all views ("read #1 view 3 row 2 col 3, ..." -> "#1 view 3 row 2 col
    3: large red cube", the CoT's lookup-step format).

    Each record reads a random number of cells in ``cells`` (inclusive; the demo passes its chain lengths). With
    a fixed number every item of the list sits at the same distance from the step that reads it, and the model
    learns to copy and read by that distance: a development model trained on 4-cell records read 99% of 4-cell
    records and 46-50% of 2- or 7-cell ones, and nothing of it carried over to chains (docs/results.md)."""
    import numpy as np

    from valr.data.records import Record, Step, StepTarget
    from valr.synth.questions import lookup_text, read_line

    lo, hi = _count_range("cells", cells)
    scenes = _world_scenes(world_dir, split)
    rng = np.random.default_rng([seed, 17])
    out = []
    for rec, scene in scenes:
        for j in range(per_scene):
            n = int(rng.integers(lo, hi + 1))
            if j % 2 == 0:  # one view
                v = int(rng.integers(scene.n_views))
                occ = scene.cells(v)
                pick = [(v, *occ[i]) for i in rng.permutation(len(occ))[:n]]
                q = read_line(pick, with_view=False)
                steps = tuple(Step(lookup_text(scene, p, i + 1, with_view=False), StepTarget(image_index=0))
                              for i, p in enumerate(pick))
                images = (rec.images[v],)
            else:  # all views, addressed by view
                occ = [(v, r, c) for v in range(scene.n_views) for r, c in scene.cells(v)]
                pick = [occ[i] for i in rng.permutation(len(occ))[:n]]
                q = read_line(pick)
                steps = tuple(Step(lookup_text(scene, p, i + 1), StepTarget(image_index=p[0]))
                              for i, p in enumerate(pick))
                images = rec.images
            out.append(Record(id=f"read-{rec.meta['scene']}-{j}", question=q, steps=steps, answer=str(len(pick)),
                              images=images, meta={"family": "read", "n_steps": len(steps)}))
    return _write_shuffled(out, rng, out_file)


def find_records(world_dir: Path, out_file: Path, seed: int, per_scene: int = 2, items: tuple[int, int] = (1, 8),
                 split: str = "train", one_view: bool = False) -> int:
    """Stage-0 records for the inverse lookup, finding a cell by content: "which cell: #1 red in view 2, #2 cube
    in view 4, #3 red cube in view 1." -> "#1 view 2 red at row 3 col 1: large red cube", ... (the CoT's format of
    a lookup by content). Each item names a colour, a shape or both that exactly one object of that view has; a
    record has a random number of items in ``items``. Chains need this lookup wherever a step goes to "the object
    of the same colour/shape in view V" or starts at a named object, and reading by address does not teach it
    (docs/results.md). With ``one_view`` every other record finds in one view, like the one-view read records
    ("which cell: #1 red, #2 cube." -> "#1 red at row 3 col 1: large red cube", ...), for stage 0's first phase."""
    import numpy as np

    from valr.data.records import Record, Step, StepTarget
    from valr.synth.questions import lookup_text, marker
    from valr.synth.world import COLOURS, SHAPES

    lo, hi = _count_range("items", items)
    rng = np.random.default_rng([seed, 23])
    out = []
    for rec, scene in _world_scenes(world_dir, split):
        findable: dict[tuple[int, int, int], list[str]] = {}  # cell -> descriptions unique in its view
        for v in range(scene.n_views):
            names = {}
            for r, c in scene.cells(v):
                o = scene.obj(v, r, c)
                names[(v, r, c)] = (COLOURS[o.colour], SHAPES[o.shape], f"{COLOURS[o.colour]} {SHAPES[o.shape]}")
            seen = Counter(n for ns in names.values() for n in ns)  # colour and shape words never coincide
            findable.update({cell: [n for n in ns if seen[n] == 1] for cell, ns in names.items()
                             if any(seen[n] == 1 for n in ns)})
        for j in range(per_scene):
            view = int(rng.integers(scene.n_views)) if one_view and j % 2 == 0 else None
            cells = [p for p in findable if view is None or p[0] == view]
            pick = [cells[i] for i in rng.permutation(len(cells))[:int(rng.integers(lo, hi + 1))]]
            if not pick:
                continue
            said = [findable[p][int(rng.integers(len(findable[p])))] for p in pick]
            pairs = list(enumerate(zip(pick, said, strict=True)))
            all_views = view is None  # else the view is the record's only image: nothing names it
            q = "which cell: " + ", ".join(f"{marker(i + 1)} {w}" + (f" in view {p[0] + 1}" if all_views else "")
                                           for i, (p, w) in pairs)
            steps = tuple(Step(lookup_text(scene, p, i + 1, key=w, with_view=all_views),
                               StepTarget(image_index=p[0] if all_views else 0)) for i, (p, w) in pairs)
            images = rec.images if all_views else (rec.images[view],)
            out.append(Record(id=f"find-{rec.meta['scene']}-{j}", question=q + ".", steps=steps,
                              answer=str(len(pick)), images=images, meta={"family": "find", "n_steps": len(steps)}))
    return _write_shuffled(out, rng, out_file)


def mix_records(sources: list[Path], dst: Path, seed: int) -> Path:
    """The records of ``sources`` shuffled together into ``dst`` (image paths rewritten so they still resolve)."""
    import numpy as np

    from valr.data.records import load_records

    _write_shuffled([r for src in sources for r in load_records(src)], np.random.default_rng([seed, 29]), dst)
    return dst


def link_images(src: Path, dst: Path) -> int:
    """Every file under ``src`` hard-linked into ``dst`` (copied where the file system has no hard links), so the
    chains directory is a self-contained dataset without a second copy of the world's images."""
    n = 0
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        t = dst / f.relative_to(src)
        t.parent.mkdir(parents=True, exist_ok=True)
        if not t.exists():
            try:
                os.link(f, t)
            except OSError:
                shutil.copy2(f, t)
        n += 1
    return n


def perception_probe(loaded: Any, read_file: Path, find_file: Path) -> dict[str, float]:
    """:func:`reading_accuracy` on validation read records and :func:`finding_accuracy` on validation find
    records."""
    return {**reading_accuracy(loaded, read_file), **finding_accuracy(loaded, find_file)}


def teacher_forced_batches(loaded: Any, teacher: Any, records_file: Path, cache: Any = None, n: int = 96,
                           batch: int = 16) -> Iterator[tuple[list, Any, Any, dict]]:
    """The first ``n`` records in batches, teacher-forced without gradients in the checkpoint's own layout (K,
    alignment layer, where segments sit): (records, batch, :func:`valr.engine.forward_latent`'s output, the
    ``teacher``'s features of every record image and step target, from ``cache`` where present). Every image a
    segment may be compared with is read (or encoded) once per batch, not per segment."""
    import torch

    from valr.data import LayoutConfig, load_records, make_batch
    from valr.engine import forward_latent
    from valr.teachers import target_features
    from valr.tokens import LatentTokenIds

    cfg, bb, tok = loaded.config, loaded.backbone, loaded.tokenizer
    lay = LayoutConfig(k=cfg.k, latent_after=cfg.latent_after)
    lat = LatentTokenIds.from_tokenizer(tok)
    recs = load_records(records_file)[:n]
    for i in range(0, len(recs), batch):
        rs = recs[i:i + batch]
        with torch.no_grad():  # left before the yield: the caller's grad mode stays its own
            b = make_batch(rs, tok, bb, lay, lat)
            out = forward_latent(bb, b, cfg.align_layer, "fast")
            feats = target_features(teacher, [p for r in rs for p in r.images]
                                    + [Path(t) for ts in b.segment_targets for t in ts if t is not None], cache)
        yield rs, b, out, feats


def segment_view_accuracy(loaded: Any, records_file: Path, feature_cache: Path | None = None, n: int = 96,
                          batch: int = 16) -> dict[str, float]:
    """Does each latent segment carry its step's view? Teacher-forced on ``n`` records
    (:func:`teacher_forced_batches`): for every segment with a target, the alignment loss of its
    projected states against each of the record's images; the segment *picks its view* when the target image
    is the nearest (chance: one over the number of views). A target that is not an input image (e.g. a focus
    image, ``valr.synth.focus``) competes with the record's other distinct step targets instead. Returns
    ``picks_view`` overall and per family and first/later step (``chase/later``), ``align_own`` /
    ``align_other`` (mean loss against the target and against the other images) and ``align_own_map`` (the
    loss against the target per patch position, rows of the teacher's grid: where the latents render their view;
    docs/results.md item 54). Empty for a checkpoint without a trained projector."""
    import torch

    from valr.teachers import FeatureCache, build_teacher

    cfg, aligner = loaded.config, loaded.aligner
    if aligner is None or not cfg.teachers:
        return {}
    teacher = build_teacher(cfg.teachers[0], loaded.backbone)
    cache = FeatureCache(str(feature_cache), teacher) if feature_cache else None
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    own, other, own_maps = [], [], defaultdict(list)
    for rs, b, out, feats in teacher_forced_batches(loaded, teacher, records_file, cache, n, batch):
        for row, (j, s) in enumerate(out.segment_owner):
            target, views = b.segment_targets[j][s], list(rs[j].images)
            if target is not None and Path(target) not in views:  # e.g. focus images: the record's own
                views = sorted({Path(t) for t in b.segment_targets[j] if t is not None})
            if target is None or len(views) < 2:
                continue
            states = out.latent_states[row:row + 1]  # the training loss of this segment against each view
            with torch.no_grad():
                per_patch = [aligner.patch_losses(teacher.name, states, feats[v][0][None], feats[v][1])[0]
                             for v in views]
            d = [float(x.mean()) for x in per_patch]
            t = views.index(Path(target))
            own.append(d[t])
            own_maps[tuple(feats[views[t]][1])].append(per_patch[t])
            other += [x for v, x in enumerate(d) if v != t]
            fam = str((rs[j].meta or {}).get("family", "all"))
            for key in ("all", f"{fam}/{'first' if s == 0 else 'later'}"):
                hits[key][0] += int(min(range(len(d)), key=d.__getitem__) == t)
                hits[key][1] += 1
    res = {("picks_view" if k == "all" else f"picks_view/{k}"): a / c for k, (a, c) in sorted(hits.items())}
    if own:
        res.update(align_own=sum(own) / len(own), align_other=sum(other) / max(len(other), 1))
        grid, maps = max(own_maps.items(), key=lambda kv: len(kv[1]))  # the usual grid's segments
        res["align_own_map"] = torch.stack(maps).mean(0).reshape(grid).tolist()
    return res


def finding_stages(c: DemoConfig, st: Stages, training: dict[str, Any], wdir: Path, progress: bool
                   ) -> tuple[str, Path]:
    """Teach finding a cell by content once stage 0 has read for ``c.stage0_steps`` all-view steps:
    ``c.find_oneview_rounds`` rounds of ``c.find_oneview_steps`` on one-view find records (each round a new
    learning-rate schedule from the last round's model: finding is a late transition), then ``c.find_steps`` on
    all-view find records mixed with the read records (so reading goes on), all at ``c.find_batch_size``. The
    records are written in the first round's and the mixed stage's directories from the world's scenes.
    Returns the last stage's name and the records that stage 0's extensions should train on: the mix once it
    exists (an extension on read records alone would train finding away), else the read records."""
    lo_hi = (c.n_min, c.n_max)

    def one_view(d: Path) -> Path:
        find_records(wdir, d / "find.jsonl", c.seed, per_scene=8, items=lo_hi, one_view=True)
        return one_view_reads(d / "find.jsonl", d / "find_one_view.jsonl")

    def mixed(d: Path) -> Path:
        find_records(wdir, d / "find.jsonl", c.seed, items=lo_hi)
        return mix_records([wdir / "read.jsonl", d / "find.jsonl"], d / "read_find.jsonl", c.seed)

    # later rounds train on the first round's records (the same draws: nothing to write again)
    rounds = [("stage0_find_one_view" + (str(r + 1) if r else ""), c.find_oneview_steps,
               one_view if r == 0 else st.root / "stage0_find_one_view" / "find_one_view.jsonl")
              for r in range(c.find_oneview_rounds)]
    up = "stage0"
    for name, steps, records in [*rounds, ("stage0_find", c.find_steps, mixed)]:
        if steps > 0:
            reading_stage(c, st, training, name, up, Path(training[up]["checkpoint"]), steps, records, progress,
                          batch=c.find_batch_size)
            up = name
    return up, st.root / up / "read_find.jsonl" if up == "stage0_find" else wdir / "read.jsonl"


def one_view_reads(src: Path, dst: Path) -> Path:
    """The single-view records of a stage-0 read file (the curriculum's first phase), written to ``dst``
    with image paths rewritten so they still resolve."""
    from valr.data.records import load_records, write_records

    recs = [r for r in load_records(src) if len(r.images) == 1]
    if not recs:
        raise ValueError(f"{src} has no single-view records; regenerate the world (valr demo --out ...)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_records(recs, dst)
    return dst


def pretrain_vision(model_dir: Path, world_dir: Path, out: Path, steps: int, batch_size: int, lr: float, seed: int,
                    progress: bool = True, position_heads: bool = False) -> dict[str, Any]:
    """Pretrain the MLLM's own vision tower (merger included) with dense per-token labels, like the perception
    teacher: each merged visual token (one per cell) predicts presence, shape, colour and size (and, with
    ``position_heads``, its row, column and view) through linear heads that are then dropped. Stands in for the
    pretrained ViT every real MLLM starts from; the language model is untouched, and finds a cell through the
    visual tokens' M-RoPE positions. Returns per-label training accuracy of the last steps."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from tqdm import tqdm

    from valr.checkpoint import load_checkpoint, save_checkpoint
    from valr.synth.dataset import load_labels

    loaded = load_checkpoint(model_dir)
    bb = loaded.backbone
    labels = load_labels(world_dir)
    rows = np.nonzero(labels["split"] == "train")[0]
    paths = [world_dir / str(labels["paths"][i]) for i in rows]
    images = []
    for pth in paths:
        with Image.open(pth) as im:
            images.append(im.convert("RGB"))
    g = labels["present"].shape[-1]
    ys = {k: torch.from_numpy(labels[k][rows].astype(np.int64)).flatten(1) for k in ("present", "shape", "colour",
                                                                                   "size")}
    views = torch.tensor([int(Path(p).stem.rsplit("_v", 1)[1]) for p in paths])
    n_views = int(views.max()) + 1
    cell = torch.arange(g * g)
    classes = {"present": 2, "shape": 5, "colour": 6, "size": 2}
    if position_heads:
        classes.update(row=g, col=g, view=n_views)
    torch.manual_seed(seed)
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(bb.hidden_size, n) for k, n in classes.items()})
    tower = loaded.model.model.visual
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    tower.train()
    accs: dict[str, list[float]] = defaultdict(list)
    bar = tqdm(range(steps), desc="vision", unit="step", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        feats = bb.image_features(bb.image_inputs([images[i] for i in idx]))
        feats = feats.view(batch_size, -1, bb.hidden_size)
        if feats.shape[1] != g * g:
            raise ValueError(f"the vision tower gives {feats.shape[1]} tokens per image, the world has {g * g} cells")
        logits = {k: h(feats).flatten(0, 1) for k, h in heads.items()}
        target = {k: v[idx].flatten() for k, v in ys.items()}
        target.update(row=(cell // g).repeat(batch_size), col=(cell % g).repeat(batch_size),
                      view=views[idx].repeat_interleave(g * g))
        occ = target["present"] == 1
        loss = sum(F.cross_entropy(logits[k][occ] if k in ("shape", "colour", "size") else logits[k],
                                   target[k][occ] if k in ("shape", "colour", "size") else target[k])
                   for k in classes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for k in classes:
                m = occ if k in ("shape", "colour", "size") else torch.ones_like(occ)
                accs[k].append(float((logits[k].argmax(-1)[m] == target[k][m]).float().mean()))
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    tower.eval()
    save_checkpoint(out, loaded.model, loaded.tokenizer, loaded.image_processor, loaded.config)
    tail = max(1, min(10, steps))
    return {"checkpoint": str(out), "steps": steps, "final_loss": float(loss.detach()),
            "train_accuracy_last_steps": {k: sum(v[-tail:]) / len(v[-tail:]) for k, v in accs.items()}}


def reading_accuracy(loaded: Any, records_file: Path, batch: int = 32) -> dict[str, float]:
    """Held-out reading probe: teacher-forced accuracy of the object words (size, colour, shape) of read records,
    for single-view and all-view records, with the records' own images and with every record's images swapped
    for another scene's (the blind level: what the text alone predicts). ``loaded``: a
    :func:`valr.checkpoint.load_checkpoint` result."""
    import torch

    from valr.data import LayoutConfig, load_records, make_batch
    from valr.engine import forward_plain
    from valr.synth.world import COLOURS, SHAPES, SIZES

    bb, tok = loaded.backbone, loaded.tokenizer
    words = [*SIZES, *COLOURS, *SHAPES]
    obj_ids = torch.tensor(sorted({i for w in words for i in tok(" " + w, add_special_tokens=False)["input_ids"]}))
    recs = load_records(records_file)
    groups = {"one_view": [r for r in recs if len(r.images) == 1], "all_views": [r for r in recs if len(r.images) > 1]}
    out: dict[str, float] = {}
    with torch.no_grad():
        for name, rs in groups.items():
            for suffix, group in (("", rs), ("_swapped_images", with_swapped_images(rs))):
                ok = tot = 0
                for i in range(0, len(group), batch):
                    b = make_batch(group[i:i + batch], tok, bb, LayoutConfig(k=0))
                    hidden = forward_plain(bb, b).hidden[:, :-1]
                    target = b.labels[:, 1:]
                    m = torch.isin(target, obj_ids)
                    ok += int((bb.logits(hidden[m]).argmax(-1) == target[m]).sum())
                    tot += int(m.sum())
                out[name + suffix] = ok / max(tot, 1)
    return out


STEP_ROLES = ("view", "key", "cell", "object", "count")


def token_role(prev: str, word: str, objects: set[str], seen: bool = True) -> str | None:
    """What a step token carries: the number after ``view`` (which view to look at), an object word before the
    step's ``:`` (``seen=False``: the key, what the step looks for: a lookup by content's colour/shape, a count's
    attribute), the number after ``row``/``col`` (which cell), an object word after it (what was seen), a count
    or running total; None for the rest (markers, fixed words)."""
    if word.isdigit():
        if prev == "view":
            return "view"
        if prev in ("row", "col"):
            return "cell"
        if prev in (":", "total") or prev in objects:  # a count's, or a tally step's ``red 2``
            return "count"
        return None
    if word not in objects:
        return None
    return "object" if seen else "key"


def teacher_forced_steps(loaded: Any, records_file: Path, n: int = 128, batch: int = 32, k: int = 0,
                         layer: int | None = None) -> Iterator[tuple[Any, int, list[str], list[bool]]]:
    """Teacher-forced predictions of chain steps: for the first ``n`` records of ``records_file``, yields
    ``(record, step index, words, right)`` per step, ``words`` the step's tokens decoded and ``right[t]`` whether
    the model predicted token ``t`` from the tokens before it (``right[0]`` is always False: it follows the
    previous step). ``k > 0`` lays the chains out with ``k`` latent steps per step (before it, or after its head
    when the checkpoint was trained with ``latent_after``) and runs the latent forward (alignment layer
    ``layer``), the layout a latent variant was trained and answers in. Token positions come from the layout."""
    import torch

    from valr.data import LayoutConfig, load_records, make_batch
    from valr.engine import forward_latent, forward_plain
    from valr.tokens import LatentTokenIds

    bb, tok = loaded.backbone, loaded.tokenizer
    if k > 0 and layer is None:
        raise ValueError("teacher-forced steps with latent steps (k > 0) need the alignment layer")
    # where the segments sit (before each step, or after its head) is the checkpoint's own layout setting
    lay = LayoutConfig(k=k, latent_after=loaded.config.latent_after if k > 0 else None)
    lat = LatentTokenIds.from_tokenizer(tok) if k > 0 else None
    recs = load_records(records_file)[:n]
    with torch.no_grad():
        for i in range(0, len(recs), batch):
            rs = recs[i:i + batch]
            b = make_batch(rs, tok, bb, lay, lat)
            out = forward_plain(bb, b) if k == 0 else forward_latent(bb, b, layer, "exact")  # type: ignore[arg-type]
            pred = bb.logits(out.hidden).argmax(-1)
            for j, r in enumerate(rs):
                for s_i, positions in enumerate(b.step_positions[j]):
                    piece = b.input_ids[j, positions].tolist()
                    right = [False] + [bool(pred[j, p - 1] == b.input_ids[j, p]) for p in positions[1:]]
                    yield r, s_i, [tok.decode([t]).strip() for t in piece], right


def step_token_accuracy(loaded: Any, records_file: Path, n: int = 128, batch: int = 32, per_step: bool = True,
                        k: int = 0, layer: int | None = None) -> dict[str, float]:
    """Teacher-forced accuracy of chain tokens by role (:data:`STEP_ROLES`), in the first step and in later steps,
    per question family, e.g. ``{"chase/first_view": 0.9, "chase/later_cell": 0.4, ...}``. Localises a chain's
    failure: a first step's view and cell come from the question (copying), later ones from an instruction found
    by its marker and, for chase/where, from the object found in that view (naming its cell); object words are
    reading. The answer is not included (the evaluation scores it). ``per_step=False`` pools first and later
    steps: ``{"find/cell": 0.3, ...}``. ``k``, ``layer``: as :func:`teacher_forced_steps`."""
    from valr.synth.world import COLOURS, SHAPES, SIZES

    objects = {*SIZES, *COLOURS, *SHAPES}
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r, s_i, words, right in teacher_forced_steps(loaded, records_file, n, batch, k, layer):
        fam = str((r.meta or {}).get("family", "all"))
        for t in range(1, len(words)):
            role = token_role(words[t - 1], words[t], objects, seen=":" in words[:t])
            if role:
                key = f"{fam}/{('first_' if s_i == 0 else 'later_') if per_step else ''}{role}"
                hits[key][0] += int(right[t])
                hits[key][1] += 1
    return {key: a / c for key, (a, c) in sorted(hits.items()) if c}


def key_kind(words: Iterable[str]) -> str:
    """What a content key names: "colour", "shape", "colour_shape" (both words) or "" (neither)."""
    from valr.synth.world import COLOURS, SHAPES

    words = set(words)
    return "_".join(k for k, names in (("colour", COLOURS), ("shape", SHAPES)) if words & set(names))


def finding_accuracy(loaded: Any, find_file: Path, n: int = 128) -> dict[str, float]:
    """How well a model finds a cell by content, teacher-forced on find records: ``find_cells`` (row and col
    numbers pooled, chance 25%), ``find_whole_cells`` (row and col both right, chance 6%; near find_cells squared
    when the two are guessed independently) and whole cells by what the step looks for, ``find_by_colour``,
    ``find_by_shape``, ``find_by_colour_shape`` (both words: neither alone is unique in that view)."""
    tokens, cells = [0, 0], defaultdict(lambda: [0, 0])
    for _, _, words, right in teacher_forced_steps(loaded, find_file, n):
        numbers = [right[t] for t in range(1, len(words)) if words[t - 1] in ("row", "col")]
        kind = key_kind(words[:words.index("at")])
        tokens[0] += sum(numbers)
        tokens[1] += len(numbers)
        for name in ("whole_cells", f"by_{kind}"):
            cells[name][0] += int(all(numbers))
            cells[name][1] += 1
    return {"find_cells": tokens[0] / max(tokens[1], 1),
            **{f"find_{name}": a / c for name, (a, c) in sorted(cells.items())}}


def cache_alignment_baselines(cache_root: Path, limit: int = 2000, center: bool = False) -> dict[str, dict[str, float]]:
    """Per teacher under a feature-cache directory, over up to ``limit`` cached images, the alignment losses of two
    projectors that know nothing about the image: ``mean_feature``, always the mean teacher feature
    (:func:`valr.align.mean_feature_loss`, raw features: the plateau of raw targets), and ``position_mean``, per
    patch position the mean over images, of centred features when ``center`` (the plateau of latents that
    learned their cell only; :func:`valr.align.position_mean_loss`). Empty if no cache."""
    from collections import Counter

    import torch

    from valr.align import mean_feature_loss, position_mean_loss
    from valr.teachers import cached_feature_maps

    out = {}
    for tdir in sorted(p for p in cache_root.glob("*") if p.is_dir()):
        maps = cached_feature_maps(tdir, limit)
        if maps:
            shape = Counter(m.shape for m in maps).most_common(1)[0][0]  # images with the usual patch grid
            out[tdir.name] = {"mean_feature": mean_feature_loss(torch.cat(maps)),
                              "position_mean": position_mean_loss(torch.stack([m for m in maps if m.shape == shape]),
                                                                  center)}
    return out


def _subset(src: Path, dst: Path, n: int) -> Path:
    lines = [x for x in src.read_text().splitlines() if x.strip()][:n]
    # keep image paths valid: records are resolved against their file's directory
    if src.parent.resolve() != dst.parent.resolve():
        raise ValueError("subset files must live next to their source")
    dst.write_text("".join(x + "\n" for x in lines))
    return dst


# ---------------------------------------------------------------------------------------------- training


def _train(cfg: DemoConfig, out: Path, *, model: Path, data: Path, stage: int, steps: int, lr: float,
           lr_vision: float = 0.0, lambda_align: float = 0.0, teachers: list | None = None,
           data_fraction: float = 1.0, val_data: Path | None = None, progress: bool = True,
           batch_size: int | None = None, save_every: int | None = None, keep_last: int = 1,
           latent_feed: str | None = None) -> dict[str, Any]:
    """One ``valr.trainer.train`` call; returns the final checkpoint path and a summary of its history.
    ``save_every``/``keep_last`` space and keep the resumable checkpoints (default: four per run, the last kept);
    ``latent_feed`` overrides the config's for a stage-2 run."""
    import torch

    from valr.config import ValrConfig
    from valr.trainer import TrainConfig, train

    vcfg = ValrConfig(k=cfg.k, align_layer=cfg.align_layer, lambda_align=lambda_align,
                      projector_width=cfg.projector_width, teachers=list(teachers or []),
                      train_mode=cfg.train_mode, center_targets=cfg.center_targets, latent_after=cfg.latent_after,
                      latent_feed=(latent_feed or cfg.latent_feed) if stage == 2 else "hidden",
                      aligned_latents=cfg.aligned_latents,
                      feature_cache=str(out / "features") if teachers else None)
    tcfg = TrainConfig(model=str(model), train_data=str(data), val_data=str(val_data) if val_data else None,
                       output_dir=str(out / "run"), stage=stage, max_steps=steps,
                       per_device_batch_size=batch_size or cfg.batch_size, grad_accum=1, lr_llm=lr,
                       lr_projector=cfg.projector_lr,
                       lr_vision=lr_vision, weight_decay=0.01, warmup_ratio=cfg.warmup_ratio, scheduler="cosine",
                       max_grad_norm=1.0, save_every=save_every or max(50, steps // 4), keep_last=keep_last,
                       log_every=10,
                       seed=cfg.seed, data_fraction=data_fraction, num_workers=cfg.num_workers, preflight="quick",
                       tensorboard=False, progress=progress, valr=vcfg)
    torch.manual_seed(cfg.seed)
    final = train(tcfg, resume=True)
    return {"checkpoint": str(final), **_history_summary(out / "run")}


def _history_summary(run_dir: Path) -> dict[str, Any]:
    rows = []
    hist = run_dir / "history.jsonl"
    if hist.is_file():
        rows = [json.loads(x) for x in hist.read_text().splitlines() if x.strip()]
    out: dict[str, Any] = {"steps": len(rows)}
    if rows:
        w = max(1, min(20, len(rows) // 5))
        for key in ("loss", "ce", "align", "latent_norm"):
            vals = [r[key] for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
            if vals and (key in ("loss", "ce") or any(v > 0 for v in vals)):  # stage 1 logs zeros there
                out[f"{key}_first"] = sum(vals[:w]) / len(vals[:w])
                out[f"{key}_last"] = sum(vals[-w:]) / len(vals[-w:])
        out["train_seconds"] = sum(r.get("time_s", 0.0) for r in rows)
        out["curve"] = {k: [round(sum(r[k] for r in rows[i:i + w]) / len(rows[i:i + w]), 5)
                            for i in range(0, len(rows), w)]
                        for k in ("ce", "align") if all(k in r for r in rows) and any(r[k] > 0 for r in rows)}
    ev = run_dir / "eval.jsonl"
    if ev.is_file():
        lines = [json.loads(x) for x in ev.read_text().splitlines() if x.strip()]
        if lines:
            out["val"] = lines[-1]
    return out


def build_base(cfg: DemoConfig, world_dir: Path, out: Path) -> Path:
    """A random tiny Qwen2.5-VL with the world's tokenizer (plus latent tokens), as a valr checkpoint."""
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from valr.checkpoint import save_checkpoint
    from valr.config import ValrConfig
    from valr.tiny import TinyShape, tiny_config, tiny_image_processor
    from valr.tokens import add_latent_tokens

    tok = AutoTokenizer.from_pretrained(world_dir / "tokenizer")
    add_latent_tokens(tok)
    shape = TinyShape(hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads, kv_heads=cfg.kv_heads,
                      intermediate=cfg.intermediate, vision_depth=cfg.vision_depth, vision_hidden=cfg.vision_hidden,
                      vision_heads=cfg.vision_heads, max_positions=2048)
    torch.manual_seed(cfg.seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(tok, shape))
    vcfg = ValrConfig(k=cfg.k, align_layer=cfg.align_layer, lambda_align=cfg.lambda_align,
                      projector_width=cfg.projector_width, train_mode=cfg.train_mode)
    return save_checkpoint(out, model, tok, tiny_image_processor(112), vcfg)


# -------------------------------------------------------------------------------------------- evaluation


def with_swapped_images(recs: list) -> list:
    """Each record with the next record's images (the blind reference: what the text alone predicts)."""
    return [dataclasses.replace(r, images=recs[(i + 1) % len(recs)].images) for i, r in enumerate(recs)]


def image_dependence(ckpt: str | Path, records_file: Path, k: int, latent: bool, layer: int, n: int = 64,
                     batch: int = 16) -> dict[str, float]:
    """Teacher-forced CE on ``n`` validation records with their own images and with every record's images
    swapped for the next record's (same number of views). Equal losses mean the model ignores the images.
    Latent variants run their own layout (latent segments, fast mode); SFT the plain CoT layout."""
    import torch

    from valr.checkpoint import load_checkpoint
    from valr.data import LayoutConfig, load_records, make_batch
    from valr.engine import forward_latent, forward_plain
    from valr.tokens import LatentTokenIds

    loaded = load_checkpoint(ckpt)
    bb, tok = loaded.backbone, loaded.tokenizer
    recs = load_records(records_file)[:n]
    swapped = with_swapped_images(recs)
    lat = LatentTokenIds.from_tokenizer(tok) if latent else None
    layout = LayoutConfig(k=k if latent else 0, latent_after=loaded.config.latent_after if latent else None)
    out = {}
    with torch.no_grad():
        for name, rs in (("ce_own_images", recs), ("ce_swapped_images", swapped)):
            tot, cnt = 0.0, 0
            for i in range(0, len(rs), batch):
                b = make_batch(rs[i:i + batch], tok, bb, layout, lat)
                o = forward_latent(bb, b, layer, "fast") if latent else forward_plain(bb, b)
                tot += float(o.loss_ce) * o.n_label_tokens
                cnt += o.n_label_tokens
            out[name] = tot / max(cnt, 1)
    out["gap"] = out["ce_swapped_images"] - out["ce_own_images"]
    return out


_LATENT_MARKUP = re.compile(r"<latent>\[\d+ latent positions\]</latent>|<latent>|</latent>")
_LOOKUP_STEP = re.compile(r"#\d+ view (?P<view>\d+) (?:(?P<key>[a-z ]+?) at )?row \d+ col \d+: ")
# why a lookup chain (chase, where, tally) went wrong, by its first wrong step: the view its head names, the
# move (by address or by content: the question's instruction for that step), the key's type (colour or shape:
# also the question's) or value (copied from the step before), or the right lookup landing on the wrong cell or
# object; "unreadable" for a step that is not a lookup at all, "missing" for a chain that stopped early
LOOKUP_ERRORS = ("view", "move", "key_type", "key_value", "found", "unreadable", "missing")


def said_steps(raw: str | None) -> list[str]:
    """The reasoning steps of a generated text, one per line, latent segments and the answer line left out."""
    text = _LATENT_MARKUP.sub("", raw or "")
    return [x.strip() for x in text.split("\n") if x.strip() and not x.strip().startswith("Answer")]


def lookup_error(gold: str, said: str | None) -> str | None:
    """Why ``said`` is not the lookup step ``gold`` (a :data:`LOOKUP_ERRORS` kind), or None when they agree or
    ``gold`` is not a lookup step."""
    g = _LOOKUP_STEP.match(gold)
    if g is None or said == gold:
        return None
    if said is None:
        return "missing"
    m = _LOOKUP_STEP.match(said)
    if m is None:
        return "unreadable"
    gk, sk = g.group("key"), m.group("key")
    if g.group("view") != m.group("view"):
        return "view"
    if (gk is None) != (sk is None):
        return "move"
    if gk is not None and gk != sk:
        return "key_type" if key_kind(gk.split()) != key_kind(sk.split()) else "key_value"
    return "found"


def _run_eval(cfg: DemoConfig, ckpt: str, test_file: Path, out: Path, policy: str, k: int) -> None:
    from valr.eval.run import run_main

    argv = ["--model", ckpt, "--benchmark", "records", "--data", str(test_file), "--out", str(out),
            "--latent-policy", policy, "--k", str(k), "--batch-size", str(cfg.eval_batch_size),
            "--max-new-tokens", str(cfg.max_new_tokens), "--force-new"]
    if cfg.eval_limit is not None:
        argv += ["--limit", str(cfg.eval_limit)]
    rc = run_main(argv)
    if rc != 0:
        raise RuntimeError(f"valr eval run failed (exit {rc}) for {ckpt}; see the messages above")


def score_predictions(test_file: Path, pred_file: Path, limit: int | None = None) -> dict[str, Any]:
    """Accuracy overall, by N, by family; per-step accuracy by step position; (length, score) pairs; per
    family, how often the whole generated chain equals the gold one (``chain_right_by_family``) and the accuracy
    of the answers that follow such a chain (``accuracy_given_chain_right``: does the model compute the answer
    from right steps?); and, over the chains made of lookup steps (chase, where, tally), why the first wrong step is
    wrong (``lookup_chain_errors``: kind -> {step position: chains}, see :func:`lookup_error`)."""
    from valr.data import load_records
    from valr.eval.benchmarks import load_records_benchmark
    from valr.eval.predictions import Prediction
    from valr.eval.scoring import item_scores

    items = load_records_benchmark(test_file, load_media=False)
    records = {r.id: r for r in load_records(test_file)}
    if limit is not None:
        items = items[:limit]
    lines = {}
    for x in pred_file.read_text().splitlines():
        if x.strip():
            o = json.loads(x)
            lines[str(o["id"])] = o
    preds = {rid: Prediction(rid, str(o["prediction"]), o.get("raw"), 0,
                             {k: v for k, v in o.items() if k not in ("id", "prediction", "raw")})
             for rid, o in lines.items()}
    scores = item_scores("records", items, preds)
    by_n: dict[int, list[float]] = defaultdict(list)
    by_family: dict[str, list[float]] = defaultdict(list)
    step_right: dict[int, list[float]] = defaultdict(list)  # position -> [step i right | steps < i right]
    step_any: dict[int, list[float]] = defaultdict(list)  # position -> [step i right] (unconditional)
    chain_right: dict[str, list[float]] = defaultdict(list)  # family -> [every step right]
    first_error: dict[str, Counter] = defaultdict(Counter)  # lookup chains: kind -> {position of the first wrong step}
    lookup_chains = 0
    given_chain: dict[str, list[float]] = defaultdict(list)  # family -> [answer score | every step right]
    pairs_tokens, pairs_positions, segs = [], [], []
    per_item = []
    for it, s in zip(items, scores, strict=True):
        n, family = int(it.meta["n_steps"]), str(it.meta["family"])
        by_n[n].append(s.score)
        by_family[family].append(s.score)
        o = lines.get(it.id, {})
        said = said_steps(o.get("raw"))
        gold = [st.text.strip() for st in records[it.id].steps]
        ok_prefix = True
        lookup = all(_LOOKUP_STEP.match(g) for g in gold)
        lookup_chains += lookup
        for i, g in enumerate(gold, start=1):
            right = float(i <= len(said) and said[i - 1] == g)
            step_any[i].append(right)
            if ok_prefix:
                step_right[i].append(right)
                ok_prefix = right == 1.0
                if lookup and not ok_prefix:
                    first_error[lookup_error(g, said[i - 1] if i <= len(said) else None)][str(i)] += 1
        chain_right[family].append(float(ok_prefix and len(said) == len(gold)))
        if chain_right[family][-1]:
            given_chain[family].append(s.score)
        if "generated_tokens" in o:
            pairs_tokens.append((float(o["generated_tokens"]), s.score))
            pairs_positions.append((float(o["generated_positions"]), s.score))
            segs.append((n, o.get("latent_segments", 0)))
        per_item.append({"id": it.id, "n": n, "score": s.score})

    def mean(v):
        return sum(v) / len(v) if v else None

    return {
        "accuracy": mean([s.score for s in scores]),
        "n": len(scores),
        "accuracy_by_n": {str(n): mean(v) for n, v in sorted(by_n.items())},
        "count_by_n": {str(n): len(v) for n, v in sorted(by_n.items())},
        "accuracy_by_family": {f: mean(v) for f, v in sorted(by_family.items())},
        "step_accuracy_by_position": {str(i): mean(v) for i, v in sorted(step_right.items())},
        "step_accuracy_unconditional": {str(i): mean(v) for i, v in sorted(step_any.items())},
        "chain_right_by_family": {f: mean(v) for f, v in sorted(chain_right.items())},
        "accuracy_given_chain_right": {f: mean(v) for f, v in sorted(given_chain.items())},
        "lookup_chain_errors": {"chains": lookup_chains,
                                **{k: dict(sorted(first_error[k].items(), key=lambda x: int(x[0])))
                                   for k in LOOKUP_ERRORS if k in first_error}},
        "mean_generated_tokens": mean([x for x, _ in pairs_tokens]),
        "mean_generated_positions": mean([x for x, _ in pairs_positions]),
        "latent_segments_per_step": (sum(s for _, s in segs) / max(1, sum(n for n, _ in segs))) if segs else None,
        "_pairs_tokens": pairs_tokens,
        "_pairs_positions": pairs_positions,
    }


def prior_baseline(world_dir: Path, split_file: Path, limit: int | None = None) -> dict[str, Any]:
    """The answer-prior reference: answer every item with the most common training answer of its family and N
    (a letter for multiple choice, the median total for counts), without looking at the images or the question.
    A variant near this level has learned the answer format, not the task."""
    import statistics

    from valr.data import load_records
    from valr.eval.benchmarks import load_records_benchmark
    from valr.eval.scoring import item_scores

    by_key: dict[tuple[str, int], list[str]] = defaultdict(list)
    for r in load_records(world_dir / "train.jsonl"):
        by_key[(r.meta["family"], int(r.meta["n_steps"]))].append(r.answer)
    guess = {}
    for key, answers in by_key.items():
        if all(a.isdigit() for a in answers):
            guess[key] = str(int(statistics.median(int(a) for a in answers)))
        else:
            guess[key] = max(sorted(set(answers)), key=answers.count)
    items = load_records_benchmark(split_file, load_media=False)
    if limit is not None:
        items = items[:limit]
    preds = {it.id: guess.get((str(it.meta["family"]), int(it.meta["n_steps"])), "A") for it in items}
    scores = item_scores("records", items, preds)
    by_n: dict[int, list[float]] = defaultdict(list)
    for it, sc in zip(items, scores, strict=True):
        by_n[int(it.meta["n_steps"])].append(sc.score)
    return {"accuracy": sum(sc.score for sc in scores) / len(scores),
            "accuracy_by_n": {str(n): sum(v) / len(v) for n, v in sorted(by_n.items())},
            "count_by_n": {str(n): len(v) for n, v in sorted(by_n.items())}}


def _long_chain_accuracy(m: dict[str, Any]) -> float | None:
    num = sum(m["accuracy_by_n"][str(n)] * m["count_by_n"][str(n)] for n in TARGET_NS if str(n) in m["accuracy_by_n"])
    den = sum(m["count_by_n"][str(n)] for n in TARGET_NS if str(n) in m["count_by_n"])
    return num / den if den else None


def check_targets(variants: dict[str, dict[str, Any]], n_hi: int = 8) -> dict[str, Any]:
    """The issue's four targets, computed from one run's (or the seed-mean) accuracies. None = not measurable."""
    out: dict[str, Any] = {}
    sft, va, no = variants.get("sft"), variants.get("valr_s"), variants.get("latent_no_align")
    if sft and va:
        a, b = va.get("accuracy_long", _long_chain_accuracy(va) if "count_by_n" in va else None), \
            sft.get("accuracy_long", _long_chain_accuracy(sft) if "count_by_n" in sft else None)
        if a is not None and b is not None:
            out["valr_s_beats_sft_by_5pts_on_long"] = {"valr_s": a, "sft": b, "gap": a - b, "met": a - b >= 0.05,
                                                       "ns": list(TARGET_NS)}

        def ratio(m):
            lo, hi = m["accuracy_by_n"].get("1"), m["accuracy_by_n"].get(str(n_hi))
            return hi / lo if lo else None

        ra, rb = ratio(va), ratio(sft)
        if ra is not None and rb is not None:
            out["valr_s_falls_less_with_n"] = {"valr_s_ratio": ra, "sft_ratio": rb, "difference": ra - rb,
                                               "met": ra - rb >= 0.15, "ratio": f"acc(N={n_hi})/acc(N=1)"}
    if sft and no:
        d = no["accuracy"] - sft["accuracy"]
        out["no_align_within_2pts_of_sft"] = {"latent_no_align": no["accuracy"], "sft": sft["accuracy"],
                                              "difference": d, "met": abs(d) <= 0.02}
    frac = (va or {}).get("data_fraction", {})
    small = [v for k, v in frac.items() if float(k) < 1.0]
    if sft and small:
        key = min(frac, key=float)
        a, b = frac[key]["accuracy"], frac[key].get("sft_accuracy", sft["accuracy"])  # a summary: the same seeds
        out["valr_s_small_data_matches_sft_full"] = {"fraction": float(key), "valr_s": a, "sft": b,
                                                     "difference": a - b, "met": a >= b}
        if "seeds" in frac[key]:
            out["valr_s_small_data_matches_sft_full"]["seeds"] = frac[key]["seeds"]
    return out


# -------------------------------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_all(results: dict[str, Any], fig_dir: Path, length_report: dict[str, Any] | None,
             errors: dict[str, Any] | None = None) -> list[str]:
    """The four figures of the issue plus the per-step accuracy curve; returns the written file names."""
    plt = _plt()
    fig_dir.mkdir(parents=True, exist_ok=True)
    written = []
    variants = results["variants"]
    names = [v for v in VARIANTS if v in variants]
    extra = {}
    frac = variants.get("valr_s", {}).get("data_fraction", {})
    for key, m in frac.items():
        if float(key) < 1.0:
            extra[f"valr_s ({float(key):.0%} data)"] = m
    err = errors or {}

    def finish(ax, xlabel: str, title: str, ylabel: str = "test accuracy (%)"):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(fig_dir / name, dpi=100)
        plt.close(fig)
        written.append(name)

    # 1. accuracy per variant
    fig, ax = plt.subplots(figsize=(6, 3.6))
    labels = names + list(extra)
    vals = [100 * variants[n]["accuracy"] for n in names] + [100 * m["accuracy"] for m in extra.values()]
    yerr = [100 * err.get(n, {}).get("accuracy", 0.0) for n in names] + [0.0] * len(extra)
    ax.bar(range(len(labels)), vals, yerr=yerr if any(yerr) else None, capsize=3,
           color=["#999999", "#d98c3f", "#2e8b57", "#1f5f8b", "#7fbf9f"][:len(labels)])
    for i, v in enumerate(vals):
        ax.text(i, v + 1, f"{v:.1f}", ha="center", fontsize=8)
    if results.get("prior_baseline"):
        ax.axhline(100 * results["prior_baseline"]["accuracy"], color="#cc3333", linestyle=":",
                   label="answer prior (no model)")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xticks(range(len(labels)), labels, rotation=15, fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(results.get("title", "accuracy per variant"), fontsize=9)
    save(fig, "accuracy_per_variant.png")

    # 2. accuracy by N
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for n in names + list(extra):
        m = variants.get(n) or extra[n]
        xs = sorted(int(k) for k in m["accuracy_by_n"])
        ys = [100 * m["accuracy_by_n"][str(x)] for x in xs]
        e = err.get(n, {}).get("accuracy_by_n")
        if e:
            ax.errorbar(xs, ys, yerr=[100 * e.get(str(x), 0) for x in xs], marker="o", capsize=2, label=n)
        else:
            ax.plot(xs, ys, marker="o", label=n, linestyle="--" if n in extra else "-")
    if results.get("prior_baseline"):
        pb = results["prior_baseline"]["accuracy_by_n"]
        xs = sorted(int(k) for k in pb)
        ax.plot(xs, [100 * pb[str(x)] for x in xs], color="#cc3333", linestyle=":", label="answer prior")
    finish(ax, "chain length N (reasoning steps)", "accuracy by chain length (dilution curve)")
    save(fig, "accuracy_by_n.png")

    # 3. accuracy by generated length
    if length_report:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for n, res in length_report["models"].items():
            pts = [((b["lo"] + b["hi"]) / 2, 100 * b["accuracy"]) for b in res["buckets"] if b["n"] >= 5]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", label=n)
        finish(ax, "generated length (text tokens, markers included; buckets with >= 5 items)",
               "accuracy by generated length (paper Fig. 2 analysis)")
        save(fig, "accuracy_by_length.png")

    # 4. accuracy vs test-time K
    by_k = variants.get("valr_s", {}).get("accuracy_by_k")
    if by_k:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        xs = sorted(int(k) for k in by_k)
        ys = [100 * by_k[str(x)] for x in xs]
        e = err.get("valr_s", {}).get("accuracy_by_k")
        ax.errorbar(xs, ys, yerr=[100 * e.get(str(x), 0) for x in xs] if e else None, marker="o", capsize=2,
                    color="#2e8b57", label="valr_s")
        if "sft" in variants:
            ax.axhline(100 * variants["sft"]["accuracy"], color="#999999", linestyle=":", label="sft")
        ax.axvline(results["config"]["k"], color="#cccccc", linestyle="--", label="training K")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        finish(ax, "latent positions per segment at test time (K)", "VaLR-S: accuracy vs test-time K")
        save(fig, "accuracy_by_k.png")

    # 5. per-step accuracy by step position (given the earlier steps right)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for n in names:
        m = variants[n].get("step_accuracy_by_position")
        if m:
            xs = sorted(int(k) for k in m)
            ax.plot(xs, [100 * m[str(x)] for x in xs], marker="o", label=n)
    finish(ax, "step position i", "per-step lookup accuracy by position",
           ylabel="step i exactly right | steps < i right (%)")
    save(fig, "step_accuracy_by_position.png")
    return written


# ------------------------------------------------------------------------------------------------- report


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def write_report(results: dict[str, Any], path: Path, fig_names: list[str]) -> None:
    v = results["variants"]
    names = [n for n in VARIANTS if n in v]
    ns = sorted({int(k) for n in names for k in v[n]["accuracy_by_n"]})
    quick_note = ", QUICK smoke run: no accuracy claims" if results["quick"] else ""
    lines = [f"# valr demo report (seed {results['seed']}{quick_note})",
             "", f"Machine: {results['machine']}.  Total {results['total_seconds']:.0f} s.", "",
             f"## Accuracy on the {results.get('eval_split', 'test')} split (%)", "",
             "| variant | overall | " + " | ".join(f"N={n}" for n in ns) + " | N>=6 |",
             "|---|---|" + "---|" * len(ns) + "---|"]
    for n in names:
        m = v[n]
        lines.append(f"| {n} | {_pct(m['accuracy'])} | " + " | ".join(_pct(m['accuracy_by_n'].get(str(x))) for x in ns)
                     + f" | {_pct(m.get('accuracy_long'))} |")
    prior = results.get("prior_baseline")
    if prior:
        lines.append(f"| answer prior (no model) | {_pct(prior['accuracy'])} | "
                     + " | ".join(_pct(prior['accuracy_by_n'].get(str(x))) for x in ns)
                     + f" | {_pct(prior.get('accuracy_long'))} |")
    for key, m in v.get("valr_s", {}).get("data_fraction", {}).items():
        if float(key) < 1.0:
            lines.append(f"| valr_s ({float(key):.0%} data) | {_pct(m['accuracy'])} | "
                         + " | ".join(_pct(m['accuracy_by_n'].get(str(x))) for x in ns)
                         + f" | {_pct(m.get('accuracy_long'))} |")
    by_k = v.get("valr_s", {}).get("accuracy_by_k")
    if by_k:
        lines += ["", "VaLR-S accuracy by test-time K: " + ", ".join(f"K={k}: {_pct(a)}" for k, a in by_k.items())]
    if "learned_the_task" in results:
        lines += ["", "Learned the task (best variant >= 5 points above the answer prior): "
                  f"{'yes' if results['learned_the_task'] else 'NO -- the comparisons below are at the prior level'}"]
    dep = {n: m.get("image_dependence") for n, m in v.items() if m.get("image_dependence")}
    if dep:
        lines += ["", "Image dependence (validation CE with own vs swapped images; gap ~0 = images ignored): "
                  + ", ".join(f"{n} {d['ce_own_images']:.3f}/{d['ce_swapped_images']:.3f}" for n, d in dep.items())]
    step1 = {n: m.get("step_accuracy_by_position", {}).get("1") for n, m in v.items()}
    lines += ["", "First reasoning step exactly right: " + ", ".join(f"{n} {_pct(a)}" for n, a in step1.items())]
    errs = {n: m["lookup_chain_errors"] for n, m in v.items() if m.get("lookup_chain_errors", {}).get("chains")}
    if errs:
        lines += ["", "Lookup chains (chase, where, tally) by their first wrong step, what it got wrong (chains; "
                  "`kind: {step position: chains}`): "
                  + "; ".join(f"{n} of {e['chains']}: " + (", ".join(f"{k} {json.dumps(e[k])}" for k in e
                                                                   if k != "chains") or "none")
                              for n, e in errs.items())]
    views = results.get("reading", {}).get("valr_s", {}).get("segment_views", {})
    if views.get("align_own_map"):
        rows = " / ".join(f"{sum(r) / len(r):.2f}" for r in views["align_own_map"])
        lines += ["", f"VaLR-S latent segments, teacher-forced on validation records: pick their view "
                  f"{_pct(views.get('picks_view'))}% of the time; alignment loss against their view "
                  f"{views['align_own']:.3f} (other views {views['align_other']:.3f}), by row of the teacher's "
                  f"grid {rows} (a row left at the no-image level is one the latents do not render)"]
    lines += ["", "## Targets", ""]
    for name, t in results.get("targets", {}).items():
        shown = {k: (round(x, 4) if isinstance(x, float) else x) for k, x in t.items()}
        lines.append(f"- {name}: {'MET' if t.get('met') else 'not met'} {json.dumps(shown)}")
    if "valr_s_small_data_matches_sft_full" not in results.get("targets", {}):
        lines.append("- valr_s_small_data_matches_sft_full: not measured (rerun with data_fraction=0.25)")
    lines += ["", "## Training", "", "| stage | steps | ce first -> last | align first -> last | seconds |",
              "|---|---|---|---|---|"]
    for name, t in results.get("training", {}).items():
        ce = f"{t.get('ce_first', float('nan')):.3f} -> {t.get('ce_last', float('nan')):.3f}"
        al = (f"{t['align_first']:.3f} -> {t['align_last']:.3f}" if t.get("align_last") else "-")
        lines.append(f"| {name} | {t.get('steps')} | {ce} | {al} | {results['stage_seconds'].get(name, 0):.0f} |")
    lines += ["", "Stage seconds: " + ", ".join(f"{k} {s:.0f}" for k, s in results["stage_seconds"].items()), ""]
    for f in fig_names:
        lines.append(f"![{f}](figures/{f})")
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------- main


def _machine() -> str:
    import torch

    return (f"{platform.machine()} {os.cpu_count()} CPU(s), torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), python {platform.python_version()}")


def reading_to_target(c: DemoConfig, st: Stages, training: dict[str, Any], wdir: Path, cdir: Path, last: str,
                      data: Path, progress: bool) -> tuple[str, list[dict[str, Any]]]:
    """Extend stage 0 from stage ``last`` until the held-out reading probe (all views) reaches
    ``c.stage0_read_target``: each check and each extension of ``c.stage0_extra_steps`` steps on ``data`` is its
    own cached stage. Returns the name of the last stage-0 stage (whose checkpoint stage 1 starts from) and the
    checks made."""
    from valr.checkpoint import load_checkpoint

    checks = []
    for i in range(c.stage0_max_extensions + 1):
        def check(d: Path, ckpt=Path(training[last]["checkpoint"])):
            return perception_probe(load_checkpoint(ckpt), wdir / "read_val.jsonl", cdir / "find_val.jsonl")

        result = st.run(f"stage0_check{i}", {"up": st.fps[last], "v": 5, "probes": st.fps["chains"]}, check)
        checks.append({"after": last, **result})
        if result["all_views"] >= c.stage0_read_target or i == c.stage0_max_extensions:
            break
        _log(f"reading {result['all_views']:.1%} < target {c.stage0_read_target:.0%}: "
             f"{c.stage0_extra_steps} more stage-0 steps")

        name = f"stage0_more{i + 1}"
        reading_stage(c, st, training, name, last, Path(training[last]["checkpoint"]), c.stage0_extra_steps,
                      data, progress)
        last = name
    return last, checks


def reading_stage(c: DemoConfig, st: Stages, training: dict[str, Any], name: str, up: str, model: Path,
                  steps: int, data: Path | Callable[[Path], Path], progress: bool, batch: int | None = None) -> Path:
    """One cached stage-0 stage: ``steps`` steps on read records (``data``, or a function of the stage directory
    that writes them) from ``model`` (the checkpoint of stage ``up``), at stage 0's learning rate and ``batch``
    (default stage 0's). Records its result in ``training[name]`` and returns its checkpoint."""
    batch = batch or c.stage0_batch_size

    def fn(d: Path):
        return _train(c, d, model=model, data=data(d) if callable(data) else data, stage=1, steps=steps,
                      lr=c.stage0_lr, batch_size=batch, progress=progress)

    training[name] = st.run(name, {"up": st.fps[up], "steps": steps, "lr": c.stage0_lr, "batch": batch}, fn)
    return Path(training[name]["checkpoint"])


def run_demo(out: str | Path, seed: int = 0, quick: bool = False, cfg: DemoConfig | None = None,
             progress: bool = True, scale: float = 1.0, overrides: list[str] = ()) -> dict[str, Any]:
    """Run (or resume) the whole demo into ``out``; returns the results object (also ``out/results.json``).
    ``scale`` multiplies every training stage's steps (the default budget fits about 30 minutes on 2 cores);
    ``overrides`` are ``key=value`` changes to :class:`DemoConfig`, applied after scaling."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = (cfg or DemoConfig.for_mode(quick, seed)).scaled(scale).with_overrides(list(overrides))
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    st = Stages(out)
    t_start = time.perf_counter()
    c = cfg

    # 1. world
    world_key = {k: getattr(c, k) for k in ("seed", "n_train", "n_val", "n_test", "n_min", "n_max", "n_views",
                                            "cell_tint", "view_shade")}
    from valr.synth.dataset import FORMAT_VERSION

    # what stage 0 reads (images, labels, read records) has not changed since text format 2; the chain records
    # that stage 1 on trains and evaluates on are the chains stage's, keyed by the current format, so a change to
    # how chains are written does not retrain perception
    world_key["text_format"] = 2
    world_key["read_records"] = 2  # 2: read records of n_min..n_max cells (1: always 4)

    def make_world(d: Path, render: bool, fixed_options: bool = False, tally_counts: bool = False) -> dict[str, Any]:
        """The world's scenes and questions in ``d`` (the same for the world and chains stages unless the chains
        ask with fixed options, which draws other scenes)."""
        from valr.synth.dataset import make_world_dataset
        from valr.synth.world import WorldConfig

        return make_world_dataset(d, seed=c.seed, n_train=c.n_train, n_val=c.n_val, n_test=c.n_test,
                                  n_range=(c.n_min, c.n_max), n_views=c.n_views,
                                  world=WorldConfig(cell_tint=c.cell_tint), render=render,
                                  fixed_options=fixed_options, tally_counts=tally_counts)

    def do_world(d: Path):
        m = make_world(d, render=True)
        shaded = shade_views(d, c.view_shade, c.cell_tint)
        n_read = read_records(d, d / "read.jsonl", c.seed, cells=(c.n_min, c.n_max))
        read_records(d, d / "read_val.jsonl", c.seed, cells=(c.n_min, c.n_max), split="val")  # the reading probe
        return {**{k: m[k] for k in ("n_scenes", "n_distribution", "tokenizer_vocab_size", "avg_tokens_per_step",
                                     "n_images")}, "n_shaded_images": shaded, "n_read_records": n_read}

    world = st.run("world", world_key, do_world)
    wdir = out / "world"

    def do_chains(d: Path):
        if c.fixed_options:  # other question draws take other scenes: render and shade them here
            m = make_world(d, render=True, fixed_options=True, tally_counts=c.tally_counts)
            shade_views(d, c.view_shade, c.cell_tint)
            n_images = sum(1 for _ in (d / "images").rglob("*.png"))
        else:
            m = make_world(d, render=False, tally_counts=c.tally_counts)
            n_images = link_images(wdir / "images", d / "images")
        _subset(d / "val.jsonl", d / "val_small.jsonl", min(c.n_val, 64))
        n_find = find_records(d, d / "find_val.jsonl", c.seed, items=(c.n_min, c.n_max), split="val")  # a probe
        return {"text_format": FORMAT_VERSION, "avg_tokens_per_step": m["avg_tokens_per_step"],
                "n_images": n_images, "n_find_probe_records": n_find}

    # the question records (same scenes and questions as the world's) in the current text format
    chains_key: dict[str, Any] = {"world": st.fps["world"], "text_format": FORMAT_VERSION}
    chains_key.update({k: True for k in ("fixed_options", "tally_counts") if getattr(c, k)})  # absent when off, as
    # before the options existed
    st.run("chains", chains_key, do_chains)
    cdir = out / "chains"

    # 2. perception teacher
    teacher_key = {"world": st.fps["world"], "teacher": c.teacher.to_dict()}

    def do_teacher(d: Path):
        from valr.synth.teacher import train_perception_teacher

        return train_perception_teacher(wdir, d, dataclasses.replace(c.teacher, seed=c.seed), progress=progress)

    teacher = st.run("teacher", teacher_key, do_teacher)
    from valr.synth.teacher import teacher_spec

    percept = teacher_spec(out / "teacher", image_size=112)

    model_key = {k: getattr(c, k) for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vision_depth",
                                            "vision_hidden", "vision_heads", "batch_size", "warmup_ratio")}
    # what only the latent variants use is in their own keys, so a K or layer sweep reuses stages 0 and 1
    latent_key = {k: getattr(c, k) for k in ("k", "align_layer", "train_mode", "projector_width", "center_targets",
                                             "latent_after")}
    if c.latent_feed != "hidden":  # absent for the paper's feedback, as before the option existed
        latent_key["latent_feed"] = c.latent_feed
    if c.aligned_latents:  # likewise absent when all K are aligned
        latent_key["aligned_latents"] = c.aligned_latents

    # 3. stage 0: perception pretraining of the MLLM: the vision tower on dense labels, then reading cells
    def do_vision(d: Path):
        base = build_base(c, wdir, d / "base")
        res = pretrain_vision(base, wdir, d / "model", c.vision_steps, c.stage0_batch_size, c.vision_lr, c.seed,
                              progress, position_heads=c.vision_position_heads)
        shutil.rmtree(base)
        return res

    training: dict[str, Any] = {}
    vision_key = {"world": st.fps["world"], "model": model_key, "steps": c.vision_steps, "lr": c.vision_lr,
                  "batch": c.stage0_batch_size}
    if not c.vision_position_heads:  # absent when on, as before the option existed
        vision_key["heads"] = "objects"
    vision = st.run("vision", vision_key, do_vision)

    # stage 0 is a curriculum: first reading cells of a single view (16 candidate tokens), then by view address
    # among all views; straight to all views the reading stays near blind much longer (docs/results.md)
    start, up = Path(vision["checkpoint"]), "vision"
    if c.stage0_oneview_steps > 0:
        start = reading_stage(c, st, training, "stage0_one_view", up, start, c.stage0_oneview_steps,
                              lambda d: one_view_reads(wdir / "read.jsonl", d / "read_one_view.jsonl"), progress)
        up = "stage0_one_view"
    reading_stage(c, st, training, "stage0", up, start, c.stage0_steps, wdir / "read.jsonl", progress)
    found, extension_data = finding_stages(c, st, training, wdir, progress)
    stage0_final, stage0_checks = reading_to_target(c, st, training, wdir, cdir, found, extension_data, progress)

    def stage1(name: str, fraction: float):
        def fn(d: Path):
            return _train(c, d, model=Path(training[stage0_final]["checkpoint"]), data=cdir / "train.jsonl",
                          stage=1, steps=c.stage1_steps, lr=c.stage1_lr, data_fraction=fraction, progress=progress)
        training[name] = st.run(name, {"up": st.fps[stage0_final], "steps": c.stage1_steps, "lr": c.stage1_lr,
                                       "fraction": fraction, "data": st.fps["chains"]}, fn)

    # 4. stage 1 (CoT SFT)
    stage1("stage1", 1.0)

    # 5. variants; the aligned ones train on records whose step targets are focus images when asked
    aligned_dir = cdir
    if c.step_targets == "focus":
        def do_focus(d: Path):
            from valr.synth.dataset import world_config
            from valr.synth.focus import focus_records

            world_cfg = world_config(json.loads((cdir / "manifest.json").read_text()))
            link_images(cdir / "images", d / "images")
            res = {}
            for split in ("train", "val", "val_small"):  # the same records, read from here so images resolve
                shutil.copyfile(cdir / f"{split}.jsonl", d / f"{split}_views.jsonl")
                res[split] = focus_records(d / f"{split}_views.jsonl", d / f"{split}.jsonl", world_cfg, c.view_shade)
            return res

        st.run("focus", {"chains": st.fps["chains"], "view_shade": c.view_shade, "v": 1}, do_focus)
        aligned_dir = out / "focus"

    jobs: list[tuple[str, dict[str, Any], Callable[[Path], Any]]] = []  # the variants, trained together below

    def variant(name: str, up: str, stage: int, lam: float, teachers: list, fraction: float = 1.0,
                feed: str | None = None):
        ddir = aligned_dir if teachers else cdir
        fn = functools.partial(_train, c, model=Path(training[up]["checkpoint"]), data=ddir / "train.jsonl",
                               stage=stage, steps=c.stage2_steps, lr=c.stage2_lr, lambda_align=lam,
                               teachers=teachers, data_fraction=fraction, latent_feed=feed,
                               val_data=ddir / "val_small.jsonl" if stage == 2 else None,
                               progress=progress and c.variant_workers == 1)
        key = {"up": st.fps[up], "stage": stage, "lambda": lam, "teachers": [dataclasses.asdict(t) for t in teachers],
               "steps": c.stage2_steps, "lr": c.stage2_lr, "projector_lr": c.projector_lr, "fraction": fraction,
               "teacher_fp": st.fps["teacher"] if teachers else None}
        if stage == 2:
            key["latent"] = {**latent_key, "latent_feed": feed} if feed else latent_key
        if teachers and c.step_targets != "view":  # absent for view targets, as before the option existed
            key["targets"] = st.fps["focus"]
        if c.variant_workers == 1:
            training[name] = st.run(name, key, fn)
        else:
            jobs.append((name, key, fn))

    from valr.teachers import TeacherSpec

    variant("sft", "stage1", 1, 0.0, [])
    variant("latent_no_align", "stage1", 2, 0.0, [])
    if c.pause_control:
        variant("latent_pause", "stage1", 2, 0.0, [], feed="pause")
    variant("valr_s", "stage1", 2, c.lambda_align, [percept])
    if c.valr_m:
        variant("valr_m", "stage1", 2, c.lambda_align, [percept, TeacherSpec(name="qe", kind="self")])
    frac_name = None
    if c.data_fraction and c.data_fraction < 1.0:
        tag = f"f{round(100 * c.data_fraction)}"
        stage1(f"stage1_{tag}", c.data_fraction)
        frac_name = f"valr_s_{tag}"
        variant(frac_name, f"stage1_{tag}", 2, c.lambda_align, [percept], c.data_fraction)
    if jobs:  # longest first, so the short ones fill in beside them
        jobs.sort(key=lambda j: (j[1]["stage"], bool(j[1]["teachers"])), reverse=True)
        training.update(st.run_parallel(jobs, c.variant_workers))

    # 6. evaluation
    test_file = cdir / f"{c.eval_split}.jsonl"
    evals: dict[str, dict[str, Any]] = {}

    def evaluate(label: str, train_name: str, policy: str, k: int):
        def fn(d: Path):
            _run_eval(c, training[train_name]["checkpoint"], test_file, d, policy, k)
            m = score_predictions(test_file, d / "predictions.jsonl", c.eval_limit)
            if k == c.k:  # does the model use the images at all? (validation records, teacher forcing)
                m["image_dependence"] = image_dependence(training[train_name]["checkpoint"],
                                                         cdir / "val_small.jsonl", c.k, policy != "off",
                                                         c.align_layer, n=min(64, c.n_val))
            (d / "metrics.json").write_text(json.dumps(m))
            return {"metrics_file": str(d / "metrics.json")}
        key = {"up": st.fps[train_name], "policy": policy, "k": k if policy != "off" else 0,  # off: K unused
               "limit": c.eval_limit, "diag": 1,
               "max_new_tokens": c.max_new_tokens, "split": c.eval_split, "test": st.fps["chains"]}
        res = st.run(f"eval/{label}", key, fn)
        metrics_file = Path(res["metrics_file"])
        # scored again from the stored predictions (cheap), so a newer scoring applies to cached generations
        evals[label] = {**json.loads(metrics_file.read_text()),
                        **score_predictions(test_file, metrics_file.parent / "predictions.jsonl", c.eval_limit)}

    evaluate("sft", "sft", "off", c.k)
    for name in VARIANTS[1:]:  # the latent variants this run trained
        if name in training:
            evaluate(name, name, "model", c.k)
    if frac_name:
        evaluate(frac_name, frac_name, "model", c.k)
    for k in c.test_ks:
        if k != c.k:
            evaluate(f"valr_s_k{k}", "valr_s", "model", k)

    # reading probe: does each stage's model read cells by address? (held-out validation scenes)
    def do_reading(d: Path):
        names = ["vision", *(n for n in training if n.startswith("stage0_find")
                             or n in ("stage0_one_view", "stage0", "stage1", "sft", "latent_no_align", "valr_s"))]
        ckpts = {"vision": vision["checkpoint"], **{n: training[n]["checkpoint"] for n in names[1:]}}
        from valr.checkpoint import load_checkpoint

        res = {}
        for n in names:
            loaded = load_checkpoint(ckpts[n])
            res[n] = perception_probe(loaded, wdir / "read_val.jsonl", cdir / "find_val.jsonl")
            if n in ("stage1", "sft", "latent_no_align", "valr_s"):  # where do chains go wrong?
                k = 0 if n in ("stage1", "sft") else c.k  # each model in the layout it was trained in
                res[n]["step_tokens"] = step_token_accuracy(loaded, cdir / "val.jsonl", n=min(128, c.n_val), k=k,
                                                            layer=c.align_layer)
            if n == "valr_s":  # does each latent segment carry its step's view (the alignment's target)?
                res[n]["segment_views"] = segment_view_accuracy(loaded, aligned_dir / "val.jsonl", out / n / "features",
                                                                n=min(96, c.n_val))
        return res

    reading = st.run("eval/reading", {"up": [st.fps[n] for n in st.fps if not n.startswith("eval/")], "v": 9},
                     do_reading)

    # 7. results
    def public(m: dict[str, Any]) -> dict[str, Any]:
        p = {k: v for k, v in m.items() if not k.startswith("_")}
        p["accuracy_long"] = _long_chain_accuracy(m)
        return p

    variants: dict[str, Any] = {}
    for name in VARIANTS:
        if name in evals:
            variants[name] = public(evals[name])
            variants[name]["training"] = {k: v for k, v in training[name].items() if k != "curve"}
            baseline = cache_alignment_baselines(out / name / "features", center=c.center_targets)
            if baseline:  # what the align loss would be if the latents carried nothing about the image
                for key in ("mean_feature", "position_mean"):
                    variants[name]["training"][f"align_of_{key}"] = {t: b[key] for t, b in baseline.items()}
    if "valr_s" in variants:
        by_k = {str(c.k): evals["valr_s"]["accuracy"]}
        by_k.update({str(k): evals[f"valr_s_k{k}"]["accuracy"] for k in c.test_ks if k != c.k})
        variants["valr_s"]["accuracy_by_k"] = {k: by_k[k] for k in sorted(by_k, key=int)}
        variants["valr_s"]["data_fraction"] = {"1.0": {"accuracy": evals["valr_s"]["accuracy"],
                                                       "accuracy_by_n": evals["valr_s"]["accuracy_by_n"]}}
        if frac_name:
            f = public(evals[frac_name])
            variants["valr_s"]["data_fraction"][str(c.data_fraction)] = {
                k: f[k] for k in ("accuracy", "accuracy_by_n", "count_by_n", "accuracy_long", "accuracy_by_family",
                                  "step_accuracy_by_position")}
    from valr.eval.length import length_report

    series = {n: evals[n]["_pairs_tokens"] for n in VARIANTS if n in evals and evals[n]["_pairs_tokens"]}
    lrep = length_report(series, n_buckets=8) if series else None
    results: dict[str, Any] = {
        "format": FORMAT,
        "seed": c.seed,
        "quick": c.quick,
        "config": c.to_dict(),
        "machine": _machine(),
        "world": world,
        "teacher": teacher,
        "training": {k: {kk: vv for kk, vv in t.items() if kk != "checkpoint"} for k, t in training.items()},
        "variants": variants,
        "reading": reading,
        "stage0_reading_checks": stage0_checks,
        "accuracy_by_length": lrep,
        # per item (generated tokens, score) of each variant: what a multi-seed summary pools its length buckets from
        "length_pairs": {n: pack_pairs(p) for n, p in series.items()},
        "stage_seconds": {k: round(s, 1) for k, s in st.seconds.items()},
        "reused_stages": st.reused,
        "total_seconds": round(sum(st.seconds.values()), 1),
        "wall_seconds_this_run": round(time.perf_counter() - t_start, 1),
        "n_test": variants.get("sft", {}).get("n"),
    }
    results["eval_split"] = c.eval_split
    prior = prior_baseline(cdir, test_file, c.eval_limit)
    prior["accuracy_long"] = _long_chain_accuracy(prior)
    results["prior_baseline"] = prior
    best = max(v["accuracy"] for v in variants.values()) if variants else 0.0
    results["above_prior"] = {n: v["accuracy"] - prior["accuracy"] for n, v in variants.items()}
    results["learned_the_task"] = best - prior["accuracy"] >= 0.05
    if c.quick:
        results["note"] = "quick smoke run: toy sizes, the accuracies mean nothing"
        results["targets"] = {}
    else:
        results["targets"] = check_targets(variants, n_hi=c.n_max)
    figs = plot_all(results, out / "figures", lrep)
    (out / "results.json").write_text(dump_json(results))
    write_report(results, out / "report.md", figs)
    _log(f"wrote {out / 'results.json'}, {out / 'report.md'} and {len(figs)} figures under {out / 'figures'}")
    return results


# ------------------------------------------------------------------------------------------ several seeds


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = (sum((x - m) ** 2 for x in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return m, sd


def dump_json(obj: Any, indent: int = 2) -> str:
    """JSON indented like ``json.dumps(indent=2)`` except that a list holding no list or object stays on one line,
    so a results file's per-item lists (``length_pairs``) and short vectors (``test_ks``) stay small in git."""
    def enc(o: Any, level: int) -> str:
        pad, end = " " * (indent * (level + 1)), " " * (indent * level)
        if isinstance(o, dict) and o:
            items = [f"{pad}{json.dumps(k if isinstance(k, str) else json.dumps(k))}: {enc(v, level + 1)}"
                     for k, v in o.items()]
            return "{\n" + ",\n".join(items) + "\n" + end + "}"
        if isinstance(o, (list, tuple)) and any(isinstance(x, (dict, list, tuple)) for x in o):
            return "[\n" + ",\n".join(pad + enc(x, level + 1) for x in o) + "\n" + end + "]"
        return json.dumps(o, default=str)

    return enc(obj, 0) + "\n"


def pack_pairs(pairs: list) -> dict[str, list[float]]:
    """(generated tokens, score) pairs as two parallel lists (one line each in :func:`dump_json`)."""
    return {"tokens": [x for x, _ in pairs], "scores": [y for _, y in pairs]}


def unpack_pairs(packed: dict[str, list[float]]) -> list[tuple[float, float]]:
    return list(zip(packed["tokens"], packed["scores"], strict=True))


def _fraction_means(runs: dict[str, dict[str, Any]], seeds: list[str]) -> dict[str, dict[str, Any]]:
    """VaLR-S's data-efficiency runs, each fraction averaged over the seeds that ran it (a seed may have run
    without ``data_fraction``), with those ``seeds`` and SFT's mean on them (``sft_accuracy``), which the target
    compares against: both sides over the same seeds."""
    fracs = {s: runs[s]["variants"].get("valr_s", {}).get("data_fraction", {}) for s in seeds}
    out: dict[str, dict[str, Any]] = {}
    for key in sorted({k for f in fracs.values() for k in f}, key=float):
        have = [s for s in seeds if key in fracs[s]]
        vs = [fracs[s][key] for s in have]
        by_n = [k for k in vs[0].get("accuracy_by_n", {}) if all(k in v.get("accuracy_by_n", {}) for v in vs)]
        out[key] = {"accuracy": _mean_std([v["accuracy"] for v in vs])[0],
                    "accuracy_by_n": {k: _mean_std([v["accuracy_by_n"][k] for v in vs])[0] for k in by_n},
                    "seeds": [int(s) for s in have]}
        if all("sft" in runs[s]["variants"] for s in have):
            out[key]["sft_accuracy"] = _mean_std([runs[s]["variants"]["sft"]["accuracy"] for s in have])[0]
    return out


def _sum_counts(dicts: list[dict[str, Any]]) -> dict[str, Any]:
    """Nested dicts of counts added key by key (``{"chains": 300, "move": {"6": 3}}`` over seeds)."""
    out: dict[str, Any] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = _sum_counts([out.get(k, {}), v]) if isinstance(v, dict) else out.get(k, 0) + v
    return out


def summarize(runs: dict[str, dict[str, Any]], command: str | None = None) -> dict[str, Any]:
    """Several seeds' results -> {"runs", "means", "std", "targets" (on the means and per seed)}."""
    seeds = sorted(runs, key=int)
    means: dict[str, Any] = {}
    stds: dict[str, Any] = {}
    names = [n for n in VARIANTS if all(n in runs[s]["variants"] for s in seeds)]
    for n in names:
        ms: dict[str, Any] = {}
        sd: dict[str, Any] = {}
        vs = [runs[s]["variants"][n] for s in seeds]
        for key in ("accuracy", "accuracy_long"):
            vals = [v[key] for v in vs if v.get(key) is not None]
            if len(vals) == len(vs):
                ms[key], sd[key] = _mean_std(vals)
        for key in ("accuracy_by_n", "accuracy_by_k", "step_accuracy_by_position", "accuracy_by_family"):
            if all(key in v for v in vs):
                common = [k for k in vs[0][key] if all(k in v[key] and v[key][k] is not None for v in vs)]
                ms[key] = {k: _mean_std([v[key][k] for v in vs])[0] for k in common}
                sd[key] = {k: _mean_std([v[key][k] for v in vs])[1] for k in common}
        if n == "valr_s":
            fr = _fraction_means(runs, seeds)
            if fr:
                ms["data_fraction"] = fr
        if all("lookup_chain_errors" in v for v in vs):  # counts: summed over the seeds, not averaged
            ms["lookup_chain_errors"] = _sum_counts([v["lookup_chain_errors"] for v in vs])
        means[n] = ms
        stds[n] = sd
    if all("prior_baseline" in runs[s] for s in seeds):
        pv = [runs[s]["prior_baseline"] for s in seeds]
        means_prior = {"accuracy": _mean_std([p["accuracy"] for p in pv])[0],
                       "accuracy_by_n": {k: _mean_std([p["accuracy_by_n"][k] for p in pv])[0]
                                         for k in pv[0]["accuracy_by_n"]}}
    else:
        means_prior = None
    per_seed = {s: runs[s].get("targets", {}) for s in seeds}
    reading_mean = None
    if all("reading" in runs[s] for s in seeds):
        stages = [n for n in runs[seeds[0]]["reading"] if all(n in runs[s]["reading"] for s in seeds)]
        def mean_of(values: list[Any]) -> Any:
            """Floats averaged; dicts (per family) per shared key; lists (grid maps) per element, if one shape."""
            if isinstance(values[0], dict):
                keys = [k for k in values[0] if all(k in v for v in values)]
                return {k: mean_of([v[k] for v in values]) for k in keys}
            if isinstance(values[0], list):
                if any(len(v) != len(values[0]) for v in values):
                    return None
                return [mean_of(list(column)) for column in zip(*values, strict=True)]
            return _mean_std(values)[0]

        reading_mean = {n: {k: mean_of([runs[s]["reading"][n][k] for s in seeds])
                            for k in runs[seeds[0]]["reading"][n] if all(k in runs[s]["reading"][n] for s in seeds)}
                        for n in stages}
    return {
        "command": command,
        "seeds": [int(s) for s in seeds],
        "runs": runs,
        "means": means,
        "std": stds,
        "prior_baseline_mean": means_prior,
        "reading_mean": reading_mean,
        "targets_on_means": check_targets(means, n_hi=runs[seeds[0]]["config"]["n_max"]),
        "targets_per_seed": per_seed,
        "stage_seconds_mean": {k: _mean_std([runs[s]["stage_seconds"].get(k, 0.0) for s in seeds])[0]
                               for k in runs[seeds[0]]["stage_seconds"]},
        "total_seconds": {s: runs[s]["total_seconds"] for s in seeds},
        "length_pairs_seeds": [int(s) for s in seeds if runs[s].get("length_pairs")],
    }


def plot_summary(summary: dict[str, Any], fig_dir: Path) -> list[str]:
    first = summary["runs"][str(summary["seeds"][0])]
    results = {"variants": summary["means"], "config": first["config"],
               "prior_baseline": summary.get("prior_baseline_mean"),
               "title": f"accuracy per variant, mean of seeds {summary['seeds']} (error bar: std over seeds)"}
    lrep = None
    # the length analysis pools the items of all seeds on shared bucket edges
    from valr.eval.length import length_report

    pooled: dict[str, list] = defaultdict(list)
    for s in summary["seeds"]:
        for n, packed in summary["runs"][str(s)].get("length_pairs", {}).items():
            pooled[n] += unpack_pairs(packed)
    if pooled:
        lrep = length_report(pooled, n_buckets=8)
    return plot_all(results, fig_dir, lrep, errors=summary["std"])


def run_seeds(out: str | Path, seeds: list[int], quick: bool = False, summary_path: str | Path | None = None,
              figures: str | Path | None = None, command: str | None = None, scale: float = 1.0,
              overrides: list[str] = ()) -> dict[str, Any]:
    """Run the demo for each seed into ``out/seed-S`` (each cached on its own), then summarise."""
    out = Path(out)
    runs = {}
    for s in seeds:
        _log(f"=== seed {s} ===")
        runs[str(s)] = load_run(run_demo(out / f"seed-{s}", seed=s, quick=quick, scale=scale, overrides=overrides),
                                out / f"seed-{s}")
    return write_summary(runs, command, out / "summary.json", summary_path,
                         figures=Path(figures) if figures else out / "figures")


def write_summary(runs: dict[str, dict[str, Any]], command: str | None, *paths: str | Path | None,
                  figures: Path | None = None) -> dict[str, Any]:
    """Summarise ``runs``, draw the seed-mean figures into ``figures`` and write the summary to each path given."""
    summary = summarize(runs, command)
    if figures is not None:
        summary["figures"] = plot_summary(summary, figures)
    text = dump_json(summary)
    written = []
    for p in paths:
        if p:
            Path(p).parent.mkdir(parents=True, exist_ok=True)
            Path(p).write_text(text)
            written.append(str(p))
    _log(f"summary of seeds {summary['seeds']}: {' and '.join(written)}")
    return summary


def load_run(results: dict[str, Any], run_dir: Path | None = None) -> dict[str, Any]:
    """One seed's results for a summary, with its ``length_pairs`` (read from ``run_dir``'s evaluations when the
    results predate them)."""
    if not results.get("length_pairs") and run_dir is not None:
        pairs = {}
        for n in VARIANTS:
            f = run_dir / "eval" / n / "metrics.json"
            if f.is_file():
                pairs[n] = pack_pairs(json.loads(f.read_text())["_pairs_tokens"])
        results = {**results, "length_pairs": pairs}
    return results


# keys of the config that may differ between the seeds of one study (everything else is the recipe): the seed,
# and data_fraction, which only adds the data-efficiency runs (stage 1 + VaLR-S on a fraction of the records) beside
# the same variants; the summary averages each fraction over the seeds that ran it (a seed of the full recipe takes
# about three hours on 2 cores with its variants one after another, the fraction runs about an hour more, so a
# session may leave them out); variant_workers, which says how the variants ran, not what they are; and
# pause_control, which only adds the pause-token control beside the same variants
SEED_KEYS = ("seed", "data_fraction", "variant_workers", "pause_control")
# how a run whose results predate an option ran without it (older results.json files lack the key)
ABSENT_MEANS: dict[str, Any] = {"fixed_options": False, "latent_feed": "hidden", "step_targets": "view",
                                "center_targets": False, "latent_after": None, "find_oneview_steps": 0,
                                "find_steps": 0, "vision_position_heads": False, "stage0_max_extensions": 0,
                                "tally_counts": False}


def merge_runs(paths: list[str | Path]) -> dict[str, dict[str, Any]]:
    """Seeds run apart (other machines, other days) gathered for one summary. Each path is a demo output directory,
    its ``results.json`` or a summary (``--summary`` / ``OUT/summary.json``: all its seeds). Every seed must come
    from the same recipe: a config that differs in anything but the seed is an error naming the keys, as is a seed
    given twice."""
    from valr.config import ConfigError

    runs: dict[str, dict[str, Any]] = {}
    origin: dict[str, str] = {}
    for raw in paths:
        p = Path(raw)
        f = p / "results.json" if p.is_dir() else p
        if not f.is_file():
            raise ConfigError(f"--merge {raw}: no such results file or demo output directory (a directory needs a "
                              "results.json: run `valr demo --out DIR` to the end first)")
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"--merge {f}: not valid JSON ({e})") from e
        if isinstance(data, dict) and isinstance(data.get("runs"), dict):
            found = {str(s): r for s, r in data["runs"].items()}
        elif isinstance(data, dict) and "seed" in data and "variants" in data and "config" in data:
            found = {str(data["seed"]): load_run(data, p if p.is_dir() else f.parent)}
        else:
            raise ConfigError(f"--merge {f}: neither a demo results.json (keys seed, config, variants) nor a summary "
                              "(key runs)")
        for seed, r in found.items():
            if r.get("quick"):
                raise ConfigError(f"--merge {f}: seed {seed} is a --quick smoke run; a study merges full runs only")
            if seed in runs:
                raise ConfigError(f"--merge: seed {seed} is in both {origin[seed]} and {f}; give each seed once")
            runs[seed], origin[seed] = r, str(f)
    if not runs:
        raise ConfigError("--merge: give at least one results file")
    # a key missing from an older results file is an option added since: it ran as ABSENT_MEANS says, or (for the
    # settings of a stage it did not have) as anything, read as today's default
    defaults = {**json.loads(json.dumps(DemoConfig().to_dict())), **ABSENT_MEANS}

    def recipe_of(r: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in {**defaults, **r["config"]}.items() if k not in SEED_KEYS}

    first = min(runs, key=int)
    recipe = recipe_of(runs[first])
    for seed, r in runs.items():
        other = recipe_of(r)
        diff = sorted(k for k in set(recipe) | set(other) if recipe.get(k, "<absent>") != other.get(k, "<absent>"))
        if diff:
            shown = ", ".join(f"{k}: {recipe.get(k, '<absent>')!r} vs {other.get(k, '<absent>')!r}" for k in diff[:6])
            raise ConfigError(f"--merge: seed {seed} ({origin[seed]}) ran another recipe than seed {first} "
                              f"({origin[first]}): {shown}; a summary averages one recipe's seeds")
    return runs
