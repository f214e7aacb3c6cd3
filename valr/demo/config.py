"""The demo's recipe: :class:`DemoConfig` (every field a ``key=value`` override, part of every stage's cache key)
and the names the results use (variants, the long-chain lengths, the results format)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from valr.synth.teacher import TeacherTrainConfig
from valr.tiny import QWEN2_ROPE_THETA

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
    # the language model's rotary base. At 10,000 (Qwen2's) the height and width axes, which get the lowest
    # frequencies, turn by at most 0.1 and 0.003 rad per cell, so attention cannot tell an image's cells, or
    # grid-placed latent slots, apart by position; on a toy a base of 10 let grid-placed aligned pause latents be read
    # (docs/results.md item 69). Changes the model from stage 0 on
    rope_theta: float = QWEN2_ROPE_THETA
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
    # valr.image_bottleneck for the latent variants (a diagnostic layout: only latent slots and image tokens see the
    # images; docs/results.md What next 4(c)); stages 0-1 and SFT train as usual
    image_bottleneck: bool = False
    # valr.latent_positions for the latent variants: "text" (1-D, the paper) or "grid" (each segment's slots at the
    # rows and columns of the aligned grid on the rotary axes, as image patches sit; docs/method.md)
    latent_positions: str = "text"
    # VaLR-S (and VaLR-M) start from a stage 2 of this many steps on the alignment alone (valr.ce_weight = 0:
    # the latents learn to carry their view before the text learns to read them; docs/results.md What next 4),
    # then train their stage2_steps as usual. 0: straight from stage 1 (the paper). Not in the unaligned variants
    align_first_steps: int = 0
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
    # those runs see each record 1/data_fraction times as often and overfit at the full step budget (docs/results.md
    # item 59); with fraction_best each keeps its model of lowest validation CE (12 passes over val_small, early
    # stopping) instead of its last, under the stage names stage1_fNN_best and valr_s_fNN_best
    fraction_best: bool = False
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
        from valr.backbones.base import check_latent_feed, check_latent_positions

        try:
            check_latent_feed(data["latent_feed"], "demo override latent_feed")
            check_latent_positions(data["latent_positions"], "demo override latent_positions")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not data["rope_theta"] > 1:
            raise ConfigError(f"demo override rope_theta={data['rope_theta']}: expected a number above 1 (10000 is "
                              "Qwen2's, smaller turns the rotary faster)")
        from valr.align import latent_grid_side

        try:
            if data["k"]:  # 0: no latents (plain CoT)
                latent_grid_side(data["k"], data["aligned_latents"])
        except ValueError as e:
            raise ConfigError(f"demo overrides k={data['k']}, aligned_latents={data['aligned_latents']}: {e}") from None
        return build_dataclass(DemoConfig, data, "demo overrides")


STEP_TARGETS = ("view", "focus")
