"""Model families behind one protocol. Importing this package registers the built-in adapters."""

from valr.backbones import qwen2_5_vl  # noqa: F401  (registers qwen2_5_vl, qwen2_vl)
from valr.backbones.base import (
    LATENT_FEEDS,
    LATENT_POSITIONS,
    Backbone,
    DecoderOutput,
    ImageInputs,
    backbone_for,
    latent_feeder,
    register_backbone,
    set_layout,
)

__all__ = ["LATENT_FEEDS", "LATENT_POSITIONS", "Backbone", "DecoderOutput", "ImageInputs", "backbone_for",
           "latent_feeder", "register_backbone", "set_layout"]
