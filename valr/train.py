"""Training objectives: stage 1 (plain CoT cross-entropy) and stage 2 (latents + REPA alignment).

``Objective`` is the piece a training loop calls per batch; it owns the teachers, their feature caches and the
projectors, and returns the loss with its parts for logging.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from valr.align import Aligner, latent_grid_side
from valr.backbones import Backbone, set_layout
from valr.config import ValrConfig
from valr.data.collate import Batch
from valr.engine import EngineOutput, forward_latent, forward_plain
from valr.teachers import FeatureCache, Teacher, build_teacher, target_features


@dataclass
class LossParts:
    loss: torch.Tensor
    ce: torch.Tensor
    align: torch.Tensor
    align_per_teacher: dict[str, torch.Tensor]
    n_label_tokens: int
    n_aligned_segments: int
    output: EngineOutput

    def logs(self) -> dict[str, float]:
        out = {"loss": float(self.loss), "ce": float(self.ce), "align": float(self.align)}
        out.update({f"align/{k}": float(v) for k, v in self.align_per_teacher.items()})
        if self.output.latent_inputs.numel():
            out["latent_norm"] = float(self.output.latent_inputs.detach().norm(dim=-1).mean())
        return out


class Objective:
    def __init__(self, backbone: Backbone, config: ValrConfig, teachers: list[Teacher] | None = None,
                 aligner: Aligner | None = None):
        latent_grid_side(config.k, config.aligned_latents)
        fed = getattr(backbone, "latent_feed", "hidden")  # a backbone without the attribute feeds hidden states
        if fed != config.latent_feed:  # the config decides how latents are fed
            warnings.warn(f"latent_feed: the backbone fed {fed!r} (e.g. from its checkpoint); "
                          f"this objective's config says {config.latent_feed!r}, which is used from now on",
                          stacklevel=2)
        set_layout(backbone, config)  # the config's latent options (feed, bottleneck, positions)
        self.backbone = backbone
        self.config = config
        if teachers is None:
            teachers = [build_teacher(spec, backbone) for spec in config.teachers]
        self.teachers = {t.name: t for t in teachers}
        if config.lambda_align > 0 and not self.teachers:
            raise ValueError("lambda_align > 0 but no teachers are configured; add teachers or set lambda_align=0")
        if problem := config.loss_weights_error():
            raise ValueError(problem)
        if aligner is None and self.teachers:
            aligner = Aligner.for_config(backbone.hidden_size, {n: t.dim for n, t in self.teachers.items()},
                                         config).to(backbone.model.device)
        self.aligner = aligner
        self.caches = {n: FeatureCache(config.feature_cache, t) for n, t in self.teachers.items()} \
            if config.feature_cache else {}

    def stage1(self, batch: Batch) -> LossParts:
        out = forward_plain(self.backbone, batch)
        zero = out.loss_ce.new_zeros(())
        return LossParts(out.loss_ce, out.loss_ce, zero, {}, out.n_label_tokens, 0, out)

    def stage2(self, batch: Batch, mode: str | None = None) -> LossParts:
        out = forward_latent(self.backbone, batch, self.config.align_layer, mode or self.config.train_mode)
        rows = [(i, batch.segment_targets[b][s]) for i, (b, s) in enumerate(out.segment_owner)
                if batch.segment_targets[b][s] is not None]
        align = out.loss_ce.new_zeros(())
        per_teacher: dict[str, torch.Tensor] = {}
        if rows and self.teachers and self.config.lambda_align > 0:
            targets = {}
            for name, teacher in self.teachers.items():
                feats = target_features(teacher, [p for _, p in rows], self.caches.get(name))
                targets[name] = [(i, *feats[p]) for i, p in rows]
            align, per_teacher = self.aligner.loss(out.latent_states, targets)
        loss = self.config.stage2_loss(out.loss_ce, align)
        return LossParts(loss, out.loss_ce, align, per_teacher, out.n_label_tokens, len(rows), out)

    def parameters(self):
        """Trainable parameters: the MLLM's plus the projectors' (teachers are frozen)."""
        params = list(self.backbone.model.parameters())
        if self.aligner is not None:
            params += list(self.aligner.parameters())
        return params
