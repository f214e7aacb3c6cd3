"""Frozen vision encoders whose patch features the latent segments are aligned to.

A teacher maps images to patch features on a grid, CLS and register tokens dropped. Built in:

* ``hf``: any Hugging Face ViT-style vision encoder loaded from a local directory — DINOv2 (with registers),
  DINOv3 ViT, SigLIP, CLIP (fixed square input) and SigLIP2 NaFlex (grid follows the aspect ratio).
* ``self``: the MLLM's own vision tower (merged visual tokens, the paper's "QE" target).
* plug-ins: ``register_teacher(kind, factory)`` or an entry point in the ``valr.teachers`` group, for encoders
  outside transformers (e.g. pi3). A factory takes the ``TeacherSpec`` and returns an object with ``name``,
  ``id``, ``dim`` and ``encode(images) -> list[(features (P, D), (gh, gw))]``.

Features are computed under no_grad; teachers are never trained.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

Features = list[tuple[torch.Tensor, tuple[int, int]]]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Teacher(Protocol):
    name: str
    id: str  # identifies encoder and preprocessing; feature caches are keyed by it
    dim: int

    def encode(self, images: list[Image.Image]) -> Features: ...


@dataclass
class TeacherSpec:
    name: str  # how losses and projectors are labelled, e.g. "dinov3"
    kind: str = "hf"  # hf | self | a registered plug-in kind
    path: str | None = None  # local directory of the encoder (hf)
    image_size: int = 224  # square input side for fixed-grid encoders
    max_patches: int = 256  # SigLIP2 NaFlex patch budget
    options: dict[str, Any] = field(default_factory=dict)


class HFVisionTeacher:
    """A transformers vision encoder from a local directory (never downloads, never runs remote code)."""

    FIXED = {"dinov2", "dinov2_with_registers", "dinov3_vit", "siglip_vision_model", "clip_vision_model",
             "siglip", "clip", "vit"}

    def __init__(self, spec: TeacherSpec, model: torch.nn.Module | None = None):
        from transformers import AutoConfig, AutoModel

        self.name = spec.name
        if model is None:
            if spec.path is None or not Path(spec.path).is_dir():
                raise ValueError(f"teacher {spec.name!r}: path {spec.path!r} is not a local directory; point "
                                 "teachers[].path at a downloaded encoder (config.json + safetensors)")
            config = AutoConfig.from_pretrained(spec.path, local_files_only=True)
            model = AutoModel.from_pretrained(spec.path, local_files_only=True, trust_remote_code=False,
                                              use_safetensors=True)
        if hasattr(model, "vision_model") and getattr(model.config, "model_type", "") in ("clip", "siglip",
                                                                                           "siglip2"):
            model = model.vision_model
        self.model = model.eval().requires_grad_(False)
        config = self.model.config
        self.model_type = config.model_type
        self.dim = config.hidden_size
        self.patch = config.patch_size
        self.image_size = spec.image_size
        self.max_patches = spec.max_patches
        self.mean, self.std = self._norm_stats(spec.path)
        origin = spec.path or f"{self.model_type}-in-memory"
        self.id = f"hf:{origin}:{self.model_type}:{self.image_size}:{self.max_patches}"

    def _norm_stats(self, path: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if path is not None and (p := Path(path) / "preprocessor_config.json").is_file():
            cfg = json.loads(p.read_text())
            if "image_mean" in cfg and "image_std" in cfg:
                return tuple(cfg["image_mean"]), tuple(cfg["image_std"])
        if self.model_type.startswith("siglip"):
            return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        return IMAGENET_MEAN, IMAGENET_STD

    def _pixels(self, image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
        im = image.convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]

    @torch.no_grad()
    def encode(self, images: list[Image.Image]) -> Features:
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        if self.model_type.startswith("siglip2"):
            return self._encode_naflex(images, device, dtype)
        side = self.image_size // self.patch
        pv = torch.stack([self._pixels(im, (self.image_size, self.image_size)) for im in images])
        out = self.model(pixel_values=pv.to(device, dtype)).last_hidden_state
        patches = out[:, out.shape[1] - side * side:]  # drop CLS / register tokens at the front
        return [(p.float().cpu(), (side, side)) for p in patches]

    def _encode_naflex(self, images: list[Image.Image], device, dtype) -> Features:
        feats: Features = []
        for im in images:  # one at a time: each image has its own grid
            w, h = im.size
            scale = (self.max_patches * self.patch**2 / (w * h)) ** 0.5
            gh, gw = max(1, int(h * scale) // self.patch), max(1, int(w * scale) // self.patch)
            while gh * gw > self.max_patches:
                gh, gw = (gh - 1, gw) if gh >= gw else (gh, gw - 1)
            x = self._pixels(im, (gh * self.patch, gw * self.patch))
            seq = x.reshape(3, gh, self.patch, gw, self.patch).permute(1, 3, 2, 4, 0).reshape(gh * gw, -1)
            out = self.model(pixel_values=seq[None].to(device, dtype),
                             pixel_attention_mask=torch.ones(1, gh * gw, dtype=torch.long, device=device),
                             spatial_shapes=torch.tensor([[gh, gw]], device=device)).last_hidden_state
            feats.append((out[0].float().cpu(), (gh, gw)))
        return feats


class SelfVisionTeacher:
    """The MLLM's own vision tower: merged visual tokens in LLM space, on the image's native merged grid."""

    def __init__(self, spec: TeacherSpec, backbone):
        self.name = spec.name
        self.backbone = backbone
        self.dim = backbone.hidden_size
        self.id = f"self:{backbone.model.config.name_or_path or 'model'}:{backbone.model.config.model_type}"

    @torch.no_grad()
    def encode(self, images: list[Image.Image]) -> Features:
        feats: Features = []
        merge = self.backbone.image_processor.merge_size
        for im in images:
            inputs = self.backbone.image_inputs([im])
            tokens = self.backbone.image_features(inputs).float().cpu()
            _, gh, gw = inputs.grid_thw[0].tolist()
            feats.append((tokens, (gh // merge, gw // merge)))
        return feats


_PLUGINS: dict[str, Callable[..., Teacher]] = {}


def register_teacher(kind: str, factory: Callable[..., Teacher]) -> None:
    """Register a teacher kind. ``factory(spec, backbone=...)`` returns a Teacher."""
    _PLUGINS[kind] = factory


def build_teacher(spec: TeacherSpec, backbone=None) -> Teacher:
    if spec.kind == "hf":
        return HFVisionTeacher(spec)
    if spec.kind == "self":
        if backbone is None:
            raise ValueError(f"teacher {spec.name!r} of kind 'self' needs the model's backbone")
        return SelfVisionTeacher(spec, backbone)
    if spec.kind not in _PLUGINS:
        for ep in entry_points(group="valr.teachers"):
            if ep.name == spec.kind:
                _PLUGINS[spec.kind] = ep.load()
    if spec.kind not in _PLUGINS:
        raise ValueError(f"unknown teacher kind {spec.kind!r} for teacher {spec.name!r}; built in: 'hf', 'self'; "
                         f"registered plug-ins: {sorted(_PLUGINS)}. Register one with "
                         "valr.teachers.register_teacher or a 'valr.teachers' entry point.")
    return _PLUGINS[spec.kind](spec, backbone=backbone)


class FeatureCache:
    """Teacher features on disk, one safetensors file per (image content, teacher id).

    Keys hash the image bytes, so renamed or moved files still hit and edited files miss. The teacher id is
    stored in each file's metadata and checked on read.
    """

    def __init__(self, root: str | Path, teacher: Teacher):
        self.root = Path(root)
        self.teacher = teacher
        self.tag = hashlib.sha256(teacher.id.encode()).hexdigest()[:16]
        (self.root / self.tag).mkdir(parents=True, exist_ok=True)

    def _file(self, image_path: Path) -> Path:
        digest = hashlib.sha256(Path(image_path).read_bytes()).hexdigest()
        return self.root / self.tag / f"{digest}.safetensors"

    def get(self, image_path: Path) -> tuple[torch.Tensor, tuple[int, int]] | None:
        f = self._file(image_path)
        if not f.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(f), "pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("teacher") != self.teacher.id:
            raise ValueError(f"feature cache file {f} was written by teacher {meta.get('teacher')!r}, not "
                             f"{self.teacher.id!r}; delete {self.root / self.tag} to rebuild it")
        t = load_file(str(f))["features"]
        return t, (int(meta["gh"]), int(meta["gw"]))

    def put(self, image_path: Path, feats: torch.Tensor, grid: tuple[int, int]) -> None:
        f = self._file(image_path)
        tmp = f.with_suffix(".tmp")
        save_file({"features": feats.contiguous()}, str(tmp),
                  metadata={"teacher": self.teacher.id, "gh": str(grid[0]), "gw": str(grid[1])})
        tmp.replace(f)


def target_features(teacher: Teacher, paths: list[Path], cache: FeatureCache | None = None,
                    load: Callable[[Path], Image.Image] | None = None) -> dict[Path, tuple[torch.Tensor,
                                                                                   tuple[int, int]]]:
    """Features of each distinct target image, from the cache where present, else encoded (and cached)."""
    from valr.data.images import load_image

    load = load or load_image
    result: dict[Path, tuple[torch.Tensor, tuple[int, int]]] = {}
    todo: list[Path] = []
    for p in dict.fromkeys(paths):
        hit = cache.get(p) if cache is not None else None
        if hit is not None:
            result[p] = hit
        else:
            todo.append(p)
    if todo:
        for p, (feats, grid) in zip(todo, teacher.encode([load(p) for p in todo]), strict=True):
            result[p] = (feats, grid)
            if cache is not None:
                cache.put(p, feats, grid)
    return result
