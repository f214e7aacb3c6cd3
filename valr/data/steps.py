"""Split raw chain-of-thought text into reasoning steps.

Rule (first that applies):

1. **Explicit markers.** If the text has at least two step markers at line starts — ``Step 1:``, ``Step 2.``,
   ``**Step 3**``, ``1.``, ``2)``, ``(3)`` — each marker starts a step and the step runs to the next marker.
   The marker itself is kept in the step text (models learn to write it).
2. **Paragraphs.** Else, if blank lines separate at least two paragraphs, each paragraph is a step.
3. **Lines.** Else each non-empty line is a step.

Whitespace inside a step is collapsed to single spaces (line breaks inside a step would look like step ends to
the generator, which treats a newline as the step delimiter). Empty steps are dropped. A trailing
"Answer: ..." line is not a step: pass it separately as the record's answer (see ``split_answer``).
"""

from __future__ import annotations

import re

_MARKER = re.compile(
    r"^\s*(?:\*\*)?(?:step\s*\d+\s*[:.)]?|\(?\d+[.)]|\(\d+\))(?:\*\*)?(?=\s|$)", re.IGNORECASE | re.MULTILINE
)
_ANSWER = re.compile(r"^\s*(?:final\s+)?answer\s*[:：]\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)


def _clean(s: str) -> str:
    return " ".join(s.split())


def split_steps(text: str) -> list[str]:
    """Split CoT text into steps by the documented rule above."""
    markers = list(_MARKER.finditer(text))
    if len(markers) >= 2:
        starts = [m.start() for m in markers] + [len(text)]
        pieces = [text[a:b] for a, b in zip(starts, starts[1:], strict=False)]
        head = text[: starts[0]]
        if head.strip():
            pieces.insert(0, head)
    elif len(paras := [p for p in re.split(r"\n\s*\n", text) if p.strip()]) >= 2:
        pieces = paras
    else:
        pieces = text.splitlines()
    return [c for p in pieces if (c := _clean(p))]


def split_answer(text: str) -> tuple[str, str | None]:
    """Separate the last ``Answer: ...`` line from the reasoning. Returns (reasoning, answer or None)."""
    found = list(_ANSWER.finditer(text))
    if not found:
        return text, None
    last = found[-1]
    return text[: last.start()] + text[last.end():], last.group(1)
