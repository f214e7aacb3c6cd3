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

import os

# Passive OpenMP waiting: on a shared 2-core machine, torch's 2 worker threads spin-waiting at every barrier make
# a step up to 5x slower as soon as another process takes a core (measured: 8.1 s active vs 1.8 s passive per
# step of a 4-layer width-128 transformer at batch 32). Takes effect only if torch is not imported yet.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The package's modules, in the order data flows: the recipe, the cached stages and the training call, the records
# each stage trains on, the probes of what a checkpoint learned, scoring of generations, the written outputs, the
# pipeline that runs it all, and the summaries over seeds.
from valr.demo.config import FORMAT, STEP_TARGETS, TARGET_NS, VARIANTS, DemoConfig  # noqa: E402
from valr.demo.pipeline import (  # noqa: E402
    build_base,
    finding_stages,
    pretrain_vision,
    reading_stage,
    reading_to_target,
    run_demo,
)
from valr.demo.probes import (  # noqa: E402
    STEP_ROLES,
    cache_alignment_baselines,
    finding_accuracy,
    image_dependence,
    perception_probe,
    reading_accuracy,
    segment_view_accuracy,
    step_token_accuracy,
    teacher_forced_batches,
    teacher_forced_steps,
    token_role,
    with_swapped_images,
)
from valr.demo.records import (  # noqa: E402
    find_records,
    link_images,
    mix_records,
    one_view_reads,
    read_records,
    shade_views,
)
from valr.demo.report import dump_json, pack_pairs, plot_all, unpack_pairs, write_report  # noqa: E402
from valr.demo.scoring import (  # noqa: E402
    LOOKUP_ERRORS,
    check_targets,
    key_kind,
    lookup_error,
    prior_baseline,
    said_steps,
    score_predictions,
)
from valr.demo.seeds import (  # noqa: E402
    ABSENT_MEANS,
    SEED_KEYS,
    load_run,
    merge_runs,
    plot_summary,
    run_seeds,
    summarize,
    write_summary,
)
from valr.demo.stages import Stages  # noqa: E402

__all__ = [
    "ABSENT_MEANS", "FORMAT", "LOOKUP_ERRORS", "SEED_KEYS", "STEP_ROLES", "STEP_TARGETS", "TARGET_NS", "VARIANTS",
    "DemoConfig", "Stages", "build_base", "cache_alignment_baselines", "check_targets", "dump_json",
    "find_records", "finding_accuracy", "finding_stages", "image_dependence", "key_kind", "link_images",
    "load_run", "lookup_error", "merge_runs", "mix_records", "one_view_reads", "pack_pairs", "perception_probe",
    "plot_all", "plot_summary", "pretrain_vision", "prior_baseline", "read_records", "reading_accuracy",
    "reading_stage", "reading_to_target", "run_demo", "run_seeds", "said_steps", "score_predictions",
    "segment_view_accuracy", "shade_views", "step_token_accuracy", "summarize", "teacher_forced_batches",
    "teacher_forced_steps", "token_role", "unpack_pairs", "with_swapped_images", "write_report", "write_summary",
]
