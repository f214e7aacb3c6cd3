"""The latent training forward: each latent slot's input is the final-layer hidden state of the position before.

Two modes return the same forward values:

* ``exact`` — the recurrence is unrolled with gradients: every slot's input is computed with the current weights
  and the loss back-propagates through all of them. The sequence is cut into *rounds*: round 0 runs each sample
  up to its first slot, round j runs slot j plus the text up to the next slot. Because every segment has the same
  K, round j is the same kind of chunk for every sample, so a batch whose samples differ in step count, step
  length and image count runs in (max slots + 1) batched passes with little padding (Coconut aligns only the first
  latent). Each round reuses the KV cache of the earlier rounds (kept in the autograd graph) and is wrapped in
  activation checkpointing with the cache passed as a list of per-round chunks, so memory stays close to one
  forward pass instead of holding a concatenated copy of the cache per round.
* ``fast`` — one no-grad cached pass computes every slot's input, then a single full-sequence pass with those
  inputs (detached) computes all outputs. Gradients do not flow through the recurrence.

Both return the alignment-layer hidden states at every slot, grouped per segment, for the REPA loss. Under
``latent_feed: pause`` nothing is fed back (each slot keeps the slot token's embedding), so there is no recurrence:
both modes are one full-sequence pass, exact in value and gradient, and the slot embedding learns.

Under the image bottleneck (``valr.image_bottleneck``, a diagnostic) every pass gets a 4-D mask in which only image
tokens and latent slots see the image tokens: :func:`full_mask` for full-sequence passes, a per-round mask over the
cached columns and the chunk in the rounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from valr.backbones.base import (
    Backbone,
    block_image_keys,
    bottleneck_mask,
    chunk_mask,
    feeds_back,
    grid_positions,
    image_bottleneck,
    latent_feeder,
    latent_grid,
)
from valr.data.collate import Batch
from valr.data.layout import IGNORE

Mode = Literal["exact", "fast"]


@dataclass
class EngineOutput:
    hidden: torch.Tensor  # (B, L, D) final post-norm hidden state at every position (zeros on padding)
    loss_ce: torch.Tensor  # mean token cross-entropy over label tokens
    n_label_tokens: int
    latent_states: torch.Tensor  # (S, K, D) alignment-layer states, one row per segment, sample-major order
    latent_inputs: torch.Tensor  # (S, K, D) the vectors fed in at the slots
    segment_owner: list[tuple[int, int]]  # (sample, segment) of each of the S rows


def cross_entropy(backbone: Backbone, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Next-token CE over positions whose next label is set; logits only where needed (vocab can be huge)."""
    target = labels[:, 1:]
    b_idx, t_idx = (target != IGNORE).nonzero(as_tuple=True)
    n = int(b_idx.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0
    logits = backbone.logits(hidden[b_idx, t_idx]).float()
    return F.cross_entropy(logits, target[b_idx, t_idx]), n


def decoder_inputs(backbone: Backbone, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's input embeddings (slots still hold the slot token's) and its (3, B, L) positions."""
    device = backbone.model.device
    ids = batch.input_ids.to(device)
    embeds = backbone.embed(ids, batch.images)
    positions = backbone.position_ids(ids, batch.attention_mask.to(device), batch.images)
    side = latent_grid(backbone)
    if side and batch.k:  # latent slots on the grid (valr.latent_positions = "grid"); text keeps its positions
        slot = torch.arange(batch.k, device=positions.device)
        for b, starts in enumerate(batch.segment_starts):
            for s in starts:
                positions[:, b, s:s + batch.k] = grid_positions(positions[0, b, s:s + batch.k], slot, side)
    return embeds, positions


def _is_image(backbone: Backbone, ids: torch.Tensor) -> torch.Tensor:
    return ids == backbone.image_token_id


def full_mask(backbone: Backbone, batch: Batch) -> torch.Tensor:
    """The decoder mask of a full-sequence pass: the (B, L) padding mask, or under the image bottleneck a
    (B, 1, L, L) causal mask in which only image tokens and latent slots see the image tokens."""
    device = backbone.model.device
    mask = batch.attention_mask.to(device)
    if not image_bottleneck(backbone):
        return mask
    is_image = _is_image(backbone, batch.input_ids.to(device))
    is_slot = torch.zeros_like(is_image)
    for b in range(batch.size):
        is_slot[b, batch.slot_positions(b)] = True
    return bottleneck_mask(mask, is_image, is_slot)


def forward_plain(backbone: Backbone, batch: Batch, layer: int | None = None) -> EngineOutput:
    """One full-sequence pass: the stage-1 (plain CoT SFT) step, and the reference cost for benchmarks."""
    embeds, positions = decoder_inputs(backbone, batch)
    out = backbone.decode(embeds, positions, full_mask(backbone, batch), None, layer)
    loss, n = cross_entropy(backbone, out.last_hidden, batch.labels.to(embeds.device))
    empty = embeds.new_zeros(0, batch.k, embeds.shape[-1])
    return EngineOutput(out.last_hidden, loss, n, empty, empty, [])


def _check_layer(backbone: Backbone, layer: int) -> None:
    if not 1 <= layer <= backbone.num_layers:
        raise ValueError(f"alignment layer {layer} is out of range: this model has {backbone.num_layers} decoder "
                         f"layers, so use 1..{backbone.num_layers} (paper: 12 of 28, the middle)")


def _round_plan(batch: Batch) -> list[list[tuple[int, int]]]:
    """Per round, per sample, the half-open position range it runs. Empty once a sample is done."""
    lengths = batch.attention_mask.sum(1).tolist()
    per_sample = []
    for b, n in enumerate(lengths):
        bounds = [0, *batch.slot_positions(b), n]
        per_sample.append(list(zip(bounds[:-1], bounds[1:], strict=True)))
    rounds = max(len(c) for c in per_sample)
    return [[c[r] if r < len(c) else (lengths[b], lengths[b]) for b, c in enumerate(per_sample)]
            for r in range(rounds)]


def _round_step(backbone: Backbone, layer: int, past_k: list[list[torch.Tensor]],
                past_v: list[list[torch.Tensor]], chunk: torch.Tensor, chunk_pos: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One decoder pass over a round's chunk on top of the cached rounds. Side-effect free (re-run by
    checkpointing): builds a fresh cache from the chunk lists and returns the new K/V chunk per layer."""
    cache = backbone.new_cache()
    past = 0
    if past_k and past_k[0]:
        for i, (ks, vs) in enumerate(zip(past_k, past_v, strict=True)):
            cache.update(torch.cat(ks, 2), torch.cat(vs, 2), i)
        past = cache.get_seq_length()
    out = backbone.decode(chunk, chunk_pos, mask, cache, layer)
    keys = [lay.keys[:, :, past:].clone() for lay in out.cache.layers]
    values = [lay.values[:, :, past:].clone() for lay in out.cache.layers]
    return (out.last_hidden, out.layer_hidden, *keys, *values)


def _run_rounds(backbone: Backbone, batch: Batch, embeds: torch.Tensor, positions: torch.Tensor, layer: int,
                differentiable: bool):
    """Unroll the latent recurrence round by round. Returns per-sample lists of final hidden rows, the
    alignment-layer states at slots, and the slot inputs (in slot order).

    ``differentiable``: each round is checkpointed and reads the earlier rounds' K/V from per-round chunks kept in
    the graph. Otherwise (no grad) the rounds append to one ``append_only`` cache, and samples with no slot left
    leave the chunk and the cache (a batch's step counts differ, so late rounds would be mostly padding)."""
    n_layers = backbone.num_layers
    batch_size, _, dim = embeds.shape
    device = embeds.device
    past_k: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    past_v: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    past_masks: list[torch.Tensor] = []
    bottleneck = image_bottleneck(backbone)
    is_image = _is_image(backbone, batch.input_ids.to(device)) if bottleneck else None
    past_images: list[torch.Tensor] = []  # per round, which chunk columns are image tokens (bottleneck only)
    prev_h: list[torch.Tensor | None] = [None] * batch_size  # each sample's next latent input
    feed = latent_feeder(backbone)
    if not differentiable and torch.is_grad_enabled():
        raise RuntimeError("the non-differentiable rounds run under torch.no_grad()")
    cache = None if differentiable else backbone.new_cache(append_only=True)
    finals: list[list[torch.Tensor]] = [[] for _ in range(batch_size)]
    slot_states: list[list[torch.Tensor]] = [[] for _ in range(batch_size)]
    slot_inputs: list[list[torch.Tensor]] = [[] for _ in range(batch_size)]
    members = list(range(batch_size))  # the sample in each row of the chunk (and of the cache)
    for r, spans in enumerate(_round_plan(batch)):
        width = max(e - a for a, e in spans)
        if width == 0:
            break
        if not differentiable:  # drop samples that are done from the chunk and the cache (they only shrink)
            keep = [i for i, b in enumerate(members) if spans[b][1] > spans[b][0]]
            if len(keep) < len(members):
                idx = torch.tensor(keep, device=device)
                cache.reorder_cache(idx)
                past_masks = [m[idx] for m in past_masks]
                past_images = [m[idx] for m in past_images]
                members = [members[i] for i in keep]
        rows, pos_rows, valid = [], [], torch.zeros(len(members), width, dtype=torch.long, device=device)
        for i, b in enumerate(members):
            a, e = spans[b]
            n = e - a
            parts = []
            if n and r > 0:  # the chunk starts at a latent slot: its input is the fed-back state
                parts = [prev_h[b].unsqueeze(0), embeds[b, a + 1:e]]
            elif n:
                parts = [embeds[b, a:e]]
            parts.append(embeds.new_zeros(width - n, dim))
            rows.append(torch.cat(parts, 0))
            pos = positions.new_zeros(positions.shape[0], width)
            pos[:, :n] = positions[:, b, a:e]
            pos_rows.append(pos)
            valid[i, :n] = 1
        chunk = torch.stack(rows, 0)
        chunk_pos = torch.stack(pos_rows, 1)
        if bottleneck:  # only image tokens and the round's slot (its first column, after round 0) see images
            images = torch.zeros_like(valid, dtype=torch.bool)
            for i, b in enumerate(members):
                a, e = spans[b]
                images[i, :e - a] = is_image[b, a:e]
            sees = images.clone()
            if r > 0:
                sees[:, 0] |= valid[:, 0].bool()
            past_valid = torch.cat(past_masks, 1) if past_masks else valid[:, :0]
            mask = block_image_keys(chunk_mask(past_valid, valid), torch.cat([*past_images, images], 1), sees)
            past_images.append(images)
        else:
            mask = torch.cat([*past_masks, valid], 1)
        if differentiable:
            snapshot_k = [list(x) for x in past_k]
            snapshot_v = [list(x) for x in past_v]

            def step(c, p, m, _k=snapshot_k, _v=snapshot_v):
                return _round_step(backbone, layer, _k, _v, c, p, m)

            outs = checkpoint(step, chunk, chunk_pos, mask, use_reentrant=False)
            last, lay = outs[0], outs[1]
            for j in range(n_layers):
                past_k[j].append(outs[2 + j])
                past_v[j].append(outs[2 + n_layers + j])
        else:
            out = backbone.decode(chunk, chunk_pos, mask, cache, layer)
            last, lay = out.last_hidden, out.layer_hidden
        past_masks.append(valid)
        for i, b in enumerate(members):
            a, e = spans[b]
            n = e - a
            if not n:
                continue
            finals[b].append(last[i, :n])
            if r > 0:
                slot_states[b].append(lay[i, 0])
                slot_inputs[b].append(prev_h[b])
            prev_h[b] = feed(last[i, n - 1])
    return finals, slot_states, slot_inputs


def _group_segments(batch: Batch, per_sample: list[list[torch.Tensor]], dim: int, like: torch.Tensor):
    rows, owner = [], []
    for b, states in enumerate(per_sample):
        for s in range(len(batch.segment_starts[b])):
            rows.append(torch.stack(states[s * batch.k:(s + 1) * batch.k], 0))
            owner.append((b, s))
    if not rows:
        return like.new_zeros(0, batch.k, dim), owner
    return torch.stack(rows, 0), owner


def forward_latent(backbone: Backbone, batch: Batch, layer: int, mode: Mode = "exact") -> EngineOutput:
    """Stage-2 forward over a laid-out VaLR batch. See the module docstring for the two modes."""
    _check_layer(backbone, layer)
    if mode not in ("exact", "fast"):
        raise ValueError(f"unknown latent training mode {mode!r}; use 'exact' or 'fast'")
    embeds, positions = decoder_inputs(backbone, batch)
    labels = batch.labels.to(embeds.device)
    batch_size, length, dim = embeds.shape
    if mode == "exact" and feeds_back(backbone):
        finals, states, inputs = _run_rounds(backbone, batch, embeds, positions, layer,
                                              differentiable=torch.is_grad_enabled())
        hidden = torch.stack([F.pad(torch.cat(f, 0), (0, 0, 0, length - sum(x.shape[0] for x in f)))
                              for f in finals], 0)
        latent_states, owner = _group_segments(batch, states, dim, embeds)
    else:  # fast mode, or pause tokens in either mode (no recurrence, so one full pass is exact)
        slots = [batch.slot_positions(b) for b in range(batch_size)]
        filled = embeds
        if feeds_back(backbone):
            with torch.no_grad():
                _, _, inputs = _run_rounds(backbone, batch, embeds, positions, layer, differentiable=False)
            b_idx = [b for b, ts in enumerate(slots) for _ in ts]
            if b_idx:
                t_idx = [t for ts in slots for t in ts]
                vectors = torch.stack([v for per in inputs for v in per], 0).detach()
                filled = embeds.index_put((torch.tensor(b_idx), torch.tensor(t_idx)), vectors)
        else:  # each slot keeps the slot token's embedding, with its gradient
            inputs = [[embeds[b, t] for t in ts] for b, ts in enumerate(slots)]
        out = backbone.decode(filled, positions, full_mask(backbone, batch), None, layer)
        hidden = out.last_hidden
        at_slots = [[out.layer_hidden[b, t] for t in ts] for b, ts in enumerate(slots)]
        latent_states, owner = _group_segments(batch, at_slots, dim, embeds)
    latent_inputs, _ = _group_segments(batch, inputs, dim, embeds)
    loss, n = cross_entropy(backbone, hidden, labels)
    return EngineOutput(hidden, loss, n, latent_states, latent_inputs, owner)
