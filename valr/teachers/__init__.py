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
from safetensors.torch import save_file

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


class FeatureCacheMismatch(ValueError):
    """A feature cache directory was made by another encoder (or the same encoder at another resolution)."""


def _describe(meta: dict[str, Any]) -> str:
    parts = [f"encoder {meta.get('teacher_id')!r}"]
    for key in ("image_size", "max_patches", "dtype"):
        if meta.get(key) is not None:
            parts.append(f"{key}={meta[key]}")
    return ", ".join(parts)


def teacher_metadata(teacher: Teacher) -> dict[str, Any]:
    """What a cache records about the encoder that filled it (the id decides; the rest is for people)."""
    return {"teacher_id": teacher.id, "teacher_name": teacher.name, "dim": int(teacher.dim),
            "image_size": getattr(teacher, "image_size", None), "max_patches": getattr(teacher, "max_patches", None)}


def _flush_pending(directory: Path, teacher_id: str, pending: dict, dtype: torch.dtype) -> Path | None:
    """Write pending features as one new shard (temp file, then rename). Module-level so a finalizer can call it."""
    if not pending:
        return None
    import os
    import time
    import uuid

    tensors = {k: v.to(dtype).contiguous() for k, (v, _) in pending.items()}
    grids = {k: list(g) for k, (_, g) in pending.items()}
    name = f"shard-{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
    tmp = directory / (name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FeatureCache.FORMAT, "teacher": teacher_id,
                                           "grids": json.dumps(grids)})
    tmp.replace(directory / name)
    pending.clear()
    return directory / name


def cached_feature_maps(teacher_dir: str | Path, limit: int = 2000) -> list[torch.Tensor]:
    """Per-image patch features ``(P, D)`` of up to ``limit`` images from one teacher's cache directory, reading
    its shard files in name order; needs no teacher object (e.g. for statistics of a finished run)."""
    from safetensors.torch import load_file

    feats: list[torch.Tensor] = []
    for shard in sorted(Path(teacher_dir).glob("shard-*.safetensors")):
        if len(feats) >= limit:
            break
        feats += [t.float() for t in load_file(str(shard)).values()][: limit - len(feats)]
    return [f.reshape(-1, f.shape[-1]) for f in feats]


def sample_cached_features(teacher_dir: str | Path, limit: int = 2000) -> torch.Tensor:
    """Patch features ``(N, D)`` of up to ``limit`` cached images (all patches of all images); empty if none."""
    feats = cached_feature_maps(teacher_dir, limit)
    return torch.cat(feats) if feats else torch.zeros(0, 0)


