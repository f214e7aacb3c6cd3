"""What every diagnostic shares: models under test, records with step targets, batched generation with a latent
hook, *traces* (the exact input sequence a generation fed the decoder, rebuilt for one no-cache forward pass),
teacher features and projectors.

A trace places the prompt (images expanded), then every generated element in order: each token's embedding,
and after each ``<latent>`` the K fed-back vectors exactly as generation fed them (``return_latents``), as
``inputs_embeds``. Positions continue the prompt's last position one by one, as in generation, so the final
hidden state at the position before a latent equals that latent (tested). Generated position ``i`` is the
``i``-th generated element (token or latent vector), at sequence index ``prompt_len + i``; the last element
(usually end-of-sequence) is included although generation never feeds it.

Per generated position a trace records its kind (``latent``; ``marker`` for ``<latent>``/``</latent>``;
``step`` for text of a reasoning line; ``answer`` for text from the answer's first token on), its *line*
(reasoning steps completed before it: a latent segment belongs to the line it precedes) and, when the record
has a step with that index and the answer has not started, the step's target image (index into the sample's
images, or a separate file).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from valr.backbones.base import grid_positions, latent_grid
from valr.generate import GenerationConfig, GenerationResult, Generator, Prompt


class DiagnosticError(ValueError):
    """A diagnostic cannot run (bad option, missing teacher, unusable data); the message says why."""


# ------------------------------------------------------------------------------------------------ subjects


@dataclass
class Subject:
    """One model under diagnosis and how it generates."""

    label: str
    path: Path
    loaded: Any  # valr.checkpoint.Loaded
    generator: Generator
    k: int
    policy: str

    @property
    def backbone(self):
        return self.loaded.backbone

    @property
    def latent(self):
        return self.generator.latent


def load_subject(path: Path, label: str | None = None, *, policy: str = "model", k: int | None = None,
                 device: str = "cpu", dtype: torch.dtype | None = None) -> Subject:
    from valr.checkpoint import load_checkpoint

    path = Path(path)
    loaded = load_checkpoint(path, device=device, dtype=dtype)
    gen = Generator(loaded.backbone, loaded.tokenizer)
    return Subject(label or default_label(path), path, loaded, gen, k if k is not None else loaded.config.k, policy)


def default_label(path: Path) -> str:
    """A readable name for a checkpoint: ``runs/demo/valr_s/run/final`` -> ``valr_s``."""
    parts = [p for p in Path(path).resolve().parts if p not in ("final", "run", "checkpoints")]
    return parts[-1] if parts else str(path)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DiagnosticError("--device cuda but no GPU is visible")
    return name


# ------------------------------------------------------------------------------------------------- samples


@dataclass
class Sample:
    """An evaluation item (question, options, answer) with its record's step targets and loaded images."""

    item: Any  # valr.eval.benchmarks.EvalItem
    targets: list[tuple[int | None, Path | None]]  # per step: (image index, file) of its target, or (None, None)
    images: list[Image.Image] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.item.id


def load_samples(data: Path, limit: int | None = None) -> list[Sample]:
    """The records benchmark (``valr.eval.benchmarks.load_records_benchmark``) with each record's step targets."""
    from valr.data.records import load_records
    from valr.eval.benchmarks import load_records_benchmark

    items = load_records_benchmark(data)
    records = {r.id: r for r in load_records(data, require_steps=False)}
    out = []
    for it in items[:limit] if limit is not None else items:
        rec = records[it.id]
        targets = []
        for step in rec.steps:
            if step.target is None:
                targets.append((None, None))
            elif step.target.image_index is not None:
                targets.append((step.target.image_index, rec.images[step.target.image_index]))
            else:
                targets.append((None, step.target.file))
        out.append(Sample(it, targets, it.load_images()))
    if not out:
        raise DiagnosticError(f"{data}: no records")
    return out


# ---------------------------------------------------------------------------------------------- generation

Hook = Callable[[int, int, int, torch.Tensor], torch.Tensor]  # (global sample index, segment, slot, vector)


