"""Naive references the fast paths are tested against: full recomputation, no cache, one sample at a time."""

from __future__ import annotations

import torch

from valr.data.collate import Batch


def naive_feed(bb, h: torch.Tensor, how: str, slot_id: int | None = None) -> torch.Tensor:
    """What a latent slot is fed, written out: the hidden state, it scaled to the embedding table's RMS, or (pause)
    the slot token's own embedding, whatever the hidden state."""
    if how == "hidden":
        return h
    if how == "pause":
        return bb.model.get_input_embeddings().weight[slot_id]
    assert how == "embedding_rms"
    table = bb.model.get_input_embeddings().weight.detach()
    return h * (table.pow(2).mean().sqrt() / h.pow(2).mean().sqrt())


def naive_bottleneck_mask(ids: list[int], image_id: int, slots: list[int]) -> torch.Tensor:
    """(1, 1, L, L): row i sees column j <= i, except that only image and slot rows see image columns."""
    image = [t == image_id for t in ids]
    sees = [image[i] or i in slots for i in range(len(ids))]
    return torch.tensor([[j <= i and (sees[i] or not image[j]) for j in range(len(ids))]
                         for i in range(len(ids))])[None, None]


def naive_grid_position(text_pos: int, slot: int, side: int) -> list[int]:
    """Slot ``slot`` of a segment, its 1-D text position given: (start, start + row, start + column)."""
    start = text_pos - slot
    return [start, start + slot // side, start + slot % side]


def naive_latent_forward(bb, single: Batch, layer: int, feed: str = "hidden", bottleneck: bool = False,
                         grid: int = 0):
    """A batch of one sample: for every slot in order, recompute the whole prefix without a cache and feed back
    the last hidden state. Returns (final hidden (L, D), alignment-layer states at slots, slot inputs).
    ``bottleneck``: under :func:`naive_bottleneck_mask` (the sample must have no padding). ``grid``: latent
    slots at :func:`naive_grid_position` on a grid of that side (0: text positions)."""
    assert single.size == 1
    ids, mask = single.input_ids, single.attention_mask
    embeds = bb.embed(ids, single.images)[0]
    pos = bb.position_ids(ids, mask, single.images).clone()
    if grid:
        for s in single.segment_starts[0]:
            for j in range(single.k):
                pos[:, 0, s + j] = torch.tensor(naive_grid_position(int(pos[0, 0, s + j]), j, grid))
    rows = list(embeds)
    slots = single.slot_positions(0)
    if bottleneck:
        assert bool(mask.all())
        mask = naive_bottleneck_mask(ids[0].tolist(), bb.image_token_id, slots)
    for s in slots:
        prefix_mask = mask[..., :s, :s] if bottleneck else mask[:, :s]
        out = bb.decode(torch.stack(rows[:s])[None], pos[:, :, :s], prefix_mask, None)
        rows[s] = naive_feed(bb, out.last_hidden[0, -1], feed, int(ids[0, s]))
    out = bb.decode(torch.stack(rows)[None], pos, mask, None, layer)
    inputs = torch.stack([rows[s] for s in slots]) if slots else embeds[:0]
    return out.last_hidden[0], out.layer_hidden[0, slots], inputs


def naive_generate(bb, tok, latent, prompt_ids: list[int], images, policy: str, k: int, max_new_tokens: int,
                   step_end: torch.Tensor, eos: list[int], feed: str = "hidden", bottleneck: bool = False,
                   grid: int = 0):
    """Greedy generation by full recomputation at every position (batch 1, no cache, no padding).
    ``bottleneck``: only image tokens and fed latents attend to the image tokens (a lower-triangular mask with
    those columns removed from every other row). ``grid``: fed latents at :func:`naive_grid_position`.

    Returns (generated token ids, list of fed-back latent vectors).
    """
    ids = torch.tensor([prompt_ids])
    mask = torch.ones_like(ids)
    rows = list(bb.embed(ids, images)[0])
    image_row = [t == bb.image_token_id for t in prompt_ids]  # per row of ``rows``
    sees = list(image_row)
    pos = bb.position_ids(ids, mask, images)[:, 0]
    next_pos = int(pos[0, -1]) + 1
    emb = bb.model.get_input_embeddings()
    tokens, fed = [], []
    left, close, boundary = 0, False, policy == "force"
    banned = [latent.end, latent.slot] + ([latent.start] if policy == "off" else [])
    while True:
        if bottleneck:
            n = len(rows)
            m = torch.tensor([[j <= i and (sees[i] or not image_row[j]) for j in range(n)] for i in range(n)])
            m = m[None, None]
        else:
            m = torch.ones(1, len(rows), dtype=torch.long)
        out = bb.decode(torch.stack(rows)[None], pos[:, None], m, None)
        h = out.last_hidden[0, -1]
        row_pos = [next_pos] * 3  # the position of the row appended now
        if left > 0:
            rows.append(naive_feed(bb, h, feed, latent.slot))
            image_row.append(False)
            sees.append(True)
            fed.append(rows[-1])
            left -= 1
            close = left == 0
            if grid:
                row_pos = naive_grid_position(next_pos, k - left - 1, grid)
        else:
            if close:
                t, close = latent.end, False
            else:
                logits = bb.logits(h).float()
                logits[banned] = float("-inf")
                t = int(logits.argmax())
                if policy == "force" and boundary:
                    t = latent.start
                boundary = bool(step_end[t])
            tokens.append(t)
            if t == latent.start:
                left = k
            if t in eos or len(tokens) >= max_new_tokens:
                return tokens, fed
            rows.append(emb(torch.tensor(t)))
            image_row.append(False)
            sees.append(False)
        pos = torch.cat([pos, torch.tensor(row_pos)[:, None]], 1)
        next_pos += 1


def check_generation_against_naive(bb, tok, latent, image_dir, batched: bool, max_new_tokens: int, **naive):
    """Cached generation (latent policy force, K = 4) of two prompts with different image counts, one batch or one
    at a time, against :func:`naive_generate` with the options ``naive``: same tokens, same fed latents. Returns,
    per prompt, the reference's positional arguments and its fed latents."""
    from PIL import Image

    from valr.generate import GenerationConfig, Generator, Prompt

    gen = Generator(bb, tok)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, latent_policy="force", k=4, return_latents=True)
    im = {n: Image.open(image_dir / f"{n}.png") for n in "abc"}
    prompts = [Prompt("Which object is in the top row?", [im["a"]]),
               Prompt("Compare the two views.", [im["b"], im["c"]])]
    groups = [prompts] if batched else [[p] for p in prompts]
    checked, segments = [], 0
    for group in groups:
        for p, r in zip(group, gen(group, cfg), strict=True):
            images = bb.image_inputs(p.images) if p.images else None
            args = (bb, tok, latent, r.prompt_token_ids, images, cfg.latent_policy, cfg.k, cfg.max_new_tokens,
                    gen.step_end(cfg.step_delimiter), gen.eos, bb.latent_feed)
            ref_tokens, ref_fed = naive_generate(*args, **naive)
            assert r.token_ids == ref_tokens
            got = torch.cat(r.latents) if r.latents else torch.zeros(0, bb.hidden_size)
            ref = torch.stack(ref_fed) if ref_fed else torch.zeros(0, bb.hidden_size)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
            segments += r.latent_segments
            checked.append((args, ref_fed))
    assert segments > 0
    return checked
