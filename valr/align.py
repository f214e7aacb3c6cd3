"""REPA alignment of latent segments to frozen vision-encoder patch features.

Per segment: the K alignment-layer states form a sqrt(K) x sqrt(K) grid (row-major; with ``aligned_latents``
set, only that many first states form the grid), are bilinearly upsampled to the teacher's patch grid,
projected token-wise by an MLP (one per teacher) and pulled toward the teacher's patch features of the segment's
target image by cosine distance (1 - cos), averaged over patches, then segments, then teachers.
The total stage-2 loss is CE + lambda * this.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def grid_side(k: int) -> int:
    side = math.isqrt(k)
    if k <= 0 or side * side != k:
        raise ValueError(f"K={k} latent positions cannot form a square grid; use a perfect square "
                         "(1, 4, 9, 16, 25, ...; the paper uses 16)")
    return side


def latent_grid_side(k: int, aligned: int = 0) -> int:
    """The side of the aligned grid of K latents of which the first ``aligned`` are aligned (0: all K)."""
    if aligned < 0 or aligned > k:
        raise ValueError(f"aligned_latents={aligned} must be between 0 (all K) and K={k}")
    if aligned == 0:
        try:
            return grid_side(k)
        except ValueError as e:
            raise ValueError(f"{e}, or align only a square number of them (aligned_latents, e.g. 16 of K=20)") \
                from None
    try:
        return grid_side(aligned)
    except ValueError:
        raise ValueError(f"aligned_latents={aligned} latents cannot form a square grid; use a perfect square "
                         f"at most K={k} (e.g. 16 of K=20), or 0 to align all K") from None


def latents_to_grid(states: torch.Tensor, grid: tuple[int, int], slots: int = 0) -> torch.Tensor:
    """(S, K, D) latent states -> (S, gh*gw, D): the first ``slots`` states of each segment (0: all K) as a
    square grid, bilinearly upsampled to the teacher grid."""
    if slots:
        latent_grid_side(states.shape[1], slots)
        states = states[:, :slots]
    s, k, d = states.shape
    side = grid_side(k)
    x = states.reshape(s, side, side, d).permute(0, 3, 1, 2)
    if (side, side) != tuple(grid):
        x = F.interpolate(x, size=tuple(grid), mode="bilinear", align_corners=False)
    return x.flatten(2).transpose(1, 2)


class Projector(nn.Module):
    """REPA's projector: Linear -> SiLU -> Linear -> SiLU -> Linear, applied to every patch position."""

    def __init__(self, in_dim: int, out_dim: int, width: int = 2048):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def patch_cosine_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cos(pred, target) per segment and patch: shapes (S, P, D) -> (S, P)."""
    return 1.0 - F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-8)


def cosine_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over segments and patches of 1 - cos(pred, target). Shapes (S, P, D).

    The paper writes -cos; 1 - cos has the same gradient and reads as 0 at perfect alignment.
    """
    return patch_cosine_distance(pred, target).mean()


def mean_feature_loss(features: torch.Tensor) -> float:
    """The alignment loss (1 - cos) of a projector that ignores its input and always predicts the mean teacher
    feature, over patch features ``(..., D)``. An alignment loss that plateaus near this value has learned only
    the common component of the teacher's features, nothing about the particular image."""
    flat = features.reshape(-1, features.shape[-1]).float()
    if flat.shape[0] == 0:
        raise ValueError("mean_feature_loss needs at least one feature vector")
    return float(1.0 - F.cosine_similarity(flat, flat.mean(0, keepdim=True), dim=-1, eps=1e-8).mean())


def centered(feats: torch.Tensor) -> torch.Tensor:
    """Patch features ``(..., P, D)`` minus each image's mean patch: the targets ``valr.center_targets`` trains on."""
    return feats - feats.mean(dim=-2, keepdim=True)


