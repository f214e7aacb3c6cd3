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
from transformers.cache_utils import DynamicLayer


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
    latent_feed: str  # how a final hidden state becomes the next latent input; one of LATENT_FEEDS
    image_token_id: int  # the placeholder token's id (the image bottleneck masks these columns)

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

    def new_cache(self, append_only: bool = False) -> Cache:
        """An empty KV cache; ``append_only``: one whose full-attention layers are ``AppendOnlyLayer`` (no-grad
        decoding that only ever appends: generation, the no-grad rounds of the fast training forward)."""
        ...


class AppendOnlyLayer(DynamicLayer):
    """A ``DynamicLayer`` that appends into a buffer grown by doubling, instead of concatenating the whole cache
    with every new chunk. Decoding n chunks then copies O(total length) instead of O(n x length) (the latent
    loop runs one chunk per slot: 129 per sample at K = 16 and 8 steps). Returns views of the buffer, so it is for
    no-grad use only (an in-place write would invalidate tensors autograd saved)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._buf_k: torch.Tensor | None = None
        self._buf_v: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            raise RuntimeError("AppendOnlyLayer is for no-grad decoding; use a DynamicCache when gradients flow")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, m = self.get_seq_length(), key_states.shape[-2]
        buf_k, buf_v = self._buf_k, self._buf_v
        stale = buf_k is None or n > 0 and self.keys.data_ptr() != buf_k.data_ptr()  # replaced (crop, reorder)
        if stale or n + m > buf_k.shape[-2] or buf_k.shape[0] != key_states.shape[0]:
            size = max(2 * n, n + m, 64)
            buf_k = key_states.new_empty(*key_states.shape[:-2], size, key_states.shape[-1])
            buf_v = value_states.new_empty(*value_states.shape[:-2], size, value_states.shape[-1])
            if n:
                buf_k[:, :, :n] = self.keys
                buf_v[:, :, :n] = self.values
            self._buf_k, self._buf_v = buf_k, buf_v
        buf_k[:, :, n:n + m] = key_states
        buf_v[:, :, n:n + m] = value_states
        self.keys, self.values = buf_k[:, :, :n + m], buf_v[:, :, :n + m]
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self._buf_k = self._buf_v = None


# "hidden": the final post-norm hidden state as it is (the paper, Coconut). "embedding_rms": the same vector
# rescaled to the root-mean-square of the input-embedding table, so fed latents sit at the scale of the token
# embeddings the model reads everywhere else (not in the paper; in a pre-norm model the final hidden state is
# usually many times larger, which peers report too). "pause": nothing is fed back; every slot keeps the learned
# embedding of the slot token, so the K positions are pause tokens (Goyal et al., 2024): the control that tells
# what the feedback adds over K extra positions of computation.
LATENT_FEEDS = ("hidden", "embedding_rms", "pause")


def _check_option(key: str, value: str, allowed: tuple[str, ...], paper: str) -> str:
    """``value`` if it is one of ``allowed``; else a ValueError naming the key, the choices and the paper's choice,
    so a typo in a config, an override or a checkpoint file reads the same everywhere."""
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not one of {list(allowed)} ({paper})")
    return value


def check_latent_feed(name: str, key: str = "latent_feed") -> str:
    return _check_option(key, name, LATENT_FEEDS,
                         "'hidden', the paper's fed hidden states, unless you mean to test another feed")


def feeds_back(backbone: Backbone) -> bool:
    """Whether a slot's input depends on the hidden state before it (False for pause tokens: no recurrence)."""
    return check_latent_feed(getattr(backbone, "latent_feed", "hidden")) != "pause"


