"""Dilution: does the model look at the images less as it generates, and do its states still carry the view?

For every generated position (see :mod:`valr.diagnostics.common` for what a position is) of a greedy
generation, one no-cache forward pass with eager attention over the exact sequence generation fed gives:

* ``mass``: the attention mass on image-token keys: for each layer and head, the sum of the position's attention
  weights over the columns holding visual tokens; averaged over heads, reported per layer and averaged over
  layers. (Weights over all keys sum to 1; ``max_total_error`` reports the largest deviation seen.)
* ``target_mass``: the same over the visual tokens of the step's target image only (positions with a target).
* ``latent_mass``: the same over the keys holding fed latents (every segment so far), and ``segment_mass`` over
  the most recent segment only, for text positions (step and answer tokens) after a segment: does the text the
  model writes read its latents at all, and how much beside the images?
* ``cos``: the cosine between the alignment-layer hidden state, mapped through the trained projector, and the
  teacher's mean patch feature of the step's target image (positions with a target, models with a probe).
* per latent segment, ``segment_alignment``: the training objective's own similarity (the K states as a
  sqrt(K) x sqrt(K) grid, upsampled to the teacher's patch grid, projected, cosine per patch, averaged) against
  the target image, and ``segment_alignment_other`` against the sample's other input images: a latent that
  carries *its* view scores higher on the target than on the others. ``picks_target`` is the fraction of
  segments that score higher on the target than on *every* other image (chance: one over the number of images),
  which a mean over the other images can hide.

Curves are averaged over samples by generated position (only where at least ``min_count`` samples reach that
position), and by reasoning line for step-text tokens and latent positions separately.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from valr.diagnostics.common import (
    Probe,
    Sample,
    Subject,
    attention_mass,
    build_trace,
    cosine,
    forward_trace,
    mean,
    pyplot,
)

KINDS = ("step", "latent", "marker", "answer")


def _target_image(sample: Sample, target: tuple[int | None, Path | None]):
    index, file = target
    if index is not None:
        return sample.images[index], f"{sample.id}:{index}:{file}"
    if file is not None:
        from valr.data.images import load_image

        return load_image(Path(file)), str(file)
    return None, None


def _segment_alignment(probe: Probe, states: torch.Tensor, feats: torch.Tensor, grid: tuple[int, int]) -> float:
    """Mean cosine of one segment's predicted patches with ``feats``, in the space its projector was trained for."""
    return 1.0 - float(probe.aligner.patch_losses(probe.name, states[None].float(), feats[None], grid).mean())


