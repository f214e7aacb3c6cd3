"""Position ids against the model's own computation, and latent special tokens."""

from __future__ import annotations

import pytest
import torch

from valr.data import LayoutConfig, make_batch
from valr.engine import forward_latent, forward_plain
from valr.tokens import LATENT_TOKENS, LatentTokenIds, add_latent_tokens, qwen_tokenizer, train_bpe_tokenizer


def test_plain_forward_equals_the_models_own_forward(tiny, records):
    """Our explicit positions + scattered image features give the logits HF computes from input_ids and pixels."""
    model, tok, _, bb, latent = tiny
    for k, lat in ((0, None), (4, latent)):  # with k=4 the slot tokens are plain text tokens to HF
        batch = make_batch(records, tok, bb, LayoutConfig(k=k), lat)
        mm = (batch.input_ids == model.config.image_token_id).int()
        ref = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    pixel_values=batch.images.pixel_values, image_grid_thw=batch.images.grid_thw,
                    mm_token_type_ids=mm).logits
        ours = bb.logits(forward_plain(bb, batch).hidden)
        valid = batch.attention_mask.bool()
        torch.testing.assert_close(ours[valid], ref[valid], atol=1e-5, rtol=1e-4)


def test_text_positions_continue_after_images(tiny, records):
    model, tok, _, bb, latent = tiny
    batch = make_batch(records[1:2], tok, bb, LayoutConfig(k=4), latent)
    pos = bb.position_ids(batch.input_ids, batch.attention_mask, batch.images)[:, 0]
    is_image = batch.input_ids[0] == model.config.image_token_id
    last_image = int(is_image.nonzero().max())
    after = pos[:, last_image + 1:]
    assert torch.equal(after[0], after[1]) and torch.equal(after[1], after[2])  # text: same on all axes
    assert int(after[0, 0]) == int(pos[:, : last_image + 1].max()) + 1
    assert torch.equal(after[0], torch.arange(after.shape[1]) + after[0, 0])
    assert not torch.equal(pos[1, is_image], pos[2, is_image])  # images really are 3-D


def test_engine_ignores_stale_rope_deltas(tiny, records):
    model, tok, _, bb, latent = tiny
    batch = make_batch(records, tok, bb, LayoutConfig(k=4), latent)
    clean = forward_latent(bb, batch, 2, "fast")
    model.model.rope_deltas = torch.full((3, 1), -55)
    stale = forward_latent(bb, batch, 2, "fast")
    torch.testing.assert_close(clean.latent_states, stale.latent_states)


def test_add_latent_tokens_is_idempotent_and_statistical():
    from valr.tiny import build_tiny

    model, tok, _ = build_tiny(train_bpe_tokenizer(["a b c d e f g"] * 3, vocab_size=280))
    # build_tiny already added them; a fresh tokenizer + model resize path:
    tok2 = train_bpe_tokenizer(["a b c d e f g"] * 3, vocab_size=280)
    n = len(tok2)
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight.mul_(0).add_(3.0)  # existing rows: all 3.0
        model.lm_head.weight.mul_(0).add_(-2.0)
    ids = add_latent_tokens(tok2, model)
    assert [tok2.convert_ids_to_tokens(i) for i in (ids.start, ids.end, ids.slot)] == list(LATENT_TOKENS)
    assert len(tok2) == n + 3
    emb = model.get_input_embeddings().weight
    torch.testing.assert_close(emb[[ids.start, ids.end, ids.slot]], torch.full((3, emb.shape[1]), 3.0))
    torch.testing.assert_close(model.lm_head.weight[[ids.start, ids.end]], torch.full((2, emb.shape[1]), -2.0))
    again = add_latent_tokens(tok2, model)
    assert again == ids and len(tok2) == n + 3


def test_latent_ids_require_the_tokens():
    tok = train_bpe_tokenizer(["hello"] * 3, vocab_size=270)
    with pytest.raises(ValueError, match="add_latent_tokens"):
        LatentTokenIds.from_tokenizer(tok)


def test_real_qwen_tokenizer_ids():
    tok = qwen_tokenizer()
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655
    ids = add_latent_tokens(tok)
    assert ids.start == 151657 and tok.decode([ids.start, ids.end]) == "<latent></latent>"
