"""Latent grid positions (``valr.latent_positions = "grid"``): each segment's slots sit on the rotary axes at the
rows and columns of the aligned grid. Checked against naive full recomputation with independently computed
positions, fast mode against exact mode, cached generation against recomputation, and by what they change."""

from __future__ import annotations

import pytest
import torch

from valr.backbones.base import grid_positions, set_layout
from valr.config import ValrConfig
from valr.data import LayoutConfig, make_batch
from valr.engine import forward_latent

from reference import check_generation_against_naive, naive_generate, naive_latent_forward

LAYER = 2
K = 4  # a 2 x 2 grid


def test_grid_positions_hand_built():
    got = grid_positions(torch.tensor([10, 11, 12, 13, 14]), torch.tensor([0, 1, 2, 3, 4]), 2)
    assert got.tolist() == [[10] * 5, [10, 10, 11, 11, 12], [10, 11, 10, 11, 10]]


def test_set_layout_reads_the_config(tiny):
    bb = tiny[3]
    set_layout(bb, ValrConfig(k=16, latent_positions="grid"))
    assert bb.latent_grid_side == 4
    set_layout(bb, ValrConfig(k=20, aligned_latents=16, latent_positions="grid"))
    assert bb.latent_grid_side == 4  # the aligned grid's side; the free latents form a fifth row
    set_layout(bb, ValrConfig(k=16))
    assert bb.latent_grid_side == 0
    with pytest.raises(ValueError, match="latent_positions='rows'.*'text'"):
        set_layout(bb, ValrConfig(k=16, latent_positions="rows"))


@pytest.mark.parametrize("bottleneck", [False, True])
def test_exact_mode_with_grid_positions_matches_naive_reference(tiny, records, bottleneck):
    model, tok, _, bb, latent = tiny
    set_layout(bb, ValrConfig(k=K, latent_positions="grid", image_bottleneck=bottleneck))
    cfg = LayoutConfig(k=K)
    batch = make_batch(records, tok, bb, cfg, latent)
    out = forward_latent(bb, batch, LAYER, "exact")
    fast = forward_latent(bb, batch, LAYER, "fast")
    with torch.no_grad():
        no_grad = forward_latent(bb, batch, LAYER, "exact")
    valid = batch.attention_mask.bool()
    for got in (fast, no_grad):
        torch.testing.assert_close(got.hidden[valid], out.hidden[valid], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.latent_states, out.latent_states, atol=1e-5, rtol=1e-4)
    for b, rec in enumerate(records):
        single = make_batch([rec], tok, bb, cfg, latent)
        hidden, states, inputs = naive_latent_forward(bb, single, LAYER, bottleneck=bottleneck, grid=2)
        n = hidden.shape[0]
        rows = [i for i, (ob, _) in enumerate(out.segment_owner) if ob == b]
        torch.testing.assert_close(out.hidden[b, :n], hidden, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.latent_states[rows].reshape(-1, bb.hidden_size), states, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.latent_inputs[rows].reshape(-1, bb.hidden_size), inputs, atol=1e-5, rtol=1e-4)
    # the positions matter: with text positions the same batch gives other latents
    set_layout(bb, ValrConfig(k=K, image_bottleneck=bottleneck))
    with torch.no_grad():
        text = forward_latent(bb, batch, LAYER, "fast")
    assert float((text.latent_states - fast.latent_states.detach()).abs().max()) > 1e-3


def test_grid_positions_leave_plain_batches_alone(tiny, records):
    """Without latent segments (stage 1, SFT) the option changes nothing."""
    model, tok, _, bb, latent = tiny
    batch = make_batch(records, tok, bb, LayoutConfig(k=0), None)
    with torch.no_grad():
        set_layout(bb, ValrConfig(k=K))
        text = forward_latent(bb, batch, LAYER, "fast").hidden
        set_layout(bb, ValrConfig(k=K, latent_positions="grid"))
        grid = forward_latent(bb, batch, LAYER, "fast").hidden
    assert torch.equal(text, grid)


@pytest.mark.parametrize("batched", [False, True])
def test_cached_generation_with_grid_positions_matches_full_recompute(tiny, image_dir, batched):
    model, tok, _, bb, latent = tiny
    set_layout(bb, ValrConfig(k=K, latent_positions="grid"))
    for args, ref_fed in check_generation_against_naive(bb, tok, latent, image_dir, batched, 20, grid=2):
        # the reference with text positions feeds other latents (so the comparison sees the positions)
        _, text_fed = naive_generate(*args)
        assert float((torch.stack(text_fed[:K]) - torch.stack(ref_fed[:K])).detach().abs().max()) > 1e-5


def test_tiny_rope_theta_sets_the_axes_frequencies():
    """TinyShape.rope_theta reaches the model, and the width axis gets the lowest frequencies (Qwen2.5-VL's
    contiguous 3-D rope split): at 10,000 a cell turns the width part by at most 0.003 rad, at 10 by 0.24."""
    from dataclasses import replace

    from valr.tiny import SHAPES, build_tiny

    t, h, w = SHAPES["tiny"].mrope_section()
    half = t + h + w  # head_dim / 2 = 8: the width section is the last 3 of each half
    for theta, width_top in [(10000.0, 10000.0 ** -0.625), (10.0, 10.0 ** -0.625)]:
        model = build_tiny(shape=replace(SHAPES["tiny"], rope_theta=theta))[0]
        rotary = model.model.language_model.rotary_emb
        x = torch.zeros(1, 1, 2 * half)
        # two cells of an image row: temporal and height 0, width 0 and 1
        cos, _ = rotary(x, torch.tensor([[[0, 0]], [[0, 0]], [[0, 1]]]))
        moved = (cos[0, 1] - cos[0, 0]).abs() > 0
        assert moved.nonzero().flatten().tolist() == [*range(t + h, half), *range(half + t + h, 2 * half)]
        angles = torch.acos(cos[0, 1, t + h:t + h + w].double().clamp(-1, 1))
        assert float(angles.max()) == pytest.approx(width_top, rel=1e-3)
