"""The latent training forward against the naive reference (full recompute per slot, one sample at a time)."""

from __future__ import annotations

import pytest
import torch

from valr.data import LayoutConfig, make_batch
from valr.engine import forward_latent, forward_plain

from reference import naive_latent_forward

LAYER = 2


def _probe_params(model):
    lm = model.model.language_model
    return {"lm_head": model.lm_head.weight, "embed": lm.embed_tokens.weight,
            "q_proj.0": lm.layers[0].self_attn.q_proj.weight, "mlp.3": lm.layers[3].mlp.down_proj.weight,
            "vision.patch": model.model.visual.patch_embed.proj.weight}


def _objective(bb, hidden, states, weight):
    """A scalar touching every output: logits, final hidden states and the alignment-layer states."""
    return bb.logits(hidden).logsumexp(-1).sum() + (hidden * weight).sum() + (states ** 2).sum() * 0.1


@pytest.mark.parametrize(("k", "feed"), [(1, "hidden"), (4, "hidden"), (4, "embedding_rms"), (4, "pause")])
def test_exact_mode_matches_naive_reference(tiny, records, k, feed):
    model, tok, _, bb, latent = tiny
    bb.latent_feed = feed
    model.train()
    cfg = LayoutConfig(k=k)
    batch = make_batch(records, tok, bb, cfg, latent)
    assert len({len(s) for s in batch.segment_starts}) > 1  # samples differ in number of steps
    torch.manual_seed(1)
    w = torch.randn(batch.input_ids.shape[1], bb.hidden_size)

    out = forward_latent(bb, batch, LAYER, "exact")
    total = 0.0
    for b in range(batch.size):
        n = int(batch.attention_mask[b].sum())
        rows = [i for i, (ob, _) in enumerate(out.segment_owner) if ob == b]
        states = out.latent_states[rows].reshape(-1, bb.hidden_size)
        total = total + _objective(bb, out.hidden[b, :n], states, w[:n])
    grads = torch.autograd.grad(total, list(_probe_params(model).values()))

    ref_total = 0.0
    for b, rec in enumerate(records):
        single = make_batch([rec], tok, bb, cfg, latent)
        hidden, states, inputs = naive_latent_forward(bb, single, LAYER, feed)
        n = hidden.shape[0]
        rows = [i for i, (ob, _) in enumerate(out.segment_owner) if ob == b]
        torch.testing.assert_close(out.hidden[b, :n], hidden, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(bb.logits(out.hidden[b, :n]), bb.logits(hidden), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.latent_states[rows].reshape(-1, bb.hidden_size), states, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.latent_inputs[rows].reshape(-1, bb.hidden_size), inputs, atol=1e-5, rtol=1e-4)
        ref_total = ref_total + _objective(bb, hidden, states, w[:n])
    ref_grads = torch.autograd.grad(ref_total, list(_probe_params(model).values()))
    for name, g, r in zip(_probe_params(model), grads, ref_grads, strict=True):
        assert r.abs().sum() > 0, name
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-3, msg=f"gradient of {name}")


def test_gradient_flows_through_the_recurrence(tiny, records):
    """Exact and fast mode agree in value but not in gradient: only exact differentiates through fed-back states.

    (That exact mode's gradients are the right ones is shown against the naive reference above.)
    """
    model, tok, _, bb, latent = tiny
    batch = make_batch(records[:1], tok, bb, LayoutConfig(k=4), latent)
    param = model.model.language_model.layers[0].mlp.down_proj.weight
    grads = {}
    for mode in ("exact", "fast"):
        out = forward_latent(bb, batch, LAYER, mode)
        (grads[mode],) = torch.autograd.grad(out.latent_states[-1].pow(2).sum(), param)
    assert (grads["exact"] - grads["fast"]).abs().max() > 1e-4 * grads["exact"].abs().max()


