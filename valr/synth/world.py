"""The built-in spatial world: scenes of several views, each a small grid of cells holding at most one object.

Design (why it looks like this): the laptop demo trains a ~3M-parameter Qwen2.5-VL-shaped model whose vision
tower turns a 112 px image into a 4x4 grid of visual tokens (14 px patches, 2x2 merge: one token per 28x28 px
cell). A calibration run showed that such a model learns to *perceive* every cell quickly but not to compute
geometry inside a reasoning step. So the world is built so that every reasoning step is a perceptual lookup:

* Objects sit on the cell grid, at most one per cell and centred in it, so each visual token sees exactly one
  object (or none) and an object never straddles tokens.
* A scene has ``n_views`` views. The views are *independent* boards (think: several shelves of one room, or
  snapshots of a room at different times). They share the cell coordinate frame verbatim ("row 2 col 3" means
  the same cell in every view) and nothing else: there is no camera rotation, so moving between views never
  needs a coordinate transform. What links views in a question is content ("the object with the same colour
  in view 3") or the shared cell address ("the object in the same cell in view 1").
* Attributes are drawn independently per object, so the same colour/shape appears in several views: looking at
  the wrong view gives a plausible but wrong object, which is what makes late-chain perception matter.

Text coordinates are 1-based (``view 1``, ``row 1`` is the top row, ``col 1`` the left column); arrays and
record image indices are 0-based. Everything is deterministic from an integer seed (``numpy.random.Generator``;
no global RNG), and rendering uses PIL without antialiasing, so the same seed gives the same pixels.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("cube", "ball", "triangle", "cross", "ring")
COLOURS: tuple[str, ...] = ("red", "yellow", "green", "cyan", "blue", "purple")
SIZES: tuple[str, ...] = ("small", "large")

# Hues 60 degrees apart and similar saturation: separable by a tiny ViT from a single 14 px patch.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "yellow": (235, 210, 30),
    "green": (40, 190, 60),
    "cyan": (30, 200, 210),
    "blue": (50, 80, 235),
    "purple": (190, 60, 210),
}
BACKGROUND_RGB: tuple[int, int, int] = (40, 40, 40)
GRID_LINE_RGB: tuple[int, int, int] = (64, 64, 64)

EMPTY = -1


@dataclass(frozen=True)
class WorldConfig:
    """How scenes are drawn and rendered. ``image_size`` must be a multiple of ``grid``.

    Defaults match the calibration model: 112 px images, 4x4 cells of 28 px (= one merged visual token each).
    ``cell_tint`` > 0 shades each cell's background by its position (red channel + row * tint, blue channel +
    col * tint): an opt-in aid that makes a cell's coordinates visible in its own pixels, for models whose
    visual tokens carry position only through rotary attention and so struggle to *name* a found cell.
    """

    n_views: int = 4
    grid: int = 4
    image_size: int = 112
    min_objects: int = 5
    max_objects: int = 9
    grid_lines: bool = True
    cell_tint: int = 0

    def __post_init__(self) -> None:
        if self.n_views < 1:
            raise ValueError("n_views must be >= 1")
        if self.grid < 2 or self.image_size % self.grid:
            raise ValueError(f"image_size {self.image_size} must be a multiple of grid {self.grid} (>= 2)")
        if not 1 <= self.min_objects <= self.max_objects <= self.grid * self.grid:
            raise ValueError("need 1 <= min_objects <= max_objects <= grid*grid")
        if not 0 <= self.cell_tint * (self.grid - 1) <= 60:
            raise ValueError("cell_tint must be >= 0 and keep backgrounds dark (tint * (grid - 1) <= 60)")

    @property
    def cell_px(self) -> int:
        return self.image_size // self.grid


@dataclass(frozen=True)
class Obj:
    """One object: indices into SHAPES, COLOURS, SIZES."""

    shape: int
    colour: int
    size: int

    def describe(self) -> str:
        """The canonical text form, e.g. ``large red cube`` (size, colour, shape)."""
        return f"{SIZES[self.size]} {COLOURS[self.colour]} {SHAPES[self.shape]}"


@dataclass(frozen=True, eq=False)
class Scene:
    """The world model of one scene: per-view, per-cell attribute arrays of shape (V, G, G), EMPTY = -1.

    The arrays are the ground truth that questions are generated from, the solver answers from, and the
    perception teacher is trained on (see :meth:`labels`).
    """

    shape: np.ndarray
    colour: np.ndarray
    size: np.ndarray
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.shape.shape == self.colour.shape == self.size.shape) or self.shape.ndim != 3:
            raise ValueError("shape/colour/size arrays must all have shape (V, G, G)")
        empty = self.shape == EMPTY
        if not (np.array_equal(empty, self.colour == EMPTY) and np.array_equal(empty, self.size == EMPTY)):
            raise ValueError("a cell must be empty in all attributes or in none")

    @property
    def n_views(self) -> int:
        return int(self.shape.shape[0])

    @property
    def grid(self) -> int:
        return int(self.shape.shape[1])

    @property
    def present(self) -> np.ndarray:
        return self.shape != EMPTY

    def obj(self, v: int, r: int, c: int) -> Obj | None:
        """The object at view ``v``, row ``r``, column ``c`` (0-based), or None for an empty cell."""
        if self.shape[v, r, c] == EMPTY:
            return None
        return Obj(int(self.shape[v, r, c]), int(self.colour[v, r, c]), int(self.size[v, r, c]))

    def cells(self, v: int) -> list[tuple[int, int]]:
        """Occupied cells of view ``v`` in row-major order."""
        rs, cs = np.nonzero(self.present[v])
        return [(int(r), int(c)) for r, c in zip(rs, cs, strict=True)]

    def labels(self) -> dict[str, np.ndarray]:
        """Dense per-cell targets for a perception teacher: ``present`` (bool) and ``shape``/``colour``/``size``
        (int8 class index, -1 where empty), each of shape (V, G, G)."""
        return {
            "present": self.present.copy(),
            "shape": self.shape.astype(np.int8),
            "colour": self.colour.astype(np.int8),
            "size": self.size.astype(np.int8),
        }

    @classmethod
    def from_labels(cls, shape: np.ndarray, colour: np.ndarray, size: np.ndarray,
                    seed: int | None = None) -> Scene:
        """Rebuild the world model from label arrays (e.g. read back from ``labels.npz``)."""
        return cls(np.asarray(shape, dtype=np.int8), np.asarray(colour, dtype=np.int8),
                   np.asarray(size, dtype=np.int8), seed)

    def fingerprint(self) -> bytes:
        """Content identity (used to prove splits share no scene)."""
        return self.shape.tobytes() + self.colour.tobytes() + self.size.tobytes()


def generate_scene(seed: int, config: WorldConfig = WorldConfig()) -> Scene:
    """A random scene, fully determined by ``seed`` and ``config``.

    Each view independently gets between min_objects and max_objects objects in distinct random cells, with
    shape, colour and size drawn uniformly and independently. Independence is deliberate: it produces
    repeated colours and shapes across views (distractors) while keeping many attribute values unique within a
    view, so content lookups ("the purple object in view 3") are usually well defined.
    """
    rng = np.random.default_rng(seed)
    v, g = config.n_views, config.grid
    shape = np.full((v, g, g), EMPTY, dtype=np.int8)
    colour = np.full((v, g, g), EMPTY, dtype=np.int8)
    size = np.full((v, g, g), EMPTY, dtype=np.int8)
    for k in range(v):
        n = int(rng.integers(config.min_objects, config.max_objects + 1))
        flat = rng.permutation(g * g)[:n]
        rs, cs = np.divmod(flat, g)
        shape[k, rs, cs] = rng.integers(0, len(SHAPES), n)
        colour[k, rs, cs] = rng.integers(0, len(COLOURS), n)
        size[k, rs, cs] = rng.integers(0, len(SIZES), n)
    return Scene(shape, colour, size, seed)


def _shape_geometry(shape: str, cx: float, cy: float, rad: float) -> list[tuple[int, int]]:
    """Integer polygon vertices for the polygonal shapes (integer so rendering is exact and reproducible)."""
    if shape == "triangle":
        pts = [(cx, cy - rad), (cx + rad * 0.95, cy + rad * 0.8), (cx - rad * 0.95, cy + rad * 0.8)]
    elif shape == "cross":
        t = rad * 0.38
        pts = [(cx - t, cy - rad), (cx + t, cy - rad), (cx + t, cy - t), (cx + rad, cy - t), (cx + rad, cy + t),
               (cx + t, cy + t), (cx + t, cy + rad), (cx - t, cy + rad), (cx - t, cy + t), (cx - rad, cy + t),
               (cx - rad, cy - t), (cx - t, cy - t)]
    else:
        raise ValueError(shape)
    return [(int(round(x)), int(round(y))) for x, y in pts]


def object_radius(size: int, cell_px: int) -> int:
    """Half-extent of an object in pixels: large fills ~80% of the cell, small ~45%."""
    return max(2, int(round(cell_px * (0.40 if size == 1 else 0.23))))


def ring_width(rad: int) -> int:
    return max(2, int(round(rad * 0.42)))


def cell_centre(r: int, c: int, cell_px: int) -> tuple[int, int]:
    """Pixel (x, y) of the centre of cell (r, c); objects are drawn around it."""
    return c * cell_px + cell_px // 2, r * cell_px + cell_px // 2


def draw_object(draw: ImageDraw.ImageDraw, obj: Obj, r: int, c: int, cell_px: int) -> None:
    """Draw one object centred in its cell, never leaving the cell."""
    cx, cy = cell_centre(r, c, cell_px)
    rad = object_radius(obj.size, cell_px)
    fill = COLOUR_RGB[COLOURS[obj.colour]]
    name = SHAPES[obj.shape]
    box = (cx - rad, cy - rad, cx + rad, cy + rad)
    if name == "cube":
        s = int(round(rad * 0.85))
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif name == "ball":
        draw.ellipse(box, fill=fill)
    elif name == "ring":
        draw.ellipse(box, outline=fill, width=ring_width(rad))
    else:
        draw.polygon(_shape_geometry(name, cx, cy, rad), fill=fill)


def background_rgb(r: int, c: int, config: WorldConfig = WorldConfig()) -> tuple[int, int, int]:
    """The background colour of cell (r, c): plain unless ``config.cell_tint`` encodes the position."""
    t = config.cell_tint
    return BACKGROUND_RGB[0] + r * t, BACKGROUND_RGB[1], BACKGROUND_RGB[2] + c * t


def render_view(scene: Scene, v: int, config: WorldConfig = WorldConfig(),
                only: Collection[tuple[int, int]] | None = None) -> Image.Image:
    """Render view ``v`` as an RGB image of ``config.image_size`` px (deterministic, no antialiasing); with
    ``only``, just the objects at those (row, col) cells, the rest of the board drawn empty."""
    if scene.grid != config.grid:
        raise ValueError(f"scene grid {scene.grid} != config grid {config.grid}")
    cell = config.cell_px
    img = Image.new("RGB", (config.image_size, config.image_size), BACKGROUND_RGB)
    draw = ImageDraw.Draw(img)
    if config.cell_tint:
        for r in range(config.grid):
            for c in range(config.grid):
                draw.rectangle((c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1),
                               fill=background_rgb(r, c, config))
    if config.grid_lines:
        for k in range(1, config.grid):
            draw.line((k * cell, 0, k * cell, config.image_size - 1), fill=GRID_LINE_RGB, width=1)
            draw.line((0, k * cell, config.image_size - 1, k * cell), fill=GRID_LINE_RGB, width=1)
    for r, c in scene.cells(v):
        if only is not None and (r, c) not in only:
            continue
        obj = scene.obj(v, r, c)
        assert obj is not None
        draw_object(draw, obj, r, c, cell)
    return img


def shade_background(a: np.ndarray, v: int, shade: int, tint: int) -> bool:
    """Give view ``v``'s background pixels of the RGB array ``a`` (H, W, 3; changed in place) the green shade
    ``BACKGROUND + shade * v`` (see ``valr.demo.shade_views``); only pixels of the (tinted) background colour
    change. Returns whether any did."""
    if shade <= 0 or v == 0:
        return False
    cell = a.shape[0] // 4 if a.shape[0] % 4 == 0 else a.shape[0]
    r = np.arange(a.shape[0])[:, None] // cell
    c = np.arange(a.shape[1])[None, :] // cell
    bg = ((a[..., 0] == BACKGROUND_RGB[0] + r * tint) & (a[..., 1] == BACKGROUND_RGB[1])
          & (a[..., 2] == BACKGROUND_RGB[2] + c * tint))
    a[..., 1][bg] = BACKGROUND_RGB[1] + shade * v
    return bool(bg.any())


def render_scene(scene: Scene, config: WorldConfig = WorldConfig()) -> list[Image.Image]:
    """All views of a scene, in view order."""
    return [render_view(scene, v, config) for v in range(scene.n_views)]
