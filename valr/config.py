"""The valr configuration: method hyper-parameters, YAML files and ``key=value`` overrides.

Unknown keys are errors (a typo must not silently fall back to a default). Values given on the command line are
parsed as YAML scalars, so ``k=9``, ``lambda_align=0.25``, ``teachers=[]`` all do what they look like.
Nested fields use dots: ``layout.answer_prefix="Final: "``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from valr.teachers import TeacherSpec


@dataclass
class ValrConfig:
    k: int = 16  # latent positions per segment (a perfect square: they form a sqrt(K) x sqrt(K) grid)
    align_layer: int = 12  # decoder layer whose output is aligned (1-based; paper: 12 of 28)
    lambda_align: float = 0.5  # weight of the REPA loss beside cross-entropy
    # weight of the cross-entropy in stage 2 (the paper: 1). 0 trains on the alignment alone, a warm-up that
    # teaches the latents to carry their view before the text learns to read them (not in the paper)
    ce_weight: float = 1.0
    projector_width: int = 2048  # hidden width of each teacher's MLP projector
    teachers: list[TeacherSpec] = field(default_factory=list)
    train_mode: str = "exact"  # exact: gradients through the latent recurrence; fast: detached latent inputs
    step_delimiter: str = "\n"
    answer_prefix: str = "Answer: "
    feature_cache: str | None = None  # directory of cached teacher features (None: encode online)
    # subtract each target image's mean patch feature before the cosine (not in the paper; off by default): with
    # teachers whose patches share a large common component, a projector that predicts that component reaches
    # the raw loss's plateau without any image-specific content (see valr.align.mean_feature_loss)
    center_targets: bool = False
    # a regex: place each step's latent segment after what it matches at the step's start (the step's head, e.g.
    # which image it looks at) instead of before the step (the paper). None: the paper's layout. See
    # valr.data.layout; generation under latent policy "model" follows it (the model emits <latent> itself)
    latent_after: str | None = None
    # what each latent slot is fed: "hidden" (the final post-norm hidden state as it is: the paper),
    # "embedding_rms" (that vector rescaled to the input embeddings' RMS; not in the paper) or "pause" (nothing fed
    # back: every slot keeps the slot token's learned embedding, K pause tokens; a control). Saved with every
    # checkpoint, so generation and evaluation of the model feed latents the way it was trained
    latent_feed: str = "hidden"
    # how many of each segment's K latents, the first ones, form the aligned grid (a perfect square at most K;
    # not in the paper, where all K are aligned: 0). The rest are fed back like the others but never pulled toward
    # the teacher, so they are free to carry what the text needs (e.g. K=20 with 16 aligned: a 4 x 4 grid and 4
    # free latents). Saved with every checkpoint, so probes and diagnostics read the same grid
    aligned_latents: int = 0
    # a diagnostic layout, not the paper's method: only latent slots (and image tokens) attend to the image tokens,
    # so the text, question included, sees the images through the latents alone (valr.backbones.base). Saved with
    # every checkpoint, so generation and evaluation of the model use the same layout
    image_bottleneck: bool = False
    # where latent slots sit on the rotary axes: "text" (1-D positions like any text token: the paper) or "grid"
    # (slot j of each segment at row j // side, column j % side of the aligned grid, as an image's patches sit;
    # not in the paper; valr.backbones.base). Saved with every checkpoint, so generation and evaluation use them
    latent_positions: str = "text"

    def loss_weights_error(self, stage: int = 2) -> str | None:
        """Why the loss weights cannot train (None: they can). Stage 1 trains on the CE whatever they are."""
        if self.ce_weight < 0 or (stage == 2 and self.ce_weight == 0 and self.lambda_align <= 0):
            return (f"valr.ce_weight={self.ce_weight}: use a weight >= 0, and 0 only with lambda_align > 0 "
                    "(an alignment-only warm-up); with both 0 stage 2 has nothing to train")
        return None

    def stage2_loss(self, ce, align):
        """The stage-2 objective from its parts (one formula for every training loop)."""
        return self.ce_weight * ce + self.lambda_align * align

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ValrConfig:
        return build_dataclass(cls, data, source)


class ConfigError(ValueError):
    pass


def build_dataclass(cls, data: dict[str, Any], source: str):
    """Instantiate a (nested) dataclass from plain data, rejecting unknown keys with their path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown} for {cls.__name__}; known keys: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        if name == "teachers" and cls is ValrConfig:
            if not isinstance(value, list):
                raise ConfigError(f"{source}: 'teachers' must be a list of teacher specs")
            value = [build_dataclass(TeacherSpec, v, f"{source}: teachers[{i}]") for i, v in enumerate(value)]
        kwargs[name] = value
    return cls(**kwargs)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings (dotted keys for nesting) to a plain dict, in order. Values are read as YAML
    (``true``, ``2e-3``, ``[1, 4]``, ``null``); text YAML would drop as a comment (``#...``) stays text."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        if value is None and raw.strip() not in ("null", "Null", "NULL", "~", ""):
            value = raw  # YAML read it as a comment (a regex such as "#\d+ view"): keep the text as written
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = (), cls=ValrConfig):
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
        data = loaded
    data = apply_overrides(data, list(overrides))
    return build_dataclass(cls, data, str(path) if path else "overrides")
