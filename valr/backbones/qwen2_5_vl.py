"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``) behind the valr Backbone protocol.

Every pass gets explicit 3-D (temporal, height, width) position ids computed once per sequence by the model's own
``get_rope_index``; the model's mutable ``rope_deltas`` is never read. Latent slots are text-type tokens, so
their positions continue the 1-D text positions after the images, exactly as for any text token.
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers import AutoImageProcessor, Cache, DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from valr.backbones.base import (
    AppendOnlyLayer,
    DecoderOutput,
    ImageInputs,
    additive_mask,
    check_latent_feed,
    register_backbone,
)


class QwenVLBackbone:
    image_placeholder = "<|image_pad|>"

    def __init__(self, model: PreTrainedModel, image_processor=None, latent_feed: str = "hidden"):
        self.model = model
        self.latent_feed = check_latent_feed(latent_feed)
        self.image_processor = image_processor
        self.lm = model.model.language_model
        text_cfg = model.config.get_text_config()
        self.num_layers = text_cfg.num_hidden_layers
        self.hidden_size = text_cfg.hidden_size
        self.image_token_id = model.config.image_token_id

    @classmethod
    def from_pretrained_processor(cls, model: PreTrainedModel, path: str) -> QwenVLBackbone:
        return cls(model, AutoImageProcessor.from_pretrained(path))

    # -- images -------------------------------------------------------------------------------------------
    def image_inputs(self, images: list[Image.Image]) -> ImageInputs:
        if not images:
            return ImageInputs.empty()
        if self.image_processor is None:
            raise ValueError("this backbone has no image processor; load the checkpoint with valr.load_model")
        out = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        grid = out["image_grid_thw"]
        merge = self.image_processor.merge_size
        return ImageInputs(out["pixel_values"], grid, (grid.prod(-1) // merge**2).tolist())

    def image_features(self, images: ImageInputs) -> torch.Tensor:
        """Merged visual tokens in LLM space, all images concatenated in order: (sum n_tokens, D)."""
        pv = images.pixel_values.to(self.model.device)
        feats = self.model.model.get_image_features(pv, images.grid_thw.to(pv.device)).pooler_output
        return torch.cat(feats, 0)

    # -- sequence inputs ----------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, images: ImageInputs | None) -> torch.Tensor:
        embeds = self.model.get_input_embeddings()(input_ids)
        is_image = input_ids == self.image_token_id
        n_slots = int(is_image.sum())
        n_feats = sum(images.n_tokens) if images is not None else 0
        if n_slots != n_feats:
            raise ValueError(f"{n_slots} image placeholder tokens but {n_feats} visual tokens from the images; "
                             "the prompt must hold exactly one expanded placeholder run per image")
        if n_slots:
            feats = self.image_features(images).to(embeds.dtype)
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), feats)
        return embeds

    def position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     images: ImageInputs | None) -> torch.Tensor:
        mm = (input_ids == self.image_token_id).int()
        grid = images.grid_thw.to(input_ids.device) if images is not None and images.grid_thw is not None else None
        if grid is None:
            # Pure text: 1-D positions counted over the non-padding tokens (same on all three axes).
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            return pos.unsqueeze(0).expand(3, -1, -1).contiguous()
        pos, _ = self.model.model.get_rope_index(input_ids, mm_token_type_ids=mm, image_grid_thw=grid,
                                                 attention_mask=attention_mask)
        return pos

    # -- decoder ------------------------------------------------------------------------------------------
    def new_cache(self, append_only: bool = False) -> Cache:
        cache = DynamicCache(config=self.model.config)
        if append_only:
            cache.layers = [AppendOnlyLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
        return cache

    def decode(self, embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
               cache: Cache | None, layer: int | None = None) -> DecoderOutput:
        cache = self.new_cache() if cache is None else cache
        if attention_mask.dim() == 4 and attention_mask.dtype == torch.bool:
            attention_mask = additive_mask(attention_mask, embeds.dtype)
        out = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                      cache=cache, use_cache=True, output_hidden_states=layer is not None)
        layer_hidden = out.hidden_states[layer] if layer is not None else None
        return DecoderOutput(out.last_hidden_state, layer_hidden, out.cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)


register_backbone("qwen2_5_vl", QwenVLBackbone)
register_backbone("qwen2_vl", QwenVLBackbone)  # same interface in transformers 5.x
