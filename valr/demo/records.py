"""The records the perception stages train on, written from the world's scenes: reading cells by address
(:func:`read_records`), finding them by content (:func:`find_records`), one-view subsets and mixes; plus the
per-view background shade that tells a visual token which view it is in (:func:`shade_views`)."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any


def shade_views(world_dir: Path, shade: int, tint: int) -> int:
    """Give each view its own background shade (green channel + view * shade) in place; returns images changed.

    A demo aid like the world's own ``cell_tint``: it makes *which view* a visual token belongs to visible in the
    token's pixels. Without it a tiny rope decoder must tell four identical-looking image runs apart by absolute
    position, which it does not learn in the demo's budget (measured: reading cells by address stayed at the
    blind loss for 1000 steps). Only background pixels change (objects and grid lines keep their colours, labels
    are untouched); idempotent, because shaded backgrounds no longer match the unshaded colour.
    """
    import numpy as np
    from PIL import Image

    from valr.synth.world import shade_background

    if shade <= 0:
        return 0
    changed = 0
    for p in sorted((world_dir / "images").rglob("*_v*.png")):
        v = int(p.stem.rsplit("_v", 1)[1])
        if v == 0:
            continue
        with Image.open(p) as im:
            a = np.asarray(im.convert("RGB")).copy()
        if shade_background(a, v, shade, tint):
            Image.fromarray(a).save(p, format="PNG", compress_level=6)
            changed += 1
    return changed


def _count_range(name: str, bounds: tuple[int, int]) -> tuple[int, int]:
    lo, hi = bounds
    if not 1 <= lo <= hi:
        raise ValueError(f"{name} must be a range 1 <= lo <= hi, got {bounds}")
    return lo, hi


def _world_scenes(world_dir: Path, split: str) -> list[tuple[Any, Any]]:
    """Each scene of ``split`` once, as (the first record that shows it, the scene rebuilt from the labels)."""
    from valr.data.records import load_records
    from valr.synth.dataset import load_labels, scene_from_labels

    labels = load_labels(world_dir)
    first: dict[tuple[str, ...], Any] = {}
    for rec in load_records(world_dir / f"{split}.jsonl"):
        first.setdefault(tuple(str(p) for p in rec.images), rec)
    return [(rec, scene_from_labels(labels, rec, world_dir)) for rec in first.values()]


def _write_shuffled(recs: list, rng: Any, dst: Path) -> int:
    """Write ``recs`` to ``dst`` in an order drawn from ``rng`` (image paths rewritten so they still resolve)."""
    from valr.data.records import write_records

    order = rng.permutation(len(recs))
    write_records([recs[i] for i in order], dst)
    return len(recs)


def read_records(world_dir: Path, out_file: Path, seed: int, per_scene: int = 4, cells: tuple[int, int] = (1, 8),
                 split: str = "train") -> int:
    """Stage-0 records: read given cells. Per scene of ``split`` (training scenes for stage 0; validation scenes
    for the held-out reading probe), ``per_scene`` records alternate between one view ("read #1 row 2 col 3, ..."
    -> "#1 row 2 col 3: large red cube") and all views ("read #1 view 3 row 2 col 3, ..." -> "#1 view 3 row 2 col
    3: large red cube", the CoT's lookup-step format).

    Each record reads a random number of cells in ``cells`` (inclusive; the demo passes its chain lengths). With
    a fixed number every item of the list sits at the same distance from the step that reads it, and the model
    learns to copy and read by that distance: a development model trained on 4-cell records read 99% of 4-cell
    records and 46-50% of 2- or 7-cell ones, and nothing of it carried over to chains (docs/results.md)."""
    import numpy as np

    from valr.data.records import Record, Step, StepTarget
    from valr.synth.questions import lookup_text, read_line

    lo, hi = _count_range("cells", cells)
    scenes = _world_scenes(world_dir, split)
    rng = np.random.default_rng([seed, 17])
    out = []
    for rec, scene in scenes:
        for j in range(per_scene):
            n = int(rng.integers(lo, hi + 1))
            if j % 2 == 0:  # one view
                v = int(rng.integers(scene.n_views))
                occ = scene.cells(v)
                pick = [(v, *occ[i]) for i in rng.permutation(len(occ))[:n]]
                q = read_line(pick, with_view=False)
                steps = tuple(Step(lookup_text(scene, p, i + 1, with_view=False), StepTarget(image_index=0))
                              for i, p in enumerate(pick))
                images = (rec.images[v],)
            else:  # all views, addressed by view
                occ = [(v, r, c) for v in range(scene.n_views) for r, c in scene.cells(v)]
                pick = [occ[i] for i in rng.permutation(len(occ))[:n]]
                q = read_line(pick)
                steps = tuple(Step(lookup_text(scene, p, i + 1), StepTarget(image_index=p[0]))
                              for i, p in enumerate(pick))
                images = rec.images
            out.append(Record(id=f"read-{rec.meta['scene']}-{j}", question=q, steps=steps, answer=str(len(pick)),
                              images=images, meta={"family": "read", "n_steps": len(steps)}))
    return _write_shuffled(out, rng, out_file)


def find_records(world_dir: Path, out_file: Path, seed: int, per_scene: int = 2, items: tuple[int, int] = (1, 8),
                 split: str = "train", one_view: bool = False) -> int:
    """Stage-0 records for the inverse lookup, finding a cell by content: "which cell: #1 red in view 2, #2 cube
    in view 4, #3 red cube in view 1." -> "#1 view 2 red at row 3 col 1: large red cube", ... (the CoT's format of
    a lookup by content). Each item names a colour, a shape or both that exactly one object of that view has; a
    record has a random number of items in ``items``. Chains need this lookup wherever a step goes to "the object
    of the same colour/shape in view V" or starts at a named object, and reading by address does not teach it
    (docs/results.md). With ``one_view`` every other record finds in one view, like the one-view read records
    ("which cell: #1 red, #2 cube." -> "#1 red at row 3 col 1: large red cube", ...), for stage 0's first phase."""
    import numpy as np

    from valr.data.records import Record, Step, StepTarget
    from valr.synth.questions import lookup_text, marker
    from valr.synth.world import COLOURS, SHAPES

    lo, hi = _count_range("items", items)
    rng = np.random.default_rng([seed, 23])
    out = []
    for rec, scene in _world_scenes(world_dir, split):
        findable: dict[tuple[int, int, int], list[str]] = {}  # cell -> descriptions unique in its view
        for v in range(scene.n_views):
            names = {}
            for r, c in scene.cells(v):
                o = scene.obj(v, r, c)
                names[(v, r, c)] = (COLOURS[o.colour], SHAPES[o.shape], f"{COLOURS[o.colour]} {SHAPES[o.shape]}")
            seen = Counter(n for ns in names.values() for n in ns)  # colour and shape words never coincide
            findable.update({cell: [n for n in ns if seen[n] == 1] for cell, ns in names.items()
                             if any(seen[n] == 1 for n in ns)})
        for j in range(per_scene):
            view = int(rng.integers(scene.n_views)) if one_view and j % 2 == 0 else None
            cells = [p for p in findable if view is None or p[0] == view]
            pick = [cells[i] for i in rng.permutation(len(cells))[:int(rng.integers(lo, hi + 1))]]
            if not pick:
                continue
            said = [findable[p][int(rng.integers(len(findable[p])))] for p in pick]
            pairs = list(enumerate(zip(pick, said, strict=True)))
            all_views = view is None  # else the view is the record's only image: nothing names it
            q = "which cell: " + ", ".join(f"{marker(i + 1)} {w}" + (f" in view {p[0] + 1}" if all_views else "")
                                           for i, (p, w) in pairs)
            steps = tuple(Step(lookup_text(scene, p, i + 1, key=w, with_view=all_views),
                               StepTarget(image_index=p[0] if all_views else 0)) for i, (p, w) in pairs)
            images = rec.images if all_views else (rec.images[view],)
            out.append(Record(id=f"find-{rec.meta['scene']}-{j}", question=q + ".", steps=steps,
                              answer=str(len(pick)), images=images, meta={"family": "find", "n_steps": len(steps)}))
    return _write_shuffled(out, rng, out_file)


