"""Generation: cached batched decoding against full recomputation, and policy off against model.generate."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from valr.generate import GenerationConfig, Generator, Prompt

from reference import naive_generate


def _prompts(image_dir):
    im = {n: Image.open(image_dir / f"{n}.png") for n in "abcd"}
    return [Prompt("What is left of the cube?", [im["a"]]),
            Prompt("Count the objects in both views, please.", [im["b"], im["c"]]),
            Prompt("Hi", [])]


def _make_latent_likely(model, latent, token):
    """Rig the LM head so that <latent> wins wherever ``token`` would: policy 'model' then enters latent mode."""
    with torch.no_grad():
        model.lm_head.weight[latent.start] = model.lm_head.weight[token] * 1.5


def _check_against_naive(bb, tok, latent, gen, prompts, cfg):
    results = gen(prompts, cfg)
    for p, r in zip(prompts, results, strict=True):
        images = bb.image_inputs(p.images)
        ref_tokens, ref_fed = naive_generate(bb, tok, latent, r.prompt_token_ids, images if p.images else None,
                                             cfg.latent_policy, cfg.k, cfg.max_new_tokens,
                                             gen.step_end(cfg.step_delimiter), gen.eos, bb.latent_feed)
        assert r.token_ids == ref_tokens
        got = torch.cat(r.latents) if r.latents else torch.zeros(0, bb.hidden_size)
        ref = torch.stack(ref_fed) if ref_fed else torch.zeros(0, bb.hidden_size)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
        assert r.latent_segments == sum(1 for t in r.token_ids if t == latent.start)
        assert r.generated_positions == len(r.token_ids) + got.shape[0]
    return results


@pytest.mark.parametrize("policy", ["force", "model"])
@pytest.mark.parametrize("batched", [False, True])
def test_cached_generation_matches_full_recompute(tiny, image_dir, policy, batched):
    model, tok, _, bb, latent = tiny
    gen = Generator(bb, tok)
    prompts = _prompts(image_dir)
    if policy == "model":
        first = gen(prompts, GenerationConfig(max_new_tokens=3, latent_policy="off"))
        _make_latent_likely(model, latent, first[0].token_ids[1])
    cfg = GenerationConfig(max_new_tokens=14, latent_policy=policy, k=4, return_latents=True)
    if batched:
        results = _check_against_naive(bb, tok, latent, gen, prompts, cfg)
    else:
        results = [_check_against_naive(bb, tok, latent, gen, [p], cfg)[0] for p in prompts]
    assert sum(r.latent_segments for r in results) > 0  # latent mode was really exercised


def _fed_under(tiny, image_dir, feed):
    """Forced-latent generation under ``feed``, checked against full recomputation; the fed vectors, stacked."""
    model, tok, _, bb, latent = tiny
    bb.latent_feed = feed
    cfg = GenerationConfig(max_new_tokens=14, latent_policy="force", k=4, return_latents=True)
    results = _check_against_naive(bb, tok, latent, Generator(bb, tok), _prompts(image_dir), cfg)
    return torch.cat([torch.cat(r.latents) for r in results])


def test_cached_generation_with_pause_feed_matches_full_recompute(tiny, image_dir):
    model, latent = tiny[0], tiny[4]
    fed = _fed_under(tiny, image_dir, "pause")
    assert fed.shape[0] > 0
    torch.testing.assert_close(fed, model.get_input_embeddings().weight[latent.slot].detach().expand_as(fed))


def test_cached_generation_with_rescaled_feed_matches_full_recompute(tiny, image_dir):
    model = tiny[0]
    fed = _fed_under(tiny, image_dir, "embedding_rms")
    table_rms = model.get_input_embeddings().weight.detach().pow(2).mean().sqrt()
    torch.testing.assert_close(fed.pow(2).mean(-1).sqrt(), torch.full((fed.shape[0],), float(table_rms)),
                               atol=1e-6, rtol=1e-5)


def test_policy_off_equals_hf_generate(tiny, image_dir):
    model, tok, _, bb, latent = tiny
    gen = Generator(bb, tok)
    prompts = _prompts(image_dir)
    ids, mask, images, _ = gen.encode_prompts(prompts)
    mm = (ids == model.config.image_token_id).int()
    hf = model.generate(input_ids=ids, attention_mask=mask, pixel_values=images.pixel_values,
                        image_grid_thw=images.grid_thw, mm_token_type_ids=mm, max_new_tokens=16, do_sample=False,
                        suppress_tokens=[latent.start, latent.end, latent.slot], pad_token_id=tok.pad_token_id)
    ours = gen(prompts, GenerationConfig(max_new_tokens=16, latent_policy="off"))
    for b, r in enumerate(ours):
        expected = hf[b, ids.shape[1]:].tolist()
        if r.finished:  # HF pads finished rows; compare up to and including EOS
            expected = expected[:len(r.token_ids)]
        assert r.token_ids == expected
        assert r.latent_segments == 0 and r.generated_positions == len(r.token_ids)


def test_latent_k_at_test_time_and_budget(tiny, image_dir):
    model, tok, _, bb, latent = tiny
    gen = Generator(bb, tok)
    prompts = _prompts(image_dir)[:2]
    for k in (1, 9):
        res = gen(prompts, GenerationConfig(max_new_tokens=10, latent_policy="force", k=k, return_latents=True))
        for r in res:
            assert len(r.token_ids) <= 10
            assert r.token_ids[0] == latent.start  # forced at the start of the answer
            assert all(seg.shape == (k, bb.hidden_size) for seg in r.latents)
            assert f"[{k} latent positions]" in r.text
            assert "<latent>" not in r.answer_text


def test_max_latent_segments_caps_forcing(tiny, image_dir):
    model, tok, _, bb, latent = tiny
    gen = Generator(bb, tok)
    res = gen(_prompts(image_dir), GenerationConfig(max_new_tokens=30, latent_policy="force", k=1,
                                                    max_latent_segments=1))
    assert all(r.latent_segments <= 1 for r in res)


def test_sampling_is_reproducible_with_a_seed(tiny, image_dir):
    model, tok, _, bb, latent = tiny
    gen = Generator(bb, tok)
    cfg = GenerationConfig(max_new_tokens=12, latent_policy="force", k=4, do_sample=True, temperature=1.5,
                           top_k=50, top_p=0.95, seed=7)
    a = gen(_prompts(image_dir), cfg)
    b = gen(_prompts(image_dir), cfg)
    c = gen(_prompts(image_dir), GenerationConfig(**{**cfg.__dict__, "seed": 8}))
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]


def test_stale_rope_deltas_do_not_matter(tiny, image_dir):
    model, tok, _, bb, latent = tiny
    gen = Generator(bb, tok)
    cfg = GenerationConfig(max_new_tokens=8, latent_policy="force", k=4)
    clean = gen(_prompts(image_dir), cfg)
    model.model.rope_deltas = torch.full((3, 1), 997)
    stale = gen(_prompts(image_dir), cfg)
    assert [r.token_ids for r in clean] == [r.token_ids for r in stale]


def test_bad_policy_and_k(tiny, image_dir):
    model, tok, _, bb, latent = tiny
    gen = Generator(bb, tok)
    with pytest.raises(ValueError, match="unknown latent policy"):
        gen(_prompts(image_dir), GenerationConfig(latent_policy="always"))
    with pytest.raises(ValueError, match="k must be >= 1"):
        gen(_prompts(image_dir), GenerationConfig(latent_policy="force", k=0))


def test_prompt_over_the_model_limit_is_an_error(image_dir):
    from valr.backbones import backbone_for
    from valr.tiny import TinyShape, build_tiny

    model, tok, ip = build_tiny(shape=TinyShape(max_positions=24))
    gen = Generator(backbone_for(model, image_processor=ip), tok)
    with pytest.raises(ValueError, match="over the model's limit of 24 positions"):
        gen([Prompt("What is left of the cube?", [Image.open(image_dir / "a.png")])], GenerationConfig())
