"""Question families: every generated chain is answered correctly and checks out against the world model,
as judged by the independent solver (which reads only the question text and the scene)."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest

from valr.synth.questions import (
    FAMILIES,
    FAMILY_KIND,
    LETTERS,
    ROW_OPTIONS,
    TALLY_COLOURS,
    make_question,
    vocabulary,
)
from valr.synth.solver import UnsolvableQuestion, check_steps, solve
from valr.synth.world import generate_scene

WORDS = set(vocabulary())


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+|\d+", text)


def _questions(n_scenes: int = 40):
    rng = np.random.default_rng(123)
    out = []
    for s in range(n_scenes):
        scene = generate_scene(1000 + s)
        for family in FAMILIES:
            for n in range(1, 11):
                if (s + n) % 4:  # a quarter of the (scene, N) grid: covers every family and N many times
                    continue
                q = make_question(scene, family, n, rng, slot=int(rng.integers(4)))
                if q is not None:
                    out.append((scene, n, q))
    return out


QUESTIONS = _questions()


def test_coverage() -> None:
    seen = {(q.family, n) for _, n, q in QUESTIONS}
    assert seen == {(f, n) for f in FAMILIES for n in range(1, 11)}
    assert len(QUESTIONS) >= 350


def test_every_answer_matches_the_independent_solver_and_every_step_checks_out() -> None:
    for scene, n, q in QUESTIONS:
        sol = solve(scene, q.text)
        assert sol.answer == q.answer, (q.text, q.answer, sol)
        assert sol.answer_text == q.answer_text
        assert check_steps(scene, q.text, [(s.text, s.view) for s in q.steps]) == []
        assert len(q.steps) == n


def test_text_is_short_and_uses_the_closed_vocabulary() -> None:
    for _, _, q in QUESTIONS:
        assert q.kind == FAMILY_KIND[q.family]
        for s in q.steps:
            assert 5 <= len(s.text.split()) <= 13, s.text
        for text in [q.text, q.answer] + [s.text for s in q.steps]:
            for w in _words(text):
                assert w in WORDS or w.isdigit(), (w, text)


def test_multiple_choice_format() -> None:
    for _, _, q in QUESTIONS:
        if q.kind != "mc":
            assert q.answer.isdigit() and int(q.answer) > 0 and not q.options  # MRA divides by the answer
            continue
        assert len(q.options) == 4 and len(set(q.options)) == 4
        assert q.options[LETTERS.index(q.answer)] == q.answer_text
        assert q.text.endswith("\n".join(f"{L}. {o}" for L, o in zip(LETTERS, q.options, strict=True)))


def test_slot_sets_the_answer_letter() -> None:
    scene = generate_scene(5)
    for family in ("chase", "tally", "where"):
        for slot in range(4):
            q = make_question(scene, family, 3, np.random.default_rng(slot), slot=slot)
            if q is not None:
                assert q.answer == LETTERS[slot]


def test_consecutive_steps_look_at_different_views_and_chase_moves_alternate() -> None:
    for _, _, q in QUESTIONS:
        views = [s.view for s in q.steps]
        assert all(a != b for a, b in zip(views, views[1:], strict=False)), q.text
        if q.family in ("chase", "where"):
            kinds = re.findall(r"(colour|shape|cell) view", q.text.split("\n")[1])
            assert all(a != b for a, b in zip(kinds, kinds[1:], strict=False))


def test_chase_distractors_include_wrong_view_answers() -> None:
    """For most chase questions, some wrong option is what the last move gives in another view."""
    hits = total = 0
    for scene, n, q in QUESTIONS:
        if q.family != "chase" or n < 2:
            continue
        total += 1
        kind, view = re.findall(r"(colour|shape|cell) view (\d)", q.text.split("\n")[1])[-1]
        prev = re.match(r"#\d+ view (\d) (?:\w+ )*?row (\d) col (\d): (\w+) (\w+) (\w+)", q.steps[-2].text)
        assert prev
        for w in range(scene.n_views):
            if w == int(view) - 1:
                continue
            for r in range(4):
                for c in range(4):
                    o = scene.obj(w, r, c)
                    if o is None:
                        continue
                    d = o.describe()
                    same = {"colour": d.split()[1] == prev.group(5), "shape": d.split()[2] == prev.group(6),
                            "cell": (r + 1, c + 1) == (int(prev.group(2)), int(prev.group(3)))}[kind]
                    if same and d in q.options and d != q.answer_text:
                        hits += 1
                        break
                else:
                    continue
                break
            else:
                continue
            break
    assert total > 20 and hits / total > 0.6


def test_checker_catches_wrong_steps_and_targets() -> None:
    scene, _, q = next(x for x in QUESTIONS if x[2].family == "chase" and x[1] >= 3)
    steps = [(s.text, s.view) for s in q.steps]
    # wrong description at the right cell
    m = re.match(r"(.*: )(\w+) (\w+) (\w+)$", steps[1][0])
    assert m
    other = "small" if m.group(2) == "large" else "large"
    bad = list(steps)
    bad[1] = (f"{m.group(1)}{other} {m.group(3)} {m.group(4)}", steps[1][1])
    assert any("holds" in e for e in check_steps(scene, q.text, bad))
    # right text, wrong target image
    bad = list(steps)
    bad[2] = (steps[2][0], (steps[2][1] + 1) % scene.n_views)
    assert any("target image" in e for e in check_steps(scene, q.text, bad))
    # a step dropped
    assert check_steps(scene, q.text, steps[:-1])
    # the right lookup under the wrong marker
    bad = list(steps)
    bad[1] = (steps[1][0].replace("#2 ", "#3 ", 1), steps[1][1])
    assert any("expected #2" in e for e in check_steps(scene, q.text, bad))
    # a lookup by content must restate what it searched for, and only a lookup by content restates a key
    scene, _, q = next(x for x in QUESTIONS if x[2].family == "where" and x[1] >= 2)
    steps = [(s.text, s.view) for s in q.steps]
    named = re.match(r"start at #1 the (\w+ \w+) in view", q.text)
    assert named and f" {named.group(1)} at row " in steps[0][0]
    bad = [(re.sub(r" \w+ \w+ at row ", " row ", steps[0][0]), steps[0][1])] + steps[1:]
    assert any("restates None" in e for e in check_steps(scene, q.text, bad))
    kinds = re.findall(r"(colour|shape|cell) view", q.text.split("\n")[1])
    for (text, _), kind in zip(steps[1:], kinds, strict=True):
        assert (" at row " in text) == (kind != "cell"), (kind, text)
    # a count step with a wrong running total
    scene, _, q = next(x for x in QUESTIONS if x[2].family == "count" and x[1] >= 2)
    steps = [(s.text, s.view) for s in q.steps]
    t = re.sub(r"total (\d+)$", lambda mm: f"total {int(mm.group(1)) + 1}", steps[-1][0])
    assert any("running total" in e for e in check_steps(scene, q.text, steps[:-1] + [(t, steps[-1][1])]))


def test_solver_refuses_ill_posed_questions() -> None:
    scene = generate_scene(11)
    v, r, c = 0, *scene.cells(0)[0]
    o = scene.obj(v, r, c)
    assert o is not None
    # a colour move into a view where that colour is not unique
    for w in range(1, scene.n_views):
        if int((scene.colour[w] == o.colour).sum()) != 1:
            text = (f"start at #1 view 1 row {r + 1} col {c + 1}.\nmoves: #2 colour view {w + 1}.\n"
                    "what is the last object?\nA. x\nB. y\nC. z\nD. w")
            with pytest.raises(UnsolvableQuestion, match="matches, need exactly one"):
                solve(scene, text)
            break
    empty = np.argwhere(~scene.present[0])[0]
    text = f"read #1 view 1 row {empty[0] + 1} col {empty[1] + 1}.\nwhich colour is most common?\nA. red\nB. blue"
    with pytest.raises(UnsolvableQuestion, match="is empty"):
        solve(scene, text)
    with pytest.raises(UnsolvableQuestion, match="view 9 does not exist"):
        solve(scene, "count #1 red in view 9.\nwhat is the total?")
    with pytest.raises(UnsolvableQuestion, match="expected #2"):  # items must be numbered in order
        solve(scene, "count #1 red in view 1, #3 blue in view 2.\nwhat is the total?")


def test_generation_is_deterministic_per_rng_seed() -> None:
    scene = generate_scene(2)
    for family in FAMILIES:
        a = make_question(scene, family, 6, np.random.default_rng(9), slot=2)
        b = make_question(scene, family, 6, np.random.default_rng(9), slot=2)
        assert a == b and a is not None
        c = [make_question(scene, family, 6, np.random.default_rng(k), slot=2) for k in range(10, 14)]
        assert any(x != a for x in c)


def test_question_dataclass_is_frozen() -> None:
    _, _, q = QUESTIONS[0]
    assert replace(q, answer="Z").answer == "Z" and q.answer != "Z"


def test_fixed_options_keep_the_same_four_options_and_check_out() -> None:
    rng = np.random.default_rng(7)
    made = {"chase": 0, "tally": 0}
    for s in range(30):
        scene = generate_scene(2000 + s)
        for family, options in (("chase", ROW_OPTIONS), ("tally", TALLY_COLOURS)):
            for n in (1, 2, 5, 8):
                slot = (s + n) % 4
                q = make_question(scene, family, n, rng, slot=slot, fixed_options=True)
                if q is None:
                    continue
                made[family] += 1
                assert q.options == options and q.answer == LETTERS[slot] and q.answer_text == options[slot]
                sol = solve(scene, q.text)  # the independent solver reads the fixed question from its text
                assert (sol.answer, sol.answer_text) == (q.answer, q.answer_text)
                assert check_steps(scene, q.text, [(st.text, st.view) for st in q.steps]) == []
                if family == "chase":  # the letter is the last step's row
                    assert re.search(r"row (\d+) col \d+:", q.steps[-1].text).group(1) == str(slot + 1)
                for w in _words(q.text):
                    assert w in WORDS or w.isdigit(), w
    assert made["chase"] >= 80 and made["tally"] >= 60, made
    where = make_question(generate_scene(3), "where", 3, np.random.default_rng(0), slot=1, fixed_options=True)
    assert where is None or where.family == "where"  # where's options are fixed already; count has none
    from valr.synth.world import WorldConfig

    with pytest.raises(ValueError, match="grid of 4, not 3"):
        make_question(generate_scene(1, WorldConfig(grid=3, image_size=84)), "chase", 2, rng, fixed_options=True)


@pytest.mark.parametrize("fixed", [False, True])
def test_tally_counts_keep_a_right_tally_on_the_same_questions(fixed: bool) -> None:
    made = 0
    for s in range(25):
        scene = generate_scene(3000 + s)
        for n in (1, 3, 6, 8):
            plain = make_question(scene, "tally", n, np.random.default_rng([s, n]), slot=n % 4, fixed_options=fixed)
            q = make_question(scene, "tally", n, np.random.default_rng([s, n]), slot=n % 4, fixed_options=fixed,
                              tally_counts=True)
            if q is None:
                assert plain is None
                continue
            made += 1
            # the same question and cells; each step adds ", colour count", counted here from its own words
            assert (q.text, q.answer, [st.view for st in q.steps]) == (plain.text, plain.answer,
                                                                       [st.view for st in plain.steps])
            seen: dict[str, int] = {}
            for kept, bare in zip(q.steps, plain.steps, strict=True):
                colour = bare.text.split(": ")[1].split()[1]
                seen[colour] = seen.get(colour, 0) + 1
                assert kept.text == f"{bare.text}, {colour} {seen[colour]}"
            assert max(seen, key=seen.get) == q.answer_text  # the answer sits beside the largest count
            assert check_steps(scene, q.text, [(st.text, st.view) for st in q.steps]) == []
            assert check_steps(scene, plain.text, [(st.text, st.view) for st in plain.steps]) == []
    assert made >= 40, made


def test_the_checker_catches_a_wrong_or_partial_tally() -> None:
    scene = generate_scene(3001)
    q = next(x for k in range(50) if (x := make_question(scene, "tally", 4, np.random.default_rng(k), slot=0,
                                                         tally_counts=True)) is not None)
    steps = [(st.text, st.view) for st in q.steps]
    wrong = [*steps[:-1], (re.sub(r"\d+$", lambda m: str(int(m.group()) + 1), steps[-1][0]), steps[-1][1])]
    assert any("the tally should read" in e for e in check_steps(scene, q.text, wrong))
    partial = [(re.sub(r", \w+ \d+$", "", steps[0][0]), steps[0][1]), *steps[1:]]
    assert any("do not keep the tally" in e for e in check_steps(scene, q.text, partial))
    chase = next(x for k in range(50) if (x := make_question(scene, "chase", 2, np.random.default_rng(k))) is not None)
    tallied = [(f"{st.text}, red 1", st.view) for st in chase.steps]
    assert any("only tally steps" in e for e in check_steps(scene, chase.text, tallied))
