"""Accuracy against generated length: fixed-width buckets, several models, JSON and PNG outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from valr.eval.length import accuracy_by_length, bucket_edges, length_main, length_report, plot_length_report


def test_bucket_edges() -> None:
    assert bucket_edges([0, 95, 1000]) == [0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]
    assert bucket_edges([10, 250], width=100) == [0, 100, 200, 300]
    assert bucket_edges([7], n_buckets=3) == [0, 3, 6, 9]
    assert bucket_edges([0, 0]) == [0, 1]
    with pytest.raises(ValueError):
        bucket_edges([])
    with pytest.raises(ValueError):
        bucket_edges([-1])
    with pytest.raises(ValueError):
        bucket_edges([5], width=0)


def test_accuracy_by_length_hand_computed() -> None:
    pairs = [(5, 1.0), (9.99, 0.0), (10, 1.0), (15, 0.5), (20, 1.0), (25, 1.0)]
    res = accuracy_by_length(pairs, [0, 10, 20])
    assert res["buckets"] == [
        {"lo": 0, "hi": 10, "n": 2, "accuracy": 0.5},
        {"lo": 10, "hi": 20, "n": 3, "accuracy": pytest.approx(2.5 / 3)},  # last bucket holds its upper edge
    ]
    assert res["n_out_of_range"] == 1
    assert res["n"] == 6
    assert res["accuracy"] == pytest.approx(4.5 / 6)
    empty = accuracy_by_length([(1, 1.0)], [0, 10, 20])
    assert empty["buckets"][1] == {"lo": 10, "hi": 20, "n": 0, "accuracy": None}
    with pytest.raises(ValueError, match="increasing"):
        accuracy_by_length(pairs, [0, 0, 1])


def test_report_shares_edges_and_plots(tmp_path: Path) -> None:
    report = length_report({"base": [(10, 1.0), (50, 0.0)], "valr": [(100, 1.0), (390, 1.0)]}, width=100)
    assert report["edges"] == [0, 100, 200, 300, 400]
    assert [b["n"] for b in report["models"]["base"]["buckets"]] == [2, 0, 0, 0]
    assert [b["accuracy"] for b in report["models"]["valr"]["buckets"]] == [None, 1.0, None, 1.0]
    png = plot_length_report(report, tmp_path / "fig.png", title="VSI-Bench")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100
    json.dumps(report)  # JSON-ready


def test_length_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "r.jsonl"
    record = {"images": [], "question": "?", "steps": [], "answer": "A"}
    data.write_text("".join(json.dumps({"id": str(i), **record}) + "\n" for i in range(4)))
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps({"id": str(i), "prediction": p, "generated_length": n}) + "\n"
                         for i, p, n in [(0, "A", 10), (1, "B", 30), (2, "A", 60), (3, "A", 90)]))
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps({"id": "0", "prediction": "A", "generated_length": 80}) + "\n")
    out = tmp_path / "out" / "len"
    assert length_main(["--benchmark", "records", "--data", str(data), "--predictions", f"base={a}", str(b),
                        "--out", str(out), "--width", "50"]) == 0
    report = json.loads((tmp_path / "out" / "len.json").read_text())
    assert report["edges"] == [0, 50, 100]
    assert [bk["accuracy"] for bk in report["models"]["base"]["buckets"]] == [0.5, 1.0]
    assert report["models"]["b"]["n"] == 1
    assert (tmp_path / "out" / "len.png").is_file()
    assert "base:" in capsys.readouterr().out
    b.write_text(json.dumps({"id": "0", "prediction": "A"}) + "\n")
    assert length_main(["--benchmark", "records", "--data", str(data), "--predictions", str(b),
                        "--out", str(out)]) == 2
    assert f"{b}:1" in capsys.readouterr().err
