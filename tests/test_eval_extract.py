"""Answer extraction from reasoning outputs (rules in valr.eval.extract's docstring)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from valr.eval.extract import answer_regions, extract_answer, option_texts

OPTS4 = ["A. left", "B. right", "C. back", "D. front"]


@pytest.mark.parametrize(("raw", "expected"), [
    ("B", "B"),
    ("B.", "B"),
    ("(B)", "B"),
    ("B)", "B"),
    ("**B**", "B"),
    ("[C]", "C"),
    ("The answer is (B).", "B"),
    ("The answer is B", "B"),
    ("the correct answer is: C", "C"),
    ("Answer: D", "D"),
    ("**Answer:** (D)", "D"),
    ("Answer**: D", "D"),
    ("Final answer: B. Because A is wrong.", "B"),
    ("Final Answer\n\nC", "C"),
    ("I compared views 1 and 2.\nFinal answer: \\boxed{C}", "C"),
    ("\\boxed{\\text{B}}", "B"),
    ("<answer>D</answer>", "D"),
    ("<answer> (c) </answer>", "C"),
    # the last marker wins
    ("The answer is A. Wait, re-checking the chair: the answer is C.", "C"),
    # a marker whose sentence holds no letter falls back to the text's last letter
    ("The answer is not obvious. Let me think. B is plausible... so C.", "C"),
    # the letter right after the marker wins even when it reads like the article
    ("The answer is A because B is behind the sofa.", "A"),
    ("Answer: A chair is to the left.", "A"),
])
def test_mc_formats(raw: str, expected: str) -> None:
    assert extract_answer(raw, "mc", OPTS4) == expected


@pytest.mark.parametrize(("raw", "expected"), [
    # "A" as an article must not win over a later explicit letter
    ("A chair is to the left of the table, so option C.", "C"),
    ("A sofa is visible in frame 3. B", "B"),
    # ... nor over an earlier explicit one
    ("B. A chair is near the door.", "B"),
    ("B is correct. A lamp stands behind it.", "B"),
    # "I" as a pronoun is not an option (and is beyond 4 options anyway)
    ("I think it is D)", "D"),
    # "option A" is explicit even before a lowercase word
    ("Looking again, option A is right", "A"),
    # a bare "A" with nothing else still counts
    ("A is correct", "A"),
    # letters beyond the options are ignored
    ("The answer is E", ""),
    ("Rooms E and F are far; D", "D"),
    # hyphenated / possessive letters are not options
    ("the T-shirt is on the B-side", ""),
    ("", ""),
    ("no idea", ""),
])
def test_mc_articles_and_negatives(raw: str, expected: str) -> None:
    assert extract_answer(raw, "mc", OPTS4) == expected


def test_mc_option_text_fallback() -> None:
    opts = ["(a) Yes", "(b) No"]
    assert option_texts(opts) == ["Yes", "No"]
    assert extract_answer("Answer: Yes, the feet are visible", "mc", opts) == "A"
    assert extract_answer("The butterfly's feet are not visible, so no.", "mc", opts) == "B"
    assert extract_answer("yes or no, hard to say", "mc", opts) == ""
    assert extract_answer("(b)", "mc", opts) == "B"
    colours = ["red", "dark red", "blue"]
    assert extract_answer("Answer: dark red", "mc", colours) == "B"
    assert extract_answer("It looks dark red to me", "mc", colours) == "B"


def test_mc_unknown_options_allows_all_letters() -> None:
    assert extract_answer("The answer is (F).", "mc") == "F"
    assert extract_answer("I pick G", "mc") == "G"


@pytest.mark.parametrize(("raw", "expected"), [
    ("5", "5"),
    ("There are 3 chairs and 4 tables, so 7 objects.", "7"),
    ("Answer: 1,234 meters. (I also saw 5 doors.)", "1234"),
    ("The room is about 12.5 square meters.", "12.5"),
    ("It is about 3.5m", "3.5"),
    ("x = -2.5", "-2.5"),
    ("between 3-4 m", "4"),
    ("Final answer: \\boxed{12}", "12"),
    ("\\boxed{1,000} after 3 checks", "1000"),
    ("The answer is .5", ".5"),
    ("Answer: three", "3"),
    ("I see two sofas", "2"),
    ("Counts: 1,2,3", "3"),
    ("Qwen2.5 says nothing", ""),
    ("", ""),
    ("<think>maybe 4? or 6</think>The answer is 5.", "5"),
    ("<think>it is 4</think>", "4"),
])
def test_numeric_formats(raw: str, expected: str) -> None:
    assert extract_answer(raw, "numeric") == expected


def test_think_tail_preferred() -> None:
    raw = "<think>The answer is A? No wait.</think>\nThe answer is C."
    assert extract_answer(raw, "mc", OPTS4) == "C"
    assert extract_answer("<think>clearly the answer is B</think>\n\n", "mc", OPTS4) == "B"


def test_regions_last_first() -> None:
    regions = answer_regions("Answer: A. more text. \\boxed{B} then final answer: C. trailing")
    assert regions == ["C.", "B", "A."]


def test_judge_called_only_when_rules_fail() -> None:
    calls: list[tuple[str, list[str], str]] = []

    def judge(question: str, options: Sequence[str], raw_output: str) -> str:
        calls.append((question, list(options), raw_output))
        return " C \n"

    assert extract_answer("The answer is B", "mc", OPTS4, question="q?", judge=judge) == "B"
    assert calls == []
    assert extract_answer("cannot tell", "mc", OPTS4, question="q?", judge=judge) == "C"
    assert calls == [("q?", OPTS4, "cannot tell")]


def test_bad_kind() -> None:
    with pytest.raises(ValueError, match="kind"):
        extract_answer("B", "open")
