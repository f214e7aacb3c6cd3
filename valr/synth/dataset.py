"""Write the spatial world as a ready-to-train dataset directory (images, records, teacher labels, tokenizer).

Layout of ``out_dir`` (all paths inside records and labels are relative to ``out_dir``)::

    images/{split}/{scene}_v{k}.png   one PNG per view (k = 0-based view = record image index)
    train.jsonl val.jsonl test.jsonl  records in the library format (valr.data.records); every record's
                                      ``images`` are all views of its scene, each step targets one view
    labels.npz                        per-view cell labels for the perception teacher, one row per PNG:
                                      ``paths`` (str, relative image path), ``split`` (str), ``present`` (bool,
                                      [M, G, G]), ``shape``/``colour``/``size`` (int8 [M, G, G], -1 = empty),
                                      ``shape_names``/``colour_names``/``size_names`` (class names)
    tokenizer/                        byte-level BPE trained on the world's text (tokenizer.save_pretrained)
    manifest.json                     config (the cache key), counts, N / family / answer distributions

Splits are disjoint by scene: scene seeds are derived from (seed, split, draw index) and every scene's content
is checked against all others. Several questions share one scene (``questions_per_scene``) so each scene is
rendered once; N is uniform over ``n_range`` per family, families round-robin, and multiple-choice answer
letters cycle through shuffled blocks so each letter is equally frequent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from valr.data.records import Record, Step, StepTarget, write_records
from valr.synth.questions import FAMILIES, FAMILY_KIND, LETTERS, Question, make_question, vocabulary
from valr.synth.world import COLOURS, SHAPES, SIZES, Scene, WorldConfig, generate_scene, render_scene

FORMAT_VERSION = 3  # 2: step markers (#1, #2, ...) in questions and steps; 3: lookups by content restate the key
SPLITS: tuple[str, ...] = ("train", "val", "test")
MAX_NUMBER = 64  # numbers 0..MAX_NUMBER-1 get whole-word tokens (counts, running totals, coordinates)
CHAT_TEXT = ("system", "user", "assistant", "You are a helpful assistant.")


def scene_seed(seed: int, split: str, draw: int) -> int:
    """The seed of a split's ``draw``-th scene: a 63-bit hash of (seed, split, draw)."""
    ss = np.random.SeedSequence([seed, SPLITS.index(split), draw])
    return int(ss.generate_state(1, np.uint64)[0]) >> 1


def _schedule(values: Sequence[Any], n: int, rng: np.random.Generator) -> list[Any]:
    """``n`` items cycling through shuffled copies of ``values``: exactly balanced up to one partial block."""
    out: list[Any] = []
    while len(out) < n:
        out += [values[int(i)] for i in rng.permutation(len(values))]
    return out[:n]


