"""Validate a records file before training: every bad record is reported with its line and reason.

Checks, per record: the line parses as JSON and as a record (``valr.data.records.parse_record``), the id is not a
duplicate, every image file exists and decodes, every step target that is a separate file exists and decodes
(index targets are range-checked by the parser), and -- when a tokenizer and image processor are given -- the
laid-out sequence fits ``max_length``. Nothing is dropped silently: ``valr data check FILE --out-clean C
--out-rejects R`` writes every good record to C and every bad one (line, id, reasons, raw text) to R.

The same functions back the trainer's pre-flight check, so a bad record stops a run before any training step.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from valr.data.images import ImageLoadError, load_image
from valr.data.layout import LayoutConfig, LayoutError, layout_record
from valr.data.records import Record, RecordError, parse_record


@dataclass
class Entry:
    """One non-blank line of a records file: the parsed record, or why it does not parse."""

    line: int
    raw: str
    record: Record | None = None
    reasons: list[str] = field(default_factory=list)

    @property
    def record_id(self) -> str | None:
        if self.record is not None:
            return self.record.id
        try:
            obj = json.loads(self.raw)
        except json.JSONDecodeError:
            return None
        rid = obj.get("id") if isinstance(obj, dict) else None
        return None if rid is None else str(rid)

    def where(self, source: str | Path) -> str:
        rid = self.record_id
        return f"{source}:{self.line}" + (f" (record {rid!r})" if rid is not None else "")


def read_entries(path: str | Path) -> tuple[list[Entry], int]:
    """Parse every line (never stopping at the first bad one). Returns (entries, number of blank lines)."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: records file not found")
    entries, blank, seen = [], 0, {}
    with path.open(encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            raw = raw.rstrip("\n")
            if not raw.strip():
                blank += 1
                continue
            e = Entry(lineno, raw)
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as err:
                e.reasons.append(f"not valid JSON ({err.msg} at column {err.colno})")
            else:
                try:
                    e.record = parse_record(obj, root=path.parent, source=str(path), line=lineno)
                except RecordError as err:
                    # parse_record prefixes "file:line (record id): "; keep only the reason
                    msg = str(err)
                    e.reasons.append(msg.split("): ", 1)[1] if "): " in msg else msg.split(": ", 1)[-1])
            if e.record is not None:
                if e.record.id in seen:
                    e.reasons.append(f"duplicate record id {e.record.id!r} (first used on line {seen[e.record.id]})")
                else:
                    seen[e.record.id] = lineno
            entries.append(e)
    return entries, blank


class ImageSide:
    """What layout needs from a backbone without loading the model: the placeholder and ``image_inputs``."""

    def __init__(self, backbone_cls, image_processor, image_placeholder: str):
        self.image_processor = image_processor
        self.image_placeholder = image_placeholder
        self._image_inputs = backbone_cls.image_inputs

    @classmethod
    def of(cls, backbone) -> ImageSide:
        return cls(type(backbone), backbone.image_processor, backbone.image_placeholder)

    def image_inputs(self, images):
        return self._image_inputs(self, images)


def load_preprocessing(model_dir: str | Path):
    """(tokenizer with latent tokens and chat template, ImageSide, valr config) of a checkpoint, without its weights."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    from valr.backbones.qwen2_5_vl import QwenVLBackbone
    from valr.checkpoint import VALR_CONFIG
    from valr.config import ValrConfig
    from valr.tokens import QWEN_VL_CHAT_TEMPLATE, add_latent_tokens

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json)")
    model_type = AutoConfig.from_pretrained(model_dir, local_files_only=True).model_type
    if model_type not in ("qwen2_5_vl", "qwen2_vl"):
        raise ValueError(f"length checks know Qwen2(.5)-VL checkpoints only, not model_type {model_type!r}")
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    if not getattr(tok, "chat_template", None):
        tok.chat_template = QWEN_VL_CHAT_TEMPLATE
    add_latent_tokens(tok)
    ip = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    cfg = ValrConfig()
    if (model_dir / VALR_CONFIG).is_file():
        meta = json.loads((model_dir / VALR_CONFIG).read_text())
        cfg = ValrConfig.from_dict(meta.get("valr", {}), str(model_dir / VALR_CONFIG))
    return tok, ImageSide(QwenVLBackbone, ip, QwenVLBackbone.image_placeholder), cfg


def check_record(record: Record, *, decode: bool = True, tokenizer=None, image_side=None,
                 layout: LayoutConfig | None = None, latent=None) -> list[str]:
    """Reasons ``record`` is unusable (empty when it is fine)."""
    reasons: list[str] = []
    images = []
    for p in record.images:
        if not Path(p).is_file():
            reasons.append(f"image file {p} does not exist")
        elif decode:
            try:
                images.append(load_image(p))
            except ImageLoadError as e:
                reasons.append(str(e).split("; replace")[0])
    for i, (step, target) in enumerate(zip(record.steps, record.target_paths(), strict=True)):
        if step.target is None or step.target.file is None:
            continue
        if not Path(target).is_file():
            reasons.append(f"step {i}: target image file {target} does not exist")
        elif decode:
            try:
                load_image(target)
            except ImageLoadError as e:
                reasons.append(f"step {i}: target " + str(e).split("; replace")[0])
    if reasons or tokenizer is None or image_side is None or layout is None or layout.max_length is None:
        return reasons
    try:
        if not decode:
            images = [load_image(p) for p in record.images]
        counts = image_side.image_inputs(images).n_tokens
        layout_record(record, tokenizer, latent, counts, image_side.image_placeholder, layout)
    except (LayoutError, ImageLoadError) as e:
        msg = str(e)
        reasons.append(msg.split(": ", 1)[1] if msg.startswith("record ") else msg)
    return reasons


def check_entries(entries: Iterable[Entry], workers: int = 4, progress: bool = False, **kwargs) -> list[Entry]:
    """Run ``check_record`` on every parsed entry (threads: image decoding releases the GIL); adds reasons."""
    entries = list(entries)
    todo = [e for e in entries if e.record is not None]

    def one(e: Entry) -> list[str]:
        return check_record(e.record, **kwargs)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="checking records", unit="rec", file=sys.stderr)
    if workers > 1 and len(todo) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for e, reasons in zip(todo, pool.map(one, todo), strict=True):
                e.reasons.extend(reasons)
                if bar:
                    bar.update()
    else:
        for e in todo:
            e.reasons.extend(one(e))
            if bar:
                bar.update()
    if bar:
        bar.close()
    return entries


def format_problems(entries: list[Entry], source: str | Path, limit: int | None = 20) -> str:
    bad = [e for e in entries if e.reasons]
    shown = bad if limit is None else bad[:limit]
    lines = [f"{e.where(source)}: {'; '.join(e.reasons)}" for e in shown]
    if len(bad) > len(shown):
        lines.append(f"... and {len(bad) - len(shown)} more bad record(s)")
    return "\n".join(lines)


def write_outputs(entries: list[Entry], source: Path, out_clean: Path | None, out_rejects: Path | None) -> None:
    """Clean records keep their text verbatim when written beside the source (paths stay valid); elsewhere they are
    re-serialised with paths relative to the new file. Rejects are JSONL: line, id, reasons, raw line."""
    if out_clean is not None:
        out_clean = Path(out_clean)
        out_clean.parent.mkdir(parents=True, exist_ok=True)
        same_dir = out_clean.parent.resolve() == source.parent.resolve()
        tmp = out_clean.with_name(out_clean.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            for e in entries:
                if e.reasons:
                    continue
                text = e.raw if same_dir else json.dumps(e.record.to_json(root=out_clean.parent), ensure_ascii=False)
                fh.write(text + "\n")
        tmp.replace(out_clean)
    if out_rejects is not None:
        out_rejects = Path(out_rejects)
        out_rejects.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_rejects.with_name(out_rejects.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            for e in entries:
                if e.reasons:
                    fh.write(json.dumps({"source": str(source), "line": e.line, "id": e.record_id,
                                         "reasons": e.reasons, "raw": e.raw}, ensure_ascii=False) + "\n")
        tmp.replace(out_rejects)


def check_main(args) -> int:
    """``valr data check``: print every bad record, write clean/rejects files, exit 1 when any record is bad."""
    from valr.tokens import LatentTokenIds

    source = Path(args.file)
    model, max_length, k = args.model, args.max_length, args.k
    if args.config:
        from valr.trainer import load_train_config

        tc = load_train_config(args.config, [])
        model = model or tc.model
        max_length = max_length if max_length is not None else tc.max_length
        if k is None:
            k = tc.valr.k if tc.stage == 2 else 0
    tok = side = layout = latent = None
    if model:
        tok, side, vcfg = load_preprocessing(model)
        k = vcfg.k if k is None else k
        if max_length is None:
            print("note: --model given without --max-length: sequence lengths are not checked", file=sys.stderr)
        layout = LayoutConfig(k=k, step_delimiter=vcfg.step_delimiter, answer_prefix=vcfg.answer_prefix,
                              max_length=max_length, latent_after=vcfg.latent_after)
        latent = LatentTokenIds.from_tokenizer(tok) if k > 0 else None
    entries, blank = read_entries(source)
    check_entries(entries, workers=args.workers, progress=not args.quiet, tokenizer=tok, image_side=side,
                  layout=layout, latent=latent)
    bad = [e for e in entries if e.reasons]
    if bad:
        print(format_problems(entries, source, limit=None))
    write_outputs(entries, source, args.out_clean, args.out_rejects)
    what = "images decoded" + (f", lengths checked against max_length={max_length} (K={k})"
                               if layout is not None and max_length is not None else "")
    print(f"{source}: {len(entries)} record(s): {len(entries) - len(bad)} clean, {len(bad)} rejected"
          f"{f', {blank} blank line(s) skipped' if blank else ''} ({what})")
    for label, p in (("clean", args.out_clean), ("rejects", args.out_rejects)):
        if p:
            print(f"wrote {label} records to {p}")
    return 1 if bad else 0