@pytest.mark.parametrize("feed", ["hidden", "embedding_rms", "pause"])
def test_fast_mode_equals_exact_mode_forward(tiny, records, feed):
    model, tok, _, bb, latent = tiny
    bb.latent_feed = feed
    batch = make_batch(records, tok, bb, LayoutConfig(k=4), latent)
    exact = forward_latent(bb, batch, LAYER, "exact")
    fast = forward_latent(bb, batch, LAYER, "fast")
    valid = batch.attention_mask.bool()
    torch.testing.assert_close(fast.hidden[valid], exact.hidden[valid], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast.latent_states, exact.latent_states, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast.latent_inputs, exact.latent_inputs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast.loss_ce, exact.loss_ce, atol=1e-5, rtol=1e-5)
    assert fast.n_label_tokens == exact.n_label_tokens
    assert not fast.latent_inputs.requires_grad or feed == "pause"  # fed-back states are detached by design
    with torch.no_grad():  # exact mode without grad runs its rounds on the append-only cache
        exact_no_grad = forward_latent(bb, batch, LAYER, "exact")
    torch.testing.assert_close(exact_no_grad.hidden[valid], exact.hidden[valid], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(exact_no_grad.latent_states, exact.latent_states, atol=1e-5, rtol=1e-4)


def test_pause_feed_is_the_slot_embedding_and_both_modes_share_gradients(tiny, records):
    """Pause tokens have no recurrence: every slot reads the slot token's embedding, which learns, and fast mode's
    gradients are the exact ones (nothing is detached)."""
    model, tok, _, bb, latent = tiny
    bb.latent_feed = "pause"
    batch = make_batch(records, tok, bb, LayoutConfig(k=4), latent)
    params = list(_probe_params(model).values())
    grads = {}
    for mode in ("exact", "fast"):
        out = forward_latent(bb, batch, LAYER, mode)
        slot = model.get_input_embeddings().weight[latent.slot]
        torch.testing.assert_close(out.latent_inputs, slot.expand_as(out.latent_inputs))
        grads[mode] = torch.autograd.grad(out.loss_ce + out.latent_states.pow(2).mean(), params)
    for name, g, r in zip(_probe_params(model), grads["fast"], grads["exact"], strict=True):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5, msg=f"gradient of {name}")
    embed_grad = grads["exact"][list(_probe_params(model)).index("embed")]
    assert embed_grad[latent.slot].abs().sum() > 0  # the pause embedding is trained
    bb.latent_feed = "hidden"
    fed_back = forward_latent(bb, batch, LAYER, "exact")
    assert (fed_back.hidden - out.hidden).abs().max() > 1e-3  # the control really differs from feedback


def test_no_slots_equals_plain_forward(tiny, records):
    model, tok, _, bb, latent = tiny
    batch = make_batch(records, tok, bb, LayoutConfig(k=0), latent)
    plain = forward_plain(bb, batch)
    exact = forward_latent(bb, batch, LAYER, "exact")
    valid = batch.attention_mask.bool()
    torch.testing.assert_close(exact.hidden[valid], plain.hidden[valid], atol=1e-5, rtol=1e-4)
    assert exact.latent_states.shape[0] == 0


def test_layer_out_of_range_is_rejected(tiny, records):
    model, tok, _, bb, latent = tiny
    batch = make_batch(records[:1], tok, bb, LayoutConfig(k=4), latent)
    with pytest.raises(ValueError, match="out of range.*1..4"):
        forward_latent(bb, batch, 5, "exact")
    with pytest.raises(ValueError, match="out of range"):
        forward_latent(bb, batch, 0, "fast")


def test_embedding_rms_feed_puts_latents_at_the_embedding_scale(tiny, records):
    """The rescaled feed is a real change (the tiny model's hidden states are far from the embeddings' scale) and
    lands every fed vector at the embedding table's RMS, in the direction of the hidden state."""
    model, tok, _, bb, latent = tiny
    batch = make_batch(records, tok, bb, LayoutConfig(k=4), latent)
    plain = forward_latent(bb, batch, LAYER, "fast").latent_inputs
    bb.latent_feed = "embedding_rms"
    scaled = forward_latent(bb, batch, LAYER, "fast").latent_inputs
    table_rms = model.get_input_embeddings().weight.detach().pow(2).mean().sqrt()
    rms = scaled.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, float(table_rms)), atol=1e-6, rtol=1e-5)
    assert plain.pow(2).mean(-1).sqrt().min() > 5 * table_rms
    # a sample's first slot sees no earlier latent, so it is fed the same hidden state's direction either way
    out = forward_latent(bb, batch, LAYER, "fast")
    first = [i for i, (_, s) in enumerate(out.segment_owner) if s == 0]
    cos = torch.nn.functional.cosine_similarity(plain[first, 0], scaled[first, 0], dim=-1)
    torch.testing.assert_close(cos, torch.ones(len(first)), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="latent_feed='norm' is not one of .*embedding_rms.*the paper's"):
        bb.latent_feed = "norm"
        forward_latent(bb, batch, LAYER, "fast")


def test_append_only_cache_layer_equals_dynamic_layer():
    """Chunks of any width appended (past the buffer's doubling, across a crop and a batch reorder) give the same
    keys and values as transformers' concatenating layer; with gradients it refuses."""
    from transformers.cache_utils import DynamicLayer

    from valr.backbones.base import AppendOnlyLayer

    torch.manual_seed(0)
    ours, ref = AppendOnlyLayer(), DynamicLayer()
    with torch.no_grad():
        for i, width in enumerate([70, 1, 1, 30, 1, 100, 5, 1]):
            k, v = torch.randn(3, 2, width, 8), torch.randn(3, 2, width, 8)
            got, want = ours.update(k, v), ref.update(k, v)
            for g, w in zip(got, want, strict=True):
                assert torch.equal(g, w)
            assert ours.get_seq_length() == ref.get_seq_length()
            if i == 3:
                ours.crop(-20), ref.crop(-20)
            if i == 5:
                order = torch.tensor([2, 0, 1])
                ours.reorder_cache(order), ref.reorder_cache(order)
    with pytest.raises(RuntimeError, match="no-grad"):
        AppendOnlyLayer().update(torch.randn(1, 1, 2, 4, requires_grad=True), torch.randn(1, 1, 2, 4))