@torch.no_grad()
def sample_dilution(subject: Subject, sample: Sample, result, probe: Probe | None) -> dict[str, Any] | None:
    """Per-position measurements of one generation (None when nothing was generated)."""
    trace = build_trace(subject, sample, result)
    n = trace.n_generated
    if n == 0:
        return None
    fw = forward_trace(subject, trace, layer=probe.layer if probe is not None else None, attentions=True)
    att = fw.attentions
    length = att.shape[-1]
    queries = torch.arange(trace.prompt_len, trace.prompt_len + n)
    image_cols = trace.image_of_column >= 0
    mass = attention_mass(att, queries, image_cols)  # (layers, n)
    total = attention_mass(att, queries, torch.ones(length, dtype=torch.bool))
    segment_of = torch.tensor(trace.segments, dtype=torch.long)  # per generated position, -1 off latents

    def generated(mask: torch.Tensor) -> torch.Tensor:  # key columns: the prompt's never, these generated ones
        return torch.cat([torch.zeros(trace.prompt_len, dtype=torch.bool), mask])

    latent_mass = attention_mass(att, queries, generated(segment_of >= 0)).mean(0)
    segment_mass: list[float | None] = [None] * n
    last_segment = -1
    for i, kind in enumerate(trace.kinds):
        last_segment = max(last_segment, trace.segments[i])
        if kind in ("step", "answer") and last_segment >= 0:
            own = generated(segment_of == last_segment)
            segment_mass[i] = float(attention_mass(att, queries[i:i + 1], own).mean())
    target_mass: list[float | None] = [None] * n
    cos: list[float | None] = [None] * n
    feats_of: dict[int, tuple[torch.Tensor, tuple[int, int]] | None] = {}
    for i, tgt in enumerate(trace.targets):
        index, _ = tgt
        if index is not None:
            cols = trace.image_of_column == index
            target_mass[i] = float(attention_mass(att, queries[i:i + 1], cols).mean())
        if probe is not None and tgt != (None, None):
            key = hash(tgt)
            if key not in feats_of:
                image, cache_key = _target_image(sample, tgt)
                feats_of[key] = probe.features(image, cache_key) if image is not None else None
            if feats_of[key] is not None:
                feats = feats_of[key][0]
                proj = probe.projector(fw.layer[trace.prompt_len + i].float())
                cos[i] = float(cosine(proj, feats.mean(0).to(proj.device)))
    segments = []
    if probe is not None:
        k = sum(1 for s in trace.segments if s == 0)
        rows = probe.slots or k  # the aligned grid: the first rows of each whole segment
        square = 0 < rows <= k and math.isqrt(rows) ** 2 == rows
        for g in sorted({s for s in trace.segments if s >= 0}):
            idx = [i for i, s in enumerate(trace.segments) if s == g]
            tgt = trace.targets[idx[0]]
            if tgt == (None, None) or len(idx) != k or not square:
                continue
            image, cache_key = _target_image(sample, tgt)
            feats, grid = probe.features(image, cache_key)
            states = fw.layer[trace.prompt_len + torch.tensor(idx)]
            own = _segment_alignment(probe, states, feats, grid)
            others = []
            for j, im in enumerate(sample.images):
                if j != tgt[0]:
                    f, gr = probe.features(im, f"{sample.id}:{j}:input")
                    others.append(_segment_alignment(probe, states, f, gr))
            segments.append({"segment": g, "line": trace.lines[idx[0]], "target": own, "other": mean(others),
                             "picks_target": all(own > o for o in others) if others else None})
    return {"id": sample.id, "kinds": trace.kinds, "lines": trace.lines, "mass": mass.mean(0).tolist(),
            "mass_layers": mass.T.tolist(), "target_mass": target_mass, "cos": cos,
            "latent_mass": latent_mass.tolist(), "segment_mass": segment_mass,
            "max_total_error": float((total - 1).abs().max()), "segments": segments}


def _avg(rows: Sequence[Any]) -> float | None:
    return mean([float(r) for r in rows if r is not None])


