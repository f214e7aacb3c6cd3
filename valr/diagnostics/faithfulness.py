"""Faithfulness: do the latents matter? Replace them and see whether the answers change.

Every intervention is a ``latent_hook`` (``valr.generate``) applied to every fed-back latent vector of a greedy
generation, so it also changes every later hidden state (the next latent is computed from the replaced one):

* ``zero``: the zero vector.
* ``noise``: Gaussian noise with the norm of the vector it replaces (a random direction, same length), seeded
  by (seed, sample, segment, slot).
* ``shuffle``: the latents another sample fed in the unperturbed run (a fixed random derangement of the
  samples), segment by segment and slot by slot.
* ``image``: the latents generated for the *same question* with another sample's images (a derangement among
  samples with the same number of images): the latents of another view.
* ``none``: the identity (a control: it must report no effect at all).

Replayed latents (``shuffle``, ``image``) are indexed by (segment, slot); a segment beyond the donor's count
reuses the donor's segments cyclically, and a donor with no latents leaves the vector as it is (counted in
``unreplaced_positions``).

For each intervention: ``answer_changed`` (fraction of samples whose extracted answer differs from the
unperturbed run's), ``output_changed`` (whose generated tokens differ), ``accuracy`` and ``accuracy_drop``
(unperturbed minus intervened; scores as ``valr eval``: option letters exactly, numbers by MRA). Rates are over
all samples and, in ``*_with_latents``, over samples whose unperturbed run had latents (only those can change).
``flag`` is ``latents_ignored`` when the unperturbed run had latents and no intervention other than ``none``
changes the answer of at least ``threshold`` of the samples with latents: latents that can be replaced by
anything without effect carry nothing the answer depends on. ``no_latents`` when the model generated none.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from valr.diagnostics.common import (
    DiagnosticError,
    Hook,
    Sample,
    Subject,
    generate,
    item_accuracy,
    mean,
    predictions,
    pyplot,
)

INTERVENTIONS = ("zero", "noise", "shuffle", "image")
ALL_INTERVENTIONS = ("none",) + INTERVENTIONS


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def derangement(n: int, seed: int, groups: Sequence[Any] | None = None) -> list[int | None]:
    """A random permutation without fixed points, within groups of equal key (None where a group has one)."""
    keys = list(groups) if groups is not None else [0] * n
    out: list[int | None] = [None] * n
    gen = torch.Generator().manual_seed(seed)
    for key in dict.fromkeys(keys):
        members = [i for i in range(n) if keys[i] == key]
        if len(members) < 2:
            continue
        order = [members[int(j)] for j in torch.randperm(len(members), generator=gen)]
        for a, b in zip(order, order[1:] + order[:1], strict=True):  # a cycle: no fixed points
            out[a] = b
    return out


class Replay:
    """A hook that feeds recorded latents: ``donors[i]`` is the list of (K, D) segments sample i receives."""

    def __init__(self, donors: Sequence[list[torch.Tensor] | None]):
        self.donors = donors
        self.unreplaced = 0

    def __call__(self, sample: int, segment: int, slot: int, vector: torch.Tensor) -> torch.Tensor:
        segs = self.donors[sample]
        if not segs:
            self.unreplaced += 1
            return vector
        seg = segs[segment % len(segs)]
        return seg[slot % seg.shape[0]].to(vector.device, vector.dtype)


def noise_hook(seed: int) -> Hook:
    def hook(sample: int, segment: int, slot: int, vector: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(_seed(seed, sample, segment, slot))
        g = torch.randn(vector.shape, generator=gen, dtype=torch.float32)
        return (g * (vector.float().norm() / g.norm().clamp_min(1e-12))).to(vector.device, vector.dtype)

    return hook


def make_hook(name: str, subject: Subject, samples: Sequence[Sample], cfg, baseline, seed: int,
              batch_size: int) -> Hook:
    if name == "none":
        return lambda sample, segment, slot, vector: vector
    if name == "zero":
        return lambda sample, segment, slot, vector: torch.zeros_like(vector)
    if name == "noise":
        return noise_hook(seed)
    if name == "shuffle":
        perm = derangement(len(samples), _seed(seed, 1))
        return Replay([baseline[j].latents if j is not None else None for j in perm])
    if name == "image":
        perm = derangement(len(samples), _seed(seed, 2), [len(s.images) for s in samples])
        have = [i for i, j in enumerate(perm) if j is not None]
        donor_runs = generate(subject, [samples[i] for i in have], cfg, batch_size,
                              images=[samples[perm[i]].images for i in have])
        donors: list[list[torch.Tensor] | None] = [None] * len(samples)
        for i, r in zip(have, donor_runs, strict=True):
            donors[i] = r.latents
        return Replay(donors)
    raise DiagnosticError(f"unknown intervention {name!r}; known: {', '.join(ALL_INTERVENTIONS)}")


def faithfulness(subject: Subject, samples: Sequence[Sample], cfg, baseline, interventions: Sequence[str],
                 *, seed: int = 0, batch_size: int = 8, threshold: float = 0.05) -> dict[str, Any]:
    """Run every intervention against the unperturbed ``baseline`` results (``return_latents=True``)."""
    base_preds = predictions(samples, baseline)
    base_acc = item_accuracy(samples, base_preds)
    with_latents = [i for i, r in enumerate(baseline) if r.latent_segments and r.latents]
    report: dict[str, Any] = {
        "n": len(samples), "n_with_latents": len(with_latents),
        "baseline": {"accuracy": mean(base_acc), "mean_latent_segments": mean([r.latent_segments for r in baseline]),
                     "mean_generated_positions": mean([r.generated_positions for r in baseline])},
        "interventions": {}, "threshold": threshold,
    }
    for name in interventions:
        hook = make_hook(name, subject, samples, cfg, baseline, seed, batch_size)
        runs = generate(subject, samples, cfg, batch_size, hook=hook)
        preds = predictions(samples, runs)
        acc = item_accuracy(samples, preds)
        answer = [base_preds[s.id] != preds[s.id] for s in samples]
        output = [b.token_ids != r.token_ids for b, r in zip(baseline, runs, strict=True)]
        report["interventions"][name] = {
            "accuracy": mean(acc), "accuracy_drop": mean(base_acc) - mean(acc),
            "answer_changed": mean([float(x) for x in answer]), "output_changed": mean([float(x) for x in output]),
            "answer_changed_with_latents": mean([float(answer[i]) for i in with_latents]),
            "output_changed_with_latents": mean([float(output[i]) for i in with_latents]),
            "accuracy_drop_with_latents": mean([base_acc[i] - acc[i] for i in with_latents]),
            "unreplaced_positions": getattr(hook, "unreplaced", 0),
        }
    effects = [v["answer_changed_with_latents"] or 0.0 for k, v in report["interventions"].items() if k != "none"]
    if not with_latents:
        report["flag"] = "no_latents"
    elif effects and max(effects) < threshold:
        report["flag"] = "latents_ignored"
    else:
        report["flag"] = None
    report["max_answer_changed_with_latents"] = max(effects) if effects else None
    return report


def plot(reports: dict[str, dict[str, Any]], path, title: str = "faithfulness") -> Any:
    """Grouped bars per intervention: answer-change rate and accuracy drop (samples with latents), per model."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    names = [n for n in ALL_INTERVENTIONS if any(n in r["interventions"] for r in reports.values())]
    width = 0.8 / max(len(reports), 1)
    for m, (label, rep) in enumerate(reports.items()):
        xs = [i + m * width for i in range(len(names))]
        for ax, key in zip(axes, ("answer_changed_with_latents", "accuracy_drop_with_latents"), strict=True):
            vals = [(rep["interventions"].get(n, {}).get(key) or 0.0) * 100 for n in names]
            flag = f" [{rep['flag']}]" if rep.get("flag") else ""
            ax.bar(xs, vals, width, label=f"{label}{flag}")
    for ax, ylabel in zip(axes, ("answers changed (%)", "accuracy drop (points)"), strict=True):
        ax.set_xticks([i + width * (len(reports) - 1) / 2 for i in range(len(names))], names)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    axes[0].set_title("samples with latents: answer changed")
    axes[1].set_title("samples with latents: accuracy drop")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
