"""Records, step splitting and layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from valr.data import LayoutConfig, make_example, parse_record, split_answer, split_steps
from valr.data.layout import IGNORE, LayoutError, layout_record
from valr.data.records import RecordError, load_records, write_records


# -- step splitting -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, steps", [
    ("Step 1: find the cube.\nStep 2: it is red.", ["Step 1: find the cube.", "Step 2: it is red."]),
    ("1. find\nthe cube\n2. red", ["1. find the cube", "2. red"]),
    ("**Step 1** look\n**Step 2** see", ["**Step 1** look", "**Step 2** see"]),
    ("(1) a\n(2) b\n(3) c", ["(1) a", "(2) b", "(3) c"]),
    ("First look.\nThen count.\n\n", ["First look.", "Then count."]),
    ("Para one\nstill one.\n\nPara two.", ["Para one still one.", "Para two."]),
    ("Intro text.\nStep 1: a\nStep 2: b", ["Intro text.", "Step 1: a", "Step 2: b"]),
    ("Only one line", ["Only one line"]),
])
def test_split_steps(text, steps):
    assert split_steps(text) == steps


def test_split_answer():
    body, ans = split_answer("Step 1: look.\nStep 2: count.\nAnswer: 3")
    assert ans == "3" and split_steps(body) == ["Step 1: look.", "Step 2: count."]
    assert split_answer("no answer here") == ("no answer here", None)


# -- records --------------------------------------------------------------------------------------------------
def test_record_defaults_and_round_trip(tmp_path, image_dir):
    r = parse_record({"id": 7, "images": [str(image_dir / "a.png")], "question": "q", "steps": ["s1", "s2"],
                      "answer": "A"})
    assert r.id == "7" and all(s.target.image_index == 0 for s in r.steps)  # single-view default
    multi = parse_record({"id": "m", "images": ["a.png", "b.png"], "video": ["c.png"], "question": "q",
                          "steps": ["s1", {"text": "s2", "target": 2}, {"text": "s3", "target": "h.png"}],
                          "answer": "A"}, root=image_dir)
    assert multi.steps[0].target is None  # several images and no target given: no alignment
    assert multi.target_paths()[1] == image_dir / "c.png" and multi.n_video_frames == 1
    assert multi.target_paths()[2] == image_dir / "h.png"
    path = image_dir / "recs.jsonl"
    write_records([r, multi], path)
    back = load_records(path)
    assert back[1] == multi and back[0].steps == r.steps


def test_written_records_resolve_from_another_directory_with_relative_inputs(tmp_path, image_dir, monkeypatch):
    """Records read with a cwd-relative path and written elsewhere still point at the same files."""
    (tmp_path / "src").mkdir()
    shutil.copy(image_dir / "a.png", tmp_path / "src" / "a.png")
    monkeypatch.chdir(tmp_path)
    src = Path("src") / "one.jsonl"
    src.write_text(json.dumps({"id": "r", "images": ["a.png"], "question": "q", "steps": ["s"], "answer": "A"}))
    write_records(load_records(src), Path("elsewhere") / "copy.jsonl")
    back = load_records(tmp_path / "elsewhere" / "copy.jsonl")
    assert back[0].images[0].resolve() == (tmp_path / "src" / "a.png").resolve() and back[0].images[0].is_file()


@pytest.mark.parametrize("obj, message", [
    ({"id": "x", "question": "q", "steps": [], "answer": "a"}, "no reasoning steps"),
    ({"id": "x", "images": ["a.png"], "question": "q", "steps": [{"text": "s", "target": 3}], "answer": "a"},
     "target image index 3 is out of range"),
    ({"id": "x", "question": "q", "steps": ["s"], "answer": "a", "colour": 1}, "unknown field"),
    ({"question": "q", "steps": ["s"], "answer": "a"}, "'id'"),
    ({"id": "x", "question": "q", "steps": ["  "], "answer": "a"}, "step 0 is empty"),
    ({"id": "x", "question": "q", "steps": ["s"], "answer": 3}, "'answer' must be a string"),
])
def test_bad_records_name_the_record(obj, message):
    with pytest.raises(RecordError, match=message) as info:
        parse_record(obj, source="train.jsonl", line=12)
    assert "train.jsonl:12" in str(info.value)


def test_bad_json_line_reports_line_number(tmp_path):
    path = tmp_path / "r.jsonl"
    good = {"id": "a", "question": "q", "steps": ["s"], "answer": "x"}
    path.write_text(json.dumps(good) + "\n\n{not json\n")
    with pytest.raises(RecordError, match=r"r.jsonl:3: not valid JSON"):
        load_records(path)


def test_missing_image_is_a_clear_error(tiny, tmp_path):
    model, tok, _, bb, latent = tiny
    r = parse_record({"id": "gone", "images": ["nope.png"], "question": "q", "steps": ["s"], "answer": "a"},
                     root=tmp_path)
    with pytest.raises(ValueError, match="record 'gone': image file .*nope.png does not exist"):
        make_example(r, tok, bb, LayoutConfig(k=4), latent)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    r2 = parse_record({"id": "bad", "images": ["bad.png"], "question": "q", "steps": ["s"], "answer": "a"},
                      root=tmp_path)
    with pytest.raises(ValueError, match="record 'bad': cannot read image"):
        make_example(r2, tok, bb, LayoutConfig(k=4), latent)


# -- layout ---------------------------------------------------------------------------------------------------
def test_layouts_share_prompt_and_step_tokens(tiny, records):
    model, tok, _, bb, latent = tiny
    rec = records[1]
    plain = make_example(rec, tok, bb, LayoutConfig(k=0), None).laid
    valr = make_example(rec, tok, bb, LayoutConfig(k=4), latent).laid
    assert plain.input_ids[:plain.prompt_length] == valr.input_ids[:valr.prompt_length]
    assert all(x == IGNORE for x in valr.labels[:valr.prompt_length])
    # removing the latent segments from the VaLR layout gives the plain layout exactly
    stripped = [t for t in valr.input_ids if t not in (latent.start, latent.end, latent.slot)]
    assert stripped == plain.input_ids
    assert len(valr.segment_starts) == len(rec.steps)
    for start in valr.segment_starts:
        assert valr.input_ids[start - 1] == latent.start and valr.labels[start - 1] == latent.start
        assert valr.input_ids[start:start + 4] == [latent.slot] * 4
        assert valr.labels[start:start + 4] == [IGNORE] * 4
        assert valr.input_ids[start + 4] == latent.end and valr.labels[start + 4] == latent.end
    text_labels = [t for t in valr.labels if t != IGNORE]
    assert latent.slot not in text_labels
    assert tok.decode(valr.input_ids[valr.prompt_length:]).endswith("Answer: 3<|im_end|>")


def test_image_placeholders_expand_to_visual_token_counts(tiny, records):
    model, tok, _, bb, latent = tiny
    ex = make_example(records[1], tok, bb, LayoutConfig(k=4), latent)
    n_pad = sum(1 for t in ex.laid.input_ids if t == model.config.image_token_id)
    assert n_pad == sum(ex.images.n_tokens) and len(ex.images.n_tokens) == 2
    assert ex.images.n_tokens[0] != ex.images.n_tokens[1] or ex.images.n_tokens[0] > 0


def test_over_length_is_an_error_not_a_truncation(tiny, records):
    model, tok, _, bb, latent = tiny
    ex = make_example(records[0], tok, bb, LayoutConfig(k=4), latent)
    with pytest.raises(LayoutError, match="over max_length=10"):
        layout_record(records[0], tok, latent, ex.images.n_tokens, "<|image_pad|>", LayoutConfig(k=4, max_length=10))


def test_latent_after_puts_each_segment_after_the_step_head(tiny, records):
    model, tok, _, bb, latent = tiny
    rec = records[1]  # steps "View 1 has ...", "View 2 has ...", "So three in total."
    plain = make_example(rec, tok, bb, LayoutConfig(k=0), None).laid
    cfg = LayoutConfig(k=4, latent_after=r"View \d+|So")
    valr = make_example(rec, tok, bb, cfg, latent).laid
    # the same tokens in the same order: only where the segments sit changed
    assert [t for t in valr.input_ids if t not in (latent.start, latent.end, latent.slot)] == plain.input_ids
    heads = ["View 1", "View 2", "So"]
    for start, head, positions in zip(valr.segment_starts, heads, valr.step_positions, strict=True):
        head_ids = tok(head, add_special_tokens=False)["input_ids"]
        assert valr.input_ids[start - 1 - len(head_ids):start - 1] == head_ids
        assert valr.input_ids[start - 1] == latent.start and valr.input_ids[start + 4] == latent.end
        assert positions[len(head_ids) - 1] == start - 2 and positions[len(head_ids)] == start + 5
    for laid in (plain, valr):  # step_positions hold exactly each step's text tokens
        assert [tok.decode([laid.input_ids[p] for p in pos]).strip() for pos in laid.step_positions] == \
            [s.text for s in rec.steps]
    assert plain.step_positions[1] == list(range(plain.step_positions[1][0], plain.step_positions[2][0]))


def test_latent_after_errors_name_the_record_and_step(tiny, records):
    model, tok, _, bb, latent = tiny
    with pytest.raises(LayoutError, match=r"record 'two', step 3: latent_after='View \\\\d\+' does not match"):
        make_example(records[1], tok, bb, LayoutConfig(k=4, latent_after=r"View \d+"), latent)
    with pytest.raises(LayoutError, match=r"record 'two', step 1: splitting .* changes its tokens"):
        make_example(records[1], tok, bb, LayoutConfig(k=4, latent_after=r"Vi|So"), latent)  # "Vi|ew" splits a word
    # the plain layout ignores the pattern (no segments to place)
    make_example(records[1], tok, bb, LayoutConfig(k=0, latent_after=r"View \d+"), None)
