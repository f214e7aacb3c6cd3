"""The spatial world's scenes and renders: deterministic, grid-aligned, and labelled exactly."""

from __future__ import annotations

import io

import numpy as np
import pytest

from valr.synth.world import (
    COLOUR_RGB,
    COLOURS,
    EMPTY,
    GRID_LINE_RGB,
    SHAPES,
    Scene,
    WorldConfig,
    background_rgb,
    generate_scene,
    render_scene,
    render_view,
)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_scene_is_deterministic_per_seed() -> None:
    a, b, c = generate_scene(7), generate_scene(7), generate_scene(8)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    assert [_png(i) for i in render_scene(a)] == [_png(i) for i in render_scene(b)]
    assert [_png(i) for i in render_scene(a)] != [_png(i) for i in render_scene(c)]


def test_scene_respects_config() -> None:
    cfg = WorldConfig(n_views=3, min_objects=4, max_objects=6)
    for seed in range(50):
        s = generate_scene(seed, cfg)
        assert s.shape.shape == (3, 4, 4)
        n = s.present.reshape(3, -1).sum(1)
        assert ((n >= 4) & (n <= 6)).all()
        assert np.array_equal(s.present, s.colour != EMPTY)


def test_labels_round_trip() -> None:
    s = generate_scene(3)
    lab = s.labels()
    assert lab["present"].dtype == bool and lab["shape"].dtype == np.int8
    t = Scene.from_labels(lab["shape"], lab["colour"], lab["size"])
    assert t.fingerprint() == s.fingerprint()
    with pytest.raises(ValueError):
        Scene.from_labels(lab["shape"], np.zeros_like(lab["colour"]), lab["size"])


@pytest.mark.parametrize(("image_size", "tint"), [(112, 0), (224, 0), (112, 12)])
def test_each_object_is_drawn_inside_its_own_cell(image_size: int, tint: int) -> None:
    cfg = WorldConfig(image_size=image_size, cell_tint=tint)
    cell = cfg.cell_px
    palette = {name: np.array(rgb) for name, rgb in COLOUR_RGB.items()}
    for seed in range(6):
        scene = generate_scene(seed, cfg)
        for v in range(scene.n_views):
            px = np.asarray(render_view(scene, v, cfg))
            assert px.shape == (image_size, image_size, 3)
            for r in range(4):
                for c in range(4):
                    box = px[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].reshape(-1, 3)
                    bg = background_rgb(r, c, cfg)
                    neutral = [np.array(bg), np.array(GRID_LINE_RGB)]
                    assert tuple(px[r * cell + 1, c * cell + 1]) == bg
                    is_neutral = np.zeros(len(box), bool)
                    for n in neutral:
                        is_neutral |= (box == n).all(1)
                    obj = scene.obj(v, r, c)
                    if obj is None:
                        assert is_neutral.all(), f"seed {seed} view {v} cell {r},{c} should be empty"
                        continue
                    rgb = palette[COLOURS[obj.colour]]
                    is_obj = (box == rgb).all(1)
                    assert (is_obj | is_neutral).all(), "only the object's colour may appear in its cell"
                    assert is_obj.sum() >= 0.04 * cell * cell
                    centre = px[r * cell + cell // 2, c * cell + cell // 2]
                    if SHAPES[obj.shape] == "ring":
                        assert tuple(centre) == bg  # hollow: tells a ring from a ball
                    else:
                        assert tuple(centre) == tuple(rgb)


def test_sizes_differ_in_area() -> None:
    areas: dict[int, list[int]] = {0: [], 1: []}
    cfg = WorldConfig()
    for seed in range(4):
        scene = generate_scene(seed, cfg)
        px = np.asarray(render_view(scene, 0, cfg))
        for r, c in scene.cells(0):
            obj = scene.obj(0, r, c)
            assert obj is not None
            box = px[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28]
            areas[obj.size].append(int((box == COLOUR_RGB[COLOURS[obj.colour]]).all(-1).sum()))
    assert min(areas[0]) > 0 and max(areas[0]) < min(areas[1]) * 1.2


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError):
        WorldConfig(image_size=110)
    with pytest.raises(ValueError):
        WorldConfig(min_objects=10, max_objects=5)
    with pytest.raises(ValueError):
        WorldConfig(cell_tint=40)
