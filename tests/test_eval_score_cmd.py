"""`valr eval score` end to end on a VSI-Bench parquet (no videos needed) and the error paths."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from valr.eval.score_cmd import read_id_list, score_main

ROWS = [
    ("0", "object_counting", None, "10"),
    ("1", "object_counting", None, "10"),
    ("2", "object_abs_distance", None, "2.0"),
    ("3", "object_size_estimation", None, "50"),
    ("4", "room_size_estimation", None, "100"),
    ("5", "object_rel_direction_easy", ["A. left", "B. right"], "A"),
    ("6", "object_rel_direction_easy", ["A. left", "B. right"], "B"),
    ("7", "object_rel_direction_medium", ["A. left", "B. right", "C. back"], "C"),
    ("8", "object_rel_direction_hard", ["A. front-left", "B. front-right", "C. back-left", "D. back-right"],
     "D"),
    ("9", "object_rel_distance", ["A. sofa", "B. lamp", "C. tv", "D. bed"], "B"),
    ("10", "route_planning", ["A. Turn Left", "B. Turn Right"], "A"),
    ("11", "obj_appearance_order", ["A. x", "B. y", "C. z", "D. w"], "C"),
]
PREDS = {"0": "10", "1": "11", "2": "3", "4": "abc", "5": "A", "6": "C", "7": "C", "8": "A", "9": "B. yes",
         "10": " A", "11": "c"}
EXPECTED_OVERALL = (0.95 + 0.1 + 0 + 0 + 1 + 0.5 + 0 + 1) / 8


@pytest.fixture
def vsi_files(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"id": int(i), "dataset": "scannet", "scene_name": f"scene{i}", "question_type": t, "question": "q?",
         "options": o, "ground_truth": gt} for i, t, o, gt in ROWS]), data)
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"id": int(k), "prediction": v}) + "\n" for k, v in PREDS.items()))
    return data, preds


def test_score_json_last_line(vsi_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    data, preds = vsi_files
    args = ["--benchmark", "vsibench", "--data", str(data), "--predictions", str(preds), "--json"]
    assert score_main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["overall"] == pytest.approx(EXPECTED_OVERALL)
    assert result["tasks"]["object_counting"] == pytest.approx(0.95)
    assert result["tasks"]["object_rel_direction"] == pytest.approx(0.5)
    assert result["n"] == 12 and result["n_missing"] == 1
    table = "\n".join(out[:-1])
    assert "object_rel_direction" in table and "44.38" in table  # overall as a percentage
    assert "question_type: object_rel_direction_easy" in table


def test_score_table_only_and_options(vsi_files: tuple[Path, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    data, preds = vsi_files
    ids = tmp_path / "debiased.txt"
    ids.write_text("1\n6\n7\n")
    code = score_main(["--benchmark", "VSI-Bench", "--data", str(data), "--predictions", str(preds),
                       "--debiased-ids", str(ids), "--token-rule", "whitespace",
                       "--video-root", str(tmp_path), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["overall"] == pytest.approx(4.55 / 8)
    assert result["debiased"]["overall"] == pytest.approx((0.9 + 0.5) / 2)
    assert score_main(["--benchmark", "vsibench", "--data", str(data), "--predictions", str(preds)]) == 0
    out = capsys.readouterr().out
    assert "{" not in out and "overall" in out


def test_score_reports_malformed_predictions(vsi_files: tuple[Path, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    data, _ = vsi_files
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prediction": "A"}\n{"id": 1, "prediction": "B"}\n{oops\n')
    assert score_main(["--benchmark", "vsibench", "--data", str(data), "--predictions", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: duplicate id '1' (first seen on line 1, again on line 2)" in err
    assert f"{bad}:3: invalid JSON" in err


def test_score_errors(vsi_files: tuple[Path, Path], tmp_path: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    data, preds = vsi_files
    other = tmp_path / "other.jsonl"
    other.write_text('{"id": "x1", "prediction": "A"}\n')
    assert score_main(["--benchmark", "vsibench", "--data", str(data), "--predictions", str(other)]) == 2
    assert "none of the 1 prediction ids matches" in capsys.readouterr().err
    assert score_main(["--benchmark", "nope", "--data", str(data), "--predictions", str(preds)]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err
    assert score_main(["--benchmark", "mmvp", "--data", str(data), "--predictions", str(preds),
                       "--video-root", "x"]) == 2
    assert "does not take option(s) ['video_root']" in capsys.readouterr().err
    assert score_main(["--data", str(data)]) == 2  # argparse usage error
    assert score_main(["--help"]) == 0


def test_score_extract_from_raw(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "r.jsonl"
    record = {"images": [], "question": "?", "steps": []}
    data.write_text(json.dumps({"id": "a", **record, "answer": "B"}) + "\n"
                    + json.dumps({"id": "b", **record, "answer": "4"}) + "\n")
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"id": "a", "raw": "A seems wrong. The answer is (B)."}) + "\n"
                     + json.dumps({"id": "b", "prediction": "9", "raw": "I count 4."}) + "\n")
    args = ["--benchmark", "records", "--data", str(data), "--predictions", str(preds), "--json"]
    assert score_main(args) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["overall"] == pytest.approx(0.5)
    assert score_main([*args, "--extract"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["overall"] == pytest.approx(1.0)


def test_read_id_list_formats(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("1\n\n 2 \n")
    (tmp_path / "b.json").write_text("[1, \"2\"]")
    (tmp_path / "c.jsonl").write_text('{"id": 1}\n{"id": "2"}\n')
    pq.write_table(pa.Table.from_pylist([{"id": 1, "question": "q"}, {"id": 2, "question": "q"}]),
                   tmp_path / "d.parquet")
    for name in ("a.txt", "b.json", "c.jsonl", "d.parquet"):
        assert read_id_list(tmp_path / name) == ["1", "2"], name
