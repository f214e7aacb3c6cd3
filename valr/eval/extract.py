r"""Answer extraction from reasoning outputs: raw chain-of-thought text in, a short answer string out.

Reasoning models write a chain before the answer, so the scoring rules (which read the first token) need the
answer pulled out first. The raw output is kept separately (the ``raw`` field of a predictions file); this
module only returns the extracted string, possibly empty when nothing answer-like is found.

Rule, in order:

0. Latent segments as valr's generation writes them in a raw output (``<latent>[16 latent positions]</latent>``,
   or a ``<latent>`` left open at the end when the token budget ran out) are removed first, so the number in
   the markup is never read as an answer.
1. If the text contains ``</think>`` and something follows it, only that tail is searched (the same rules,
   then the whole text if the tail gives nothing), so musings inside the thinking block do not win.
2. Answer regions, tried from the last one in the text backwards: the content of each ``\boxed{...}``, the
   content of each ``<answer>...</answer>``, and the text after each answer marker (case-insensitive):
   ``Final answer`` (optionally followed by ``:`` or ``is``), ``Answer:`` and ``answer is``
   (``**Answer:**`` and ``Answer**:`` also count); a marker's region runs to the end of the first line or
   sentence after it (a ``.``, ``!`` or ``?`` followed by a space), so the reasoning after it is not read.
   The first region that yields an answer wins:

   * multiple choice: the first option letter in the region that either comes first (only punctuation or
     markup before it: ``": **(B)**"``) or is written as a letter rather than a word (see below); failing
     that, the region's text read as an option's text (``"Answer: Yes"`` with options Yes/No -> ``A``);
   * numeric: the first number in the region.

3. No region yields anything: multiple choice takes the *last* option letter in the text (preferring the last
   one that is not word-like), else the one option whose text is the only option mentioned; numeric takes the
   *last* number in the text.

Option letters are uppercase A.. up to the number of options (A-Z when the options are unknown), standing
alone: not touching a letter, digit, apostrophe, underscore or hyphen, so ``(B)``, ``B.``, ``B)``, ``**B**``,
``[B]``, ``B:`` and a bare ``B`` all count, and lowercase ``(b)`` counts in brackets. The letters ``A`` and
``I`` are also English words: when followed by a lowercase word (``"A chair is ..."``, ``"I think"``) and not
preceded by ``option``/``choice`` they are word-like, and any later non-word-like letter wins over them.

Numbers: optional minus sign (only when it is not a hyphen between two words or numbers: ``3-4`` gives ``3``
and ``4``), digits with optional thousands separators (``1,234`` -> ``1234``) and decimals (``.5``, ``2.50``).
Scientific notation and fractions are not parsed. When a region or the text holds no digits, the number words
zero..twenty are read (``"Answer: three"`` -> ``3``). The number is returned as written, commas removed.

An optional ``Judge`` (any callable ``(question, options, raw_output) -> str``, e.g. an LLM grader) is called
only when the rules above extract nothing; its reply is stripped and returned as is.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_WORD_LETTERS = frozenset("AI")

_MARKER = re.compile(
    r"\bfinal\s+answer\b\**\s*(?:is\b|[:：])?|\banswer\b\**\s*(?:is\b\s*[:：]?|[:：])", re.IGNORECASE
)
_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.IGNORECASE | re.DOTALL)
_BOXED = "\\boxed{"
_UPPER = re.compile(r"(?<![A-Za-z0-9_'’\-])([A-Z])(?![A-Za-z0-9_'’\-])")
_LOWER_BRACKETED = re.compile(r"\(([a-z])\)")
_OPTION_WORD = re.compile(r"(?:option|choice)\s*[:#]?\s*[(\[]?\s*$", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])(-?)(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")
_NUMBER_WORDS = {
    w: i for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split())
}
_NUMBER_WORD = re.compile(r"\b(" + "|".join(_NUMBER_WORDS) + r")\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")
_OPTION_PREFIX = re.compile(r"^\s*[(\[]?[A-Za-z][)\].:]\s+")
_LATENT_SEGMENT = re.compile(r"<latent>.*?(?:</latent>|$)", re.DOTALL)


class Judge(Protocol):
    """Fallback extractor, e.g. an LLM grader: returns the answer (a letter or a number) or ``""``."""

    def __call__(self, question: str, options: Sequence[str], raw_output: str) -> str: ...


@dataclass(frozen=True)
class _Letter:
    pos: int
    letter: str
    word_like: bool


def option_texts(options: Sequence[str]) -> list[str]:
    """Options without a leading letter label: ``"A. left"`` / ``"(a) left"`` -> ``"left"``."""
    return [_OPTION_PREFIX.sub("", o, count=1).strip() for o in options]


def _letters(text: str, allowed: str) -> list[_Letter]:
    found: list[_Letter] = []
    for m in _UPPER.finditer(text):
        letter = m.group(1)
        if letter not in allowed:
            continue
        word_like = (
            letter in _WORD_LETTERS
            and re.match(r"\s+[a-z]", text[m.end():]) is not None
            and _OPTION_WORD.search(text[: m.start()]) is None
        )
        found.append(_Letter(m.start(1), letter, word_like))
    for m in _LOWER_BRACKETED.finditer(text):
        letter = m.group(1).upper()
        if letter in allowed:
            found.append(_Letter(m.start(1), letter, False))
    return sorted(found, key=lambda c: c.pos)


def _leading(text: str, pos: int) -> bool:
    return not any(ch.isalnum() for ch in text[:pos])


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def _option_from_text(text: str, options: Sequence[str], *, in_region: bool) -> str:
    texts = [_norm(t) for t in option_texts(options)]
    body = _norm(text)
    if not body or not any(texts):
        return ""
    if in_region:
        # The region starts with an option's text; the longest match wins ("dark red" over "red").
        starts = [(len(t), i) for i, t in enumerate(texts) if t and (body == t or body.startswith(t + " "))]
        if starts:
            return LETTERS[max(starts)[1]]
    mentioned = {i for i, t in enumerate(texts) if t and re.search(rf"(?<!\w){re.escape(t)}(?!\w)", body)}
    # A shorter option contained in a longer mentioned one ("red" in "dark red") is not a separate mention.
    mentioned = {i for i in mentioned if not any(j != i and texts[i] in texts[j] for j in mentioned)}
    return LETTERS[mentioned.pop()] if len(mentioned) == 1 else ""


def _mc_in_region(region: str, allowed: str, options: Sequence[str]) -> str:
    cands = _letters(region, allowed)
    for c in cands:
        if c.word_like and not _leading(region, c.pos):
            continue
        return c.letter
    if cands:
        return cands[0].letter
    return _option_from_text(region, options, in_region=True)


def _mc_in_text(text: str, allowed: str, options: Sequence[str]) -> str:
    cands = _letters(text, allowed)
    strong = [c for c in cands if not c.word_like]
    if strong:
        return strong[-1].letter
    if cands:
        return cands[-1].letter
    return _option_from_text(text, options, in_region=False)


def _numbers(text: str) -> list[str]:
    found = [sign + digits.replace(",", "") for sign, digits in _NUMBER.findall(text)]
    if not found:
        found = [str(_NUMBER_WORDS[w.lower()]) for w in _NUMBER_WORD.findall(text)]
    return found


def _boxed_contents(text: str) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    start = text.find(_BOXED)
    while start != -1:
        i, depth = start + len(_BOXED), 1
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        end = i - 1 if depth == 0 else len(text)
        out.append((start, text[start + len(_BOXED):end]))
        start = text.find(_BOXED, start + len(_BOXED))
    return out


def _first_sentence(text: str) -> str:
    """The text after a marker up to the end of its first line or sentence, not the reasoning after it."""
    body = text.lstrip()
    body = body.split("\n", 1)[0]
    end = _SENTENCE_END.search(body)
    return body[: end.start()] if end else body


def answer_regions(text: str) -> list[str]:
    """The candidate answer regions of a text, last in the text first (rule 2 of the module docstring)."""
    regions: list[tuple[int, str]] = _boxed_contents(text)
    regions += [(m.start(), m.group(1)) for m in _ANSWER_TAG.finditer(text)]
    regions += [(m.start(), _first_sentence(text[m.end():])) for m in _MARKER.finditer(text)]
    return [r for _, r in sorted(regions, key=lambda pr: pr[0], reverse=True)]


def _extract_rules(text: str, kind: str, options: Sequence[str]) -> str:
    allowed = LETTERS[: len(options)] if options else LETTERS
    for region in answer_regions(text):
        if kind == "mc":
            found = _mc_in_region(region, allowed, options)
        else:
            numbers = _numbers(region)
            found = numbers[0] if numbers else ""
        if found:
            return found
    if kind == "mc":
        return _mc_in_text(text, allowed, options)
    numbers = _numbers(text)
    return numbers[-1] if numbers else ""


def extract_answer(raw: str, kind: str, options: Sequence[str] = (), *, question: str = "",
                   judge: Judge | None = None) -> str:
    """The answer of a reasoning output: an option letter (``kind="mc"``) or a number (``"numeric"``)."""
    if kind not in ("mc", "numeric"):
        raise ValueError(f"kind must be 'mc' or 'numeric', got {kind!r}")
    found = ""
    raw = _LATENT_SEGMENT.sub("", raw)
    _, sep, tail = raw.rpartition("</think>")
    if sep and tail.strip():
        found = _extract_rules(tail, kind, options)
    if not found:
        found = _extract_rules(raw, kind, options)
    if not found and judge is not None:
        found = judge(question, list(options), raw).strip()
    return found