class FeatureCache:
    """Teacher patch features on disk: sharded safetensors keyed by image content hash, one directory per teacher.

    Layout: ``root/<teacher name>/meta.json`` (format, encoder id, dim, resolution, dtype) and
    ``root/<teacher name>/shard-*.safetensors``; each shard holds many images' features under their SHA-256 (of
    the file bytes, so moved files still hit and edited files miss) and repeats the encoder id and the grids in its
    own metadata. Opening a directory made by another encoder id (another model or another resolution) raises
    :class:`FeatureCacheMismatch` at once, before any work; so does a shard copied in from another cache.

    ``put`` buffers in memory (visible to ``get`` at once) and writes a shard every ``shard_size`` images;
    ``flush`` writes the rest (also done when the object is garbage-collected or the process exits normally).
    Several processes may fill one directory at the same time: every shard has a unique name.
    """

    FORMAT = "valr-features-2"

    def __init__(self, root: str | Path, teacher: Teacher, shard_size: int = 256, dtype: str = "float32"):
        import re
        import weakref

        self.root = Path(root)
        self.teacher = teacher
        safe = re.fullmatch(r"[A-Za-z0-9_.-]+", teacher.name) and teacher.name not in (".", "..")
        self.dir = self.root / (teacher.name if safe else hashlib.sha256(teacher.name.encode()).hexdigest()[:16])
        self.shard_size = shard_size
        meta = {"format": self.FORMAT, **teacher_metadata(teacher), "dtype": dtype}
        meta_file = self.dir / "meta.json"
        if meta_file.is_file():
            found = json.loads(meta_file.read_text())
            if found.get("teacher_id") != teacher.id:
                raise FeatureCacheMismatch(
                    f"feature cache {self.dir} was made by {_describe(found)}, but teacher {teacher.name!r} of this "
                    f"run is {_describe(meta)}; point feature_cache at another directory, or delete {self.dir} and "
                    "rebuild it with `valr features`")
            meta = found
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            import os
            import uuid

            tmp = self.dir / f"meta.json.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"  # several processes may race
            tmp.write_text(json.dumps(meta, indent=2))
            tmp.replace(meta_file)
        self.meta = meta
        self.dtype = getattr(torch, meta.get("dtype", "float32"))
        self._index: dict[str, Path] = {}
        self._grids: dict[str, tuple[int, int]] = {}
        self._pending: dict[str, tuple[torch.Tensor, tuple[int, int]]] = {}
        self._digests: dict[tuple[str, int, int], str] = {}
        self._shards: set[Path] = set()
        self.refresh()
        self._finalizer = weakref.finalize(self, _flush_pending, self.dir, teacher.id, self._pending, self.dtype)

    # -- index ------------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """(Re)read the shard headers: picks up shards written by other processes since opening."""
        from safetensors import safe_open

        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            if shard in self._shards:
                continue
            with safe_open(str(shard), "pt") as fh:
                meta = fh.metadata() or {}
                keys = list(fh.keys())
            if meta.get("teacher") != self.teacher.id:
                raise FeatureCacheMismatch(
                    f"feature cache file {shard} was written by teacher {meta.get('teacher')!r}, not "
                    f"{self.teacher.id!r}; delete {self.dir} (or that file) to rebuild it with `valr features`")
            grids = json.loads(meta.get("grids", "{}"))
            for k in keys:
                self._index[k] = shard
                self._grids[k] = tuple(grids[k])
            self._shards.add(shard)

    def __getstate__(self) -> dict[str, Any]:
        """Picklable for data-loader workers started by spawn (read-only there: nothing is flushed at exit)."""
        state = self.__dict__.copy()
        state["_finalizer"] = None
        state["_pending"] = dict(self._pending)
        return state

    def key(self, image_path: Path) -> str:
        """SHA-256 of the file's bytes (memoised per path, size and modification time)."""
        p = Path(image_path)
        st = p.stat()
        memo = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if memo not in self._digests:
            self._digests[memo] = hashlib.sha256(p.read_bytes()).hexdigest()
        return self._digests[memo]

    def __len__(self) -> int:
        return len(set(self._index) | set(self._pending))

    def has_key(self, digest: str) -> bool:
        return digest in self._pending or digest in self._index

    def round_trip(self, feats: torch.Tensor) -> torch.Tensor:
        """``feats`` as a later ``get`` returns them (stored dtype, read back as float32)."""
        return feats.to(self.dtype).float()

    # -- read / write ---------------------------------------------------------------------------------------
    def get(self, image_path: Path) -> tuple[torch.Tensor, tuple[int, int]] | None:
        return self.get_key(self.key(image_path))

    def sample(self, limit: int = 2000) -> torch.Tensor:
        """Patch features ``(N, D)`` of up to ``limit`` cached images (unwritten ones first, then the shards in
        name order), e.g. for statistics."""
        pending = [self.round_trip(f).reshape(-1, self.teacher.dim) for f, _ in list(self._pending.values())[:limit]]
        on_disk = sample_cached_features(self.dir, limit - len(pending))
        feats = pending + ([on_disk] if len(on_disk) else [])
        return torch.cat(feats) if feats else torch.zeros(0, self.teacher.dim)

    def get_key(self, digest: str) -> tuple[torch.Tensor, tuple[int, int]] | None:
        if digest in self._pending:
            feats, grid = self._pending[digest]
            return self.round_trip(feats), grid
        shard = self._index.get(digest)
        if shard is None:
            return None
        from safetensors import safe_open

        with safe_open(str(shard), "pt") as fh:
            return fh.get_tensor(digest).float(), self._grids[digest]

    def put(self, image_path: Path, feats: torch.Tensor, grid: tuple[int, int]) -> None:
        self.put_key(self.key(image_path), feats, grid)

    def put_key(self, digest: str, feats: torch.Tensor, grid: tuple[int, int]) -> None:
        self._pending[digest] = (feats.detach().cpu(), (int(grid[0]), int(grid[1])))
        if len(self._pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        grids = {k: g for k, (_, g) in self._pending.items()}
        shard = _flush_pending(self.dir, self.teacher.id, self._pending, self.dtype)
        if shard is not None:
            self._shards.add(shard)
            for k, g in grids.items():
                self._index[k] = shard
                self._grids[k] = g


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
            if cache is not None:
                cache.put(p, feats, grid)
                feats = cache.round_trip(feats)  # exactly what a later read from the cache returns
            result[p] = (feats, grid)
    return result