def position_mean_loss(features: torch.Tensor, center: bool = False) -> float:
    """The alignment loss (1 - cos) of a projector that knows which patch position each latent stands for but
    nothing about the image: it predicts, per position, the mean over images of the (per-image centred when
    ``center``, as ``valr.center_targets`` trains) features ``(N, P, D)``. With centred targets this, not
    :func:`mean_feature_loss`, is the plateau of latents that learned their cell and not the image."""
    if features.ndim != 3 or features.shape[0] == 0:
        raise ValueError("position_mean_loss needs features of shape (images, patches, dim)")
    f = centered(features.float()) if center else features.float()
    return float(1.0 - F.cosine_similarity(f, f.mean(0, keepdim=True).expand_as(f), dim=-1, eps=1e-8).mean())


class Aligner(nn.Module):
    """One projector per teacher; computes the multi-teacher REPA loss (a plain mean over teachers).
    ``slots``: how many of each segment's first latents form the grid (0: all K; ``ValrConfig.aligned_latents``)."""

    def __init__(self, hidden_size: int, teacher_dims: dict[str, int], width: int = 2048, center: bool = False,
                 slots: int = 0):
        super().__init__()
        if not teacher_dims:
            raise ValueError("alignment needs at least one teacher")
        self.center, self.slots = center, slots
        self.projectors = nn.ModuleDict({name: Projector(hidden_size, dim, width)
                                         for name, dim in teacher_dims.items()})

    @classmethod
    def for_config(cls, hidden_size: int, teacher_dims: dict[str, int], config, width: int | None = None):
        """Projectors for ``teacher_dims`` that read the grid and targets ``config`` (a ValrConfig) trains on;
        ``width`` overrides ``config.projector_width`` (e.g. the width saved with a checkpoint)."""
        return cls(hidden_size, teacher_dims, width or config.projector_width, center=config.center_targets,
                   slots=config.aligned_latents)

    def follow(self, config) -> Aligner:
        """These projectors, now reading the grid and targets of ``config`` (continuing a run with new settings)."""
        self.center, self.slots = config.center_targets, config.aligned_latents
        return self

    def targets(self, feats: torch.Tensor) -> torch.Tensor:
        """Teacher patch features ``(S, P, D)`` as the loss sees them: raw, or minus each image's mean patch."""
        return centered(feats) if self.center else feats

    def predict(self, name: str, states: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Latent states ``(S, K, D)`` -> teacher ``name``'s predicted patch features ``(S, gh*gw, Dt)``."""
        proj = self.projectors[name]
        return proj(latents_to_grid(states, grid, self.slots).to(proj.net[0].weight.dtype))

    def patch_losses(self, name: str, states: torch.Tensor, feats: torch.Tensor, grid: tuple[int, int]
                     ) -> torch.Tensor:
        """The loss before averaging: 1 - cos per segment and patch ``(S, gh*gw)``, against features ``(S, P, Dt)``
        (e.g. where in the grid the latents render their view and where not). One segment (``S = 1``) against
        ``V`` images' features ``(V, P, Dt)`` gives ``(V, gh*gw)``: it is projected once."""
        return patch_cosine_distance(self.predict(name, states, grid), self.targets(feats.to(states.device)))

    def loss(self, states: torch.Tensor, targets: dict[str, list[tuple[int, torch.Tensor, tuple[int, int]]]],
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """REPA loss over teachers.

        ``targets[name]`` lists, for every segment with a target, (row of ``states``, features (P, Dt), grid).
        Segments are grouped by grid so each group is one batched upsample + projection.
        Returns (mean over teachers, per-teacher losses).
        """
        per_teacher: dict[str, torch.Tensor] = {}
        for name, items in targets.items():
            if name not in self.projectors:
                raise ValueError(f"no projector for teacher {name!r}; known: {sorted(self.projectors)}")
            if not items:
                continue
            groups: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
            for row, feats, grid in items:
                groups.setdefault(tuple(grid), []).append((row, feats))
            total, count = states.new_zeros(()).float(), 0
            for grid, members in groups.items():
                rows = torch.tensor([r for r, _ in members], device=states.device)
                feats = torch.stack([f for _, f in members], 0)
                total = total + self.patch_losses(name, states[rows], feats, grid).mean() * len(members)
                count += len(members)
            per_teacher[name] = total / count
        if not per_teacher:
            return states.sum() * 0.0, {}
        return torch.stack(list(per_teacher.values())).mean(), per_teacher
