"""`valr data check` reports every bad record with its line; `valr data convert-llava` converts CoT data."""

from __future__ import annotations

import json

import pytest

from valr.cli import main
from valr.data import iter_records, load_records
from valr.data.smoke import write_smoke_setup
from valr.tiny import TinyShape

SMALL = TinyShape(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64, vision_depth=1, vision_hidden=16,
                  vision_heads=1)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return write_smoke_setup(tmp_path_factory.mktemp("smoke"), n_train=4, n_val=0, shape=SMALL)


def test_check_reports_every_bad_line_and_writes_clean_and_rejects(smoke, tmp_path, capsys):
    root = smoke["train"].parent
    (root / "corrupt.png").write_bytes(b"\x89PNG not really")
    good = {"id": "good", "images": ["images/train_0000.png"], "question": "Q?", "steps": ["a.", "b."],
            "answer": "A"}
    lines = [
        json.dumps(good),                                                                   # 1 ok
        "{broken",                                                                          # 2 bad JSON
        "",                                                                                 # 3 blank
        json.dumps(dict(good, id="extra", colour="red")),                                   # 4 unknown field
        json.dumps(dict(good, id="missing", images=["images/nope.png"])),                   # 5 missing image
        json.dumps(dict(good, id="corrupt", images=["corrupt.png"])),                       # 6 undecodable
        json.dumps(dict(good, id="index", steps=[{"text": "x", "target": 3}])),             # 7 target out of range
        json.dumps(dict(good, id="dangling", steps=[{"text": "x", "target": "gone.png"}])),  # 8 missing target
        json.dumps(dict(good, id="good")),                                                  # 9 duplicate id
        json.dumps(dict(good, id="long", steps=["word " * 300])),                           # 10 over-length
        json.dumps(dict(good, id="fine2", steps=[{"text": "x", "target": "images/train_0001.png"}])),  # 11 ok
    ]
    src = root / "mixed.jsonl"
    src.write_text("\n".join(lines) + "\n")
    clean, rejects = tmp_path / "out" / "clean.jsonl", tmp_path / "out" / "rejects.jsonl"
    code = main(["data", "check", str(src), "--out-clean", str(clean), "--out-rejects", str(rejects),
                 "--model", str(smoke["model"]), "--max-length", "400", "--k", "4", "--quiet"])
    out = capsys.readouterr().out
    assert code == 1
    expect = {2: "not valid JSON", 4: "unknown field(s) ['colour']", 5: "images/nope.png does not exist",
              6: "cannot read image", 7: "target image index 3 is out of range",
              8: "step 0: target image file", 9: "duplicate record id 'good' (first used on line 1)",
              10: "over max_length=400"}
    for line, reason in expect.items():
        hit = [x for x in out.splitlines() if x.startswith(f"{src}:{line}")]
        assert hit and reason in hit[0], (line, out)
    assert f"{src}:10 (record 'long'): laid-out sequence has" in out
    assert "10 record(s): 2 clean, 8 rejected, 1 blank line(s) skipped" in out
    # nothing dropped silently: clean + rejects = every record; the clean file (elsewhere) still resolves paths
    kept = load_records(clean)
    assert [r.id for r in kept] == ["good", "fine2"] and all(p.is_file() for r in kept for p in r.images)
    assert kept[1].target_paths()[0].is_file()
    bad = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert [b["line"] for b in bad] == sorted(expect) and all(b["reasons"] and b["raw"] for b in bad)
    # beside the source the clean file keeps the lines verbatim
    assert main(["data", "check", str(src), "--out-clean", str(root / "c.jsonl"), "--quiet"]) == 1
    assert (root / "c.jsonl").read_text().splitlines()[0] == lines[0]
    assert main(["data", "check", str(root / "c.jsonl"), "--quiet"]) == 0


def test_convert_llava(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for n in ("a", "b"):
        Image.new("RGB", (32, 32)).save(tmp_path / "imgs" / f"{n}.png")
    items = [
        {"id": "s1", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nHow many cubes?"},
            {"from": "gpt", "value": "Step 1: Find the cubes.\nStep 2: Count them: 3.\nAnswer: 3"}]},
        {"id": "t1", "images": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "<image><image> Same object?"},
            {"from": "gpt", "value": "<think>The first view shows a mug.\n\nThe second view shows the same mug."
                                     "</think><answer>yes</answer>"}],
         },
        {"id": "noanswer", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image> Hm?"}, {"from": "gpt", "value": "Just text without a verdict."}]},
        {"id": "multi", "image": "b.png", "conversations": [
            {"from": "human", "value": "<image> Colour?"}, {"from": "gpt", "value": "It is dark.\nAnswer: black"},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes.\nAnswer: yes"}]},
    ]
    src = tmp_path / "llava.json"
    src.write_text(json.dumps(items))
    out = tmp_path / "records" / "train.jsonl"
    assert main(["data", "convert-llava", str(src), str(out), "--image-root", str(tmp_path / "imgs")]) == 0
    text = capsys.readouterr().out
    assert "3 record(s) written" in text and "1 rejected" in text and "1 item(s) had more than one" in text
    recs = list(iter_records(out))
    s1, t1, multi = recs
    assert s1.question == "How many cubes?" and s1.steps[0].text == "Step 1: Find the cubes." and s1.answer == "3"
    assert s1.images[0] == (tmp_path / "imgs" / "a.png").resolve() and s1.target_paths() == [s1.images[0]] * 2
    assert t1.question == "Same object?" and len(t1.steps) == 2 and t1.answer == "yes"
    assert t1.target_paths() == [None, None]  # several images, no explicit targets: none by default
    assert multi.answer == "black" and [s.text for s in multi.steps] == ["It is dark."]
    rejected = [json.loads(x) for x in (out.parent / "train.rejects.jsonl").read_text().splitlines()]
    assert rejected == [{"index": 2, "id": "noanswer", "reason": rejected[0]["reason"]}]
    assert "no final answer" in rejected[0]["reason"]
