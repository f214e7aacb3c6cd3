"""Batched, KV-cached generation with per-sample latent mode.

Every sample advances one position per decoder call. A sample in text mode feeds the embedding of its next token;
a sample in latent mode feeds back its own last final-layer hidden state for K positions (as it is, or rescaled
to the embeddings' scale under ``latent_feed: embedding_rms``, or the slot token's embedding under ``pause``; see
``valr.backbones.base.latent_feeder``), after which
``</latent>`` is appended and text resumes. When a sample enters latent mode depends on the policy:

* ``model`` — when the model itself emits ``<latent>`` (what a stage-2 model learned to do before each step).
* ``force`` — also forced at the start of the answer and after every step delimiter (a token whose text ends
  with the delimiter, "\\n" by default); the model may still enter latent mode elsewhere on its own. Every line,
  the final answer line included, is then preceded by a latent segment.
* ``off`` — never: ``<latent>`` and ``</latent>`` are suppressed, so this is ordinary decoding and its greedy
  tokens equal ``model.generate(..., suppress_tokens=[<latent>, </latent>, slot])``.

``</latent>`` is never sampled (the engine appends it), and the slot placeholder never appears as a token.
``max_new_tokens`` counts generated tokens, the two markers included; latent positions are not tokens, but
every result reports ``generated_positions`` (tokens plus latent positions) as the compute actually spent.

Reasoning budget (``min_steps`` / ``max_steps``; both off by default, and then nothing below changes a token):

* A *step* is a line: it is completed by a generated text token whose text ends with the step delimiter (the
  ``step_end`` table; "\\n" by default; a token such as "\\n\\n" completes one step). ``steps`` counts the steps
  completed before the answer starts; lines after the answer are not counted.
* A *line start* is the start of the output and the position after a step-completing token. It lasts through
  a latent segment: after ``<latent>`` [K positions] ``</latent>`` at a line start the next token is still at
  the line start (this is where a stage-2 model chooses between the next step and the answer).
* The *answer prefix* is ``answer_prefix`` ("Answer: ", as in the training layout). Its *forced tokens* are the
  tokens every ``answer_prefix + x`` line begins with (the longest common prefix of the tokenizations of the
  prefix followed by a few probe answers), so whitespace that byte-level BPE merges into the answer token
  (" B") is left to the model. Its *first token* is the first of those.
* The model *tries to answer* when, at a line start, the token it chooses is the first token of the answer
  prefix. From then on the sample is *answering* (no more steps are counted, no control applies). This is a
  one-token test: a step that happens to begin with the same token counts as an answer (the built-in world's
  steps begin with "view"; check your data's steps with the tokenizer if in doubt).
* ``min_steps``: while fewer steps are completed (and the sample is not answering), the answer's first token is
  suppressed at line starts and end-of-sequence is suppressed everywhere, so the model continues with a new
  step. ``suppressed_answers`` counts the line-start decisions where the answer's first token was the top choice
  before suppression.
* ``max_steps``: at the first line-start decision after ``max_steps`` steps are completed, the forced tokens of
  the answer prefix are appended one per position (``forced_answer`` is set) and the model writes the answer
  after them. Under policy ``force`` no latent segment is forced before a forced answer (and under ``model`` a
  ``<latent>`` the model would choose there is overridden): the budget ends the reasoning, latent or not.
  ``max_steps=0`` answers at once.
* ``max_new_tokens`` still caps everything, forced tokens included: a budget too small for the steps asked for
  ends the output early (``finished`` is false).

Latent interventions: ``latent_hook(sample, segment, position, vector) -> vector`` transforms every fed-back
latent vector before it is fed (``sample`` is the index in the call's prompt list, ``segment`` counts the
sample's latent segments from 0, ``position`` the slot within the segment from 0, ``vector`` the (D,) final
hidden state, rescaled first when the backbone's ``latent_feed`` asks for it). The next position's hidden
state is computed from what was fed, so an intervention propagates through the rest of the segment.
``latents`` in the result (``return_latents``) are the vectors actually fed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from PIL import Image
from transformers import LogitsProcessorList, PreTrainedTokenizerBase
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from valr.backbones.base import (
    Backbone,
    ImageInputs,
    block_image_keys,
    bottleneck_mask,
    grid_positions,
    image_bottleneck,
    latent_feeder,
    latent_grid,
)
from valr.data.layout import prompt_ids
from valr.tokens import LatentTokenIds, step_end_table

Policy = Literal["model", "force", "off"]


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    min_new_tokens: int = 0  # end-of-sequence is suppressed until this many tokens exist
    latent_policy: Policy = "model"
    k: int = 16  # latent positions per segment at test time (may differ from training)
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    step_delimiter: str = "\n"
    max_latent_segments: int | None = None  # per sample; None = no cap beyond max_new_tokens
    return_latents: bool = False
    system_prompt: str | None = None
    min_steps: int = 0  # reasoning budget: an earlier answer (or end) is suppressed; see the module docstring
    max_steps: int | None = None  # the answer is forced after this many steps; None = no maximum
    answer_prefix: str = "Answer: "  # how the answer line starts (the layout's answer_prefix)
    latent_hook: LatentHook | None = None  # transforms each fed-back latent vector (interventions)


LatentHook = Callable[[int, int, int, torch.Tensor], torch.Tensor]


@dataclass
class Prompt:
    question: str
    images: list[Image.Image] = field(default_factory=list)


@dataclass
class GenerationResult:
    text: str  # decoded output, latent segments shown as <latent>[K latent positions]</latent>
    answer_text: str  # decoded output with the latent segments removed
    token_ids: list[int]  # generated tokens (markers included, EOS included when reached)
    prompt_token_ids: list[int]  # what the model was fed, image placeholders expanded
    latent_segments: int
    generated_positions: int  # tokens + latent positions
    latents: list[torch.Tensor] | None = None  # per segment, the (K, D) fed-back vectors
    finished: bool = False  # reached EOS (False: hit max_new_tokens)
    steps: int = 0  # reasoning steps (lines) completed before the answer started
    answered: bool = False  # the answer line started (the model's own choice or forced)
    forced_answer: bool = False  # max_steps forced the answer prefix
    suppressed_answers: int = 0  # line starts where min_steps suppressed the top-choice answer token


class Generator:
    """Holds what generation needs besides the prompts, so repeated calls reuse the step-end table."""

    def __init__(self, backbone: Backbone, tokenizer: PreTrainedTokenizerBase):
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.latent = LatentTokenIds.from_tokenizer(tokenizer)
        self._step_end: dict[str, torch.Tensor] = {}
        gen_eos = backbone.model.generation_config.eos_token_id
        eos = set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos = sorted(eos)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        self._answer: dict[str, list[int]] = {}

    def step_end(self, delimiter: str) -> torch.Tensor:
        if delimiter not in self._step_end:
            self._step_end[delimiter] = step_end_table(self.tokenizer, delimiter)
        return self._step_end[delimiter]

    def answer_tokens(self, prefix: str) -> list[int]:
        """The forced tokens of an answer prefix: those every ``prefix + answer`` line starts with."""
        if prefix not in self._answer:
            self._answer[prefix] = answer_prefix_tokens(self.tokenizer, prefix)
        return self._answer[prefix]

    def encode_prompts(self, prompts: list[Prompt], system_prompt: str | None = None):
        """Left-padded prompt ids, mask, all images of the batch, and each sample's unpadded ids."""
        per_ids, per_images = [], []
        for p in prompts:
            images = self.backbone.image_inputs(p.images)
            ids = prompt_ids(self.tokenizer, p.question, images.n_tokens, self.backbone.image_placeholder,
                             system_prompt)
            limit = self.backbone.model.config.get_text_config().max_position_embeddings
            if len(ids) >= limit:
                raise ValueError(f"prompt {len(per_ids)} has {len(ids)} tokens (images expanded), at or over the "
                                 f"model's limit of {limit} positions; shorten the question, use fewer or smaller "
                                 "images (the image processor's max_pixels)")
            per_ids.append(ids)
            per_images.append(images)
        return self.pad_left(per_ids) + (ImageInputs.concat(per_images), per_ids)

    def pad_left(self, per_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(len(x) for x in per_ids)
        ids = torch.full((len(per_ids), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, x in enumerate(per_ids):
            ids[b, n - len(x):] = torch.tensor(x)
            mask[b, n - len(x):] = 1
        return ids, mask

    def _processors(self, cfg: GenerationConfig) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if cfg.do_sample:
            if cfg.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(cfg.temperature))
            if cfg.top_k:
                procs.append(TopKLogitsWarper(cfg.top_k))
            if cfg.top_p < 1.0:
                procs.append(TopPLogitsWarper(cfg.top_p))
        return procs

    @torch.no_grad()
    def __call__(self, prompts: list[Prompt], cfg: GenerationConfig) -> list[GenerationResult]:
        if cfg.latent_policy not in ("model", "force", "off"):
            raise ValueError(f"unknown latent policy {cfg.latent_policy!r}; use model, force or off")
        if cfg.k < 1 and cfg.latent_policy != "off":
            raise ValueError(f"k must be >= 1 for latent policy {cfg.latent_policy!r} (use policy 'off' for none)")
        if cfg.min_steps < 0 or (cfg.max_steps is not None and cfg.max_steps < 0):
            raise ValueError(f"min_steps and max_steps must be >= 0, got {cfg.min_steps} and {cfg.max_steps}")
        if cfg.max_steps is not None and cfg.max_steps < cfg.min_steps:
            raise ValueError(f"max_steps ({cfg.max_steps}) is below min_steps ({cfg.min_steps})")
        ids, mask, images, per_ids = self.encode_prompts(prompts, cfg.system_prompt)
        return self.run(ids, mask, images, per_ids, cfg)

    def run(self, ids: torch.Tensor, mask: torch.Tensor, images: ImageInputs | None, per_ids: list[list[int]],
            cfg: GenerationConfig) -> list[GenerationResult]:
        bb = self.backbone
        device = bb.model.device
        ids, mask = ids.to(device), mask.to(device)
        batch = ids.shape[0]
        lat = self.latent
        positions = bb.position_ids(ids, mask, images)
        bottleneck = image_bottleneck(bb)  # only latent slots (and image tokens) see the image tokens
        side = latent_grid(bb)
        key_images = ids == bb.image_token_id if bottleneck else None
        prefill_mask = bottleneck_mask(mask, key_images) if bottleneck else mask
        out = bb.decode(bb.embed(ids, images), positions, prefill_mask, bb.new_cache(append_only=True))
        cache, hidden = out.cache, out.last_hidden[:, -1]
        next_pos = positions[0, :, -1] + 1  # the last prompt token is text: same position on all axes
        embed = bb.model.get_input_embeddings()
        feed = latent_feeder(bb, embed.weight[lat.slot].detach())
        step_end = self.step_end(cfg.step_delimiter).to(device)
        procs = self._processors(cfg)
        gen = torch.Generator(device=device)
        if cfg.seed is not None:
            gen.manual_seed(cfg.seed)
        banned = [lat.end, lat.slot] + ([lat.start] if cfg.latent_policy == "off" else [])

        tokens: list[list[int]] = [[] for _ in range(batch)]
        latents: list[list[list[torch.Tensor]]] = [[] for _ in range(batch)]
        n_latent = [0] * batch
        latent_left = [0] * batch
        close_next = [False] * batch
        at_boundary = [cfg.latent_policy == "force"] * batch
        done = [False] * batch
        finished = [False] * batch
        # reasoning-budget state (see the module docstring); only bookkeeping unless min/max_steps are set
        answer_ids = self.answer_tokens(cfg.answer_prefix)
        answer_first = answer_ids[0]
        line_start = [True] * batch
        steps = [0] * batch
        answering = [False] * batch
        forced_answer = [False] * batch
        forced: list[list[int]] = [[] for _ in range(batch)]
        suppressed = [0] * batch
        hook = cfg.latent_hook
        while not all(done):
            logits = bb.logits(hidden).float()
            logits[:, banned] = float("-inf")
            if cfg.min_new_tokens:
                early = torch.tensor([len(t) < cfg.min_new_tokens for t in tokens], device=device)
                logits[early.nonzero(as_tuple=True)[0][:, None], torch.tensor(self.eos, device=device)] = float("-inf")
            if cfg.min_steps:
                short = [b for b in range(batch) if not done[b] and not answering[b] and steps[b] < cfg.min_steps]
                if short:
                    top = logits[short].argmax(-1).tolist()
                    for b, t in zip(short, top, strict=True):
                        if line_start[b]:
                            decides = latent_left[b] == 0 and not close_next[b] and not (
                                cfg.latent_policy == "force" and at_boundary[b] and self._segments_left(tokens[b], cfg))
                            suppressed[b] += int(decides and t == answer_first)
                            logits[b, answer_first] = float("-inf")
                    logits[torch.tensor(short, device=device)[:, None],
                           torch.tensor(self.eos, device=device)] = float("-inf")
            history = torch.tensor([t[-1:] or [self.pad_id] for t in tokens], device=device)
            scores = procs(history, logits)
            if cfg.do_sample:
                chosen = torch.multinomial(torch.softmax(scores, -1), 1, generator=gen).squeeze(1)
            else:
                chosen = scores.argmax(-1)
            feed_hidden = torch.zeros(batch, dtype=torch.bool, device=device)
            feed_ids = torch.full((batch,), self.pad_id, dtype=torch.long, device=device)
            active = torch.zeros(batch, dtype=torch.long, device=device)
            fed = feed(hidden)
            fed = fed.clone() if hook is not None and fed is hidden else fed
            for b in range(batch):
                if done[b]:
                    continue
                active[b] = 1
                if latent_left[b] > 0:
                    feed_hidden[b] = True
                    vector = fed[b]
                    if hook is not None:
                        vector = hook(b, len(latents[b]) - 1, cfg.k - latent_left[b], vector)
                        fed[b] = vector.to(fed.device, fed.dtype)
                    latent_left[b] -= 1
                    n_latent[b] += 1
                    if cfg.return_latents:
                        latents[b][-1].append(fed[b].cpu())
                    close_next[b] = latent_left[b] == 0
                    continue
                if close_next[b]:
                    token = lat.end
                    close_next[b] = False
                elif forced[b]:
                    token = forced[b].pop(0)
                    at_boundary[b] = bool(step_end[token]) if token < step_end.numel() else False
                elif cfg.max_steps is not None and line_start[b] and not answering[b] and steps[b] >= cfg.max_steps:
                    token, forced[b] = answer_ids[0], list(answer_ids[1:])
                    forced_answer[b] = True
                    at_boundary[b] = bool(step_end[token]) if token < step_end.numel() else False
                else:
                    token = int(chosen[b])
                    segments_left = self._segments_left(tokens[b], cfg)
                    if cfg.latent_policy == "force" and at_boundary[b] and segments_left:
                        token = lat.start
                    elif token == lat.start and not segments_left:
                        token = int(scores[b].masked_fill(
                            torch.arange(scores.shape[1], device=device) == lat.start, float("-inf")).argmax())
                    at_boundary[b] = bool(step_end[token]) if token < step_end.numel() else False
                if token not in (lat.start, lat.end):
                    if line_start[b] and not answering[b] and token == answer_first:
                        answering[b] = True
                    line_start[b] = bool(step_end[token]) if token < step_end.numel() else False
                    if line_start[b] and not answering[b]:
                        steps[b] += 1
                tokens[b].append(token)
                feed_ids[b] = token
                if token == lat.start:
                    latent_left[b] = cfg.k
                    latents[b].append([])
                if token in self.eos or len(tokens[b]) >= cfg.max_new_tokens:
                    done[b] = True  # nothing more is fed for this sample
                    finished[b] = token in self.eos
                    active[b] = 0
            if all(done):
                break
            inputs = embed(feed_ids)
            inputs = torch.where(feed_hidden[:, None], fed.to(inputs.dtype), inputs)
            mask = torch.cat([mask, active[:, None]], 1)
            step_mask = mask
            if bottleneck:
                key_images = torch.cat([key_images, torch.zeros_like(key_images[:, :1])], 1)
                step_mask = block_image_keys(mask.bool()[:, None, None, :], key_images, feed_hidden[:, None])
            pos = next_pos.view(1, batch, 1).expand(3, batch, 1)
            if side and bool(feed_hidden.any()):  # latent slots on the grid (valr.latent_positions = "grid")
                slot = torch.tensor([cfg.k - left - 1 for left in latent_left], device=device)
                pos = torch.where(feed_hidden.view(1, batch, 1), grid_positions(next_pos, slot, side)[..., None], pos)
            out = bb.decode(inputs[:, None], pos, step_mask, cache)
            cache, hidden = out.cache, out.last_hidden[:, -1]
            next_pos = next_pos + active
        results = [self._result(tokens[b], per_ids[b], n_latent[b], latents[b], cfg, finished[b])
                   for b in range(batch)]
        for b, r in enumerate(results):
            r.steps, r.answered, r.forced_answer, r.suppressed_answers = \
                steps[b], answering[b], forced_answer[b], suppressed[b]
        return results

    def _segments_left(self, tokens: list[int], cfg: GenerationConfig) -> bool:
        return cfg.max_latent_segments is None or \
            sum(1 for t in tokens if t == self.latent.start) < cfg.max_latent_segments

    def _result(self, tokens: list[int], prompt: list[int], n_latent: int, latents: list[list[torch.Tensor]],
                cfg: GenerationConfig, finished: bool) -> GenerationResult:
        lat = self.latent
        shown = [t for t in tokens if t not in self.eos]
        pieces, plain = [], []
        run: list[int] = []
        inside = False
        for t in shown + [None]:
            if t in (lat.start, lat.end, None):
                text = self.tokenizer.decode(run, skip_special_tokens=False) if run else ""
                if inside:
                    pieces.append(f"<latent>[{cfg.k} latent positions]")
                else:
                    pieces.append(text)
                    plain.append(text)
                if t == lat.end:
                    pieces.append("</latent>")
                run, inside = [], t == lat.start
            else:
                run.append(t)
        segments = sum(1 for t in tokens if t == lat.start)
        return GenerationResult(
            text="".join(pieces), answer_text="".join(plain), token_ids=tokens, prompt_token_ids=prompt,
            latent_segments=segments, generated_positions=len(tokens) + n_latent,
            latents=[torch.stack(seg) for seg in latents if seg] if cfg.return_latents else None,
            finished=finished)


ANSWER_PROBES = ("A", "B", "1", "12", "yes", "x")


def answer_prefix_tokens(tokenizer: PreTrainedTokenizerBase, prefix: str) -> list[int]:
    """The tokens every ``prefix + answer`` line starts with: the longest common prefix of the tokenizations of
    ``prefix`` followed by a few probe answers (so "Answer: " gives the tokens of "Answer:" when the space merges
    into the answer token, as in byte-level BPE). Falls back to the prefix's own tokens when that is empty."""
    if not prefix:
        raise ValueError("answer_prefix must not be empty")

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    common = ids(prefix + ANSWER_PROBES[0])
    for probe in ANSWER_PROBES[1:]:
        other = ids(prefix + probe)
        n = 0
        while n < min(len(common), len(other)) and common[n] == other[n]:
            n += 1
        common = common[:n]
    return common or ids(prefix)
