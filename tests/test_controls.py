"""Generation controls: reasoning budget (min/max steps, forced answers), latent K and policy, latent hooks.

Every control is checked against a naive reference written from the documented semantics (full recomputation,
one sample, state re-derived from the token list at every position), and for the exact step counts it promises.
The tiny random model is rigged so that it writes lines and tries to answer at line starts.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from valr.generate import GenerationConfig, Generator, Prompt, answer_prefix_tokens

NEG = float("-inf")


def _prompts(image_dir):
    im = {n: Image.open(image_dir / f"{n}.png") for n in "abcd"}
    return [Prompt("What is left of the cube?", [im["a"]]),
            Prompt("Count the objects in both views, please.", [im["b"], im["c"]]),
            Prompt("Hi", [])]


@pytest.fixture
def rigged(tiny, image_dir):
    """The random tiny model loops over a short cycle of tokens. Rig its LM head so that "\\n" wins where the
    cycle's last token would and the answer's first token where the cycle's first token would: it then writes
    short lines and tries to answer at line starts."""
    from collections import Counter

    model, tok, _, bb, latent = tiny
    gen = Generator(bb, tok)
    first = gen(_prompts(image_dir)[:1], GenerationConfig(max_new_tokens=24, latent_policy="off"))[0].token_ids
    head = Counter(first).most_common(1)[0][0]  # a token of the cycle
    again = first.index(head, first.index(head) + 1)
    last = first[again - 1]  # the token before the cycle starts again
    newline = tok("\n", add_special_tokens=False)["input_ids"][-1]
    answer = gen.answer_tokens("Answer: ")
    with torch.no_grad():
        w = model.lm_head.weight
        w[newline] = w[last] * 1.5
        w[answer[0]] = w[head] * 1.2
    model.rig_head = head
    return model, tok, bb, latent, Generator(bb, tok)


def _line_state(tokens, step_end, latent, answer_first):
    """(line start, completed steps, answering) after ``tokens``, re-derived from scratch."""
    line_start, steps, answering = True, 0, False
    for t in tokens:
        if t in (latent.start, latent.end):
            continue
        if line_start and not answering and t == answer_first:
            answering = True
        line_start = bool(step_end[t])
        if line_start and not answering:
            steps += 1
    return line_start, steps, answering


def naive_generate_controls(bb, latent, prompt_ids, images, cfg: GenerationConfig, step_end, eos, answer_ids):
    """Greedy generation with the reasoning budget and latent hook, by full recomputation (batch 1, no cache)."""
    ids = torch.tensor([prompt_ids])
    rows = list(bb.embed(ids, images)[0])
    pos = bb.position_ids(ids, torch.ones_like(ids), images)[:, 0]
    next_pos = int(pos[0, -1]) + 1
    emb = bb.model.get_input_embeddings()
    tokens, fed, queue = [], [], []
    left, close, segment = 0, False, -1
    banned = [latent.end, latent.slot] + ([latent.start] if cfg.latent_policy == "off" else [])
    while True:
        out = bb.decode(torch.stack(rows)[None], pos[:, None], torch.ones(1, len(rows), dtype=torch.long), None)
        h = out.last_hidden[0, -1]
        if left > 0:
            v = cfg.latent_hook(0, segment, cfg.k - left, h) if cfg.latent_hook else h
            rows.append(v)
            fed.append(v)
            left -= 1
            close = left == 0
        else:
            line_start, steps, answering = _line_state(tokens, step_end, latent, answer_ids[0])
            if close:
                t, close = latent.end, False
            elif queue:
                t = queue.pop(0)
            elif cfg.max_steps is not None and line_start and not answering and steps >= cfg.max_steps:
                t, queue = answer_ids[0], list(answer_ids[1:])
            else:
                logits = bb.logits(h).float()
                logits[banned] = NEG
                if not answering and steps < cfg.min_steps:
                    logits[eos] = NEG
                    if line_start:
                        logits[answer_ids[0]] = NEG
                t = int(logits.argmax())
                after_step = not tokens or bool(step_end[tokens[-1]])
                if cfg.latent_policy == "force" and after_step:
                    t = latent.start
            tokens.append(t)
            if t == latent.start:
                left, segment = cfg.k, segment + 1
            if t in eos or len(tokens) >= cfg.max_new_tokens:
                return tokens, fed, _line_state(tokens, step_end, latent, answer_ids[0])
            rows.append(emb(torch.tensor(t)))
        pos = torch.cat([pos, torch.full((3, 1), next_pos)], 1)
        next_pos += 1


def _check(bb, latent, gen, prompts, cfg):
    results = gen(prompts, cfg)
    step_end = gen.step_end(cfg.step_delimiter)
    answer = gen.answer_tokens(cfg.answer_prefix)
    for b, (p, r) in enumerate(zip(prompts, results, strict=True)):
        images = bb.image_inputs(p.images) if p.images else None
        single = cfg if cfg.latent_hook is None else GenerationConfig(**{
            **cfg.__dict__, "latent_hook": lambda _s, g, q, v, b=b, hook=cfg.latent_hook: hook(b, g, q, v)})
        ref_tokens, ref_fed, (_, ref_steps, ref_answering) = naive_generate_controls(
            bb, latent, r.prompt_token_ids, images, single, step_end, gen.eos, answer)
        assert r.token_ids == ref_tokens
        got = torch.cat(r.latents) if r.latents else torch.zeros(0, bb.hidden_size)
        ref = torch.stack(ref_fed) if ref_fed else torch.zeros(0, bb.hidden_size)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
        assert (r.steps, r.answered) == (ref_steps, ref_answering)
    return results


CONFIGS = {
    "force-plain": dict(latent_policy="force", k=2),  # no budget: only the bookkeeping (steps, answered)
    "off-min3": dict(latent_policy="off", min_steps=3),
    "off-max1": dict(latent_policy="off", max_steps=1),
    "force-max2": dict(latent_policy="force", k=2, max_steps=2),
    "force-min2-max3": dict(latent_policy="force", k=3, min_steps=2, max_steps=3),
    "model-min2-max2": dict(latent_policy="model", k=2, min_steps=2, max_steps=2),
    "force-max0": dict(latent_policy="force", k=2, max_steps=0),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_controls_match_naive_reference(rigged, image_dir, name):
    model, tok, bb, latent, gen = rigged
    if name.startswith("model"):  # <latent> wins at some line starts: the model enters latent mode by itself
        with torch.no_grad():
            model.lm_head.weight[latent.start] = model.lm_head.weight[model.rig_head] * 1.25
    cfg = GenerationConfig(max_new_tokens=22, return_latents=True, **CONFIGS[name])
    results = _check(bb, latent, gen, _prompts(image_dir), cfg)
    answer = gen.answer_tokens("Answer: ")
    for r in results:
        if cfg.max_steps is not None:
            assert r.steps <= cfg.max_steps
        if r.answered:
            assert r.steps >= cfg.min_steps
        if r.forced_answer:
            assert r.steps == cfg.max_steps
            # the forced tokens sit right after the last step, with no latent segment forced before them
            start = _answer_index(r.token_ids, gen.step_end("\n"), latent, answer[0])
            assert r.token_ids[start:start + len(answer)] == answer[:len(r.token_ids) - start]
            assert start == 0 or r.token_ids[start - 1] != latent.end
    if cfg.max_steps is not None:  # the budget is large enough: every sample answers, by itself or forced
        assert all(r.answered for r in results) and any(r.forced_answer for r in results)
    if cfg.max_steps is not None and name != "off-max1":  # there the first sample answers by itself at once
        assert all(r.forced_answer for r in results)
    if name.startswith("model"):
        assert sum(r.latent_segments for r in results) > 0
    if name == "force-max0":
        assert all(r.token_ids[:len(answer)] == answer and r.steps == 0 for r in results)


def _answer_index(tokens, step_end, latent, answer_first):
    line_start = True
    for i, t in enumerate(tokens):
        if t in (latent.start, latent.end):
            continue
        if line_start and t == answer_first:
            return i
        line_start = bool(step_end[t])
    raise AssertionError("no answer found")


def test_min_steps_suppresses_early_answers(rigged, image_dir):
    model, tok, bb, latent, gen = rigged
    prompts = _prompts(image_dir)
    free = gen(prompts, GenerationConfig(max_new_tokens=20, latent_policy="off"))
    assert any(r.answered and r.steps < 3 for r in free)  # the rig makes the model answer early by itself
    held = gen(prompts, GenerationConfig(max_new_tokens=20, latent_policy="off", min_steps=3))
    for f, h in zip(free, held, strict=True):
        assert h.steps >= 3 or not h.answered
        if f.answered and f.steps < 3:
            assert h.suppressed_answers >= 1
        if h.answered:
            assert h.steps >= 3 and not h.forced_answer
        assert h.finished is False or h.steps >= 3  # end of sequence is suppressed too


def test_exact_budget_gives_exact_step_counts(rigged, image_dir):
    model, tok, bb, latent, gen = rigged
    for s in (1, 2, 4):
        for policy, k in (("off", 4), ("force", 2)):
            res = gen(_prompts(image_dir), GenerationConfig(max_new_tokens=40, latent_policy=policy, k=k,
                                                            min_steps=s, max_steps=s))
            for r in res:
                assert r.steps == s and r.answered
                if policy == "force":  # one segment per step: the forced answer line has none
                    assert r.token_ids.count(latent.start) >= s
                    answer_at = _answer_index(r.token_ids, gen.step_end("\n"), latent, gen.answer_tokens("Answer: ")[0])
                    assert r.token_ids[:answer_at].count(latent.start) == s


def test_latent_k_and_positions_reported(rigged, image_dir):
    model, tok, bb, latent, gen = rigged
    for k in (1, 3):
        res = gen(_prompts(image_dir), GenerationConfig(max_new_tokens=16, latent_policy="force", k=k,
                                                        max_steps=2, return_latents=True))
        for r in res:
            assert all(seg.shape == (k, bb.hidden_size) for seg in r.latents)
            assert r.generated_positions == len(r.token_ids) + sum(seg.shape[0] for seg in r.latents)
            assert r.steps == 2 and r.forced_answer


def test_identity_hook_changes_nothing_and_sees_every_site(rigged, image_dir):
    model, tok, bb, latent, gen = rigged
    prompts = _prompts(image_dir)
    base = GenerationConfig(max_new_tokens=16, latent_policy="force", k=3, return_latents=True)
    plain = gen(prompts, base)
    calls = []

    def identity(sample, segment, position, vector):
        calls.append((sample, segment, position))
        return vector

    hooked = gen(prompts, GenerationConfig(**{**base.__dict__, "latent_hook": identity}))
    for b, (p, h) in enumerate(zip(plain, hooked, strict=True)):
        assert p.token_ids == h.token_ids
        torch.testing.assert_close(torch.cat(p.latents), torch.cat(h.latents), atol=0, rtol=0)
        sites = [(g, q) for s, g, q in calls if s == b]
        assert sites == [(g, q) for g in range(p.latent_segments) for q in range(3)][:len(sites)]
        assert len(sites) == sum(seg.shape[0] for seg in p.latents)


def test_zero_hook_matches_naive_and_feeds_zeros(rigged, image_dir):
    model, tok, bb, latent, gen = rigged
    cfg = GenerationConfig(max_new_tokens=14, latent_policy="force", k=2, return_latents=True,
                           latent_hook=lambda s, g, q, v: torch.zeros_like(v) if s != 1 else v * 2)
    res = _check(bb, latent, gen, _prompts(image_dir), cfg)
    assert all(float(seg.abs().sum()) == 0 for seg in res[0].latents)


def test_bad_budget_is_an_error(rigged, image_dir):
    model, tok, bb, latent, gen = rigged
    with pytest.raises(ValueError, match="below min_steps"):
        gen(_prompts(image_dir), GenerationConfig(min_steps=3, max_steps=2))
    with pytest.raises(ValueError, match=">= 0"):
        gen(_prompts(image_dir), GenerationConfig(min_steps=-1))


def test_answer_prefix_tokens_leave_the_merged_space_to_the_model(tiny):
    _, tok, _, _, _ = tiny
    ids = answer_prefix_tokens(tok, "Answer: ")
    assert ids == tok("Answer:", add_special_tokens=False)["input_ids"]
    assert tok("Answer: B", add_special_tokens=False)["input_ids"][:len(ids)] == ids
    with pytest.raises(ValueError):
        answer_prefix_tokens(tok, "")