def generation_config(subject: Subject, max_new_tokens: int, **overrides: Any) -> GenerationConfig:
    cfg = subject.loaded.config
    return GenerationConfig(max_new_tokens=max_new_tokens, latent_policy=subject.policy,
                            k=subject.k if subject.policy != "off" else 1, step_delimiter=cfg.step_delimiter,
                            answer_prefix=cfg.answer_prefix, return_latents=True, **overrides)


def generate(subject: Subject, samples: Sequence[Sample], cfg: GenerationConfig, batch_size: int = 8,
             hook: Hook | None = None, images: Sequence[list[Image.Image]] | None = None,
             ) -> list[GenerationResult]:
    """Greedy generation in batches; ``hook`` sees sample indices into ``samples`` (not batch positions).
    ``images`` replaces each sample's images (same order), e.g. to run a question on another scene."""
    import dataclasses

    out: list[GenerationResult] = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        prompts = [Prompt(s.item.question, list(images[start + j]) if images is not None else s.images)
                   for j, s in enumerate(batch)]
        bcfg = cfg
        if hook is not None:
            bcfg = dataclasses.replace(cfg, latent_hook=lambda b, g, q, v, o=start: hook(o + b, g, q, v))
        out.extend(subject.generator(prompts, bcfg))
    return out


def predictions(samples: Sequence[Sample], results: Sequence[GenerationResult]) -> dict[str, str]:
    from valr.eval.extract import extract_answer

    return {s.id: extract_answer(r.answer_text, s.item.kind, s.item.options, question=s.item.question)
            for s, r in zip(samples, results, strict=True)}


def item_accuracy(samples: Sequence[Sample], preds: dict[str, str]) -> list[float]:
    """Per-sample score (exact option letter for multiple choice, MRA for numbers), as ``valr eval`` scores."""
    from valr.eval.scoring import item_scores

    return [s.score for s in item_scores("records", [x.item for x in samples], preds)]


# -------------------------------------------------------------------------------------------------- traces


@dataclass
class Trace:
    embeds: torch.Tensor  # (L, D) decoder inputs
    positions: torch.Tensor  # (3, L)
    prompt_len: int
    image_of_column: torch.Tensor  # (L,) long: which input image each column's visual token belongs to, -1 if none
    kinds: list[str]  # per generated position: latent | marker | step | answer
    lines: list[int]  # per generated position: steps completed before it
    segments: list[int]  # per generated position: latent segment index (-1 if not a latent)
    slots: list[int]  # per generated position: slot within the segment (-1 if not a latent)
    targets: list[tuple[int | None, Path | None]]  # per generated position: the step's target, or (None, None)

    @property
    def n_generated(self) -> int:
        return len(self.kinds)


def line_states(tokens: Sequence[int], step_end: torch.Tensor, latent, answer_first: int
                ) -> list[tuple[int, bool]]:
    """Per token: (steps completed before it, answering from this token on), as ``valr.generate`` counts them."""
    out = []
    line_start, steps, answering = True, 0, False
    for t in tokens:
        if t in (latent.start, latent.end):
            out.append((steps, answering))
            continue
        if line_start and not answering and t == answer_first:
            answering = True
        out.append((steps, answering))
        line_start = bool(step_end[t]) if t < step_end.numel() else False
        if line_start and not answering:
            steps += 1
    return out


