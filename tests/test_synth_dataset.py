"""make_world_dataset: documented files, library-format records that check out, balanced and disjoint splits,
byte-identical output per seed, caching, and a tokenizer that covers the world's vocabulary."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from valr.data.records import iter_records
from valr.synth.dataset import (
    load_labels,
    make_world_dataset,
    scene_for_record,
    scene_from_labels,
    world_config,
)
from valr.synth.questions import FAMILIES, vocabulary
from valr.synth.solver import check_record
from valr.synth.world import COLOUR_RGB, COLOURS

KW = dict(seed=3, n_train=80, n_val=40, n_test=40)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("world")
    return out, make_world_dataset(out, **KW)


def _records(out: Path, split: str):
    return list(iter_records(out / f"{split}.jsonl"))


def test_writes_the_documented_files(world) -> None:
    out, m = world
    for f in ("train.jsonl", "val.jsonl", "test.jsonl", "labels.npz", "manifest.json",
              "tokenizer/tokenizer.json"):
        assert (out / f).is_file(), f
    assert json.loads((out / "manifest.json").read_text()) == m
    assert m["config"]["seed"] == 3 and m["config"]["counts"] == {"train": 80, "val": 40, "test": 40}
    assert len(list((out / "images").rglob("*.png"))) == m["n_images"]


def test_records_parse_target_existing_views_and_check_out(world) -> None:
    out, m = world
    labels = load_labels(out)
    wcfg = world_config(m)
    for split in ("train", "val", "test"):
        recs = _records(out, split)
        assert len(recs) == m["config"]["counts"][split]
        assert len({r.id for r in recs}) == len(recs)
        for r in recs:
            assert len(r.images) == 4 and all(p.is_file() for p in r.images)
            assert all(p is not None and p.is_file() for p in r.target_paths())
            assert [s.target.image_index for s in r.steps] == r.meta["step_views"]
            assert r.meta["n_steps"] == len(r.steps) and r.meta["split"] == split
            assert r.meta["family"] in FAMILIES and r.meta["kind"] in ("mc", "numeric")
            # the world model two independent ways: from the teacher labels and from the scene seed
            from_labels = scene_from_labels(labels, r, out)
            assert from_labels.fingerprint() == scene_for_record(r, wcfg).fingerprint()
            assert check_record(r, from_labels) == []


def test_distributions_are_balanced(world) -> None:
    out, m = world
    recs = _records(out, "train")
    assert Counter(r.meta["n_steps"] for r in recs) == {n: 8 for n in range(1, 11)}
    assert Counter(r.meta["family"] for r in recs) == {f: 20 for f in FAMILIES}
    assert Counter(r.answer for r in recs if r.meta["kind"] == "mc") == {L: 15 for L in "ABCD"}
    assert m["n_distribution"]["train"] == {str(n): 8 for n in range(1, 11)}


def test_splits_are_disjoint_by_scene(world) -> None:
    out, m = world
    seeds = {s: {r.meta["scene_seed"] for r in _records(out, s)} for s in ("train", "val", "test")}
    assert not seeds["train"] & seeds["val"] and not seeds["train"] & seeds["test"]
    assert not seeds["val"] & seeds["test"]
    labels = load_labels(out)
    content = Counter()
    for split in ("train", "val", "test"):
        idx = np.nonzero(labels["split"] == split)[0]
        keys = {labels["shape"][i:i + 4].tobytes() + labels["colour"][i:i + 4].tobytes()
                for i in idx[::4]}
        content.update(keys)
    assert max(content.values()) == 1


def test_labels_match_pixels(world) -> None:
    out, _ = world
    labels = load_labels(out)
    for i in range(0, len(labels["paths"]), 37):
        px = np.asarray(Image.open(out / labels["paths"][i]).convert("RGB"))
        for r in range(4):
            for c in range(4):
                box = px[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28]
                if labels["present"][i, r, c]:
                    rgb = COLOUR_RGB[str(labels["colour_names"][labels["colour"][i, r, c]])]
                    assert (box == rgb).all(-1).sum() > 20
                else:
                    assert labels["shape"][i, r, c] == -1
                    assert not any((box == COLOUR_RGB[k]).all(-1).any() for k in COLOURS)


def test_second_call_reuses_and_a_new_config_regenerates(world, tmp_path: Path) -> None:
    out, m = world
    stamp = (out / "train.jsonl").stat().st_mtime_ns
    assert make_world_dataset(out, **KW) == m
    assert (out / "train.jsonl").stat().st_mtime_ns == stamp
    small = make_world_dataset(tmp_path, seed=3, n_train=8, n_val=4, n_test=4, families=("count",))
    again = make_world_dataset(tmp_path, seed=3, n_train=12, n_val=4, n_test=4, families=("count",))
    assert small["config"] != again["config"]
    assert len(_records(tmp_path, "train")) == 12
    assert {r.meta["family"] for r in _records(tmp_path, "train")} == {"count"}


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path: Path) -> None:
    out, _ = world
    twin = make_world_dataset(tmp_path / "twin", **KW)
    assert twin["tokenizer_vocab_size"] > 0
    for split in ("train", "val", "test"):
        assert (out / f"{split}.jsonl").read_bytes() == (tmp_path / "twin" / f"{split}.jsonl").read_bytes()
    pngs = sorted(p.relative_to(out) for p in (out / "images").rglob("*.png"))
    assert pngs == sorted(p.relative_to(tmp_path / "twin") for p in (tmp_path / "twin" / "images").rglob("*.png"))
    assert all((out / p).read_bytes() == (tmp_path / "twin" / p).read_bytes() for p in pngs)
    make_world_dataset(tmp_path / "other", **{**KW, "seed": 4, "n_train": 8, "n_val": 4, "n_test": 4})
    a = (out / "train.jsonl").read_text().splitlines()[:8]
    b = (tmp_path / "other" / "train.jsonl").read_text().splitlines()
    assert a != b
    assert (out / pngs[0]).read_bytes() != (tmp_path / "other" / pngs[0]).read_bytes()


def test_tokenizer_round_trips_and_covers_the_vocabulary(world) -> None:
    from transformers import AutoTokenizer

    out, m = world
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert len(tok) == m["tokenizer_vocab_size"] <= 640
    texts = []
    for split in ("train", "val", "test"):
        for r in _records(out, split):
            texts += [r.question, r.answer] + [s.text for s in r.steps]
    texts.append("\n".join(texts[:50]))
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == t
    for w in vocabulary() + [str(i) for i in range(41)]:
        assert len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1, w
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w
    assert m["avg_tokens_per_step"] <= 13  # words are whole tokens: a lookup step is 11-14 tokens


def test_records_load_as_an_eval_benchmark(world) -> None:
    """The test split is directly usable by the evaluation loader (letters -> mc, positive numbers -> numeric)."""
    benchmarks = pytest.importorskip("valr.eval.benchmarks")
    out, _ = world
    items = benchmarks.load_records_benchmark(out / "test.jsonl")
    recs = {r.id: r for r in _records(out, "test")}
    assert len(items) == len(recs)
    for it in items:
        assert it.kind == recs[it.id].meta["kind"] and it.task == recs[it.id].meta["family"]


def test_fixed_options_world_checks_out_and_keeps_its_own_cache_key(tmp_path: Path) -> None:
    from valr.synth.questions import ROW_OPTIONS, TALLY_COLOURS

    kw = dict(seed=4, n_train=40, n_val=8, n_test=8, n_range=(1, 6))
    m = make_world_dataset(tmp_path / "fixed", fixed_options=True, **kw)
    assert m["config"]["fixed_options"] is True
    labels = load_labels(tmp_path / "fixed")
    recs = _records(tmp_path / "fixed", "train")
    for r in recs:
        assert check_record(r, scene_from_labels(labels, r, tmp_path / "fixed")) == []
        if r.meta["family"] in ("chase", "tally"):
            assert tuple(r.meta["options"]) == (ROW_OPTIONS if r.meta["family"] == "chase" else TALLY_COLOURS)
    for family in ("chase", "tally"):  # letters (rows, colours) balanced as with drawn options
        letters = Counter(r.answer for r in recs if r.meta["family"] == family)
        assert set(letters) == set("ABCD") and max(letters.values()) - min(letters.values()) <= 1, letters
    plain = make_world_dataset(tmp_path / "plain", **kw)
    assert "fixed_options" not in plain["config"]  # the default keeps the key worlds had before the option


def test_tally_counts_world_has_the_same_records_but_tally_steps_that_keep_count(tmp_path: Path) -> None:
    kw = dict(seed=5, n_train=40, n_val=8, n_test=8, n_range=(2, 6), render=False)
    m = make_world_dataset(tmp_path / "counts", tally_counts=True, **kw)
    assert m["config"]["tally_counts"] is True
    make_world_dataset(tmp_path / "plain", **kw)
    labels = load_labels(tmp_path / "counts")
    counted, plain = _records(tmp_path / "counts", "train"), _records(tmp_path / "plain", "train")
    assert [r.question for r in counted] == [r.question for r in plain]
    for a, b in zip(counted, plain, strict=True):
        assert check_record(a, scene_from_labels(labels, a, tmp_path / "counts")) == []
        tally = a.meta["family"] == "tally"
        for sa, sb in zip(a.steps, b.steps, strict=True):
            assert (sa.text != sb.text) == tally and sa.text.startswith(sb.text)
    assert any(r.meta["family"] == "tally" for r in counted)
