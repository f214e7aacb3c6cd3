"""Collapse and norms: are the latents the same whatever the input, and are they sized like the inputs they
replace?

Over the fed-back latent vectors of greedy generations (``return_latents``; the final-layer, post-norm hidden
states the model feeds itself):

* ``cross_sample``: mean cosine between latents of *different* samples at the same (segment, slot). Near 1
  means collapse: the latents do not depend on the sample.
* ``cross_sample_centered``: the same after subtracting the mean latent over all samples and positions (a large
  shared component, common in transformer states, inflates raw cosines; what is left is what differs).
* ``along_segment``: mean cosine between consecutive slots of a segment; ``within_segment``: mean over all
  pairs of slots of a segment. Near 1: the K positions repeat one vector.
* ``across_segments``: mean cosine between the segment means of one sample's segments.
* ``effective_rank``: participation ratio (sum s^2)^2 / sum s^4 of the singular values of the centered matrix
  of all latents: about 1 when every latent lies on one direction.
* norms: latent norms (overall and by slot) against token-embedding norms (the inputs latents stand in for):
  over the whole vocabulary and over the tokens the model generated. ``norm_ratio`` = mean latent norm / mean
  generated-token embedding norm.
* ``token_cross_cosine``: mean pairwise cosine between the embeddings of distinct generated tokens (a reference
  level for unrelated inputs).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from valr.diagnostics.common import Subject, mean, pyplot


def _pairwise_mean(x: torch.Tensor) -> float | None:
    """Mean cosine over distinct pairs of rows of ``x`` (N, D)."""
    n = x.shape[0]
    if n < 2:
        return None
    u = torch.nn.functional.normalize(x.float(), dim=-1, eps=1e-8)
    sim = u @ u.T
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def effective_rank(x: torch.Tensor) -> float | None:
    if x.shape[0] < 2:
        return None
    s = torch.linalg.svdvals(x.float() - x.float().mean(0))
    p = s**2
    return float(p.sum() ** 2 / (p**2).sum().clamp_min(1e-30))


def latent_statistics(latents: Sequence[list[torch.Tensor] | None]) -> dict[str, Any]:
    """The latent-only statistics of the module docstring; ``latents[i]`` is sample i's list of (K, D) segments."""
    sites: dict[tuple[int, int], list[torch.Tensor]] = defaultdict(list)
    along, within, across, norms_by_slot = [], [], [], defaultdict(list)
    rows = []
    for segs in latents:
        if not segs:
            continue
        for g, seg in enumerate(segs):
            seg = seg.float()
            rows.append(seg)
            for q in range(seg.shape[0]):
                sites[(g, q)].append(seg[q])
                norms_by_slot[q].append(float(seg[q].norm()))
            if seg.shape[0] > 1:
                along.append(float(torch.nn.functional.cosine_similarity(seg[:-1], seg[1:], dim=-1).mean()))
                within.append(_pairwise_mean(seg))
        if len(segs) > 1:
            across.append(_pairwise_mean(torch.stack([s.float().mean(0) for s in segs])))
    if not rows:
        return {"n_latents": 0}
    allv = torch.cat(rows)
    centre = allv.mean(0)
    cross = [_pairwise_mean(torch.stack(v)) for v in sites.values() if len(v) > 1]
    cross_c = [_pairwise_mean(torch.stack(v) - centre) for v in sites.values() if len(v) > 1]
    norms = allv.norm(dim=-1)
    return {
        "n_latents": int(allv.shape[0]),
        "cross_sample": mean(cross), "cross_sample_centered": mean(cross_c),
        "along_segment": mean(along), "within_segment": mean(within), "across_segments": mean(across),
        "effective_rank": effective_rank(allv), "dim": int(allv.shape[1]),
        "latent_norm": {"mean": float(norms.mean()), "std": float(norms.std()) if len(norms) > 1 else 0.0},
        "latent_norm_by_slot": [mean(norms_by_slot[q]) for q in sorted(norms_by_slot)],
    }


@torch.no_grad()
def collapse(subject: Subject, results) -> dict[str, Any]:
    """Latent statistics plus the token-embedding references for one model's generations."""
    lat = subject.latent
    emb = subject.backbone.model.get_input_embeddings().weight.detach().float()
    n_vocab = len(subject.loaded.tokenizer)
    special = {lat.start, lat.end, lat.slot}
    vocab_rows = torch.tensor([i for i in range(min(n_vocab, emb.shape[0])) if i not in special])
    vocab_norm = emb[vocab_rows].norm(dim=-1)
    used = sorted({t for r in results for t in r.token_ids if t not in special and t < emb.shape[0]})
    used_rows = emb[torch.tensor(used, dtype=torch.long)] if used else emb[:0]
    used_norm = used_rows.norm(dim=-1)
    stats = latent_statistics([r.latents for r in results])
    out = {
        **stats,
        "n_samples": len(results), "n_with_latents": sum(1 for r in results if r.latents),
        "token_embedding_norm": {"vocabulary_mean": float(vocab_norm.mean()), "vocabulary_std": float(vocab_norm.std()),
                                 "generated_mean": float(used_norm.mean()) if used else None,
                                 "generated_std": float(used_norm.std()) if len(used) > 1 else None},
        "token_cross_cosine": _pairwise_mean(used_rows) if len(used) > 1 else None,
    }
    if stats.get("n_latents") and used:
        out["norm_ratio"] = stats["latent_norm"]["mean"] / float(used_norm.mean())
    return out


def plot(reports: dict[str, dict[str, Any]], path, title: str = "collapse and norms") -> Any:
    """Left: latent norm by slot per model, dashed at its generated-token embedding norm. Right: the cosines."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    keys = ("cross_sample", "cross_sample_centered", "along_segment", "within_segment", "across_segments",
            "token_cross_cosine")
    width = 0.8 / max(len(reports), 1)
    for m, (label, rep) in enumerate(reports.items()):
        colour = colours[m % len(colours)]
        slots = rep.get("latent_norm_by_slot") or []
        if slots:
            axes[0].plot(range(1, len(slots) + 1), slots, marker="o", color=colour, label=f"{label} latents")
        ref = rep["token_embedding_norm"]["generated_mean"]
        if ref is not None:
            axes[0].axhline(ref, ls="--", color=colour, lw=1, label=f"{label} token embeddings")
        vals = [rep.get(k) if rep.get(k) is not None else float("nan") for k in keys]
        axes[1].bar([i + m * width for i in range(len(keys))], vals, width, color=colour, label=label)
    axes[0].set(xlabel="slot in segment", ylabel="L2 norm", title="latent norms vs token embeddings")
    axes[0].set_yscale("log")
    axes[1].set_xticks([i + width * (len(reports) - 1) / 2 for i in range(len(keys))],
                       [k.replace("_", "\n") for k in keys], fontsize=7)
    axes[1].set(ylabel="mean cosine", title="similarity of latents")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines or ax.patches:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
