"""Lay a record out as one token sequence: the plain-CoT layout (stage 1) and the VaLR layout (stage 2).

Both share the prompt (the model's chat template, one expanded image placeholder run per image, then the
question) and the assistant turn; they differ only in what precedes each reasoning step::

    plain : <step 1>\\n <step 2>\\n ... Answer: <answer><|im_end|>
    valr  : <latent> [slot]*K </latent> <step 1>\\n <latent> [slot]*K </latent> <step 2>\\n ... Answer: ...

K counts the continuous positions only; the two markers are extra tokens (the paper is ambiguous on this).
Cross-entropy covers every assistant token including the markers and the end-of-turn token, never the prompt
and never the K slots (their inputs are hidden states, not tokens, so there is nothing to predict there).
Each step text is tokenized on its own, so a step's tokens are identical in both layouts.
"""

from __future__ import annotations

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


@dataclass
class LaidOut:
    record_id: str
    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    segment_starts: list[int] = field(default_factory=list)  # position of each segment's first slot
    segment_targets: list[Path | None] = field(default_factory=list)


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
    for step, target in zip(record.steps, targets, strict=True):
        if use_latents:
            ids.append(latent.start)
            labels.append(latent.start)
            out.segment_starts.append(len(ids))
            out.segment_targets.append(target)
            ids.extend([latent.slot] * cfg.k)
            labels.extend([IGNORE] * cfg.k)
            ids.append(latent.end)
            labels.append(latent.end)
        text = step.text.rstrip(cfg.step_delimiter) + cfg.step_delimiter
        piece = _text_ids(tokenizer, text)
        ids.extend(piece)
        labels.extend(piece)
    tail = _text_ids(tokenizer, cfg.answer_prefix + record.answer) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    ids.extend(tail)
    labels.extend(tail)
    if cfg.max_length is not None and len(ids) > cfg.max_length:
        raise LayoutError(f"record {record.id!r}: laid-out sequence has {len(ids)} tokens, over max_length="
                          f"{cfg.max_length}; raise max_length, shrink images (max_pixels) or split the record")
    return out
