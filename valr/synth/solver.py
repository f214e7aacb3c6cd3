"""An independent solver and chain checker for the spatial world's questions.

Independence is the point: the solver never sees the generated chain or the generator's internal choices. It
parses the *question text* (so it also proves the text is unambiguous), executes it on the scene's world model
(the attribute arrays of :class:`~valr.synth.world.Scene`, which can be rebuilt from ``labels.npz``), and
refuses questions whose lookups are undefined (an empty cell, a colour that is not unique in a view, a tie for
the most common colour). The checker then verifies every step of a chain: its stated facts hold in the world,
it looks at the view it names (its alignment target), and it is the lookup the question calls for at that point.
It shares only the vocabulary with the generator (:mod:`valr.synth.world`), not its code paths.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from valr.data.records import Record
from valr.synth.world import COLOURS, SHAPES, SIZES, Scene


class UnsolvableQuestion(ValueError):
    """The question text is malformed or a lookup it asks for is undefined in the scene."""


@dataclass(frozen=True)
class Expected:
    """What one step must establish: a lookup (view, row, col) or a count (view, attribute word, running total).

    All 0-based; ``row``/``col`` are None for counts, ``word``/``total`` None for lookups except tally's, where they
    are the colour read and how many of that colour the chain has read so far (a step may keep that tally:
    ``..., red 2``). ``key`` is what a lookup by content searched for (a colour or shape word, or "colour
    shape"), which its step restates; None for a lookup by address.
    """

    view: int
    row: int | None = None
    col: int | None = None
    word: str | None = None
    total: int | None = None
    key: str | None = None


@dataclass(frozen=True)
class Solution:
    family: str
    answer: str
    answer_text: str
    trace: tuple[Expected, ...]


_OPTION = re.compile(r"^([A-Z])\. (.+)$")
_CELL = r"view (\d+) row (\d+) col (\d+)"
_MOVE = re.compile(r"^#(\d+) (colour|shape|cell) view (\d+)$")
_LOOKUP_STEP = re.compile(r"^#(\d+) view (\d+) (?:(\w+(?: \w+)?) at )?row (\d+) col (\d+): (\w+) (\w+) (\w+)"
                          r"(?:, (\w+) (\d+))?$")
_COUNT_STEP = re.compile(r"^#(\d+) view (\d+) (\w+): (\d+), total (\d+)$")


def _numbered(found: str, expected: int, what: str) -> None:
    """Items and steps carry markers #1, #2, ... in order; anything else is malformed."""
    if int(found) != expected:
        raise UnsolvableQuestion(f"{what} is marked #{found}, expected #{expected}")
_QUADRANT_NAMES = ("top left", "top right", "bottom left", "bottom right")


def _view(scene: Scene, text: str) -> int:
    v = int(text) - 1
    if not 0 <= v < scene.n_views:
        raise UnsolvableQuestion(f"view {text} does not exist (scene has {scene.n_views} views)")
    return v


def _coord(scene: Scene, text: str) -> int:
    i = int(text) - 1
    if not 0 <= i < scene.grid:
        raise UnsolvableQuestion(f"row/col {text} is off the {scene.grid}x{scene.grid} grid")
    return i


def _options(lines: Sequence[str]) -> dict[str, str]:
    opts: dict[str, str] = {}
    for line in lines:
        m = _OPTION.match(line)
        if not m:
            raise UnsolvableQuestion(f"not an option line: {line!r}")
        opts[m.group(1)] = m.group(2)
    if len(set(opts.values())) != len(opts):
        raise UnsolvableQuestion("options are not distinct")
    return opts


def _letter(opts: dict[str, str], text: str) -> str:
    hits = [k for k, v in opts.items() if v == text]
    if len(hits) != 1:
        raise UnsolvableQuestion(f"the true answer {text!r} is not exactly one of the options {opts}")
    return hits[0]


def _describe(scene: Scene, v: int, r: int, c: int) -> str:
    if scene.shape[v, r, c] < 0:
        raise UnsolvableQuestion(f"view {v + 1} row {r + 1} col {c + 1} is empty")
    return f"{SIZES[scene.size[v, r, c]]} {COLOURS[scene.colour[v, r, c]]} {SHAPES[scene.shape[v, r, c]]}"


def _unique(mask: np.ndarray, what: str) -> tuple[int, int]:
    rs, cs = np.nonzero(mask)
    if len(rs) != 1:
        raise UnsolvableQuestion(f"{what}: {len(rs)} matches, need exactly one")
    return int(rs[0]), int(cs[0])


def _run_moves(scene: Scene, start: Expected, moves_line: str) -> list[Expected]:
    """The lookups of a moves line from ``start``: each move's key is the colour or shape word of the object it
    moves from (none for a cell move)."""
    v, r, c = start.view, start.row, start.col
    assert r is not None and c is not None
    if not (moves_line.startswith("moves: ") and moves_line.endswith(".")):
        raise UnsolvableQuestion(f"bad moves line {moves_line!r}")
    body = moves_line[len("moves: "):-1]
    path = [start]
    if body == "none":
        return path
    for i, part in enumerate(body.split(", ")):
        m = _MOVE.match(part)
        if not m:
            raise UnsolvableQuestion(f"bad move {part!r}")
        _numbered(m.group(1), i + 2, f"move {part!r}")
        kind, w = m.group(2), _view(scene, m.group(3))
        _describe(scene, v, r, c)  # the current cell must hold an object
        key = None
        if kind == "cell":
            _describe(scene, w, r, c)
        elif kind == "colour":
            key = COLOURS[scene.colour[v, r, c]]
            r, c = _unique(scene.colour[w] == scene.colour[v, r, c], f"colour in view {w + 1}")
        else:
            key = SHAPES[scene.shape[v, r, c]]
            r, c = _unique(scene.shape[w] == scene.shape[v, r, c], f"shape in view {w + 1}")
        v = w
        path.append(Expected(v, r, c, key=key))
    return path


def _solve_chase(scene: Scene, lines: list[str]) -> Solution:
    m = re.fullmatch(rf"start at #1 {_CELL}\.", lines[0])
    if not m or lines[2] not in ("what is the last object?", "which row is the last object in?"):
        raise UnsolvableQuestion("not a chase question")
    v, r, c = _view(scene, m.group(1)), _coord(scene, m.group(2)), _coord(scene, m.group(3))
    path = _run_moves(scene, Expected(v, r, c), lines[1])
    last = path[-1]
    text = _describe(scene, last.view, last.row, last.col)  # type: ignore[arg-type]
    if lines[2].startswith("which row"):
        text = f"row {last.row + 1}"  # type: ignore[operator]
    return Solution("chase", _letter(_options(lines[3:]), text), text, tuple(path))


def _solve_where(scene: Scene, lines: list[str]) -> Solution:
    m = re.fullmatch(r"start at #1 the (\w+) (\w+) in view (\d+)\.", lines[0])
    if not m or lines[2] != "where is the last object?":
        raise UnsolvableQuestion("not a where question")
    if m.group(1) not in COLOURS or m.group(2) not in SHAPES:
        raise UnsolvableQuestion(f"unknown object {m.group(1)} {m.group(2)}")
    v = _view(scene, m.group(3))
    mask = (scene.colour[v] == COLOURS.index(m.group(1))) & (scene.shape[v] == SHAPES.index(m.group(2)))
    r, c = _unique(mask, f"the {m.group(1)} {m.group(2)} in view {v + 1}")
    path = _run_moves(scene, Expected(v, r, c, key=f"{m.group(1)} {m.group(2)}"), lines[1])
    lr, lc = path[-1].row, path[-1].col
    assert lr is not None and lc is not None
    half = scene.grid // 2
    text = f"{'top' if lr < half else 'bottom'} {'left' if lc < half else 'right'}"
    return Solution("where", _letter(_options(lines[3:]), text), text, tuple(path))


def _attribute_count(scene: Scene, v: int, word: str) -> int:
    for names, arr in ((COLOURS, scene.colour), (SHAPES, scene.shape), (SIZES, scene.size)):
        if word in names:
            return int((arr[v] == names.index(word)).sum())
    raise UnsolvableQuestion(f"unknown attribute {word!r}")


def _solve_count(scene: Scene, lines: list[str]) -> Solution:
    if len(lines) != 2 or lines[1] != "what is the total?" or not lines[0].startswith("count ") \
            or not lines[0].endswith("."):
        raise UnsolvableQuestion("not a count question")
    total, trace = 0, []
    for i, part in enumerate(lines[0][len("count "):-1].split(", ")):
        m = re.fullmatch(r"#(\d+) (\w+) in view (\d+)", part)
        if not m:
            raise UnsolvableQuestion(f"bad count term {part!r}")
        _numbered(m.group(1), i + 1, f"count term {part!r}")
        v = _view(scene, m.group(3))
        total += _attribute_count(scene, v, m.group(2))
        trace.append(Expected(v, word=m.group(2), total=total))
    return Solution("count", str(total), str(total), tuple(trace))


def _solve_tally(scene: Scene, lines: list[str]) -> Solution:
    if lines[1] != "which colour is most common?" or not lines[0].startswith("read ") \
            or not lines[0].endswith("."):
        raise UnsolvableQuestion("not a tally question")
    trace, colours = [], []
    seen: Counter[str] = Counter()
    for i, part in enumerate(lines[0][len("read "):-1].split(", ")):
        m = re.fullmatch(rf"#(\d+) {_CELL}", part)
        if not m:
            raise UnsolvableQuestion(f"bad cell {part!r}")
        _numbered(m.group(1), i + 1, f"cell {part!r}")
        v, r, c = _view(scene, m.group(2)), _coord(scene, m.group(3)), _coord(scene, m.group(4))
        _describe(scene, v, r, c)
        colours.append(COLOURS[scene.colour[v, r, c]])
        seen[colours[-1]] += 1
        trace.append(Expected(v, r, c, word=colours[-1], total=seen[colours[-1]]))
    ranked = Counter(colours).most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        raise UnsolvableQuestion(f"no unique most common colour: {ranked}")
    text = ranked[0][0]
    return Solution("tally", _letter(_options(lines[2:]), text), text, tuple(trace))


def solve(scene: Scene, question: str) -> Solution:
    """Answer ``question`` from the world model alone; raises UnsolvableQuestion if it is ill-posed."""
    lines = question.split("\n")
    head = lines[0]
    if head.startswith("start at #1 view") and len(lines) >= 3:
        return _solve_chase(scene, lines)
    if head.startswith("start at #1 the") and len(lines) >= 3:
        return _solve_where(scene, lines)
    if head.startswith("count "):
        return _solve_count(scene, lines)
    if head.startswith("read ") and len(lines) >= 2:
        return _solve_tally(scene, lines)
    raise UnsolvableQuestion(f"unrecognised question {head!r}")


def check_steps(scene: Scene, question: str, steps: Sequence[tuple[str, int | None]]) -> list[str]:
    """Verify a chain step by step; returns the problems found (empty list = every step checks out).

    ``steps`` are (text, target view index) pairs. A lookup step ``view V row R col C: size colour shape`` must
    describe the object really at that cell (a lookup by content restates its key: ``view V KEY at row R ...``),
    and a count step ``view V word: n, total t`` must give the true count and running total; each must be the
    lookup the question calls for at that position and target the view it names.
    """
    try:
        sol = solve(scene, question)
    except UnsolvableQuestion as e:
        return [f"question: {e}"]
    errors = []
    kept: dict[int, bool] = {}  # tally step number -> does it keep the tally (all of a chain's steps or none)
    if len(steps) != len(sol.trace):
        errors.append(f"chain has {len(steps)} steps, the question needs {len(sol.trace)}")
    for i, ((text, target), exp) in enumerate(zip(steps, sol.trace, strict=False)):
        where = f"step {i + 1} ({text!r})"
        lookup = exp.row is not None
        m = (_LOOKUP_STEP if lookup else _COUNT_STEP).match(text)
        if not m:
            errors.append(f"{where}: not a {'lookup' if lookup else 'count'} step")
            continue
        if int(m.group(1)) != i + 1:
            errors.append(f"{where}: marked #{m.group(1)}, expected #{i + 1}")
        if lookup:
            v, r, c = int(m.group(2)) - 1, int(m.group(4)) - 1, int(m.group(5)) - 1
            if (v, r, c) != (exp.view, exp.row, exp.col):
                errors.append(f"{where}: looks at the wrong cell, expected view {exp.view + 1} row "
                              f"{exp.row + 1} col {exp.col + 1}")
                continue
            if m.group(3) != exp.key:
                errors.append(f"{where}: restates {m.group(3)!r} as what it searched for, expected {exp.key!r}")
            said = " ".join(m.group(6, 7, 8))
            if said != _describe(scene, v, r, c):
                errors.append(f"{where}: the cell holds {_describe(scene, v, r, c)!r}")
            if m.group(9) is not None and sol.family != "tally":
                errors.append(f"{where}: keeps a tally ({m.group(9)} {m.group(10)}), which only tally steps do")
            elif sol.family == "tally":
                kept[i + 1] = m.group(9) is not None
                if kept[i + 1] and (m.group(9), int(m.group(10))) != (exp.word, exp.total):
                    errors.append(f"{where}: the tally should read {exp.word} {exp.total}")
        else:
            v, word, n, total = int(m.group(2)) - 1, m.group(3), int(m.group(4)), int(m.group(5))
            if (v, word) != (exp.view, exp.word):
                errors.append(f"{where}: counts the wrong thing, expected {exp.word} in view {exp.view + 1}")
                continue
            if n != _attribute_count(scene, v, word):
                errors.append(f"{where}: true count is {_attribute_count(scene, v, word)}")
            if total != exp.total:
                errors.append(f"{where}: running total should be {exp.total}")
        if target != exp.view:
            errors.append(f"{where}: target image {target} is not the view it looks at ({exp.view})")
    if any(kept.values()) and not all(kept.values()):
        errors.append(f"steps {[i for i, k in kept.items() if not k]} do not keep the tally the other steps keep")
    return errors


def check_record(record: Record, scene: Scene) -> list[str]:
    """Check a stored record against its scene: the answer is the solver's and every step checks out."""
    try:
        sol = solve(scene, record.question)
    except UnsolvableQuestion as e:
        return [f"{record.id}: {e}"]
    errors = []
    if record.answer != sol.answer:
        errors.append(f"answer {record.answer!r} but the solver says {sol.answer!r} ({sol.answer_text})")
    steps = [(s.text, None if s.target is None else s.target.image_index) for s in record.steps]
    errors += check_steps(scene, record.question, steps)
    return [f"{record.id}: {e}" for e in errors]
