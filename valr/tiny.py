"""Tiny random Qwen2.5-VL models built from configs: for tests, smoke runs and benchmarks, with no download.

The same code path loads real checkpoints; these only differ in size. Token ids in the config (image, vision
start/end, pad, eos) are read from the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from valr.tokens import add_latent_tokens, qwen_tokenizer, train_bpe_tokenizer

# Qwen2Config's default rotary base, the tiny models' and the demo's (released Qwen2.5-VL checkpoints use 1,000,000)
QWEN2_ROPE_THETA = 10000.0

SMALL_CORPUS = [
    "Step 1: look at the image. Step 2: find the red cube left of the blue ball.\n",
    "The answer is B. Answer: 3. How many objects are there in view 2? Count the triangles.\n",
    "You are a helpful assistant. Describe the scene in detail, then answer the question.\n",
    "first second third next above below behind front near far large small green yellow\n",
]


@dataclass(frozen=True)
class TinyShape:
    """Model dimensions. ``head_dim/2`` must equal ``sum(mrope_section)`` (Qwen2.5-VL's 3-D rope split)."""

    hidden: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vision_depth: int = 2
    vision_hidden: int = 32
    vision_heads: int = 2
    max_positions: int = 4096
    # the rotary base. With 10,000 and a small head_dim the height and width axes (the lowest
    # frequencies) turn by at most 0.1 and 0.003 rad per cell, so attention can hardly tell cells apart by position.
    rope_theta: float = QWEN2_ROPE_THETA

    def mrope_section(self) -> list[int]:
        half = self.hidden // self.heads // 2
        t = half // 4
        h = (half - t) // 2
        return [t, h, half - t - h]


SHAPES = {
    "tiny": TinyShape(),
    # Tens of millions of parameters: realistic for timing on a laptop CPU (benchmarks).
    "bench": TinyShape(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1536, vision_depth=4,
                       vision_hidden=256, vision_heads=4),
}


def small_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained on a built-in corpus: fast models, any text still encodes."""
    return train_bpe_tokenizer(SMALL_CORPUS * 4, vocab_size=vocab_size)


def tiny_config(tokenizer: PreTrainedTokenizerBase, shape: TinyShape = SHAPES["tiny"],
                vocab_size: int | None = None) -> Qwen2_5_VLConfig:
    """``vocab_size`` may exceed the tokenizer (real Qwen checkpoints pad their vocabulary too)."""
    ids = tokenizer.convert_tokens_to_ids
    vocab = max(len(tokenizer), vocab_size or 0)
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
            num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.max_positions,
            rope_parameters=dict(rope_type="default", rope_theta=shape.rope_theta, mrope_section=shape.mrope_section()),
            bos_token_id=ids("<|im_start|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=shape.vision_depth, hidden_size=shape.vision_hidden, intermediate_size=shape.vision_hidden * 2,
            num_heads=shape.vision_heads, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
            window_size=112, out_hidden_size=shape.hidden, fullatt_block_indexes=[shape.vision_depth - 1],
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def tiny_image_processor(max_side: int = 112) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=max_side * max_side)


def build_tiny(tokenizer: str | PreTrainedTokenizerBase = "small", shape: str | TinyShape = "tiny",
               seed: int = 0, max_side: int = 112, vocab_size: int | None = None):
    """Return (model, tokenizer, image_processor): a random Qwen2.5-VL with latent tokens added."""
    tok = tokenizer
    if isinstance(tok, str):
        tok = {"small": small_tokenizer, "qwen": qwen_tokenizer}[tok]()
    add_latent_tokens(tok)
    shp = SHAPES[shape] if isinstance(shape, str) else shape
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(tok, shp, vocab_size)).eval()
    return model, tok, tiny_image_processor(max_side)
