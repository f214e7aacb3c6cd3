"""Uniform frame sampling from a video file (PyAV) or a folder of pre-extracted frames.

Sampling rule (the same for files and folders): with ``n`` frames available and ``k`` wanted, the indices are
``numpy.round(numpy.linspace(0, n - 1, k)).astype(int)``: the first and last frame are always taken and
``numpy.round`` rounds halves to even (``linspace(0, 5, 3) = [0, 2.5, 5] -> [0, 2, 5]``). When the video is
shorter than ``k`` frames some indices repeat; the duplicates are kept so that every item gets exactly ``k``
images (predictable prompt length), at the cost of a few redundant frames on very short clips.

Videos are decoded sequentially (no seeking: seek points differ between containers and codecs, and sequential
decode always lands on the exact frame). The frame count is read from the container; when it is missing or
wrong, the actual number of decoded frames is used and the sampling is redone with it. Frame index ``i`` is
the i-th frame in the decoder's output (presentation) order.

A frame folder holds one image per frame; files are ordered by a natural sort of their names (digit runs
compare as numbers, so ``frame_2.jpg`` comes before ``frame_10.jpg``; for zero-padded names this is the same
as a plain sort).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from threading import Lock
from typing import TYPE_CHECKING, overload

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from av.container import InputContainer

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
DEFAULT_NUM_FRAMES = 32


class VideoError(ValueError):
    """A video or frame folder cannot be read. The message names the path and what to do."""


def sample_indices(n_frames: int, num_frames: int) -> list[int]:
    """Indices of ``num_frames`` frames spread uniformly over ``n_frames`` (rule in the module docstring)."""
    if n_frames < 1:
        raise ValueError(f"cannot sample from {n_frames} frames")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return [int(i) for i in np.round(np.linspace(0, n_frames - 1, num_frames)).astype(int)]


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part]


def list_frame_files(folder: str | Path) -> list[Path]:
    """The image files of a frame folder, in natural name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VideoError(f"{folder}: frame folder not found")
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise VideoError(f"{folder}: frame folder holds no image files (looked for {sorted(IMAGE_SUFFIXES)})")
    return sorted(files, key=lambda p: _natural_key(p.name))


def sample_frame_folder(folder: str | Path, num_frames: int = DEFAULT_NUM_FRAMES) -> list[Path]:
    """Paths of the frames sampled from a folder of pre-extracted frames."""
    files = list_frame_files(folder)
    return [files[i] for i in sample_indices(len(files), num_frames)]


def _open(path: Path) -> InputContainer:
    import av

    if not path.is_file():
        raise VideoError(f"{path}: video file not found")
    try:
        container = av.open(str(path))
    except Exception as e:  # PyAV raises several error types; all mean the same to the caller
        raise VideoError(f"{path}: cannot open video ({e}); check it is a complete, readable video") from e
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: file has no video stream")
    return container


def count_frames(path: str | Path) -> int:
    """Number of frames as declared by the container, else counted from the demuxed packets (no decode)."""
    path = Path(path)
    with _open(path) as container:
        stream = container.streams.video[0]
        if stream.frames and stream.frames > 0:
            return int(stream.frames)
        return sum(1 for packet in container.demux(stream) if packet.size)


def _decode(path: Path, wanted: set[int]) -> tuple[dict[int, Image.Image], int | None]:
    """Decode sequentially, keeping the wanted frames; also returns the total count if decoding ran out."""
    frames: dict[int, Image.Image] = {}
    last = max(wanted)
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        i = -1
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    frames[i] = frame.to_image().convert("RGB")
                if i >= last:
                    return frames, None
        except Exception as e:
            raise VideoError(f"{path}: decoding failed at frame {i + 1} ({e}); is the file truncated?") from e
    return frames, i + 1


def sample_video(path: str | Path, num_frames: int = DEFAULT_NUM_FRAMES) -> list[Image.Image]:
    """Decode ``num_frames`` uniformly sampled frames of a video file as RGB PIL images."""
    path = Path(path)
    n = count_frames(path)
    if n < 1:
        raise VideoError(f"{path}: video has no frames")
    indices = sample_indices(n, num_frames)
    frames, decoded = _decode(path, set(indices))
    if decoded is not None and len(frames) < len(set(indices)):
        # The container over-reported its frame count: resample over the frames that really exist.
        if decoded < 1:
            raise VideoError(f"{path}: no frame could be decoded")
        indices = sample_indices(decoded, num_frames)
        frames, _ = _decode(path, set(indices))
    return [frames[i] for i in indices]


class _FrameCache:
    """A small LRU of decoded videos, shared by all items, so memory stays bounded over a whole benchmark."""

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = capacity
        self._data: OrderedDict[tuple[str, int], tuple[Image.Image, ...]] = OrderedDict()
        self._lock = Lock()

    def get(self, path: Path, num_frames: int) -> tuple[Image.Image, ...]:
        key = (str(path.resolve()), num_frames)
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        frames = tuple(sample_video(path, num_frames))
        with self._lock:
            self._data[key] = frames
            self._data.move_to_end(key)
            while len(self._data) > max(self.capacity, 1):
                self._data.popitem(last=False)
        return frames

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


FRAME_CACHE = _FrameCache()


class VideoFrames(Sequence[Image.Image]):
    """The sampled frames of one video, decoded on first access.

    Behaves as a read-only list of PIL images of length ``num_frames``. Decoding is deferred so that loading a
    benchmark (thousands of questions over a few hundred videos) costs nothing, and decoded frames live in
    the shared ``FRAME_CACHE`` rather than on each item, so consecutive questions about the same scene reuse
    one decode while memory stays bounded.
    """

    def __init__(self, path: str | Path, num_frames: int = DEFAULT_NUM_FRAMES) -> None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.path = Path(path)
        self.num_frames = num_frames

    def frames(self) -> tuple[Image.Image, ...]:
        return FRAME_CACHE.get(self.path, self.num_frames)

    def __len__(self) -> int:
        return self.num_frames

    @overload
    def __getitem__(self, index: int) -> Image.Image: ...

    @overload
    def __getitem__(self, index: slice) -> list[Image.Image]: ...

    def __getitem__(self, index: int | slice) -> Image.Image | list[Image.Image]:
        frames = self.frames()
        return list(frames[index]) if isinstance(index, slice) else frames[index]

    def __iter__(self) -> Iterator[Image.Image]:
        return iter(self.frames())

    def __repr__(self) -> str:
        return f"VideoFrames({str(self.path)!r}, num_frames={self.num_frames})"