def mix_records(sources: list[Path], dst: Path, seed: int) -> Path:
    """The records of ``sources`` shuffled together into ``dst`` (image paths rewritten so they still resolve)."""
    import numpy as np

    from valr.data.records import load_records

    _write_shuffled([r for src in sources for r in load_records(src)], np.random.default_rng([seed, 29]), dst)
    return dst


def link_images(src: Path, dst: Path) -> int:
    """Every file under ``src`` hard-linked into ``dst`` (copied where the file system has no hard links), so the
    chains directory is a self-contained dataset without a second copy of the world's images."""
    n = 0
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        t = dst / f.relative_to(src)
        t.parent.mkdir(parents=True, exist_ok=True)
        if not t.exists():
            try:
                os.link(f, t)
            except OSError:
                shutil.copy2(f, t)
        n += 1
    return n


def one_view_reads(src: Path, dst: Path) -> Path:
    """The single-view records of a stage-0 read file (the curriculum's first phase), written to ``dst``
    with image paths rewritten so they still resolve."""
    from valr.data.records import load_records, write_records

    recs = [r for r in load_records(src) if len(r.images) == 1]
    if not recs:
        raise ValueError(f"{src} has no single-view records; regenerate the world (valr demo --out ...)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_records(recs, dst)
    return dst


def _subset(src: Path, dst: Path, n: int) -> Path:
    lines = [x for x in src.read_text().splitlines() if x.strip()][:n]
    # keep image paths valid: records are resolved against their file's directory
    if src.parent.resolve() != dst.parent.resolve():
        raise ValueError("subset files must live next to their source")
    dst.write_text("".join(x + "\n" for x in lines))
    return dst
