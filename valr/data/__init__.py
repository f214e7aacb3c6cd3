"""Data flows one way: record -> layout -> example -> batch."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from valr.backbones.base import Backbone
from valr.data.collate import Batch, Example, collate
from valr.data.images import load_image
from valr.data.layout import LayoutConfig, layout_record
from valr.data.records import Record, RecordError, iter_records, load_records, parse_record, write_records
from valr.data.steps import split_answer, split_steps
from valr.tokens import LatentTokenIds


def make_example(record: Record, tokenizer: PreTrainedTokenizerBase, backbone: Backbone, cfg: LayoutConfig,
                 latent: LatentTokenIds | None = None) -> Example:
    """Load a record's images, lay it out (VaLR layout when ``latent`` is given and cfg.k > 0)."""
    images = backbone.image_inputs([load_image(p, record.id) for p in record.images])
    laid = layout_record(record, tokenizer, latent, images.n_tokens, backbone.image_placeholder, cfg)
    return Example(laid, images)


def make_batch(records: list[Record], tokenizer: PreTrainedTokenizerBase, backbone: Backbone,
               cfg: LayoutConfig, latent: LatentTokenIds | None = None) -> Batch:
    examples = [make_example(r, tokenizer, backbone, cfg, latent) for r in records]
    k = cfg.k if latent is not None else 0
    return collate(examples, tokenizer.pad_token_id, k)


__all__ = ["Batch", "Example", "LayoutConfig", "Record", "RecordError", "collate", "iter_records",
           "layout_record", "load_image", "load_records", "make_batch", "make_example", "parse_record",
           "split_answer", "split_steps", "write_records"]
