"""The image bottleneck (a diagnostic layout): only image tokens and latent slots attend to image tokens. Checked
against naive full recomputation with an independently built mask, fast mode against exact mode, and by what
changes when the images change."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from valr.backbones.base import ImageInputs
from valr.data import LayoutConfig, make_batch
from valr.engine import forward_latent, forward_plain

from reference import check_generation_against_naive, naive_latent_forward

LAYER = 2


def _other_images(batch):
    im = batch.images
    return dataclasses.replace(batch, images=ImageInputs(im.pixel_values + 0.5, im.grid_thw, im.n_tokens))


def _before_first_slot(bb, batch):
    """Per sample, the valid text positions before its first latent slot (the question and the step's head)."""
    is_text = (batch.input_ids != bb.image_token_id) & batch.attention_mask.bool()
    keep = torch.zeros_like(is_text)
    for b in range(batch.size):
        first = (batch.slot_positions(b) or [batch.input_ids.shape[1]])[0]
        keep[b, :first] = is_text[b, :first]
    return keep


@pytest.mark.parametrize("k", [0, 4])
def test_text_sees_the_images_only_through_the_latents(tiny, records, k):
    model, tok, _, bb, latent = tiny
    batch = make_batch(records, tok, bb, LayoutConfig(k=k), latent if k else None)
    other = _other_images(batch)
    before = _before_first_slot(bb, batch)
    for bottleneck in (False, True):
        bb.image_bottleneck = bottleneck
        with torch.no_grad():
            run = (lambda b: forward_latent(bb, b, LAYER, "fast")) if k else (lambda b: forward_plain(bb, b))
            a, o = run(batch), run(other)
        moved = (a.hidden - o.hidden).abs().amax(-1)
        if bottleneck:  # nothing before the first slot (no slot at k = 0) sees the images
            assert float(moved[before].max()) < 1e-6
        else:
            assert float(moved[before].max()) > 1e-3
        if k:  # the slots do, and through them the text after them
            assert float((a.latent_states - o.latent_states).abs().max()) > 1e-3
            after = batch.attention_mask.bool() & ~before & (batch.input_ids != bb.image_token_id)
            assert float(moved[after].max()) > 1e-3


@pytest.mark.parametrize("feed", ["hidden", "pause"])
def test_exact_mode_under_the_bottleneck_matches_naive_reference(tiny, records, feed):
    model, tok, _, bb, latent = tiny
    bb.latent_feed, bb.image_bottleneck = feed, True
    cfg = LayoutConfig(k=4)
    batch = make_batch(records, tok, bb, cfg, latent)
    out = forward_latent(bb, batch, LAYER, "exact")
    fast = forward_latent(bb, batch, LAYER, "fast")
    with torch.no_grad():  # the append-only-cache rounds, which drop finished samples
        no_grad = forward_latent(bb, batch, LAYER, "exact")
    valid = batch.attention_mask.bool()
    for got in (fast, no_grad):
        torch.testing.assert_close(got.hidden[valid], out.hidden[valid], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.latent_states, out.latent_states, atol=1e-5, rtol=1e-4)
    for b, rec in enumerate(records):
        single = make_batch([rec], tok, bb, cfg, latent)
        hidden, states, inputs = naive_latent_forward(bb, single, LAYER, feed, bottleneck=True)
        n = hidden.shape[0]
        rows = [i for i, (ob, _) in enumerate(out.segment_owner) if ob == b]
        torch.testing.assert_close(out.hidden[b, :n], hidden, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.latent_states[rows].reshape(-1, bb.hidden_size), states, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.latent_inputs[rows].reshape(-1, bb.hidden_size), inputs, atol=1e-5, rtol=1e-4)
    bb.image_bottleneck = False  # and the bottleneck changes something
    with torch.no_grad():
        free = forward_latent(bb, batch, LAYER, "fast")
    assert float((free.latent_states - fast.latent_states).abs().max()) > 1e-3


@pytest.mark.parametrize("batched", [False, True])
def test_cached_generation_under_the_bottleneck_matches_full_recompute(tiny, image_dir, batched):
    model, tok, _, bb, latent = tiny
    bb.image_bottleneck = True
    check_generation_against_naive(bb, tok, latent, image_dir, batched, 14, bottleneck=True)
