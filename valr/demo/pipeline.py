"""The demo end to end (:func:`run_demo`): world, teacher, vision tower, the stage-0 curriculum, stage 1, the
variants, evaluation, probes and results; each step a cached stage (see the package docstring)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from valr.demo.config import FORMAT, VARIANTS, DemoConfig
from valr.demo.probes import (
    cache_alignment_baselines,
    image_dependence,
    perception_probe,
    segment_view_accuracy,
    step_token_accuracy,
)
from valr.demo.records import _subset, find_records, link_images, mix_records, one_view_reads, read_records, shade_views
from valr.demo.report import dump_json, pack_pairs, plot_all, write_report
from valr.demo.scoring import _long_chain_accuracy, check_targets, prior_baseline, score_predictions
from valr.demo.stages import BEST_PASSES, Stages, _log, _train, _without_paths
from valr.demo.stats import paired_comparisons
from valr.tiny import QWEN2_ROPE_THETA


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
                      vision_heads=cfg.vision_heads, max_positions=2048, rope_theta=cfg.rope_theta)
    torch.manual_seed(cfg.seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(tok, shape))
    vcfg = ValrConfig(k=cfg.k, align_layer=cfg.align_layer, lambda_align=cfg.lambda_align,
                      projector_width=cfg.projector_width, train_mode=cfg.train_mode)
    return save_checkpoint(out, model, tok, tiny_image_processor(112), vcfg)


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


@dataclasses.dataclass
class DemoRun:
    """What the phases of one demo run share: the recipe, the stage cache, the output directory and every
    training stage's result by name (checkpoint and history summary)."""

    c: DemoConfig
    st: Stages
    out: Path
    progress: bool
    training: dict[str, Any] = dataclasses.field(default_factory=dict)
    stage0_final: str = ""  # the stage-0 stage whose checkpoint stage 1 starts from (set by perception_stages)

    @property
    def wdir(self) -> Path:  # the world: images, labels, read records
        return self.out / "world"

    @property
    def cdir(self) -> Path:  # the question records in the current text format
        return self.out / "chains"

    @property
    def aligned_dir(self) -> Path:  # the records the aligned variants train on (focus targets when asked)
        return self.out / "focus" if self.c.step_targets == "focus" else self.cdir


def run_demo(out: str | Path, seed: int = 0, quick: bool = False, cfg: DemoConfig | None = None,
             progress: bool = True, scale: float = 1.0, overrides: list[str] = ()) -> dict[str, Any]:
    """Run (or resume) the whole demo into ``out``; returns the results object (also ``out/results.json``).
    ``scale`` multiplies every training stage's steps (the default budget takes about 2 h 25 min on 2 cores);
    ``overrides`` are ``key=value`` changes to :class:`DemoConfig`, applied after scaling."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = (cfg or DemoConfig.for_mode(quick, seed)).scaled(scale).with_overrides(list(overrides))
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = DemoRun(cfg, Stages(out), out, progress)
    t_start = time.perf_counter()
    world = data_stages(run)  # 1.
    teacher, percept = teacher_stage(run)  # 2.
    vision, stage0_checks = perception_stages(run)  # 3.
    variant_stages(run, percept)  # 4. and 5.
    evals = evaluations(run)  # 6.
    reading = reading_probes(run, vision["checkpoint"])
    return write_results(run, world, teacher, stage0_checks, evals, reading, t_start)  # 7.


def fraction_stages(c: DemoConfig) -> tuple[str, str] | None:
    """The data-efficiency stages' names (stage 1 and VaLR-S on the first ``data_fraction`` of the records), or
    None when the recipe has none. The reading probe leaves them out of its key, so adding them to a finished
    run reuses its probe."""
    if not c.data_fraction or c.data_fraction >= 1.0:
        return None
    tag = f"f{round(100 * c.data_fraction)}" + ("_best" if c.fraction_best else "")
    return f"stage1_{tag}", f"valr_s_{tag}"


def data_stages(run: DemoRun) -> dict[str, Any]:
    """1. The world (scenes, images, labels, read records) and the chains (its questions in the current text
    format). Returns the world stage's result."""
    c, st, wdir = run.c, run.st, run.wdir
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
    return world


