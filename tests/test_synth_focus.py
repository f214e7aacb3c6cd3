"""Focus targets: each step's target image holds exactly the objects the step finds, on its view's own board,
and the rewritten records keep everything but the targets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from valr.data.records import load_records
from valr.synth.dataset import make_world_dataset, scene_for_record, world_config
from valr.synth.focus import focus_records, term_cells
from valr.synth.world import render_view, shade_background


@pytest.fixture(scope="module")
def focused(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("focus")
    m = make_world_dataset(out, seed=5, n_train=24, n_val=4, n_test=4)
    wcfg = world_config(m)
    stats = focus_records(out / "train.jsonl", out / "train_focus.jsonl", wcfg, view_shade=20)
    return out, wcfg, stats


def _cell(a: np.ndarray, r: int, c: int, px: int) -> np.ndarray:
    return a[r * px + 2:(r + 1) * px - 2, c * px + 2:(c + 1) * px - 2]  # inside the grid lines


def _occupied(a: np.ndarray, board: np.ndarray, px: int, grid: int) -> set[tuple[int, int]]:
    """Cells whose pixels differ from the empty board's."""
    return {(r, c) for r in range(grid) for c in range(grid)
            if not np.array_equal(_cell(a, r, c, px), _cell(board, r, c, px))}


def test_focus_records_keep_text_and_target_what_each_step_finds(focused) -> None:
    out, wcfg, stats = focused
    plain, focus = load_records(out / "train.jsonl"), load_records(out / "train_focus.jsonl")
    assert stats["records"] == len(plain) == len(focus) and stats["rendered"] == stats["focus_images"] > 0
    px, families = wcfg.cell_px, set()
    for p, f in zip(plain, focus, strict=True):
        assert (p.id, p.question, p.answer, p.images, p.meta) == (f.id, f.question, f.answer, f.images, f.meta)
        assert [s.text for s in p.steps] == [s.text for s in f.steps]
        scene = scene_for_record(p, wcfg)
        for ps, fs in zip(p.steps, f.steps, strict=True):
            assert fs.target.file is not None and fs.target.file.is_file()
            v = ps.target.image_index
            full = np.asarray(Image.open(p.images[v]).convert("RGB")).copy()  # the (unshaded) input view
            shown = np.asarray(Image.open(fs.target.file).convert("RGB"))
            board = np.asarray(render_view(scene, v, wcfg, only=())).copy()
            for a in (full, board):  # as the demo shades its views
                shade_background(a, v, 20, wcfg.cell_tint)
            cells = _occupied(shown, board, px, wcfg.grid)
            if ": " in ps.text and "total" not in ps.text:  # a lookup: "... row R col C: size colour shape"
                words = ps.text.split(": ")[0].split()
                r, c = int(words[-3]) - 1, int(words[-1]) - 1
                assert cells == {(r, c)}
                assert np.array_equal(_cell(shown, r, c, px), _cell(full, r, c, px))  # the very object
            else:  # a count: "#i view V WORD: n, total t"
                word, n = ps.text.split(": ")[0].split()[-1], int(ps.text.split(": ")[1].split(",")[0])
                assert cells == set(term_cells(scene, v, word)) and len(cells) == n
            families.add(p.meta["family"])
    assert families == {"chase", "where", "count", "tally"}


def test_focus_images_are_shaded_like_the_views(focused) -> None:
    out, wcfg, _ = focused
    rec = load_records(out / "train_focus.jsonl")[0]
    scene = scene_for_record(rec, wcfg)
    step = next(s for s in rec.steps if "-view0-" not in s.target.file.name)
    v = int(step.target.file.name.split("-view")[1].split("-")[0])
    shown = np.asarray(Image.open(step.target.file).convert("RGB"))
    board = np.asarray(render_view(scene, v, wcfg, only=())).copy()
    assert not np.array_equal(shown[0:3, 0:3], board[0:3, 0:3])  # shading changed the empty board's pixels
    assert shade_background(board, v, 20, wcfg.cell_tint)
    empty = [(r, c) for r in range(wcfg.grid) for c in range(wcfg.grid)]
    assert _occupied(shown, board, wcfg.cell_px, wcfg.grid) <= set(empty)
    assert np.array_equal(shown[0:3, 0:3], board[0:3, 0:3])


def test_rerun_reuses_images(focused, tmp_path: Path) -> None:
    out, wcfg, stats = focused
    again = focus_records(out / "train.jsonl", out / "train_focus.jsonl", wcfg, view_shade=20)
    assert again["rendered"] == 0 and again["focus_images"] == stats["focus_images"]
