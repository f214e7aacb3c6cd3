"""Lay a record out as one token sequence: the plain-CoT layout (stage 1) and the VaLR layout (stage 2).

Both share the prompt (the model's chat template, one expanded image placeholder run per image, then the
question) and the assistant turn; they differ only in what precedes each reasoning step::

    plain : <step 1>\\n <step 2>\\n ... Answer: <answer><|im_end|>
    valr  : <latent> [slot]*K </latent> <step 1>\\n <latent> [slot]*K </latent> <step 2>\\n ... Answer: ...

With ``latent_after`` (a regular expression; not in the paper) each segment sits inside its step instead, right
after the step's *head*, the text the pattern matches at the start of the step::

    valr, latent_after="#\\d+ view \\d+": #1 view 2 <latent> [slot]*K </latent> red at row 1 col 3: ...\\n ...

so the segment comes after the step says *where* it looks (which the segment's alignment target is) and before
what it finds there. Latents placed before the step must work out the next step's image on their own; in the
built-in world a 4-layer model never did, and with the head first the alignment carried the step's view
(docs/results.md, seventh session).

K counts the continuous positions only; the two markers are extra tokens (the paper is ambiguous on this).
Cross-entropy covers every assistant token including the markers and the end-of-turn token, never the prompt
and never the K slots (their inputs are hidden states, not tokens, so there is nothing to predict there).
Each step text is tokenized on its own, so a step's tokens are identical in both layouts (a head split off by
``latent_after`` must end at a token boundary; the layout checks it). ``step_positions`` records where each
step's text tokens landed, for probes that score them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from valr.data.records import Record
from valr.tokens import LatentTokenIds

IGNORE = -100


@dataclass(frozen=True)
class LayoutConfig:
    k: int = 16  # latent positions per segment (0 = plain CoT layout)
    step_delimiter: str = "\n"
    answer_prefix: str = "Answer: "
    system_prompt: str | None = None  # None: the chat template's default
    max_length: int | None = None  # error (never truncate) when a sequence is longer
    latent_after: str | None = None  # regex: put each step's latent segment after this match at the step's start


@dataclass
class LaidOut:
    record_id: str
    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    segment_starts: list[int] = field(default_factory=list)  # position of each segment's first slot
    segment_targets: list[Path | None] = field(default_factory=list)
    step_positions: list[list[int]] = field(default_factory=list)  # positions of each step's text tokens


class LayoutError(ValueError):
    pass


def prompt_text(tokenizer: PreTrainedTokenizerBase, question: str, n_images: int,
                system_prompt: str | None = None) -> str:
    """The chat-formatted prompt, images first (Qwen's convention), ending with the assistant header."""
    if not getattr(tokenizer, "chat_template", None):
        raise LayoutError("tokenizer has no chat template; valr needs the model's chat format (save the "
                          "checkpoint's tokenizer with its chat_template, or use valr.tokens.QWEN_VL_CHAT_TEMPLATE)")
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str, image_tokens: list[int], placeholder: str,
               system_prompt: str | None = None) -> list[int]:
    """Token ids of the prompt with each image's placeholder repeated once per visual token."""
    text = prompt_text(tokenizer, question, len(image_tokens), system_prompt)
    parts = text.split(placeholder)
    if len(parts) != len(image_tokens) + 1:
        raise LayoutError(f"chat template produced {len(parts) - 1} image placeholders for "
                          f"{len(image_tokens)} images")
    expanded = parts[0] + "".join(placeholder * n + rest for n, rest in zip(image_tokens, parts[1:], strict=True))
    return tokenizer(expanded, add_special_tokens=False)["input_ids"]


def _text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def split_head(tokenizer: PreTrainedTokenizerBase, record_id: str, index: int, text: str, pattern: str | None,
               ) -> tuple[list[int], list[int]]:
    """A step's token ids as (head, rest): the head is what ``pattern`` matches at the start of the step (empty
    without a pattern). Raises if the step has no head or if splitting changes the step's tokens."""
    ids = _text_ids(tokenizer, text)
    if pattern is None:
        return [], ids
    m = re.match(pattern, text)
    if m is None or m.end() == 0:
        raise LayoutError(f"record {record_id!r}, step {index + 1}: latent_after={pattern!r} does not match the "
                          f"start of {text!r}; every step must begin with its head (fix the step or the pattern)")
    head, rest = _text_ids(tokenizer, text[:m.end()]), _text_ids(tokenizer, text[m.end():])
    if head + rest != ids:
        raise LayoutError(f"record {record_id!r}, step {index + 1}: splitting {text!r} after {text[:m.end()]!r} "
                          f"changes its tokens; end latent_after's match at a token boundary (e.g. before a space)")
    return head, rest


def layout_record(record: Record, tokenizer: PreTrainedTokenizerBase, latent: LatentTokenIds | None,
                  image_tokens: list[int], placeholder: str, cfg: LayoutConfig) -> LaidOut:
    """Token ids and labels of one record. ``latent=None`` or ``cfg.k == 0`` gives the plain-CoT layout."""
    if len(image_tokens) != len(record.images):
        raise LayoutError(f"record {record.id!r}: {len(record.images)} images but {len(image_tokens)} counts")
    ids = prompt_ids(tokenizer, record.question, image_tokens, placeholder, cfg.system_prompt)
    labels = [IGNORE] * len(ids)
    out = LaidOut(record.id, ids, labels, prompt_length=len(ids))
    use_latents = latent is not None and cfg.k > 0
    targets = record.target_paths()
    for i, (step, target) in enumerate(zip(record.steps, targets, strict=True)):
        text = step.text.rstrip(cfg.step_delimiter) + cfg.step_delimiter
        head, rest = split_head(tokenizer, record.id, i, text, cfg.latent_after if use_latents else None)
        positions = list(range(len(ids), len(ids) + len(head)))
        ids.extend(head)
        labels.extend(head)
        if use_latents:
            ids.append(latent.start)
            labels.append(latent.start)
            out.segment_starts.append(len(ids))
            out.segment_targets.append(target)
            ids.extend([latent.slot] * cfg.k)
            labels.extend([IGNORE] * cfg.k)
            ids.append(latent.end)
            labels.append(latent.end)
        positions += range(len(ids), len(ids) + len(rest))
        out.step_positions.append(positions)
        ids.extend(rest)
        labels.extend(rest)
    tail = _text_ids(tokenizer, cfg.answer_prefix + record.answer) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    ids.extend(tail)
    labels.extend(tail)
    if cfg.max_length is not None and len(ids) > cfg.max_length:
        raise LayoutError(f"record {record.id!r}: laid-out sequence has {len(ids)} tokens, over max_length="
                          f"{cfg.max_length}; raise max_length, shrink images (max_pixels) or split the record")
    return out