def teacher_stage(run: DemoRun) -> tuple[dict[str, Any], Any]:
    """2. The perception teacher, trained on the world's per-cell labels. Returns its result and its spec."""
    c, st = run.c, run.st
    teacher_key = {"world": st.fps["world"], "teacher": c.teacher.to_dict()}

    def do_teacher(d: Path):
        from valr.synth.teacher import train_perception_teacher

        return train_perception_teacher(run.wdir, d, dataclasses.replace(c.teacher, seed=c.seed),
                                        progress=run.progress)

    teacher = st.run("teacher", teacher_key, do_teacher)
    from valr.synth.teacher import teacher_spec

    return teacher, teacher_spec(run.out / "teacher", image_size=112)


def model_key(c: DemoConfig) -> dict[str, Any]:
    """The MLLM's shape and training batch in the cache key of stage 0's first stage (and so of all after it)."""
    key = {k: getattr(c, k) for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vision_depth",
                                      "vision_hidden", "vision_heads", "batch_size", "warmup_ratio")}
    if c.rope_theta != QWEN2_ROPE_THETA:  # absent at Qwen2's base, as before the option existed
        key["rope_theta"] = c.rope_theta
    return key


def perception_stages(run: DemoRun) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """3. Stage 0, perception pretraining of the MLLM: the vision tower on dense labels, then reading cells by
    address, finding them by content, and extensions while held-out reading is under target. Sets
    ``run.stage0_final`` (the stage that stage 1 starts from); returns the vision stage's result and the
    reading checks."""
    c, st, training, wdir, progress = run.c, run.st, run.training, run.wdir, run.progress

    def do_vision(d: Path):
        base = build_base(c, wdir, d / "base")
        res = pretrain_vision(base, wdir, d / "model", c.vision_steps, c.stage0_batch_size, c.vision_lr, c.seed,
                              progress, position_heads=c.vision_position_heads)
        shutil.rmtree(base)
        return res

    vision_key = {"world": st.fps["world"], "model": model_key(c), "steps": c.vision_steps, "lr": c.vision_lr,
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
    run.stage0_final, checks = reading_to_target(c, st, training, wdir, run.cdir, found, extension_data, progress)
    return vision, checks


def latent_key(c: DemoConfig) -> dict[str, Any]:
    """What only the latent variants use: in their own cache keys, so a K or layer sweep reuses stages 0 and 1."""
    key = {k: getattr(c, k) for k in ("k", "align_layer", "train_mode", "projector_width", "center_targets",
                                      "latent_after")}
    if c.latent_feed != "hidden":  # absent for the paper's feedback, as before the option existed
        key["latent_feed"] = c.latent_feed
    if c.aligned_latents:  # likewise absent when all K are aligned
        key["aligned_latents"] = c.aligned_latents
    if c.image_bottleneck:  # and without the bottleneck
        key["image_bottleneck"] = True
    if c.latent_positions != "text":  # and with the paper's 1-D latent positions (so older keys still match)
        key["latent_positions"] = c.latent_positions
    return key


def stage1(run: DemoRun, name: str, fraction: float, keep_best: bool = False) -> None:
    """Chain-of-thought SFT from stage 0's last model on ``fraction`` of the training records (``keep_best``: the
    model of lowest validation CE, not the last)."""
    c, st, training = run.c, run.st, run.training

    def fn(d: Path):
        return _train(c, d, model=Path(training[run.stage0_final]["checkpoint"]), data=run.cdir / "train.jsonl",
                      stage=1, steps=c.stage1_steps, lr=c.stage1_lr, data_fraction=fraction, progress=run.progress,
                      val_data=run.cdir / "val_small.jsonl" if keep_best else None, keep_best=keep_best)
    key = {"up": st.fps[run.stage0_final], "steps": c.stage1_steps, "lr": c.stage1_lr, "fraction": fraction,
           "data": st.fps["chains"]}
    training[name] = st.run(name, {**key, "best": BEST_PASSES} if keep_best else key, fn)


def variant_stages(run: DemoRun, percept: Any) -> None:
    """4. Stage 1, then 5. the variants from it (the aligned ones on records whose step targets are focus images
    when asked), two at a time by default, and the data-efficiency stages when the recipe has them."""
    c, st, training, cdir = run.c, run.st, run.training, run.cdir
    stage1(run, "stage1", 1.0)
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

    jobs: list[tuple[str, dict[str, Any], Callable[[Path], Any]]] = []  # the variants, trained together below
    latent = latent_key(c)

    def variant(name: str, up: str, stage: int, lam: float, teachers: list, fraction: float = 1.0,
                feed: str | None = None, keep_best: bool = False, align_only: int = 0):
        """``align_only``: instead a stage 2 of that many steps on the alignment alone, trained at once (a
        variant starts from it)."""
        ddir = run.aligned_dir if teachers else cdir
        steps = align_only or c.stage2_steps
        now = c.variant_workers == 1 or bool(align_only)  # trained here, not with the others below
        fn = functools.partial(_train, c, model=Path(training[up]["checkpoint"]), data=ddir / "train.jsonl",
                               stage=stage, steps=steps, lr=c.stage2_lr, lambda_align=lam,
                               teachers=teachers, data_fraction=fraction, latent_feed=feed,
                               val_data=ddir / "val_small.jsonl" if stage == 2 else None,
                               progress=run.progress and now,
                               keep_best=keep_best, ce_weight=0.0 if align_only else 1.0)
        key = {"up": st.fps[up], "stage": stage, "lambda": lam,
               "teachers": [_without_paths(dataclasses.asdict(t)) for t in teachers],  # teacher_fp: its content
               "steps": steps, "lr": c.stage2_lr, "projector_lr": c.projector_lr, "fraction": fraction,
               "teacher_fp": st.fps["teacher"] if teachers else None}
        if align_only:
            key["ce_weight"] = 0.0
        if stage == 2:
            key["latent"] = {**latent, "latent_feed": feed} if feed else latent
        if teachers and c.step_targets != "view":  # absent for view targets, as before the option existed
            key["targets"] = st.fps["focus"]
        if keep_best:
            key["best"] = BEST_PASSES
        if now:
            training[name] = st.run(name, key, fn)
        else:
            jobs.append((name, key, fn))

    from valr.teachers import TeacherSpec

    variant("sft", "stage1", 1, 0.0, [])
    variant("latent_no_align", "stage1", 2, 0.0, [])
    if c.pause_control:
        variant("latent_pause", "stage1", 2, 0.0, [], feed="pause")
    aligned_from = "stage1"
    if c.align_first_steps:
        aligned_from = "align_first"
        variant(aligned_from, "stage1", 2, c.lambda_align, [percept], align_only=c.align_first_steps)
    variant("valr_s", aligned_from, 2, c.lambda_align, [percept])
    if c.valr_m:
        variant("valr_m", aligned_from, 2, c.lambda_align, [percept, TeacherSpec(name="qe", kind="self")])
    if frac := fraction_stages(c):
        stage1(run, frac[0], c.data_fraction, c.fraction_best)
        variant(frac[1], frac[0], 2, c.lambda_align, [percept], c.data_fraction, keep_best=c.fraction_best)
    if jobs:  # longest first, so the short ones fill in beside them
        jobs.sort(key=lambda j: (j[1]["stage"], bool(j[1]["teachers"])), reverse=True)
        training.update(st.run_parallel(jobs, c.variant_workers))


def evaluations(run: DemoRun) -> dict[str, dict[str, Any]]:
    """6. Greedy generation on the test split for every variant (VaLR-S also at the other test-time K), each
    a cached stage, scored again from its stored predictions. Returns the metrics by label."""
    c, st, training, cdir = run.c, run.st, run.training, run.cdir
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
        name = eval_stage_name(c.eval_split, label)
        _file_by_split(run.out, label)
        res = st.run(name, key, fn)
        metrics_file = Path(res["metrics_file"])
        # scored again from the stored predictions (cheap), so a newer scoring applies to cached generations
        evals[label] = {**json.loads(metrics_file.read_text()),
                        **score_predictions(test_file, metrics_file.parent / "predictions.jsonl", c.eval_limit)}

    evaluate("sft", "sft", "off", c.k)
    for name in VARIANTS[1:]:  # the latent variants this run trained
        if name in training:
            evaluate(name, name, "model", c.k)
    if frac := fraction_stages(c):
        evaluate(frac[1], frac[1], "model", c.k)
    for k in c.test_ks:
        if k != c.k:
            evaluate(f"valr_s_k{k}", "valr_s", "model", k)
    return evals


def eval_stage_name(split: str, label: str) -> str:
    """The evaluation stage of ``label`` on ``split``: ``eval/LABEL`` on the test split (as it always was),
    ``eval/SPLIT/LABEL`` on any other, so that a validation run beside a finished test run keeps both."""
    return f"eval/{label}" if split == "test" else f"eval/{split}/{label}"


def _file_by_split(out: Path, label: str) -> None:
    """Moves a non-test evaluation written before stages were named by split (``eval/LABEL`` holding another
    split) to the name it has now, where a run on that split reuses it instead of a test run deleting it."""
    d = out / "eval" / label
    try:
        split = json.loads((d / "key.json").read_text())["key"]["split"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    target = out / eval_stage_name(split, label)
    if split != "test" and not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        d.replace(target)
        _log(f"eval/{label}: an evaluation on the {split} split, moved to {target.relative_to(out)}")


def reading_probes(run: DemoRun, vision_checkpoint: str) -> dict[str, Any]:
    """Does each stage's model read and find cells (held-out validation scenes), where do the chains go wrong
    (teacher-forced step tokens), and does each VaLR-S segment carry its step's view? One cached stage."""
    c, st, training, wdir, cdir = run.c, run.st, run.training, run.wdir, run.cdir

    def do_reading(d: Path):
        names = ["vision", *(n for n in training if n.startswith("stage0_find")
                             or n in ("stage0_one_view", "stage0", "stage1", "sft", "latent_no_align", "valr_s"))]
        ckpts = {"vision": vision_checkpoint, **{n: training[n]["checkpoint"] for n in names[1:]}}
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
                res[n]["segment_views"] = segment_view_accuracy(loaded, run.aligned_dir / "val.jsonl",
                                                                run.out / n / "features", n=min(96, c.n_val))
        return res

    read = [n for n in st.fps if not n.startswith("eval/") and n not in (fraction_stages(c) or ())]
    return st.run("eval/reading", {"up": [st.fps[n] for n in read], "v": 9}, do_reading)


def write_results(run: DemoRun, world: dict[str, Any], teacher: dict[str, Any], stage0_checks: list[dict[str, Any]],
                  evals: dict[str, dict[str, Any]], reading: dict[str, Any], t_start: float) -> dict[str, Any]:
    """7. ``results.json``, ``report.md`` and the figures from every stage's result. Returns the results."""
    c, st, training, out = run.c, run.st, run.training, run.out

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
        if frac := fraction_stages(c):
            f = public(evals[frac[1]])
            variants["valr_s"]["data_fraction"][str(c.data_fraction)] = {
                k: f[k] for k in ("accuracy", "accuracy_by_n", "count_by_n", "accuracy_long", "accuracy_by_family",
                                  "step_accuracy_by_position")}
            if c.fraction_best:  # which step's model each stage kept (lowest validation CE)
                variants["valr_s"]["data_fraction"][str(c.data_fraction)]["kept_steps"] = {
                    stage: training[stage]["best"]["step"] for stage in frac}
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
    prior = prior_baseline(run.cdir, run.cdir / f"{c.eval_split}.jsonl", c.eval_limit)
    prior["accuracy_long"] = _long_chain_accuracy(prior)
    results["prior_baseline"] = prior
    best = max(v["accuracy"] for v in variants.values()) if variants else 0.0
    results["above_prior"] = {n: v["accuracy"] - prior["accuracy"] for n, v in variants.items()}
    results["learned_the_task"] = best - prior["accuracy"] >= 0.05
    # how sure each comparison is over this split's questions (paired bootstrap; training noise is not in it)
    frac = fraction_stages(c)
    results["paired"] = paired_comparisons({n: evals[n]["_items"] for n in evals},
                                           extra=[(f"{frac[1]}_vs_sft", frac[1], "sft", None)] if frac else [])
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