def build_trace(subject: Subject, sample: Sample, result: GenerationResult) -> Trace:
    """The exact decoder inputs of one generation (needs ``return_latents=True``)."""
    if result.latent_segments and result.latents is None:
        raise DiagnosticError("the generation was run without return_latents; traces need the fed latents")
    bb, gen, lat = subject.backbone, subject.generator, subject.latent
    cfg = subject.loaded.config
    images = bb.image_inputs(sample.images) if sample.images else None
    ids = torch.tensor([result.prompt_token_ids], device=bb.model.device)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        prompt = bb.embed(ids, images)[0]
        pos = bb.position_ids(ids, mask, images)[:, 0]
    col_image = torch.full((ids.shape[1],), -1, dtype=torch.long)
    is_image = (ids[0] == bb.image_token_id).cpu()
    if images is not None:
        owner = torch.repeat_interleave(torch.arange(len(images.n_tokens)), torch.tensor(images.n_tokens))
        col_image[is_image] = owner
    states = line_states(result.token_ids, gen.step_end(cfg.step_delimiter), lat,
                         gen.answer_tokens(cfg.answer_prefix)[0])
    emb = bb.model.get_input_embeddings()
    rows, kinds, lines, segs, slots, targets = [], [], [], [], [], []
    latents = list(result.latents or [])
    seg = -1

    def target(line: int, answering: bool):
        return sample.targets[line] if not answering and line < len(sample.targets) else (None, None)

    with torch.no_grad():
        for t, (line, answering) in zip(result.token_ids, states, strict=True):
            rows.append(emb(torch.tensor(t, device=prompt.device)))
            is_marker = t in (lat.start, lat.end)
            kinds.append("marker" if is_marker else "answer" if answering else "step")
            lines.append(line)
            segs.append(-1)
            slots.append(-1)
            targets.append(target(line, answering))
            if t == lat.start:
                seg += 1
                if seg < len(latents):
                    for q, v in enumerate(latents[seg]):
                        rows.append(v.to(prompt.device, prompt.dtype))
                        kinds.append("latent")
                        lines.append(line)
                        segs.append(seg)
                        slots.append(q)
                        targets.append(target(line, answering))
    n = len(rows)
    gen_pos = pos[:, -1:] + torch.arange(1, n + 1, device=pos.device)
    side = latent_grid(bb)
    if side and n:  # latent slots on the grid, as generation placed them
        col = torch.tensor([q >= 0 for q in slots], device=pos.device)
        slot = torch.tensor(slots, device=pos.device).clamp(min=0)
        gen_pos = torch.where(col, grid_positions(gen_pos[0], slot, side), gen_pos)
    embeds = torch.cat([prompt, torch.stack(rows)]) if rows else prompt
    col_image = torch.cat([col_image, torch.full((n,), -1, dtype=torch.long)])
    return Trace(embeds, torch.cat([pos, gen_pos], 1), ids.shape[1], col_image, kinds, lines, segs, slots, targets)


@contextmanager
def eager_attention(model) -> Iterator[None]:
    """Switch the model to eager attention (the only implementation that returns attention weights)."""
    before = model.config._attn_implementation
    if before != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before != "eager":
            model.set_attn_implementation(before)


@dataclass
class TraceForward:
    final: torch.Tensor  # (L, D) final-layer (post-norm) hidden states
    layer: torch.Tensor | None  # (L, D) output of the alignment layer
    attentions: torch.Tensor | None  # (layers, heads, L, L)


@torch.no_grad()
def forward_trace(subject: Subject, trace: Trace, layer: int | None = None, attentions: bool = False
                  ) -> TraceForward:
    """One no-cache forward pass over the whole trace (eager attention when ``attentions``)."""
    from valr.backbones.base import additive_mask, bottleneck_mask, image_bottleneck

    bb = subject.backbone
    embeds = trace.embeds[None]
    mask = torch.ones(1, embeds.shape[1], dtype=torch.long, device=embeds.device)
    if image_bottleneck(bb):  # as in generation: only image tokens and latents see the image tokens
        image = (trace.image_of_column >= 0).to(embeds.device)
        slot = torch.zeros_like(image)
        slot[trace.prompt_len:] = torch.tensor([k == "latent" for k in trace.kinds], dtype=torch.bool)
        mask = additive_mask(bottleneck_mask(mask, image[None], slot[None]), embeds.dtype)
    kwargs = dict(inputs_embeds=embeds, attention_mask=mask, position_ids=trace.positions[:, None],
                  output_hidden_states=layer is not None, use_cache=False)
    if attentions:
        with eager_attention(bb.model):
            out = bb.lm(**kwargs, output_attentions=True)
        att = torch.stack([a[0].float() for a in out.attentions])
    else:
        out = bb.lm(**kwargs)
        att = None
    return TraceForward(out.last_hidden_state[0], out.hidden_states[layer][0] if layer is not None else None, att)


