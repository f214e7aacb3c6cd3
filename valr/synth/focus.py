"""Focus targets: each step's alignment target is what the step finds, drawn alone, instead of its whole view.

The paper aligns latents to *interleaved* images of a chain of thought where it has them (crops, highlighted
regions, sketches: images the model never sees at inference), and to an input view otherwise. Aligning to an
input view asks the latents for a copy of what the model can already read from its image tokens; a focus image
asks for the result of the step's search. For the built-in world the focus image of a step is its view with only
the objects the step looks at: the one object at the cell a lookup lands on, or every object a counting term
matches (none when it counts 0), in place, on the view's own (shaded) board. The cells come from the independent
solver (:mod:`valr.synth.solver`), not from the generator, and the images are rendered once per distinct
(scene, view, cells).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from valr.data.records import Record, StepTarget, load_records, write_records
from valr.synth.dataset import scene_for_record
from valr.synth.solver import Expected, solve
from valr.synth.world import COLOURS, SHAPES, SIZES, Scene, WorldConfig, render_view, shade_background


def term_cells(scene: Scene, view: int, word: str) -> list[tuple[int, int]]:
    """The (row, col) cells of ``view`` whose object has the colour, shape or size ``word``."""
    for names, arr in ((COLOURS, scene.colour), (SHAPES, scene.shape), (SIZES, scene.size)):
        if word in names:
            rows, cols = np.nonzero(arr[view] == names.index(word))
            return sorted(zip(rows.tolist(), cols.tolist(), strict=True))
    raise ValueError(f"{word!r} is not a colour, shape or size of the world")


def step_cells(scene: Scene, expected: Expected) -> list[tuple[int, int]]:
    """The cells one step looks at: a lookup's cell, or a counting term's matches."""
    if expected.row is not None and expected.col is not None:
        return [(expected.row, expected.col)]
    assert expected.word is not None
    return term_cells(scene, expected.view, expected.word)


def focus_image(scene: Scene, view: int, cells: Sequence[tuple[int, int]], world: WorldConfig,
                view_shade: int) -> Image.Image:
    """View ``view`` with only the objects at ``cells``, shaded like the input views (``valr.demo.shade_views``)."""
    a = np.asarray(render_view(scene, view, world, only=set(cells))).copy()
    shade_background(a, view, view_shade, world.cell_tint)
    return Image.fromarray(a)


def focus_records(src: Path, dst: Path, world: WorldConfig, view_shade: int, image_dir: str = "focus") -> dict:
    """Write ``dst``: the records of ``src`` with every step's target replaced by its focus image, rendered under
    ``dst.parent / image_dir`` (reused when present). Input images, text and answers are unchanged, so the same
    model can be trained on either file. Returns counts."""
    out_dir = dst.parent / image_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[Record] = []
    rendered = 0
    for rec in load_records(src):
        scene = scene_for_record(rec, world)
        trace = solve(scene, rec.question).trace
        if len(trace) != len(rec.steps):
            raise ValueError(f"{src}: record {rec.id!r} has {len(rec.steps)} steps but its question calls for "
                             f"{len(trace)}; focus targets need the world's own chains")
        steps = []
        for step, e in zip(rec.steps, trace, strict=True):
            cells = step_cells(scene, e)
            code = "-".join(f"r{r}c{c}" for r, c in cells) or "none"
            path = out_dir / f"{rec.meta['scene']}-view{e.view}-{code}.png"
            if not path.exists():
                focus_image(scene, e.view, cells, world, view_shade).save(path, format="PNG", compress_level=6)
                rendered += 1
            steps.append(dataclasses.replace(step, target=StepTarget(file=path)))
        records.append(dataclasses.replace(rec, steps=tuple(steps)))
    write_records(records, dst)
    return {"records": len(records), "focus_images": len(list(out_dir.glob("*.png"))), "rendered": rendered}
