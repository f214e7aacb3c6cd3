"""Predictions files: parsing, and every malformed line reported with file:line and reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from valr.eval.predictions import Prediction, PredictionsError, read_predictions, write_predictions


def test_read_predictions(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join([
        json.dumps({"id": "a", "prediction": "B", "generated_length": 120}),
        "",
        json.dumps({"id": 7, "prediction": 3.5}),
        json.dumps({"id": "c", "raw": "The answer is (C).", "model": "x"}),
        json.dumps({"id": "d", "prediction": "", "raw": "..."}),
    ]) + "\n")
    preds = read_predictions(path)
    assert list(preds) == ["a", "7", "c", "d"]
    assert preds["a"] == Prediction("a", "B", None, 1, {"generated_length": 120})
    assert preds["7"].prediction == "3.5" and preds["7"].line == 3
    assert preds["c"].prediction is None and preds["c"].raw == "The answer is (C)."
    assert preds["c"].extra == {"model": "x"}
    assert preds["d"].prediction == ""


def test_malformed_lines_all_reported(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([
        json.dumps({"id": "a", "prediction": "A"}),          # 1 ok
        "{not json",                                          # 2
        json.dumps({"prediction": "A"}),                      # 3 no id
        json.dumps(["a", "A"]),                               # 4 not an object
        json.dumps({"id": "b"}),                              # 5 neither prediction nor raw
        json.dumps({"id": "a", "prediction": "B"}),          # 6 duplicate of line 1
        json.dumps({"id": "c", "prediction": ["A"]}),        # 7 bad type
        json.dumps({"id": True, "prediction": "A"}),         # 8 bad id
        json.dumps({"id": "e", "prediction": "A", "raw": 5}),  # 9 bad raw
    ]) + "\n")
    with pytest.raises(PredictionsError) as info:
        read_predictions(path)
    msg = str(info.value)
    assert f"{path}: 8 malformed line(s)" in msg
    assert f"{path}:2: invalid JSON" in msg
    assert f"{path}:3: missing field 'id'" in msg
    assert f"{path}:4: expected a JSON object, got list" in msg
    assert f"{path}:5: needs 'prediction'" in msg
    assert f"{path}:6: duplicate id 'a' (first seen on line 1, again on line 6)" in msg
    assert f"{path}:7: field 'prediction' must be a string or number, got list" in msg
    assert f"{path}:8: field 'id' must be a non-empty string or integer" in msg
    assert f"{path}:9: field 'raw' must be a string" in msg


def test_many_errors_truncated(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("x\n" * 25)
    with pytest.raises(PredictionsError, match=r"25 malformed line\(s\)(.|\n)*and 5 more"):
        read_predictions(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PredictionsError, match="predictions file not found"):
        read_predictions(tmp_path / "none.jsonl")


def test_round_trip(tmp_path: Path) -> None:
    preds = [Prediction("a", "B", "raw text", extra={"generated_length": 9}), Prediction("b", "4")]
    write_predictions(tmp_path / "o.jsonl", preds)
    back = read_predictions(tmp_path / "o.jsonl")
    a = back["a"]
    assert (a.prediction, a.raw, a.extra) == ("B", "raw text", {"generated_length": 9})
    assert back["b"].prediction == "4" and back["b"].raw is None
