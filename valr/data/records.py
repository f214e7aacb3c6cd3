"""The record: one training or evaluation example, as stored one JSON object per line.

A record is the unit that flows record -> layout -> batch -> engine. Its JSON form::

    {"id": "scene-17-q3",
     "images": ["views/17_0.png", "views/17_1.png"],       # model inputs, in order (video frames too)
     "question": "Which object ...?",
     "steps": ["Look at view 1 ...",                          # a plain string: target chosen by default rule
               {"text": "In view 2 ...", "target": 1},        # target: index into "images"
               {"text": "The helper sketch ...", "target": "helpers/17_h.png"}],  # or an unseen image file
     "answer": "B"}

Optional fields: ``video`` (a list of frame paths, appended to ``images`` as one multi-image input and kept
apart for bookkeeping), ``meta`` (free-form dict, carried through untouched).

Default alignment target of a step given as a plain string: image 0 when the record has exactly one image (the
paper's single-view rule), otherwise no target (the segment gets latents but no alignment loss).
Relative paths are resolved against the directory of the JSONL file that holds the record.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class RecordError(ValueError):
    """A record is malformed. The message names the file, line and record id, and what to do."""


@dataclass(frozen=True)
class StepTarget:
    """Where a step's alignment target comes from: an input image (by index) or a separate image file."""

    image_index: int | None = None
    file: Path | None = None

    def __post_init__(self) -> None:
        if (self.image_index is None) == (self.file is None):
            raise ValueError("StepTarget needs exactly one of image_index or file")


@dataclass(frozen=True)
class Step:
    text: str
    target: StepTarget | None = None


@dataclass(frozen=True)
class Record:
    id: str
    question: str
    steps: tuple[Step, ...]
    answer: str
    images: tuple[Path, ...] = ()
    n_video_frames: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def target_paths(self) -> list[Path | None]:
        """The image file each step aligns to (None where the step has no target)."""
        out: list[Path | None] = []
        for step in self.steps:
            if step.target is None:
                out.append(None)
            elif step.target.file is not None:
                out.append(step.target.file)
            else:
                out.append(self.images[step.target.image_index])
        return out

    def to_json(self, root: Path | None = None) -> dict[str, Any]:
        """The JSON form; paths are written relative to ``root`` when they lie under it."""

        def rel(p: Path) -> str:
            if root is None:
                return str(p)
            try:
                return str(p.resolve().relative_to(root.resolve()))
            except ValueError:  # outside root: absolute, since a relative path would be read against root
                return str(p.resolve())

        n_still = len(self.images) - self.n_video_frames
        steps: list[Any] = []
        for s in self.steps:
            if s.target is None:
                steps.append({"text": s.text, "target": None})
            elif s.target.file is not None:
                steps.append({"text": s.text, "target": rel(s.target.file)})
            else:
                steps.append({"text": s.text, "target": s.target.image_index})
        out: dict[str, Any] = {
            "id": self.id,
            "images": [rel(p) for p in self.images[:n_still]],
            "question": self.question,
            "steps": steps,
            "answer": self.answer,
        }
        if self.n_video_frames:
            out["video"] = [rel(p) for p in self.images[n_still:]]
        if self.meta:
            out["meta"] = self.meta
        return out


def _where(source: str, line: int | None, rid: Any) -> str:
    loc = source if line is None else f"{source}:{line}"
    return f"{loc} (record {rid!r})" if rid is not None else loc


def parse_record(obj: Any, *, root: Path = Path("."), source: str = "<record>", line: int | None = None,
                 require_steps: bool = True) -> Record:
    """Validate one JSON object and build a Record. Raises RecordError saying where and what to fix."""
    rid = obj.get("id") if isinstance(obj, dict) else None
    where = _where(source, line, rid)

    def fail(msg: str) -> RecordError:
        return RecordError(f"{where}: {msg}")

    if not isinstance(obj, dict):
        raise fail(f"expected a JSON object, got {type(obj).__name__}")
    known = {"id", "images", "video", "question", "steps", "answer", "meta"}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise fail(f"unknown field(s) {unknown}; allowed fields are {sorted(known)}")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
        raise fail("field 'id' must be a non-empty string or integer")
    for key in ("question", "answer"):
        if not isinstance(obj.get(key), str):
            raise fail(f"field {key!r} must be a string")

    def paths(key: str) -> list[Path]:
        value = obj.get(key) or []
        if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
            raise fail(f"field {key!r} must be a list of image paths (strings)")
        return [p if (p := Path(v)).is_absolute() else root / p for v in value]

    stills, frames = paths("images"), paths("video")
    images = stills + frames

    raw_steps = obj.get("steps")
    if not isinstance(raw_steps, list):
        raise fail("field 'steps' must be a list of strings or {'text', 'target'} objects")
    if require_steps and not raw_steps:
        raise fail("record has no reasoning steps; give at least one step (split raw CoT text with "
                   "valr.data.steps.split_steps)")
    steps: list[Step] = []
    for i, raw in enumerate(raw_steps):
        if isinstance(raw, str):
            text, tgt_raw, default = raw, None, True
        elif isinstance(raw, dict) and isinstance(raw.get("text"), str) and set(raw) <= {"text", "target"}:
            text, tgt_raw, default = raw["text"], raw.get("target"), "target" not in raw
        else:
            raise fail(f"step {i} must be a string or an object with 'text' (string) and optional 'target'")
        if not text.strip():
            raise fail(f"step {i} is empty")
        target: StepTarget | None
        if tgt_raw is None:
            target = StepTarget(image_index=0) if default and len(images) == 1 else None
        elif isinstance(tgt_raw, bool):
            raise fail(f"step {i}: target must be an image index or a file path, got {tgt_raw!r}")
        elif isinstance(tgt_raw, int):
            if not 0 <= tgt_raw < len(images):
                raise fail(f"step {i}: target image index {tgt_raw} is out of range; the record has "
                           f"{len(images)} image(s) (indices 0..{len(images) - 1})")
            target = StepTarget(image_index=tgt_raw)
        elif isinstance(tgt_raw, str) and tgt_raw:
            p = Path(tgt_raw)
            target = StepTarget(file=p if p.is_absolute() else root / p)
        else:
            raise fail(f"step {i}: target must be an image index, a file path or null, got {tgt_raw!r}")
        steps.append(Step(text=text, target=target))

    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise fail("field 'meta' must be an object")
    return Record(id=str(rid), question=obj["question"], steps=tuple(steps), answer=obj["answer"],
                  images=tuple(images), n_video_frames=len(frames), meta=meta)


def iter_records(path: str | Path, *, require_steps: bool = True) -> Iterator[Record]:
    """Yield the records of a JSONL file, failing on the first bad line with its line number."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: records file not found")
    root = path.parent
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield parse_record(obj, root=root, source=str(path), line=lineno, require_steps=require_steps)


def load_records(path: str | Path, *, require_steps: bool = True) -> list[Record]:
    return list(iter_records(path, require_steps=require_steps))


def write_records(records: list[Record], path: str | Path) -> None:
    """Write records as JSONL (atomically), with paths relative to the file's directory where possible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r.to_json(root=path.parent), ensure_ascii=False) + "\n")
    tmp.replace(path)
