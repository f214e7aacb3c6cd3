"""Collate laid-out examples into a right-padded batch the engine runs on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from valr.backbones.base import ImageInputs
from valr.data.layout import IGNORE, LaidOut


@dataclass
class Example:
    laid: LaidOut
    images: ImageInputs


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L), right-padded with pad_id
    attention_mask: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L), IGNORE on prompt, slots and padding
    images: ImageInputs | None  # all images of the batch, in sample order
    segment_starts: list[list[int]]  # per sample, first slot position of each latent segment
    segment_targets: list[list[Path | None]]  # per sample, alignment target of each segment
    k: int  # latent positions per segment
    record_ids: list[str] = field(default_factory=list)
    step_positions: list[list[list[int]]] = field(default_factory=list)  # per sample, each step's text positions

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def slot_positions(self, b: int) -> list[int]:
        return [s + j for s in self.segment_starts[b] for j in range(self.k)]


def collate(examples: list[Example], pad_id: int, k: int) -> Batch:
    n = max(len(e.laid.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        m = len(e.laid.input_ids)
        ids[b, :m] = torch.tensor(e.laid.input_ids)
        labels[b, :m] = torch.tensor(e.laid.labels)
        mask[b, :m] = 1
    return Batch(ids, mask, labels, ImageInputs.concat([e.images for e in examples]),
                 [list(e.laid.segment_starts) for e in examples], [list(e.laid.segment_targets) for e in examples],
                 k, [e.laid.record_id for e in examples], [e.laid.step_positions for e in examples])