def latent_feeder(backbone: Backbone, slot_embedding: torch.Tensor | None = None
                  ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The map from final hidden states (..., D) to fed latent inputs under ``backbone.latent_feed``.

    Build it once per forward or generation call: the embedding scale is read from the weights then (and detached),
    so a training step sees one constant scale and gradients flow through the per-vector rescaling only. Pause
    tokens ignore the hidden state and need ``slot_embedding`` (the slot token's input embedding, shape (D,))."""
    how = check_latent_feed(getattr(backbone, "latent_feed", "hidden"))
    if how == "hidden":
        return lambda h: h
    if how == "pause":
        if slot_embedding is None:
            raise ValueError("latent_feed 'pause' feeds the slot token's embedding: pass slot_embedding")
        return lambda h: slot_embedding.to(h.device, h.dtype).expand_as(h)
    weight = backbone.model.get_input_embeddings().weight.detach()
    target = weight.float().pow(2).mean().sqrt()

    def rescale(h: torch.Tensor) -> torch.Tensor:
        rms = h.float().pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()
        return (h.float() * (target.to(h.device) / rms)).to(h.dtype)

    return rescale


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


# The image bottleneck (a diagnostic layout, not the paper's method): only image tokens and latent slots attend to
# image tokens, so every text token, the question's included, reaches the images through the latents alone.
# Comparing latents without alignment against VaLR under it measures whether the alignment makes the latents
# carry what the text needs from the image (docs/results.md, What next 4(c)). Off unless a backbone sets
# ``image_bottleneck = True`` (from ``valr.image_bottleneck`` of the run or checkpoint).


def image_bottleneck(backbone: Backbone) -> bool:
    return bool(getattr(backbone, "image_bottleneck", False))


# Latent grid positions (not in the paper, where latent slots are text tokens with 1-D positions): slot j of a
# segment whose first slot has the 1-D position p sits at (p, p + j // side, p + j % side) on Qwen2.5-VL's
# (temporal, height, width) rotary axes, as the model places an image's merged patches; text after the segment
# keeps its 1-D positions. Meant to let the text address a cell of the aligned grid as it addresses an image's;
# on the demo's model it did not, and it slowed the alignment: there the height and width axes get the lowest
# rotary frequencies, so a segment's slots are nearly indistinguishable to attention (docs/results.md item 66).
# Off unless a backbone sets ``latent_grid_side`` (from ``valr.latent_positions = "grid"`` of a run or checkpoint).
LATENT_POSITIONS = ("text", "grid")


def check_latent_positions(name: str, key: str = "latent_positions") -> str:
    return _check_option(key, name, LATENT_POSITIONS,
                         "'text', the paper's 1-D positions, unless you mean to test grid positions")


def latent_grid(backbone: Backbone) -> int:
    """The grid side latent slots are placed on (0: 1-D text positions, the paper)."""
    return int(getattr(backbone, "latent_grid_side", 0))


def grid_positions(text_pos: torch.Tensor, slot: torch.Tensor, side: int) -> torch.Tensor:
    """(3, ...) grid positions of latent slots from their 1-D text positions and their index in the segment."""
    start = text_pos - slot
    return torch.stack([start, start + torch.div(slot, side, rounding_mode="floor"), start + slot % side])


def set_layout(backbone: Backbone, config) -> None:
    """Give a backbone a run's or checkpoint's latent options (``valr.ValrConfig``): what latents are fed, the
    image bottleneck and the latent positions. Generation, diagnostics and training read them from the backbone."""
    from valr.align import latent_grid_side

    backbone.latent_feed = check_latent_feed(config.latent_feed, "valr.latent_feed")
    check_latent_positions(config.latent_positions, "valr.latent_positions")
    backbone.image_bottleneck = config.image_bottleneck
    backbone.latent_grid_side = (latent_grid_side(config.k, config.aligned_latents)
                                 if config.latent_positions == "grid" else 0)


def causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, L) key mask -> (B, 1, L, L) boolean causal mask. Every position attends to itself, padding included, so
    no row is empty (padded rows are ignored downstream)."""
    length = valid.shape[1]
    tri = torch.tril(torch.ones(length, length, dtype=torch.bool, device=valid.device))
    eye = torch.eye(length, dtype=torch.bool, device=valid.device)
    return ((tri[None] & valid.bool()[:, None, :]) | eye[None])[:, None]


def chunk_mask(past_valid: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """A chunk of W positions decoded on top of P cached columns: (B, P) and (B, W) key masks ->
    (B, 1, W, P + W) boolean mask (all valid cached columns, then causal within the chunk)."""
    past = past_valid.bool()[:, None, :].expand(-1, valid.shape[1], -1)
    return torch.cat([past, causal_mask(valid)[:, 0]], -1)[:, None]


def block_image_keys(mask: torch.Tensor, key_is_image: torch.Tensor, query_sees: torch.Tensor) -> torch.Tensor:
    """Remove image keys from the rows of queries that may not see them: ``mask`` (B, 1, Q, K) boolean,
    ``key_is_image`` (B, K), ``query_sees`` (B, Q) (image tokens and latent slots; so no row loses its own
    column)."""
    return mask & ~(key_is_image.bool()[:, None, None, :] & ~query_sees.bool()[:, None, :, None])


def bottleneck_mask(valid: torch.Tensor, is_image: torch.Tensor, is_slot: torch.Tensor | None = None) -> torch.Tensor:
    """The image bottleneck over a whole sequence: (B, L) key mask, image columns and latent slots (None: no
    slots) -> (B, 1, L, L) causal mask in which only image tokens and slots see the image tokens."""
    sees = is_image.bool() if is_slot is None else is_image.bool() | is_slot.bool()
    return block_image_keys(causal_mask(valid), is_image, sees)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean (B, 1, Q, K) mask as the additive float mask every attention implementation reads the same way
    (eager attention adds a boolean mask as 0/1 instead of masking)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
