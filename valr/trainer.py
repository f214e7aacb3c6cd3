"""Training at scale: stage 1 (plain CoT SFT) and stage 2 (latent segments + REPA alignment) as one loop.

``train(cfg)`` is the whole thing as a Python function (returns ``output_dir/final``, a standard checkpoint) and
``valr train --config YAML [key=value ...] [--resume]`` wraps it. It runs as a plain process or under
``accelerate launch`` (DDP; FSDP and DeepSpeed ZeRO-2 through the accelerate config files in
``configs/accelerate``). What it does, in order, so that bad input fails before any long work:

1. config: YAML + ``key=value`` overrides; unknown keys are errors naming the file and line.
2. data: every line of the records files parses (all bad lines listed); the first ``data_fraction`` of the
   training records is used; pre-flight (``preflight: full``) decodes every image and target and lays every
   record out against ``max_length`` -- errors name file, line and record.
3. model, teachers, feature caches (a cache made by another encoder or resolution is refused), optimizer.
4. the loop: deterministic data order (a permutation per epoch from ``seed``), gradient accumulation,
   clipping, non-finite guard (``nan_policy``), tensorboard scalars, a progress bar, atomic checkpoints every
   ``save_every`` steps (the last ``keep_last`` kept) from which ``--resume`` continues bit-exactly.

Checkpoint layout (``output_dir/checkpoints/step-00000100``; written to ``.tmp`` then renamed)::

    model/                 valr.checkpoint format (HF model + tokenizer + processor + valr_config + projectors)
    optimizer.pt           AdamW state (torch.save; loaded with weights_only=True)
    scheduler.pt           LR scheduler state (same)
    rng-rank{R}.pt         python / numpy / torch (+cuda) RNG states of each process (same)
    trainable.safetensors  LoRA runs only: every trainable tensor (the model/ copy has LoRA merged)
    trainer_state.json     step, epoch, step in epoch, data-order seed, global batch, counters
    accelerate/            FSDP / DeepSpeed only: accelerator.save_state (sharded model + optimizer)

Why not ``accelerator.save_state`` everywhere: it writes the model in its own layout (not a loadable valr
checkpoint) and pickles numpy RNG state; here weights are safetensors and everything else loads with
``weights_only=True``. Under FSDP / DeepSpeed the optimizer is sharded, so there it is used for model+optimizer.

Gradient checkpointing: transformers' per-layer checkpointing forces ``cache=None`` inside checkpointed decoder
layers (``GradientCheckpointingLayer``), which the exact latent mode needs to chain its rounds, so
``gradient_checkpointing: true`` turns it on only where it is exact -- stage 1 and stage 2 ``train_mode: fast``.
The exact mode already checkpoints every round itself (``valr.engine``), so its memory stays near one forward.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from valr.backbones.base import check_latent_feed, check_latent_positions, set_layout
from valr.config import ConfigError, ValrConfig, apply_overrides, build_dataclass

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_VISION = re.compile(r"(^|\.)visual\.")


class TrainError(ValueError):
    """Bad input or state found by the trainer; the message says where and what to do."""


class NonFiniteLoss(TrainError):
    pass


@dataclass
class TrainConfig:
    model: str = ""  # local checkpoint directory (stage 2: the stage-1 final checkpoint)
    train_data: str = ""  # records JSONL
    val_data: str | None = None  # records JSONL, evaluated every eval_every steps and at the end
    output_dir: str = "runs/train"
    stage: int = 1  # 1: plain CoT cross-entropy; 2: latent segments + lambda * REPA alignment
    max_steps: int = 0  # optimizer steps; 0: use epochs
    epochs: float = 1.0
    per_device_batch_size: int = 2
    grad_accum: int = 16
    lr_llm: float = 1e-5  # language model (and LoRA adapters)
    lr_projector: float = 1e-5  # REPA projectors (stage 2)
    lr_vision: float = 0.0  # 0: vision tower frozen (paper)
    weight_decay: float = 0.01  # on matrices; biases and norm weights get none
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"  # cosine | linear | constant (all with linear warm-up)
    max_grad_norm: float = 1.0  # 0: no clipping (the norm is still logged)
    bf16: bool = False  # bf16 autocast (weights and optimizer state stay fp32)
    gradient_checkpointing: bool = False  # transformers' per-layer checkpointing where exact (see module doc)
    lora_r: int = 0  # > 0: train LoRA adapters (PEFT) on the language model instead of all its weights
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    lora_modules_to_save: list[str] = field(default_factory=list)  # e.g. [embed_tokens, lm_head]
    save_every: int = 500  # steps between checkpoints (0: none)
    keep_last: int = 3
    log_every: int = 10
    eval_every: int = 0  # steps between validation passes (0: only at the end)
    keep_best: bool = False  # also keep output_dir/best: the model of the validation pass with the lowest CE
    nan_policy: str = "halt"  # halt | skip (a step whose loss or gradient is not finite)
    seed: int = 0
    data_fraction: float = 1.0  # use the first fraction of the training records
    max_length: int | None = None  # longest laid-out sequence allowed (checked up front, never truncated)
    num_workers: int = 2  # data-loading processes
    preflight: str = "full"  # full: decode every image and lay out every record first | quick: files exist | off
    feature_fallback: str = "online"  # online: encode targets missing from the feature cache | error
    feature_shard_size: int = 256
    system_prompt: str | None = None
    plugins: list[str] = field(default_factory=list)  # modules imported first (they may register teachers)
    overwrite: bool = False  # replace an output_dir that already holds checkpoints (else: use --resume)
    tensorboard: bool = True
    progress: bool = True
    valr: ValrConfig = field(default_factory=ValrConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# config loading


def _key_lines(path: Path) -> dict[tuple[str, ...], int]:
    """Line number of every mapping key in a YAML file, by key path."""
    out: dict[tuple[str, ...], int] = {}
    try:
        root = yaml.compose(path.read_text())
    except yaml.YAMLError:
        return out

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = prefix + (str(k.value),)
                out[key] = k.start_mark.line + 1
                walk(v, key)

    walk(root, ())
    return out


def _coerce(obj, source: str) -> None:
    """YAML reads ``1e-5`` as a string; turn such values into the declared number types, reject the rest."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        kind = str(f.type)
        if value is None or dataclasses.is_dataclass(value):
            if value is None and "None" not in kind:
                raise ConfigError(f"{source}: {f.name} must not be null")
            continue
        try:
            if kind.startswith("float") and not isinstance(value, bool):
                value = float(value)
            elif kind.startswith("int") and not isinstance(value, bool):
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                value = int(value)
            elif kind == "bool" and not isinstance(value, bool):
                if str(value).lower() not in ("true", "false"):
                    raise ValueError
                value = str(value).lower() == "true"
            elif kind.startswith("list") and not isinstance(value, list):
                raise ValueError
            elif kind.startswith("str") and not isinstance(value, str):
                value = str(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: {f.name}={value!r} is not a valid {kind}") from None
        setattr(obj, f.name, value)


def train_config_from_dict(data: dict[str, Any], source: str = "config",
                           lines: dict[tuple[str, ...], int] | None = None) -> TrainConfig:
    lines = lines or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys to values")
    data = dict(data)
    valr_data = data.pop("valr", None) or {}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    known_valr = {f.name for f in dataclasses.fields(ValrConfig)}
    problems = []
    for key in sorted(set(data) - known):
        where = f"{source}:{lines[(key,)]}" if (key,) in lines else f"{source} (command line)"
        problems.append(f"{where}: unknown key {key!r}")
    if isinstance(valr_data, dict):
        for key in sorted(set(valr_data) - known_valr):
            where = f"{source}:{lines[('valr', key)]}" if ("valr", key) in lines else f"{source} (command line)"
            problems.append(f"{where}: unknown key 'valr.{key}'")
    if problems:
        raise ConfigError("\n".join(problems) + f"\nknown keys: {sorted(known - {'valr'})}; under valr: "
                          f"{sorted(known_valr)}")
    cfg = build_dataclass(TrainConfig, data, source)
    cfg.valr = ValrConfig.from_dict(valr_data, f"{source}: valr")
    _coerce(cfg, source)
    _coerce(cfg.valr, f"{source}: valr")
    validate(cfg)
    return cfg


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """A TrainConfig from a YAML file plus ``key=value`` overrides (dotted keys reach into ``valr``)."""
    data: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    source = "overrides"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
        lines, source = _key_lines(path), str(path)
    data = apply_overrides(data, list(overrides))
    return train_config_from_dict(data, source, lines)


def validate(cfg: TrainConfig) -> None:
    def bad(msg: str):
        raise ConfigError(msg)

    if not cfg.model:
        bad("model: give the local checkpoint directory to train (stage 2: the stage-1 final checkpoint)")
    if not cfg.train_data:
        bad("train_data: give a records JSONL file (see valr.data.records)")
    choices = {"stage": (1, 2), "scheduler": ("cosine", "linear", "constant"), "nan_policy": ("halt", "skip"),
               "preflight": ("full", "quick", "off"), "feature_fallback": ("online", "error"),
               "valr.train_mode": ("exact", "fast")}
    for key, allowed in choices.items():
        value = attrgetter(key)(cfg)
        if value not in allowed:
            bad(f"{key}={value!r} is not one of {list(allowed)}")
    try:
        check_latent_feed(cfg.valr.latent_feed, "valr.latent_feed")
        check_latent_positions(cfg.valr.latent_positions, "valr.latent_positions")
    except ValueError as e:
        bad(str(e))
    if not 0.0 < cfg.data_fraction <= 1.0:
        bad(f"data_fraction={cfg.data_fraction} must be in (0, 1]")
    for key in ("per_device_batch_size", "grad_accum", "keep_last", "log_every"):
        if getattr(cfg, key) < 1:
            bad(f"{key} must be at least 1")
    for key in ("max_steps", "save_every", "eval_every", "lora_r", "num_workers", "lr_llm", "lr_projector",
                "lr_vision", "weight_decay", "max_grad_norm", "lora_dropout"):
        if getattr(cfg, key) < 0:
            bad(f"{key} must not be negative")
    if cfg.max_steps == 0 and cfg.epochs <= 0:
        bad("set max_steps > 0 or epochs > 0")
    if cfg.keep_best and not cfg.val_data:
        bad("keep_best: give val_data (the best checkpoint is the one with the lowest validation CE) and set "
            "eval_every to how often it is measured (0: only at the end, so best = final)")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        bad("warmup_ratio must be in [0, 1)")
    if cfg.max_length is not None and cfg.max_length < 1:
        bad("max_length must be positive (or null)")
    if cfg.stage == 2 or cfg.valr.latent_positions == "grid":  # grid positions need the grid's side
        from valr.align import latent_grid_side

        try:
            latent_grid_side(cfg.valr.k, cfg.valr.aligned_latents)
        except ValueError as e:
            bad(f"valr.k / valr.aligned_latents: {e}")
    if cfg.lora_r and cfg.lr_vision > 0:
        bad("lr_vision > 0 with LoRA is not supported (LoRA adapts the language model only)")


# ---------------------------------------------------------------------------------------------------------------
# data


class _Examples(torch.utils.data.Dataset):
    """Records -> (Example, cached target features). Runs in data-loader workers."""

    def __init__(self, records, tokenizer, image_side, layout, latent, caches):
        self.records, self.tokenizer, self.image_side = records, tokenizer, image_side
        self.layout, self.latent, self.caches = layout, latent, caches

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        from valr.data import make_example

        ex = make_example(self.records[i], self.tokenizer, self.image_side, self.layout, self.latent)
        wanted = list(dict.fromkeys(t for t in ex.laid.segment_targets if t is not None))
        feats = {name: {p: cache.get(p) for p in wanted} for name, cache in self.caches.items()}
        return ex, feats


class _Collate:
    def __init__(self, pad_id: int, k: int):
        self.pad_id, self.k = pad_id, k

    def __call__(self, items):
        from valr.data import collate

        feats: dict[str, dict] = {}
        for _, f in items:
            for name, d in f.items():
                feats.setdefault(name, {}).update(d)
        return collate([ex for ex, _ in items], self.pad_id, self.k), feats


# ---------------------------------------------------------------------------------------------------------------
# the module that DDP / FSDP / DeepSpeed wrap


class TrainModule(nn.Module):
    """Model + projectors; ``forward(batch, targets)`` returns the loss and its parts (one place for autocast,
    DDP hooks and sharding to see the whole computation)."""

    def __init__(self, model: nn.Module, backbone, aligner: nn.Module | None, valr_cfg: ValrConfig, stage: int):
        super().__init__()
        self.model = model
        self.aligner = aligner
        self.backbone = backbone
        self.valr_cfg = valr_cfg
        self.stage = stage

    def forward(self, batch, targets: dict[str, dict]) -> dict[str, Any]:
        from valr.engine import forward_latent, forward_plain

        if self.stage == 1:
            out = forward_plain(self.backbone, batch)
            zero = out.loss_ce.detach().new_zeros(())
            return {"loss": out.loss_ce, "ce": out.loss_ce, "align": zero, "latent_norm": zero, "per_teacher": {},
                    "n_label_tokens": out.n_label_tokens}
        cfg = self.valr_cfg
        out = forward_latent(self.backbone, batch, cfg.align_layer, cfg.train_mode)
        rows = [(i, batch.segment_targets[b][s]) for i, (b, s) in enumerate(out.segment_owner)
                if batch.segment_targets[b][s] is not None]
        align = out.loss_ce.new_zeros(())
        per: dict[str, torch.Tensor] = {}
        if rows and self.aligner is not None and cfg.lambda_align > 0:
            items = {name: [(i, *feats[p]) for i, p in rows] for name, feats in targets.items()}
            align, per = self.aligner.loss(out.latent_states, items)
        loss = cfg.stage2_loss(out.loss_ce, align)
        norm = (out.latent_inputs.detach().float().norm(dim=-1).mean() if out.latent_inputs.numel()
                else loss.detach().new_zeros(()))
        return {"loss": loss, "ce": out.loss_ce, "align": align, "latent_norm": norm, "per_teacher": per,
                "n_label_tokens": out.n_label_tokens}


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoints(ckdir: Path) -> list[Path]:
    found = [p for p in ckdir.glob("step-*") if p.is_dir() and re.fullmatch(r"step-\d+", p.name)
             and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = _checkpoints(Path(output_dir) / "checkpoints")
    return found[-1] if found else None


def read_log(output_dir: str | Path, name: str = "history.jsonl") -> list[dict[str, Any]]:
    """The rows a run logged to ``output_dir/name``: one per logged step (``history.jsonl``) or per validation
    pass (``eval.jsonl``); [] before the first. For readers of a finished or stopped run (summaries, benchmarks,
    plots); a resumed run has already dropped the rows of steps it redoes."""
    path = Path(output_dir) / name
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _format_entry_problems(entries, source, limit=20) -> str:
    from valr.data.check import format_problems

    return format_problems(entries, source, limit)


# ---------------------------------------------------------------------------------------------------------------
# the trainer


class _Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool):
        from accelerate import Accelerator, DistributedDataParallelKwargs

        self.cfg = cfg
        self.resume = resume
        self.out = Path(cfg.output_dir)
        self.ckdir = self.out / "checkpoints"
        self.best: dict[str, Any] | None = None  # the lowest-CE validation pass (keep_best)
        handlers = [DistributedDataParallelKwargs(find_unused_parameters=cfg.stage == 2 or cfg.lr_vision > 0)]
        self.acc = Accelerator(gradient_accumulation_steps=cfg.grad_accum,
                               mixed_precision="bf16" if cfg.bf16 else None,  # None: accelerate config / env
                               kwargs_handlers=handlers,
                               step_scheduler_with_optimizer=False)
        from accelerate.utils import DistributedType

        self.sharded = self.acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        self.is_fsdp = self.acc.distributed_type == DistributedType.FSDP
        self.main = self.acc.is_main_process
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.step_delay = float(os.environ.get("VALR_TRAIN_STEP_DELAY", "0") or 0)  # tests: time to SIGKILL

    def log(self, msg: str) -> None:
        if self.main:
            print(f"[valr train] {msg}", file=sys.stderr, flush=True)

    # -- set-up ---------------------------------------------------------------------------------------------
    def prepare_output(self) -> Path | None:
        """Returns the checkpoint to resume from (None: fresh start)."""
        cfg = self.cfg
        final = self.out / "final"
        existing = _checkpoints(self.ckdir)
        if not self.resume and (existing or final.exists()):
            if not cfg.overwrite:
                raise TrainError(f"{self.out} already holds a run ({'checkpoints' if existing else 'final'}); pass "
                                 "--resume to continue it, set overwrite=true to replace it, or pick another "
                                 "output_dir")
            self.acc.wait_for_everyone()
            if self.main:
                shutil.rmtree(self.ckdir, ignore_errors=True)
                shutil.rmtree(final, ignore_errors=True)
                shutil.rmtree(self.out / "best", ignore_errors=True)
                shutil.rmtree(self.out / "tb", ignore_errors=True)
                for name in ("history.jsonl", "eval.jsonl"):
                    (self.out / name).unlink(missing_ok=True)
            existing = []
        self.acc.wait_for_everyone()
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in self.ckdir.glob("step-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            (self.out / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.acc.wait_for_everyone()
        if self.resume and not existing:
            self.log(f"--resume: no checkpoint under {self.ckdir}; starting from the beginning")
        return existing[-1] if self.resume and existing else None

    def read_data(self) -> None:
        from valr.data.check import read_entries

        cfg = self.cfg
        entries, _ = read_entries(cfg.train_data)
        bad = [e for e in entries if e.reasons]
        if bad:
            raise TrainError(f"{len(bad)} bad record(s) in {cfg.train_data}:\n"
                             f"{_format_entry_problems(entries, cfg.train_data)}\n"
                             f"run `valr data check {cfg.train_data} --out-clean CLEAN --out-rejects REJECTS`")
        if not entries:
            raise TrainError(f"{cfg.train_data} holds no records")
        n_use = max(1, round(len(entries) * cfg.data_fraction))
        self.train_entries = entries[:n_use]
        self.val_entries = []
        if cfg.val_data:
            val, _ = read_entries(cfg.val_data)
            bad = [e for e in val if e.reasons]
            if bad:
                raise TrainError(f"{len(bad)} bad record(s) in {cfg.val_data}:\n"
                                 f"{_format_entry_problems(val, cfg.val_data)}")
            self.val_entries = val
        self.global_batch = cfg.per_device_batch_size * self.world * cfg.grad_accum
        self.steps_per_epoch = len(self.train_entries) // self.global_batch
        if self.steps_per_epoch == 0:
            raise TrainError(f"{len(self.train_entries)} training record(s) (data_fraction={cfg.data_fraction}) "
                             f"are fewer than one optimizer step's global batch (per_device_batch_size "
                             f"{cfg.per_device_batch_size} x {self.world} process(es) x grad_accum "
                             f"{cfg.grad_accum} = {self.global_batch}); lower those or add data")
        self.total_steps = cfg.max_steps or max(1, round(cfg.epochs * self.steps_per_epoch))
        dropped = len(self.train_entries) - self.steps_per_epoch * self.global_batch
        self.log(f"{len(self.train_entries)} training records ({cfg.data_fraction:g} of {len(entries)}), "
                 f"{len(self.val_entries)} validation; global batch {self.global_batch}, "
                 f"{self.steps_per_epoch} steps/epoch ({dropped} records left out of each epoch's order), "
                 f"{self.total_steps} steps")

    def load_model(self, ckpt: Path | None) -> None:
        from valr.checkpoint import load_checkpoint
        from valr.data import LayoutConfig
        from valr.data.check import ImageSide
        from valr.tokens import LatentTokenIds

        cfg = self.cfg
        src = ckpt / "model" if ckpt is not None and not cfg.lora_r else Path(cfg.model)
        device = "cpu" if self.sharded else self.acc.device
        loaded = load_checkpoint(src, device=device, dtype=torch.float32)  # fp32 master weights
        self.loaded = loaded
        self.model = loaded.model
        self.tok = loaded.tokenizer
        self.ip = loaded.image_processor
        self.backbone = loaded.backbone
        set_layout(self.backbone, cfg.valr)  # this run's latent options, whatever the source checkpoint had
        self.image_side = ImageSide.of(loaded.backbone)
        v = cfg.valr
        self.k = v.k if cfg.stage == 2 else 0
        self.layout = LayoutConfig(k=self.k, step_delimiter=v.step_delimiter, answer_prefix=v.answer_prefix,
                                   system_prompt=cfg.system_prompt, max_length=cfg.max_length,
                                   latent_after=v.latent_after)
        self.latent = LatentTokenIds.from_tokenizer(self.tok) if cfg.stage == 2 else None
        if cfg.stage == 2 and not 1 <= v.align_layer <= self.backbone.num_layers:
            raise TrainError(f"valr.align_layer={v.align_layer} is out of range: {src} has "
                             f"{self.backbone.num_layers} decoder layers (paper: 12 of 28)")

    def preflight(self) -> None:
        from accelerate.utils import gather_object

        from valr.data.check import check_entries

        cfg = self.cfg
        if cfg.preflight == "off":
            return
        t0 = time.perf_counter()
        tagged = [(cfg.train_data, e) for e in self.train_entries] + [(cfg.val_data, e) for e in self.val_entries]
        mine = [(src, e) for i, (src, e) in enumerate(tagged) if i % self.world == self.rank]
        full = cfg.preflight == "full"
        check_entries([e for _, e in mine], workers=max(1, cfg.num_workers), progress=cfg.progress and self.main,
                      decode=full, tokenizer=self.tok if full else None,
                      image_side=self.image_side if full else None, layout=self.layout, latent=self.latent)
        bad = [(e.where(src), e.reasons) for src, e in mine if e.reasons]
        if self.world > 1:
            bad = gather_object(bad)
        if bad:
            lines = [f"{where}: {'; '.join(r)}" for where, r in bad[:20]]
            more = f"\n... and {len(bad) - 20} more" if len(bad) > 20 else ""
            raise TrainError(f"pre-flight check ({cfg.preflight}) found {len(bad)} bad record(s):\n"
                             + "\n".join(lines) + more + "\nfix them, or filter with `valr data check FILE "
                             "--out-clean CLEAN --out-rejects REJECTS`")
        self.log(f"pre-flight ({cfg.preflight}): {len(self.train_entries) + len(self.val_entries)} records OK "
                 f"in {time.perf_counter() - t0:.1f}s")

    def setup_teachers(self) -> None:
        from valr.teachers import FeatureCache, build_teacher

        cfg, v = self.cfg, self.cfg.valr
        self.teachers: dict[str, Any] = {}
        self.caches: dict[str, FeatureCache] = {}
        if problem := v.loss_weights_error(cfg.stage):
            raise TrainError(problem)
        if cfg.stage != 2 or v.lambda_align <= 0:
            return
        if not v.teachers:
            raise TrainError("stage 2 with valr.lambda_align > 0 needs valr.teachers (or set lambda_align=0)")
        for spec in v.teachers:
            if spec.kind == "self" and cfg.lr_vision > 0:
                raise TrainError(f"teacher {spec.name!r} of kind 'self' encodes with the model's own vision tower, "
                                 "which lr_vision > 0 trains: its targets would drift (and cached ones go stale). "
                                 "Keep lr_vision=0 or use an external teacher")
            t = build_teacher(spec, self.backbone)
            if hasattr(t, "model"):
                t.model.to(self.acc.device)
            self.teachers[spec.name] = t
        if v.feature_cache:
            for name, t in self.teachers.items():
                self.caches[name] = FeatureCache(v.feature_cache, t, shard_size=cfg.feature_shard_size)
            sizes = ", ".join(f"{n}: {len(c)} cached" for n, c in self.caches.items())
            self.log(f"feature cache {v.feature_cache} ({sizes}); missing features: {cfg.feature_fallback}")
        elif cfg.feature_fallback == "error":
            raise TrainError("feature_fallback=error needs valr.feature_cache (precompute with `valr features`)")

    def build_modules(self, ckpt: Path | None) -> None:
        from valr.align import Aligner

        cfg, v = self.cfg, self.cfg.valr
        model = self.model
        model.train()
        for name, p in model.named_parameters():
            p.requires_grad_(cfg.lr_vision > 0 or not _VISION.search(name))
        aligner = None
        if self.teachers:
            dims = {n: t.dim for n, t in self.teachers.items()}
            old = self.loaded.aligner
            if old is not None and {n: p.net[-1].out_features for n, p in old.projectors.items()} == dims and \
                    old.projectors[next(iter(dims))].net[0].out_features == v.projector_width:
                aligner = old.follow(v)
                self.log("REPA projectors: continuing from the checkpoint's")
            else:
                torch.manual_seed(cfg.seed)
                aligner = Aligner.for_config(self.backbone.hidden_size, dims, v)
            aligner.to(model.device if not self.sharded else "cpu")
        self.peft = None
        if cfg.lora_r:
            from peft import LoraConfig, get_peft_model

            targets = "|".join(re.escape(t) for t in cfg.lora_target_modules)
            lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=rf".*language_model\..*\.({targets})$",
                              modules_to_save=cfg.lora_modules_to_save or None)
            torch.manual_seed(cfg.seed)
            self.peft = get_peft_model(model, lcfg)
            model = self.peft
        if cfg.gradient_checkpointing:
            if cfg.stage == 1 or v.train_mode == "fast":
                base = self.peft.get_base_model() if self.peft is not None else model
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                self.log("gradient checkpointing: on (transformers, per decoder layer)")
            else:
                self.log("gradient checkpointing: the exact latent mode already checkpoints every round; "
                         "transformers' per-layer checkpointing would drop the KV cache the rounds share, so it "
                         "stays off")
        self.module = TrainModule(model, self.backbone, aligner, v, cfg.stage)
        groups: list[dict[str, Any]] = []

        def add(label: str, named: list[tuple[str, nn.Parameter]], lr: float) -> None:
            decay = [p for _, p in named if p.requires_grad and p.ndim >= 2]
            rest = [p for _, p in named if p.requires_grad and p.ndim < 2]
            if decay:
                groups.append({"params": decay, "lr": lr, "weight_decay": cfg.weight_decay, "name": label})
            if rest:
                groups.append({"params": rest, "lr": lr, "weight_decay": 0.0, "name": label})

        named = list(model.named_parameters())
        add("llm", [(n, p) for n, p in named if not _VISION.search(n)], cfg.lr_llm)
        add("vision", [(n, p) for n, p in named if _VISION.search(n)], cfg.lr_vision)
        if aligner is not None:
            add("projector", list(aligner.named_parameters()), cfg.lr_projector)
        if not groups:
            raise TrainError("nothing to train: every parameter is frozen")
        self.trainable = [n for n, p in self.module.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr_llm, betas=(0.9, 0.999), eps=1e-8)
        from transformers import get_scheduler

        name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.scheduler]
        self.warmup = math.ceil(cfg.warmup_ratio * self.total_steps)
        self.scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=self.warmup,
                                       num_training_steps=self.total_steps)
        n_train = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.module.parameters())
        self.log(f"stage {cfg.stage}: {n_train / 1e6:.2f} M of {n_all / 1e6:.2f} M parameters trainable; "
                 f"groups: {sorted({g['name'] for g in groups})}; warm-up {self.warmup} steps, {cfg.scheduler}")

    def load_resume_state(self, ckpt: Path) -> dict[str, Any]:
        from safetensors.torch import load_file

        state = json.loads((ckpt / "trainer_state.json").read_text())
        checks = {"n_train_records": len(self.train_entries), "global_batch": self.global_batch,
                  "data_order_seed": self.cfg.seed}
        for key, now in checks.items():
            if state.get(key) != now:
                raise TrainError(f"cannot resume from {ckpt}: {key} was {state.get(key)} there and is {now} now "
                                 "(the data order would differ); keep train_data, data_fraction, seed and the global "
                                 "batch (per_device_batch_size x processes x grad_accum) unchanged")
        if state.get("total_steps") != self.total_steps:
            self.log(f"note: total steps changed from {state.get('total_steps')} to {self.total_steps}; the LR "
                     "schedule continues from the saved state")
        if state.get("world_size") != self.world:
            self.log(f"note: resuming with {self.world} process(es) (saved with {state.get('world_size')}); the data "
                     "order is the same, bitwise equality with an uninterrupted run is not guaranteed")
        if self.cfg.lora_r:
            tensors = load_file(str(ckpt / "trainable.safetensors"))
            missing = set(self.trainable) - set(tensors)
            if missing:
                raise TrainError(f"{ckpt}/trainable.safetensors lacks {sorted(missing)[:5]}...")
            self.module.load_state_dict(tensors, strict=False)
        if not self.sharded:
            opt = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
            self.optimizer.load_state_dict(opt)
        self.scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        return state

    # -- data order -------------------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train_entries), generator=g).tolist()

    def loader(self, epoch: int, start: int):
        cfg = self.cfg
        order = self.epoch_order(epoch)
        bs, G = cfg.per_device_batch_size, self.global_batch
        plan = []
        for s in range(start, self.steps_per_epoch):
            chunk = order[s * G:(s + 1) * G]
            for m in range(cfg.grad_accum):
                a = (m * self.world + self.rank) * bs
                plan.append(chunk[a:a + bs])
        return self._make_loader(plan, [e.record for e in self.train_entries])

    def _make_loader(self, plan, records):
        ds = _Examples(records, self.tok, self.image_side, self.layout, self.latent, self.caches)
        return torch.utils.data.DataLoader(ds, batch_sampler=plan, collate_fn=_Collate(self.tok.pad_token_id, self.k),
                                           num_workers=self.cfg.num_workers)

    def resolve_targets(self, batch, feats: dict[str, dict]) -> dict[str, dict]:
        """Teacher features of every target in the batch: from the cache, else encoded one image at a time (so a
        feature never depends on which other images were missing in the same step: resume stays bit-exact)."""
        from valr.data.images import load_image

        if not self.teachers:
            return {}
        need = list(dict.fromkeys(p for seg in batch.segment_targets for p in seg if p is not None))
        out: dict[str, dict] = {}
        for name, teacher in self.teachers.items():
            cache = self.caches.get(name)
            have = feats.get(name, {})
            res = {}
            for p in need:
                hit = have.get(p)
                if hit is None and cache is not None:
                    hit = cache.get(p)
                if hit is None:
                    if self.cfg.feature_fallback == "error":
                        owners = [rid for rid, segs in zip(batch.record_ids, batch.segment_targets, strict=True)
                                  if p in segs]
                        raise TrainError(f"teacher {name!r}: no cached features for {p} (record(s) {owners}) in "
                                         f"{self.cfg.valr.feature_cache}; run `valr features --config ...` first "
                                         "or set feature_fallback=online")
                    ((f, grid),) = teacher.encode([load_image(p)])
                    if cache is not None:
                        cache.put(p, f, grid)
                        f = cache.round_trip(f)
                    hit = (f, grid)
                res[p] = hit
            out[name] = res
        return out

    # -- checkpoints ------------------------------------------------------------------------------------------
    def unwrapped(self) -> TrainModule:
        return self.acc.unwrap_model(self.module)

    def write_model(self, path: Path) -> None:
        """Collective: every process calls it; the main one writes a valr checkpoint at ``path``."""
        from valr.checkpoint import save_checkpoint

        mod = self.unwrapped()
        ctx = nullcontext()
        if self.is_fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            ctx = FSDP.summon_full_params(self.module, writeback=False, rank0_only=True, offload_to_cpu=True)
        with ctx:
            if self.main:
                model = mod.model
                if self.peft is not None:
                    import copy

                    model = copy.deepcopy(self.peft).merge_and_unload()
                save_checkpoint(path, model, self.tok, self.ip, self.cfg.valr, mod.aligner)
        self.acc.wait_for_everyone()

    def save(self, step: int, counters: dict[str, Any]) -> Path:
        from safetensors.torch import save_file

        name = f"step-{step:08d}"
        tmp, final = self.ckdir / f"{name}.tmp", self.ckdir / name
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        torch.save(_rng_state(), tmp / f"rng-rank{self.rank}.pt")
        for cache in self.caches.values():
            cache.flush()
        if self.sharded:
            self.acc.save_state(str(tmp / "accelerate"))
        self.write_model(tmp / "model")
        if self.main:
            if not self.sharded:
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            if self.cfg.lora_r:
                sd = self.unwrapped().state_dict()
                save_file({n: sd[n].detach().cpu().contiguous() for n in self.trainable},
                          str(tmp / "trainable.safetensors"))
            state = {"step": step, "epoch": step // self.steps_per_epoch,
                     "step_in_epoch": step % self.steps_per_epoch, "steps_per_epoch": self.steps_per_epoch,
                     "total_steps": self.total_steps, "data_order_seed": self.cfg.seed,
                     "global_batch": self.global_batch, "world_size": self.world,
                     "n_train_records": len(self.train_entries), **counters}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        self.acc.wait_for_everyone()
        if self.main:
            tmp.rename(final)
            for old in _checkpoints(self.ckdir)[:-self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    # -- evaluation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        cfg = self.cfg
        if not self.val_entries:
            return {}
        bs, n = cfg.per_device_batch_size, len(self.val_entries)
        n_batches = math.ceil(n / (bs * self.world))
        plan, weights = [], []
        for i in range(n_batches):
            idx = [j for j in range((i * self.world + self.rank) * bs, (i * self.world + self.rank + 1) * bs)
                   if j < n]
            plan.append(idx or [0])  # every process runs the same number of passes (collectives stay in step)
            weights.append(1.0 if idx else 0.0)
        loader = self._make_loader(plan, [e.record for e in self.val_entries])
        self.module.eval()
        sums = torch.zeros(4, dtype=torch.float64)
        for (batch, feats), w in zip(loader, weights, strict=True):
            outs = self.module(batch, self.resolve_targets(batch, feats))
            ntok = outs["n_label_tokens"]
            sums += torch.tensor([w * float(outs["ce"]) * ntok, w * ntok, w * float(outs["align"]), w],
                                 dtype=torch.float64)
        self.module.train()
        sums = self.acc.reduce(sums.to(self.acc.device), "sum").cpu()
        return {"val/ce": float(sums[0] / max(sums[1], 1)), "val/align": float(sums[2] / max(sums[3], 1))}

    # -- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> Path:
        cfg = self.cfg
        ckpt = self.prepare_output()
        final = self.out / "final"
        self.read_data()
        if self.resume and final.is_dir() and (final / "valr_train_state.json").is_file():
            done = json.loads((final / "valr_train_state.json").read_text())
            if done.get("step") == self.total_steps:
                self.log(f"{final} is already complete ({self.total_steps} steps); nothing to do")
                return final
        _seed_all(cfg.seed)
        for m in cfg.plugins:
            importlib.import_module(m)
        if self.acc.state.deepspeed_plugin is not None:
            ds = self.acc.state.deepspeed_plugin
            ds.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.per_device_batch_size
            if ds.deepspeed_config.get("gradient_accumulation_steps") not in (cfg.grad_accum, "auto", None):
                raise TrainError(f"the DeepSpeed config's gradient_accumulation_steps "
                                 f"({ds.deepspeed_config['gradient_accumulation_steps']}) differs from grad_accum "
                                 f"({cfg.grad_accum})")
        self.load_model(ckpt)
        self.preflight()
        self.setup_teachers()
        self.build_modules(ckpt)
        state: dict[str, Any] = {}
        if ckpt is not None:
            state = self.load_resume_state(ckpt)
        self.module, self.optimizer = self.acc.prepare(self.module, self.optimizer)
        if ckpt is not None and self.sharded:
            self.acc.load_state(str(ckpt / "accelerate"))
        step = int(state.get("step", 0))
        counters = {"nan_skipped": int(state.get("nan_skipped", 0)), "tokens_seen": int(state.get("tokens_seen", 0))}
        if ckpt is not None:
            rng_file = ckpt / f"rng-rank{self.rank}.pt"
            if not rng_file.is_file():
                rng_file = ckpt / "rng-rank0.pt"
            _set_rng_state(torch.load(rng_file, weights_only=True))
            self.log(f"resumed from {ckpt} at step {step} (epoch {state['epoch']}, step {state['step_in_epoch']} "
                     f"of {self.steps_per_epoch})")
        writer = None
        if self.main and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.out / "tb"))
        from tqdm import tqdm

        bar = tqdm(total=self.total_steps, initial=step, disable=not (self.main and cfg.progress), unit="step",
                   desc=f"stage {cfg.stage}", file=sys.stderr, dynamic_ncols=True)
        teachers = list(self.teachers)
        groups = [g["name"] for g in self.optimizer.param_groups]
        history = None
        self.best = self.read_best(step)
        if self.main:
            for name in ("history.jsonl", "eval.jsonl"):  # drop rows after the checkpoint: those steps are redone
                f = self.out / name
                if f.is_file():
                    rows = [r for r in f.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= step]
                    f.write_text("".join(r + "\n" for r in rows))
            history = (self.out / "history.jsonl").open("a")
        window: list[dict[str, float]] = []
        try:
            while step < self.total_steps:
                epoch, start = divmod(step, self.steps_per_epoch)
                it = iter(self.loader(epoch, start))
                for _ in range(start, self.steps_per_epoch):
                    if step >= self.total_steps:
                        break
                    row = self.train_step(it, step, teachers, counters)
                    step += 1
                    row["step"] = step
                    lrs = self.scheduler.get_last_lr()
                    for gname, lr in zip(groups, lrs, strict=True):
                        row[f"lr/{gname}"] = lr
                    window.append(row)
                    if history is not None:
                        history.write(json.dumps(row) + "\n")
                        history.flush()
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens'] / row['time_s']:.0f}")
                    if step % cfg.log_every == 0 or step == self.total_steps:
                        self.write_scalars(writer, window, step)
                        window = []
                    if cfg.eval_every and step % cfg.eval_every == 0 and step < self.total_steps:
                        self.write_eval(writer, step)
                    if cfg.save_every and step % cfg.save_every == 0 and step < self.total_steps:
                        self.save(step, counters)
                    if self.step_delay:
                        time.sleep(self.step_delay)
            bar.close()
            self.write_eval(writer, step)
            for cache in self.caches.values():
                cache.flush()
            self.write_model(final)
            if self.main:
                (final / "valr_train_state.json").write_text(json.dumps(
                    {"step": step, "total_steps": self.total_steps, "stage": cfg.stage,
                     "n_train_records": len(self.train_entries), **counters,
                     **({"best": self.best} if self.best else {}),
                     "train_config": cfg.to_dict()}, indent=2, default=str))
            self.acc.wait_for_everyone()
            self.log(f"done: {step} steps; final checkpoint {final}")
            return final
        finally:
            bar.close()
            if writer is not None:
                writer.close()
            if history is not None:
                history.close()

    def train_step(self, it, step: int, teachers: list[str], counters: dict[str, Any]) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        nt = len(teachers)
        # local sums: loss, ce, align, latent_norm, micro-batches, tokens, bad flag, per-teacher sums, counts
        sums = torch.zeros(7 + 2 * nt, dtype=torch.float64)
        bad_ids: list[str] = []
        grad_norm = float("nan")
        for _ in range(cfg.grad_accum):
            batch, feats = next(it)
            targets = self.resolve_targets(batch, feats)
            with self.acc.accumulate(self.module):
                outs = self.module(batch, targets)
                loss = outs["loss"]
                finite = bool(torch.isfinite(loss.detach()).item())
                # always backward, even a non-finite loss: DDP expects one backward per forward; the window's
                # gradients are then dropped as a whole below
                self.acc.backward(loss)
                sums[5] += float(batch.attention_mask.sum())
                if finite:
                    parts = [loss, outs["ce"], outs["align"], outs["latent_norm"]]
                    sums[:5] += torch.tensor([float(x.detach()) for x in parts] + [1.0], dtype=torch.float64)
                    for j, name in enumerate(teachers):
                        if name in outs["per_teacher"]:
                            sums[7 + j] += float(outs["per_teacher"][name].detach())
                            sums[7 + nt + j] += 1
                else:
                    sums[6] = 1
                    bad_ids.extend(batch.record_ids)
                if self.acc.sync_gradients:
                    any_bad = bool(self.acc.reduce(sums[6:7].clone().to(self.acc.device), "sum").item() > 0)
                    why = "loss"
                    if not any_bad:
                        norm = self.acc.clip_grad_norm_(self.module.parameters(),
                                                        cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
                        if norm is not None:
                            grad_norm = float(norm)
                            if not math.isfinite(grad_norm):
                                any_bad, why = True, "gradient norm"
                    if any_bad:
                        self.on_non_finite(step + 1, why, bad_ids)
                        counters["nan_skipped"] += 1
                    else:
                        self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
        sums = self.acc.reduce(sums.to(self.acc.device), "sum").cpu() if self.world > 1 else sums
        elapsed = time.perf_counter() - t0
        n = max(float(sums[4]), 1.0)
        counters["tokens_seen"] += int(sums[5])
        row = {"loss": float(sums[0]) / n, "ce": float(sums[1]) / n, "align": float(sums[2]) / n,
               "latent_norm": float(sums[3]) / n, "tokens": int(sums[5]), "time_s": elapsed,
               "grad_norm": grad_norm, "skipped": int(sums[6] > 0)}
        for j, name in enumerate(teachers):
            if sums[7 + nt + j] > 0:
                row[f"align/{name}"] = float(sums[7 + j] / sums[7 + nt + j])
        return row

    def on_non_finite(self, step: int, why: str, local_ids: list[str]) -> None:
        from accelerate.utils import gather_object

        ids = gather_object([(self.rank, local_ids)]) if self.world > 1 else [(self.rank, local_ids)]
        where = "; ".join(f"rank {r}: {i}" for r, i in ids if i) or "all losses finite (the gradient is not)"
        msg = f"non-finite {why} at step {step}; batch record ids: {where}"
        if self.cfg.nan_policy == "halt":
            raise NonFiniteLoss(msg + " (nan_policy=halt; set nan_policy=skip to drop such steps and go on)")
        self.log(msg + " -- step skipped (nan_policy=skip)")

    def write_scalars(self, writer, window: list[dict[str, float]], step: int) -> None:
        if writer is None or not window:
            return
        keys = sorted({k for row in window for k in row} - {"step", "tokens", "time_s", "skipped"})
        for k in keys:
            vals = [row[k] for row in window if k in row and math.isfinite(row[k])]
            if vals:
                tag = k if k.startswith("lr/") else f"train/{k}"
                writer.add_scalar(tag, sum(vals) / len(vals), step)
        secs = sum(r["time_s"] for r in window)
        writer.add_scalar("perf/tokens_per_s", sum(r["tokens"] for r in window) / secs, step)
        writer.add_scalar("perf/steps_per_s", len(window) / secs, step)
        writer.flush()

    def write_eval(self, writer, step: int) -> None:
        metrics = self.evaluate()
        if not metrics:
            return
        self.log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if writer is not None:
            for k, v in metrics.items():
                writer.add_scalar(k, v, step)
            writer.flush()
        if self.main:
            with (self.out / "eval.jsonl").open("a") as fh:
                fh.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.cfg.keep_best and (self.best is None or metrics["val/ce"] < self.best["val/ce"]):
            self.best = {"step": step, **metrics}
            self.write_best()

    def read_best(self, step: int) -> dict[str, Any] | None:
        """The best validation pass so far of the run resumed at ``step`` (None: none yet, or a fresh start, whose
        stale best is removed). A best written after the checkpoint is kept: the steps redone reproduce it (resume
        is bit-exact), and it replaced the best of the passes before the checkpoint, which would be lost."""
        if not self.cfg.keep_best:
            return None
        best, old = self.out / "best", self.out / "best.old"
        self.acc.wait_for_everyone()
        if self.main and old.is_dir() and not best.exists():  # killed between write_best's two renames
            old.replace(best)
        self.acc.wait_for_everyone()
        info = best / "valr_best.json"
        if step > 0 and info.is_file():
            return json.loads(info.read_text())
        if self.main:
            shutil.rmtree(best, ignore_errors=True)
        self.acc.wait_for_everyone()
        return None

    def write_best(self) -> None:
        """Collective: writes the current model to ``output_dir/best`` atomically (a new directory, then the
        swap), with ``valr_best.json`` naming its step and validation metrics."""
        best, tmp, old = (self.out / n for n in ("best", "best.tmp", "best.old"))
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
        self.write_model(tmp)
        if self.main:
            (tmp / "valr_best.json").write_text(json.dumps(self.best, indent=2))
            shutil.rmtree(old, ignore_errors=True)
            if best.exists():
                best.replace(old)
            tmp.replace(best)
            shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        self.log(f"step {self.best['step']}: best validation CE so far ({self.best['val/ce']:.4f}); saved {best}")


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train as ``cfg`` says; returns ``output_dir/final`` (a standard valr checkpoint).

    Callable repeatedly in one process (each call gets a fresh accelerate state). ``resume=True`` continues from
    the newest complete checkpoint under ``output_dir/checkpoints`` (from the start when there is none).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    validate(cfg)
    trainer = _Trainer(cfg, resume)
    try:
        return trainer.run()
    finally:
        from accelerate.state import AcceleratorState, GradientState

        if trainer.world == 1:
            AcceleratorState._reset_state(reset_partial_state=True)
        else:
            AcceleratorState._reset_state()
        GradientState._reset_state()


def train_main(args) -> int:
    """``valr train``: load the config, train, print the final checkpoint's path."""
    try:
        cfg = load_train_config(args.config, args.overrides)
        final = train(cfg, resume=args.resume)
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("VALR_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(final)
    return 0