def attention_mass(attn: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Attention mass of each query on a set of keys: ``attn`` (layers, heads, L, L) of softmax rows,
    ``queries`` (Q,) indices, ``keys`` (L,) bool. Returns (layers, Q): the sum over the chosen key columns,
    averaged over heads."""
    rows = attn[:, :, queries]  # (layers, heads, Q, L)
    return (rows * keys.to(rows.dtype)).sum(-1).mean(1)


# ------------------------------------------------------------------------------------- teachers, projectors


@dataclass
class Probe:
    """A teacher and the projector that maps alignment-layer states into its feature space."""

    name: str
    teacher: Any
    aligner: Any  # valr.align.Aligner reading the grid and targets its checkpoint was trained on
    layer: int
    source: str  # which checkpoint's projector
    _cache: dict[str, tuple[torch.Tensor, tuple[int, int]]] = field(default_factory=dict)

    @property
    def projector(self) -> torch.nn.Module:
        return self.aligner.projectors[self.name]

    @property
    def slots(self) -> int:
        """How many of each segment's first latents form the grid (0: all; valr.aligned_latents)."""
        return self.aligner.slots

    def features(self, image: Image.Image, key: str) -> tuple[torch.Tensor, tuple[int, int]]:
        if key not in self._cache:
            self._cache[key] = self.teacher.encode([image])[0]
        return self._cache[key]


def load_aligner(path: Path, hidden_size: int):
    """Only the projectors of a stage-2 checkpoint (None when it has none)."""
    from safetensors.torch import load_file

    from valr.align import Aligner
    from valr.checkpoint import PROJECTORS, VALR_CONFIG

    meta_file, weights = Path(path) / VALR_CONFIG, Path(path) / PROJECTORS
    if not meta_file.is_file() or not weights.is_file():
        return None
    shapes = json.loads(meta_file.read_text()).get("projectors")
    if not shapes:
        return None
    aligner = Aligner(hidden_size, {n: s["out"] for n, s in shapes.items()}, next(iter(shapes.values()))["width"])
    aligner.load_state_dict(load_file(str(weights)))
    return aligner.eval()


def parse_teacher_arg(value: str | None) -> tuple[str | None, str | None]:
    """``NAME`` or ``NAME=PATH`` (PATH an HF encoder directory, or ``self`` for the MLLM's vision tower)."""
    if value is None:
        return None, None
    name, sep, path = value.partition("=")
    return name or None, (path if sep else None)


def build_probe(subject: Subject, teacher_arg: str | None = None, projector_from: Path | None = None
                ) -> tuple[Probe | None, str]:
    """The probe for a subject: its own projector (else ``projector_from``'s) and the matching teacher, from the
    checkpoint's config unless ``teacher_arg`` overrides it. Returns (probe or None, a note saying why not)."""
    from valr.config import ValrConfig
    from valr.teachers import TeacherSpec, build_teacher

    aligner, source, cfg = subject.loaded.aligner, str(subject.path), subject.loaded.config
    if aligner is None and projector_from is not None:
        aligner = load_aligner(projector_from, subject.backbone.hidden_size)
        source = str(projector_from)
        meta = Path(projector_from) / "valr_config.json"
        if meta.is_file():
            cfg = ValrConfig.from_dict(json.loads(meta.read_text()).get("valr", {}), str(meta))
    if aligner is None:
        return None, "no trained projector (not a stage-2 checkpoint with alignment; see --projector-from)"
    aligner = aligner.follow(cfg).to(subject.backbone.model.device).float()
    name, path = parse_teacher_arg(teacher_arg)
    names = list(aligner.projectors)
    name = name or next((t.name for t in cfg.teachers if t.name in names), names[0])
    if name not in aligner.projectors:
        return None, f"no projector for teacher {name!r} (projectors: {names})"
    spec = next((t for t in cfg.teachers if t.name == name), None)
    if path is not None:
        spec = TeacherSpec(name=name, kind="self", image_size=spec.image_size if spec else 224) if path == "self" \
            else TeacherSpec(name=name, kind="hf", path=path, image_size=spec.image_size if spec else 224)
    if spec is None:
        return None, f"teacher {name!r} is not in the checkpoint's config; pass --teacher {name}=PATH"
    try:
        teacher = build_teacher(spec, backbone=subject.backbone)
    except (ValueError, OSError) as e:
        return None, f"cannot build teacher {name!r}: {e}"
    return Probe(name, teacher, aligner, cfg.align_layer, source), ""


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)


# ------------------------------------------------------------------------------------------------- outputs


def mean(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
