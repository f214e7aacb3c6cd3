"""Predictions files: JSONL, one object per line, keyed by item id.

Each line is an object with ``id`` (string or integer) and ``prediction`` (the answer to score: a string, or a
number which is converted with ``str``). ``raw`` (the model's full output) may be given too; a line with
``raw`` but no ``prediction`` gets its prediction extracted from ``raw`` by the scorer. Other fields are kept
in ``extra`` (e.g. ``generated_length`` for the length analysis) and otherwise ignored. Blank lines are
skipped.

The reader never drops a line silently: every malformed line (invalid JSON, not an object, missing or bad
``id``, bad ``prediction``/``raw``, an id already seen, which names the lines of both) is collected and
reported together in one ``PredictionsError`` with ``file:line`` and the reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_REPORTED = 20


class PredictionsError(ValueError):
    """A predictions file is malformed; the message lists every bad line with its number."""


@dataclass(frozen=True)
class Prediction:
    id: str
    prediction: str | None
    raw: str | None = None
    line: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _parse_line(obj: Any) -> tuple[str, str | None, str | None, dict[str, Any]]:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        raise ValueError("missing field 'id'")
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
        raise ValueError(f"field 'id' must be a non-empty string or integer, got {rid!r}")
    pred = obj.get("prediction")
    raw = obj.get("raw")
    if raw is not None and not isinstance(raw, str):
        raise ValueError(f"field 'raw' must be a string, got {type(raw).__name__}")
    if pred is None:
        if raw is None:
            raise ValueError("needs 'prediction' (a string; write \"\" for an empty answer) or 'raw'")
    elif isinstance(pred, bool) or not isinstance(pred, (str, int, float)):
        raise ValueError(f"field 'prediction' must be a string or number, got {type(pred).__name__}")
    else:
        pred = str(pred)
    extra = {k: v for k, v in obj.items() if k not in ("id", "prediction", "raw")}
    return str(rid), pred, raw, extra


def read_predictions(path: str | Path) -> dict[str, Prediction]:
    """Read a predictions JSONL file into ``{id: Prediction}``, or raise listing every bad line."""
    path = Path(path)
    if not path.is_file():
        raise PredictionsError(f"{path}: predictions file not found")
    out: dict[str, Prediction] = {}
    errors: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})")
                continue
            try:
                rid, pred, raw, extra = _parse_line(obj)
            except ValueError as e:
                errors.append(f"{path}:{lineno}: {e}")
                continue
            if rid in out:
                errors.append(f"{path}:{lineno}: duplicate id {rid!r} (first seen on line {out[rid].line}, "
                              f"again on line {lineno}); keep one prediction per id")
                continue
            out[rid] = Prediction(rid, pred, raw, lineno, extra)
    if errors:
        shown = errors[:MAX_REPORTED]
        more = f"\n... and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
        raise PredictionsError(f"{path}: {len(errors)} malformed line(s):\n" + "\n".join(shown) + more)
    return out


def write_predictions(path: str | Path, predictions: Iterable[Prediction]) -> None:
    """Write predictions as JSONL (``id``, ``prediction``, ``raw`` when known, then the extra fields)."""
    with Path(path).open("w", encoding="utf-8") as fh:
        for p in predictions:
            obj: dict[str, Any] = {"id": p.id, "prediction": p.prediction}
            if p.raw is not None:
                obj["raw"] = p.raw
            obj.update(p.extra)
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