def aggregate(per_sample: Sequence[dict[str, Any]], n_layers: int, min_count: int) -> dict[str, Any]:
    """Curves by position and by line, summaries by kind (see the module docstring)."""
    by_pos: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    by_line: dict[tuple[str, int], dict[str, list]] = defaultdict(lambda: defaultdict(list))
    by_kind: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for s in per_sample:
        for i, kind in enumerate(s["kinds"]):
            for bucket in (by_pos[i], by_line[(kind, s["lines"][i])], by_kind[kind]):
                bucket["mass"].append(s["mass"][i])
                bucket["layers"].append(s["mass_layers"][i])
                bucket["target_mass"].append(s["target_mass"][i])
                bucket["cos"].append(s["cos"][i])
                bucket["latent_mass"].append(s["latent_mass"][i])
                bucket["segment_mass"].append(s["segment_mass"][i])

    def summary(b: dict[str, list]) -> dict[str, Any]:
        layers = [_avg([row[layer] for row in b["layers"]]) for layer in range(n_layers)]
        return {"n": len(b["mass"]), "mass": _avg(b["mass"]), "mass_layers": layers,
                "target_mass": _avg(b["target_mass"]), "cos": _avg(b["cos"]),
                "latent_mass": _avg(b["latent_mass"]), "segment_mass": _avg(b["segment_mass"])}

    positions = [{"position": i, **summary(by_pos[i])} for i in sorted(by_pos) if len(by_pos[i]["mass"]) >= min_count]
    lines = {kind: [{"line": line, **summary(b)} for (k, line), b in sorted(by_line.items(), key=lambda x: x[0][1])
                    if k == kind and len(b["mass"]) >= min_count] for kind in ("step", "latent")}
    segs = [g for s in per_sample for g in s["segments"]]
    # least-squares slope of the image mass against position, over step and answer tokens (text the model wrote)
    xs, ys = [], []
    for s in per_sample:
        for i, kind in enumerate(s["kinds"]):
            if kind in ("step", "answer"):
                xs.append(i)
                ys.append(s["mass"][i])
    slope = None
    if len(set(xs)) > 1:
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return {
        "n_samples": len(per_sample),
        "by_kind": {k: summary(by_kind[k]) for k in KINDS if k in by_kind},
        "text_mass_slope_per_position": slope,
        "by_position": positions,
        "by_line": lines,
        "segment_alignment": {"n": len(segs), "target": _avg([g["target"] for g in segs]),
                              "other": _avg([g["other"] for g in segs]),
                              "picks_target": _avg([g["picks_target"] for g in segs])},
        "max_total_error": max((s["max_total_error"] for s in per_sample), default=0.0),
    }


def plot(reports: dict[str, dict[str, Any]], path: Path, title: str = "dilution") -> Path:
    """Five panels: image-attention mass by position, by reasoning line (text vs latent) and by layer (text
    vs latent), the step text's attention on its own latent segment beside its target view's image tokens by
    line, and the cosine to the teacher's target-view feature by position; one colour per model."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 5, figsize=(23, 4.2), dpi=100)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for c, (label, rep) in enumerate(reports.items()):
        colour = colours[c % len(colours)]
        pos = rep["by_position"]
        axes[0].plot([p["position"] for p in pos], [p["mass"] for p in pos], color=colour, label=label, lw=1.2)
        for kind, style in (("step", "-"), ("latent", "--")):
            rows = [r for r in rep["by_line"].get(kind, []) if r["mass"] is not None]
            if rows:
                axes[1].plot([r["line"] + 1 for r in rows], [r["mass"] for r in rows], style, marker="o",
                             color=colour, label=f"{label} ({'text' if kind == 'step' else 'latent'})")
        for kind, style in (("step", "-"), ("latent", "--")):
            layers = rep["by_kind"].get(kind, {}).get("mass_layers") or []
            if layers and all(v is not None for v in layers):
                axes[2].plot(range(1, len(layers) + 1), layers, style, marker="o", color=colour,
                             label=f"{label} ({'text' if kind == 'step' else 'latent'})")
        rows = rep["by_line"].get("step", [])
        for key, style, what in (("segment_mass", "-", "own latent segment"), ("target_mass", ":", "target view")):
            pts = [(r["line"] + 1, r[key]) for r in rows if r.get(key) is not None]
            if pts:
                axes[3].plot(*zip(*pts, strict=True), style, marker="o", color=colour, label=f"{label} ({what})")
        cos = [(p["position"], p["cos"]) for p in pos if p["cos"] is not None]
        if cos:
            axes[4].plot(*zip(*cos, strict=True), color=colour, label=label, lw=1.2)
    axes[0].set(xlabel="generated position", ylabel="attention mass on image tokens",
                title="image attention (mean over layers, heads)")
    axes[1].set(xlabel="reasoning step (line)", ylabel="attention mass on image tokens", title="by step")
    axes[2].set(xlabel="layer", ylabel="attention mass on image tokens", title="by layer")
    axes[3].set(xlabel="reasoning step (line)", ylabel="attention mass of the step text",
                title="reading its latents vs its view")
    axes[4].set(xlabel="generated position", ylabel="cosine", title="projected state vs teacher (target view)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
