"""The small protocol every model family implements, so the engine never touches family internals.

Adding Qwen2-VL, Qwen3-VL or a LLaVA-style model is one more file implementing ``Backbone`` and one
``register_backbone`` call. The engine only needs: token embeddings, image features, explicit position ids for
a whole laid-out sequence, a decoder call over a chunk with a KV cache, and the LM head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image
from transformers import Cache, PreTrainedModel


@dataclass
class ImageInputs:
    """Pixel inputs of a list of images in the backbone's format, plus how many placeholder tokens each needs."""

    pixel_values: torch.Tensor | None
    grid_thw: torch.Tensor | None  # (n_images, 3) in patch units; None without images
    n_tokens: list[int]

    @staticmethod
    def empty() -> ImageInputs:
        return ImageInputs(None, None, [])

    @staticmethod
    def concat(parts: list[ImageInputs]) -> ImageInputs | None:
        """All images of a batch in sample order; None when no sample has images."""
        parts = [p for p in parts if p.pixel_values is not None]
        if not parts:
            return None
        return ImageInputs(torch.cat([p.pixel_values for p in parts]), torch.cat([p.grid_thw for p in parts]),
                           [n for p in parts for n in p.n_tokens])


@dataclass
class DecoderOutput:
    last_hidden: torch.Tensor  # (B, W, D) final-layer, post-norm: what latent mode feeds back
    layer_hidden: torch.Tensor | None  # (B, W, D) output of the alignment layer, when asked for
    cache: Cache


class Backbone(Protocol):
    model: PreTrainedModel
    image_placeholder: str  # the token string repeated once per visual token in the prompt
    num_layers: int
    hidden_size: int

    def image_inputs(self, images: list[Image.Image]) -> ImageInputs: ...

    def embed(self, input_ids: torch.Tensor, images: ImageInputs | None) -> torch.Tensor:
        """Token embeddings with visual features in the placeholder rows (grad flows into both)."""
        ...

    def position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     images: ImageInputs | None) -> torch.Tensor:
        """Explicit position ids for whole sequences (any padding side), shape (P, B, L)."""
        ...

    def decode(self, embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
               cache: Cache | None, layer: int | None = None) -> DecoderOutput:
        """One decoder pass over a chunk; ``attention_mask`` covers cached columns plus the chunk."""
        ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def new_cache(self) -> Cache: ...


_REGISTRY: dict[str, Callable[..., Backbone]] = {}


def register_backbone(model_type: str, factory: Callable[..., Backbone]) -> None:
    """Make ``backbone_for`` wrap models whose ``config.model_type`` is ``model_type``."""
    _REGISTRY[model_type] = factory


def backbone_for(model: PreTrainedModel, **kwargs) -> Backbone:
    model_type = model.config.model_type
    if model_type not in _REGISTRY:
        raise ValueError(f"no valr backbone for model_type {model_type!r}; supported: {sorted(_REGISTRY)}. "
                         "Add one by implementing valr.backbones.base.Backbone and calling register_backbone.")
    return _REGISTRY[model_type](model, **kwargs)
