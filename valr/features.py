"""``valr features``: precompute teacher patch features for every step-target image into the feature cache.

Reads the same YAML as ``valr train`` (teachers, ``valr.feature_cache``, train/val data). Per teacher: every
distinct target image (by content hash) that is not cached yet is encoded in batches and written to shards of
``valr.teachers.FeatureCache`` (one directory per teacher, metadata naming encoder id and resolution).
Resumable: finished shards stay, so a rerun skips what is done. Under ``accelerate launch`` (or torchrun) each
process takes every N-th image. Failures (missing or unreadable image, encoder error) are listed with the
records that use the image; they do not stop the others. Exit status 1 when anything failed.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class TeacherSummary:
    name: str
    teacher_id: str
    references: int = 0  # step targets pointing at an image
    images: int = 0  # distinct image contents (this process's share)
    encoded: int = 0
    cached: int = 0  # skipped: already in the cache
    failed: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (path, reason, records)
    mean_feature_loss: float | None = None  # 1 - cos of always predicting the mean feature (see valr.align)

    def line(self) -> str:
        text = (f"teacher {self.name!r} ({self.teacher_id}): {self.references} target reference(s), {self.images} "
                f"distinct image(s): {self.encoded} encoded, {self.cached} skipped as cached, {len(self.failed)} "
                "failed")
        if self.mean_feature_loss is not None:
            text += (f"; predicting the mean feature gives alignment loss {self.mean_feature_loss:.3f} (a training "
                     "align loss near this has learned nothing image-specific)")
        return text


def _targets(cfg, splits: tuple[str, ...]) -> dict[Path, list[str]]:
    """Every step-target path of the chosen splits -> where it is used ("file:line (record id)")."""
    from valr.data.check import format_problems, read_entries

    refs: dict[Path, list[str]] = {}
    files = [f for s, f in (("train", cfg.train_data), ("val", cfg.val_data)) if s in splits and f]
    for f in files:
        entries, _ = read_entries(f)
        bad = [e for e in entries if e.reasons]
        if bad:
            raise ValueError(f"{len(bad)} bad record(s) in {f}:\n{format_problems(entries, f)}\nrun `valr data "
                             f"check {f}` first")
        for e in entries:
            for t in e.record.target_paths():
                if t is not None:
                    refs.setdefault(Path(t), []).append(e.where(f))
    return refs


def precompute_features(cfg, batch_size: int = 16, shard_size: int = 256, dtype: str = "float32",
                        splits: tuple[str, ...] = ("train", "val"), device: str | None = None,
                        progress: bool = True) -> list[TeacherSummary]:
    from tqdm import tqdm

    from valr.data.images import ImageLoadError, load_image
    from valr.teachers import FeatureCache, build_teacher

    v = cfg.valr
    if not v.feature_cache:
        raise ValueError("valr.feature_cache is not set: name the directory the features go to")
    if not v.teachers:
        raise ValueError("valr.teachers is empty: nothing to precompute")
    for m in cfg.plugins:
        importlib.import_module(m)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    refs = _targets(cfg, splits)
    backbone = None
    if any(s.kind == "self" for s in v.teachers):
        from valr.checkpoint import load_checkpoint

        backbone = load_checkpoint(cfg.model, device=device).backbone
    teachers = []
    for spec in v.teachers:  # build every teacher and open every cache first: mismatches fail before any work
        t = build_teacher(spec, backbone)
        if hasattr(t, "model"):
            t.model.to(device)
        teachers.append((t, FeatureCache(v.feature_cache, t, shard_size=shard_size, dtype=dtype)))
    summaries = []
    for teacher, cache in teachers:
        s = TeacherSummary(teacher.name, teacher.id, references=sum(len(r) for r in refs.values()))
        by_digest: dict[str, Path] = {}
        for p in sorted(refs):
            try:
                by_digest.setdefault(cache.key(p), p)
            except OSError as e:
                if rank == 0:
                    s.failed.append((str(p), f"cannot read: {e.strerror or e}", refs[p]))
        mine = [d for i, d in enumerate(sorted(by_digest)) if i % world == rank]
        s.images = len(mine)
        todo = []
        for d in mine:
            if cache.has_key(d):
                s.cached += 1
            else:
                todo.append(d)
        bar = tqdm(total=len(todo), desc=f"features {teacher.name}", unit="img", file=sys.stderr,
                   disable=not progress)
        for a in range(0, len(todo), batch_size):
            chunk, images = [], []
            for d in todo[a:a + batch_size]:
                try:
                    images.append(load_image(by_digest[d]))
                    chunk.append(d)
                except ImageLoadError as e:
                    s.failed.append((str(by_digest[d]), str(e).split("; replace")[0], refs[by_digest[d]]))
                    bar.update()
            if not chunk:
                continue
            try:
                feats = teacher.encode(images)
                done = list(zip(chunk, feats, strict=True))
            except Exception:  # one bad image must not sink the batch: retry one by one
                done = []
                for d, im in zip(chunk, images, strict=True):
                    try:
                        done.append((d, teacher.encode([im])[0]))
                    except Exception as e:  # noqa: BLE001 - reported per image
                        s.failed.append((str(by_digest[d]), f"encoder error: {type(e).__name__}: {e}",
                                         refs[by_digest[d]]))
            for d, (f, grid) in done:
                cache.put_key(d, f, grid)
                s.encoded += 1
            bar.update(len(chunk))
        cache.flush()
        bar.close()
        sample = cache.sample()
        if len(sample):
            from valr.align import mean_feature_loss

            s.mean_feature_loss = mean_feature_loss(sample)
        summaries.append(s)
    return summaries


def features_main(args) -> int:
    from valr.trainer import load_train_config

    try:
        cfg = load_train_config(args.config, args.overrides)
        splits = ("train", "val") if args.split == "both" else (args.split,)
        summaries = precompute_features(cfg, batch_size=args.batch_size, shard_size=args.shard_size,
                                        dtype=args.dtype, splits=splits, device=args.device,
                                        progress=not args.quiet)
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("VALR_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prefix = f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
    failed = 0
    for s in summaries:
        print(prefix + s.line())
        for path, reason, records in s.failed:
            where = ", ".join(records[:3]) + (f" and {len(records) - 3} more" if len(records) > 3 else "")
            print(f"{prefix}  failed: {path}: {reason} (used by {where})")
        failed += len(s.failed)
    print(f"{prefix}feature cache: {cfg.valr.feature_cache}")
    return 1 if failed else 0
