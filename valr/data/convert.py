"""Convert LLaVA-style conversation data with chain-of-thought answers into valr records.

Input: a JSON list (or JSONL) of ``{"id", "image": str | "images": [str], "conversations": [{"from": "human" |
"gpt", "value": str}, ...]}``. The first human turn is the question (``<image>`` placeholders removed), the gpt
turn after it is the CoT answer. The answer is split into reasoning and final answer by, in order:
``<think>...</think>`` (reasoning inside, answer after, ``<answer>...</answer>`` tags stripped), an
``<answer>...</answer>`` block, or the last ``Answer: ...`` line (``valr.data.steps.split_answer``). The reasoning
becomes steps by ``valr.data.steps.split_steps``. Items that cannot be converted go to a rejects file with the
reason; items with more than one human/gpt exchange keep the first and are counted in the summary.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from valr.data.records import Record, RecordError, parse_record, write_records
from valr.data.steps import split_answer, split_steps

_THINK = re.compile(r"<think>(.*?)</think>(.*)", re.DOTALL | re.IGNORECASE)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_IMAGE = re.compile(r"\s*<image>\s*")


@dataclass
class ConvertReport:
    records: list[Record] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    extra_turns: int = 0


def split_cot(text: str) -> tuple[str, str | None]:
    """(reasoning, final answer or None) of one CoT answer."""
    think = _THINK.search(text)
    if think:
        reasoning, rest = think.group(1), think.group(2)
        tag = _ANSWER_TAG.search(rest)
        answer = (tag.group(1) if tag else rest).strip()
        return reasoning, answer or None
    tag = _ANSWER_TAG.search(text)
    if tag:
        return text[: tag.start()] + text[tag.end():], tag.group(1).strip() or None
    reasoning, answer = split_answer(text)
    return reasoning, answer


def _load_items(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def convert_llava(src: str | Path, out: str | Path, image_root: str | Path) -> ConvertReport:
    src, out, image_root = Path(src), Path(out), Path(image_root)
    report = ConvertReport()
    for index, item in enumerate(_load_items(src)):
        rid = item.get("id", index) if isinstance(item, dict) else index

        def reject(reason: str, rid=rid, index=index) -> None:
            report.rejects.append({"index": index, "id": rid, "reason": reason})

        if not isinstance(item, dict):
            reject("item is not a JSON object")
            continue
        images = item.get("images", item.get("image", []))
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            reject("'image'/'images' must be a path or a list of paths")
            continue
        turns = item.get("conversations")
        if not isinstance(turns, list):
            reject("no 'conversations' list")
            continue
        roles = [(t.get("from", t.get("role")), t.get("value", t.get("content"))) for t in turns
                 if isinstance(t, dict)]
        q = next((i for i, (r, _) in enumerate(roles) if r in ("human", "user")), None)
        a = next((i for i, (r, _) in enumerate(roles) if q is not None and i > q and r in ("gpt", "assistant")), None)
        if q is None or a is None or not isinstance(roles[q][1], str) or not isinstance(roles[a][1], str):
            reject("no human turn followed by a gpt turn")
            continue
        if sum(1 for r, _ in roles if r in ("human", "user")) > 1:
            report.extra_turns += 1
        question = _IMAGE.sub(" ", roles[q][1]).strip()
        reasoning, answer = split_cot(roles[a][1])
        if answer is None:
            reject("no final answer found (expected an 'Answer: ...' line, <answer>...</answer> or text after "
                   "</think>)")
            continue
        steps = split_steps(reasoning)
        if not steps:
            reject("no reasoning steps before the answer")
            continue
        paths = [p if Path(p).is_absolute() else str((image_root / p).resolve()) for p in images]
        try:
            record = parse_record({"id": str(rid), "images": paths, "question": question, "steps": steps,
                                   "answer": answer}, root=out.parent, source=str(src))
        except RecordError as e:
            reject(str(e))
            continue
        report.records.append(record)
    write_records(report.records, out)
    rejects = out.with_name(out.stem + ".rejects.jsonl")
    if report.rejects:
        rejects.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in report.rejects))
    elif rejects.exists():
        rejects.unlink()
    return report


def convert_main(args) -> int:
    report = convert_llava(args.src, args.out, args.image_root)
    out = Path(args.out)
    print(f"{args.src}: {len(report.records)} record(s) written to {out}, {len(report.rejects)} rejected"
          + (f" (reasons in {out.with_name(out.stem + '.rejects.jsonl')})" if report.rejects else ""))
    for r in report.rejects[:20]:
        print(f"  item {r['index']} (id {r['id']!r}): {r['reason']}")
    if len(report.rejects) > 20:
        print(f"  ... and {len(report.rejects) - 20} more")
    if report.extra_turns:
        print(f"note: {report.extra_turns} item(s) had more than one human/gpt exchange; only the first was "
              "converted")
    print(f"next: `valr data check {out}` verifies that every image exists and decodes")
    return 0