def _plan(n: int, families: Sequence[str], n_range: tuple[int, int], rng: np.random.Generator
          ) -> list[tuple[str, int, int]]:
    """(family, N, answer slot) per record: families round-robin, N and slots balanced within each family."""
    per_family = [sum(1 for i in range(n) if i % len(families) == f) for f in range(len(families))]
    ns = list(range(n_range[0], n_range[1] + 1))
    n_sched = [_schedule(ns, k, rng) for k in per_family]
    slot_sched = [_schedule(range(len(LETTERS)), k, rng) for k in per_family]
    return [(families[i % len(families)], n_sched[i % len(families)][i // len(families)],
             slot_sched[i % len(families)][i // len(families)]) for i in range(n)]


def _record(q: Question, rid: str, images: list[Path], scene_name: str, seed: int, split: str,
            n_views: int) -> Record:
    meta: dict[str, Any] = {
        "family": q.family, "task": q.family, "n_steps": len(q.steps), "kind": q.kind, "split": split,
        "scene": scene_name, "scene_seed": seed, "n_views": n_views, "answer_text": q.answer_text,
        "step_views": [s.view for s in q.steps],
    }
    if q.options:
        meta["options"] = list(q.options)
    steps = tuple(Step(s.text, StepTarget(image_index=s.view)) for s in q.steps)
    return Record(id=rid, question=q.text, steps=steps, answer=q.answer, images=tuple(images), meta=meta)


def _generate_split(out_dir: Path, split: str, n: int, seed: int, cfg: WorldConfig, families: Sequence[str],
                    n_range: tuple[int, int], per_scene: int, seen: set[bytes], labels: dict[str, list[Any]],
                    pool: ThreadPoolExecutor, writes: list[Future[None]], render: bool = True,
                    question_kw: dict[str, bool] | None = None) -> tuple[list[Record], int]:
    rng = np.random.default_rng([seed, SPLITS.index(split), 1_000_003])
    plan = _plan(n, families, n_range, rng)
    records: list[Record] = []
    draw, scene, used, images, name = -1, None, per_scene, [], ""
    n_scenes = 0

    def next_scene() -> Scene:
        nonlocal draw
        while True:
            draw += 1
            s = generate_scene(scene_seed(seed, split, draw), cfg)
            if s.fingerprint() not in seen:
                seen.add(s.fingerprint())
                return s

    for family, n_steps, slot in plan:
        q = None
        for _ in range(200):
            if scene is None or used >= per_scene:
                scene, used, images = next_scene(), 0, []
            q = make_question(scene, family, n_steps, rng, slot, **(question_kw or {}))
            if q is not None:
                break
            scene = None  # this scene cannot host the question: move on
        if q is None or scene is None:
            raise RuntimeError(f"could not generate a {family} question with N={n_steps}; is n_views >= 2?")
        if not images:  # first question of this scene: render and save its views once
            name = f"{split}{draw:05d}"
            rel = [Path("images") / split / f"{name}_v{k}.png" for k in range(scene.n_views)]
            if render:
                (out_dir / rel[0]).parent.mkdir(parents=True, exist_ok=True)
                for img, p in zip(render_scene(scene, cfg), rel, strict=True):
                    writes.append(pool.submit(img.save, out_dir / p, format="PNG", compress_level=6))
            lab = scene.labels()
            for k, p in enumerate(rel):
                labels["paths"].append(p.as_posix())
                labels["split"].append(split)
                for key in ("present", "shape", "colour", "size"):
                    labels[key].append(lab[key][k])
            images = [out_dir / p for p in rel]
            n_scenes += 1
        assert scene.seed is not None
        records.append(_record(q, f"{split}-{name}-q{used}", images, name, scene.seed, split, scene.n_views))
        used += 1
    return records, n_scenes


def record_texts(records: Iterable[Record]) -> Iterable[str]:
    """Every piece of text a model sees or emits for these records."""
    for r in records:
        yield r.question
        for s in r.steps:
            yield s.text
        yield r.answer


def tokenizer_corpus(texts: Iterable[str]) -> list[str]:
    """The world's text plus every vocabulary word (bare and space-prefixed, as BPE sees them at line start
    and mid-line), the numbers, letters and the chat template's fixed text, so each becomes one token."""
    words = vocabulary() + [str(i) for i in range(MAX_NUMBER)] + list(CHAT_TEXT) + [".", ",", ":", "?", "#"]
    return list(texts) + words + [f"x {w}" for w in words]


def make_world_dataset(out_dir: str | Path, seed: int = 0, n_train: int = 4000, n_val: int = 500,
                       n_test: int = 500, n_range: tuple[int, int] = (1, 10),
                       families: Sequence[str] = FAMILIES, image_size: int = 112, n_views: int = 4,
                       questions_per_scene: int = 4, world: WorldConfig | None = None, render: bool = True,
                       fixed_options: bool = False, tally_counts: bool = False) -> dict[str, Any]:
    """Generate (or reuse) the world dataset in ``out_dir`` and return its manifest.

    Cached: when ``out_dir/manifest.json`` records the same config and the files exist, nothing is rewritten;
    otherwise everything is regenerated (``out_dir/images`` is replaced). ``world`` sets the other scene and
    render settings (objects per view, grid lines, cell tint); its image_size and n_views are replaced by the
    arguments. The tokenizer is trained to closure (every world word and number 0..63 one token; about 590).
    ``render=False`` writes everything but the images (records still name ``images/...``): the same scenes and
    questions in the current text format, for a directory that gets its images from an existing world.
    ``fixed_options``: chase and tally with fixed options (:mod:`valr.synth.questions`); question sampling then
    takes other draws, so such a directory needs its own images (another world's scenes would not match).
    ``tally_counts``: tally's steps keep the tally (``..., red 2``); the same scenes and questions as without it.
    """
    out = Path(out_dir).resolve()
    families = tuple(families)
    for f in families:
        if f not in FAMILIES:
            raise ValueError(f"unknown family {f!r}; choose from {FAMILIES}")
    lo, hi = int(n_range[0]), int(n_range[1])
    if not 1 <= lo <= hi:
        raise ValueError(f"n_range must satisfy 1 <= lo <= hi, got {n_range}")
    cfg = dataclasses.replace(world or WorldConfig(), n_views=n_views, image_size=image_size)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    config = {
        "version": FORMAT_VERSION, "seed": seed, "counts": counts, "n_range": [lo, hi],
        "families": list(families), "questions_per_scene": questions_per_scene,
        "world": dataclasses.asdict(cfg),
    }
    question_kw = {"fixed_options": fixed_options, "tally_counts": tally_counts}
    config.update({k: True for k, on in question_kw.items() if on})  # absent when off: worlds keep their cache key
    manifest_path = out / "manifest.json"
    files = [f"{s}.jsonl" for s in SPLITS] + ["labels.npz", "tokenizer/tokenizer.json"]
    if not render:
        config["render"] = False
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            old = None
        if old is not None and old.get("config") == config and all((out / f).exists() for f in files):
            return old

    out.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # an interrupted run must not look complete
    if render and (out / "images").is_dir():
        shutil.rmtree(out / "images")
    seen: set[bytes] = set()
    labels: dict[str, list[Any]] = {k: [] for k in ("paths", "split", "present", "shape", "colour", "size")}
    all_records: list[Record] = []
    stats: dict[str, Any] = {"n_scenes": {}, "n_distribution": {}, "families": {}, "answers": {}}
    writes: list[Future[None]] = []
    # PNG encoding and file creation dominate the run time and release the GIL: overlap them in threads.
    with ThreadPoolExecutor(max_workers=4) as pool:
        per_split = {split: _generate_split(out, split, counts[split], seed, cfg, families, (lo, hi),
                                            questions_per_scene, seen, labels, pool, writes, render, question_kw)
                     for split in SPLITS}
        for w in writes:
            w.result()  # re-raise any write error
    for split in SPLITS:
        records, n_scenes = per_split[split]
        write_records(records, out / f"{split}.jsonl")
        all_records += records
        stats["n_scenes"][split] = n_scenes
        stats["n_distribution"][split] = {str(k): v for k, v in
                                          sorted(Counter(r.meta["n_steps"] for r in records).items())}
        stats["families"][split] = dict(sorted(Counter(r.meta["family"] for r in records).items()))
        stats["answers"][split] = dict(sorted(Counter(r.answer for r in records if r.meta["kind"] == "mc").items()))

    g = cfg.grid
    np.savez_compressed(
        out / "labels.npz", paths=np.array(labels["paths"], dtype=str), split=np.array(labels["split"], dtype=str),
        present=np.array(labels["present"], dtype=bool).reshape(-1, g, g),
        shape=np.array(labels["shape"], dtype=np.int8).reshape(-1, g, g),
        colour=np.array(labels["colour"], dtype=np.int8).reshape(-1, g, g),
        size=np.array(labels["size"], dtype=np.int8).reshape(-1, g, g),
        shape_names=np.array(SHAPES), colour_names=np.array(COLOURS), size_names=np.array(SIZES))

    from valr.tokens import train_bpe_tokenizer  # heavy import (transformers): only when writing

    tok = train_bpe_tokenizer(tokenizer_corpus(record_texts(all_records)), vocab_size=4096)
    tok.save_pretrained(str(out / "tokenizer"))
    step_texts = [s.text for r in all_records for s in r.steps]
    step_lens = [len(e.ids) for e in tok.backend_tokenizer.encode_batch(step_texts, add_special_tokens=False)]

    manifest = {
        "config": config,
        "files": {"records": {s: f"{s}.jsonl" for s in SPLITS}, "images": "images/", "labels": "labels.npz",
                  "tokenizer": "tokenizer/"},
        "kinds": {f: FAMILY_KIND[f] for f in families},
        "tokenizer_vocab_size": len(tok),
        "avg_tokens_per_step": round(float(np.mean(step_lens)), 3) if step_lens else 0.0,
        "n_images": len(labels["paths"]),
        **stats,
    }
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(manifest_path)
    return manifest


def load_labels(out_dir: str | Path) -> dict[str, np.ndarray]:
    """The teacher labels written by make_world_dataset (see the module docstring for the keys)."""
    with np.load(Path(out_dir) / "labels.npz") as z:
        return {k: z[k] for k in z.files}


def world_config(manifest: dict[str, Any]) -> WorldConfig:
    """The WorldConfig a manifest was generated with."""
    return WorldConfig(**manifest["config"]["world"])


def scene_for_record(record: Record, world: WorldConfig) -> Scene:
    """Regenerate a record's scene from the seed in its meta (``world`` from :func:`world_config`)."""
    return generate_scene(int(record.meta["scene_seed"]), world)


def scene_from_labels(labels: dict[str, np.ndarray], record: Record, root: str | Path) -> Scene:
    """Rebuild a record's scene from the teacher labels of its images (``root`` = the dataset directory)."""
    index = {p: i for i, p in enumerate(labels["paths"].tolist())}
    base = Path(root).resolve()
    rows = [index[Path(os.path.relpath(Path(p).resolve(), base)).as_posix()] for p in record.images]
    return Scene.from_labels(labels["shape"][rows], labels["colour"][rows], labels["size"][rows])


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m valr.synth.dataset OUT_DIR [--seed S] [--n-train N] ...``: write (or reuse) a dataset."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--n-min", type=int, default=1)
    ap.add_argument("--n-max", type=int, default=10)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--fixed-options", action="store_true",
                    help="chase and tally with the same four options in every question (like where's quadrants)")
    ap.add_argument("--tally-counts", action="store_true",
                    help="tally's steps keep the tally (`#2 view 1 row 2 col 3: small red ball, red 2`)")
    args = ap.parse_args(argv)
    m = make_world_dataset(args.out_dir, seed=args.seed, n_train=args.n_train, n_val=args.n_val,
                           n_test=args.n_test, n_range=(args.n_min, args.n_max),
                           families=tuple(args.families.split(",")), image_size=args.image_size,
                           fixed_options=args.fixed_options, tally_counts=args.tally_counts)
    print(json.dumps({k: m[k] for k in ("n_scenes", "tokenizer_vocab_size", "avg_tokens_per_step")}))


if __name__ == "__main__":
    main()
