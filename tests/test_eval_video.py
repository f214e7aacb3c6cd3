"""Frame sampling: the index rule, PyAV decoding of tiny videos, frame folders and the lazy frame list."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

import valr.eval.video as video
from valr.eval.video import (
    FRAME_CACHE,
    VideoError,
    VideoFrames,
    count_frames,
    list_frame_files,
    sample_frame_folder,
    sample_indices,
    sample_video,
)

LEVELS = [i * 25 for i in range(10)]  # frame i is a flat grey of level 25 * i


def write_video(path: Path, levels: list[int], size: int = 32) -> Path:
    """A tiny video whose frame i is a flat grey ``levels[i]`` (mpeg4: present in every PyAV wheel)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for level in levels:
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), level, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def grey(im: Image.Image) -> int:
    """The frame's grey level, snapped to the nearest written level (mpeg4 is lossy)."""
    mean = float(np.asarray(im.convert("L")).mean())
    return min(LEVELS, key=lambda lv: abs(lv - mean))


@pytest.fixture(autouse=True)
def _clear_cache() -> None:
    FRAME_CACHE.clear()


@pytest.mark.parametrize(("n", "k", "expected"), [
    (10, 4, [0, 3, 6, 9]),
    (5, 4, [0, 1, 3, 4]),         # linspace 0, 1.33, 2.67, 4
    (6, 3, [0, 2, 5]),            # 2.5 rounds half to even -> 2
    (3, 4, [0, 1, 1, 2]),         # shorter than k: duplicates kept, always k indices
    (1, 3, [0, 0, 0]),
    (100, 1, [0]),
    (32, 32, list(range(32))),
])
def test_sample_indices(n: int, k: int, expected: list[int]) -> None:
    assert sample_indices(n, k) == expected


def test_sample_indices_32_of_long_video_spans_both_ends() -> None:
    idx = sample_indices(3000, 32)
    assert len(idx) == 32 and idx[0] == 0 and idx[-1] == 2999
    assert idx == [int(round(x)) for x in np.linspace(0, 2999, 32)]


def test_sample_indices_rejects_bad_counts() -> None:
    with pytest.raises(ValueError):
        sample_indices(0, 4)
    with pytest.raises(ValueError):
        sample_indices(4, 0)


def test_decode_mp4(tmp_path: Path) -> None:
    path = write_video(tmp_path / "scene.mp4", LEVELS)
    assert count_frames(path) == 10
    frames = sample_video(path, 4)
    assert [im.size for im in frames] == [(32, 32)] * 4
    assert all(im.mode == "RGB" for im in frames)
    assert [grey(im) for im in frames] == [0, 75, 150, 225]
    assert [grey(im) for im in sample_video(path, 12)] == [LEVELS[i] for i in sample_indices(10, 12)]


def test_decode_container_without_frame_count(tmp_path: Path) -> None:
    path = write_video(tmp_path / "scene.mkv", LEVELS)  # matroska declares no frame count
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0
    assert count_frames(path) == 10
    assert [grey(im) for im in sample_video(path, 3)] == [0, 100, 225]


def test_over_reported_frame_count_is_resampled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_video(tmp_path / "scene.mp4", LEVELS)
    monkeypatch.setattr(video, "count_frames", lambda p: 40)
    assert [grey(im) for im in sample_video(path, 4)] == [0, 75, 150, 225]


def test_video_errors(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="video file not found"):
        sample_video(tmp_path / "missing.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(VideoError, match=r"bad\.mp4: cannot open video"):
        sample_video(bad)


def test_video_frames_lazy_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_video(tmp_path / "scene.mp4", LEVELS)
    calls: list[Path] = []
    real = video.sample_video

    def counting(p: Path, n: int) -> list[Image.Image]:
        calls.append(p)
        return real(p, n)

    monkeypatch.setattr(video, "sample_video", counting)
    a, b = VideoFrames(path, 4), VideoFrames(path, 4)
    assert len(a) == 4 and calls == []          # length known without decoding
    assert grey(a[1]) == 75
    assert [grey(im) for im in b] == [0, 75, 150, 225]
    assert [grey(im) for im in a[2:]] == [150, 225]
    assert len(calls) == 1                      # one decode shared by both items
    for name in ("other.mp4", "third.mp4"):
        list(VideoFrames(write_video(tmp_path / name, LEVELS), 4))
    list(VideoFrames(path, 4))                  # evicted (cache holds 2 videos): decoded again
    assert len(calls) == 4


def test_frame_folder_natural_order(tmp_path: Path) -> None:
    folder = tmp_path / "scene"
    folder.mkdir()
    for i in range(12):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(folder / f"frame_{i}.png")
    (folder / "notes.txt").write_text("not a frame")
    files = list_frame_files(folder)
    assert [p.name for p in files[:3]] == ["frame_0.png", "frame_1.png", "frame_2.png"]
    assert files[-1].name == "frame_11.png"
    assert [p.name for p in sample_frame_folder(folder, 4)] == ["frame_0.png", "frame_4.png", "frame_7.png",
                                                                 "frame_11.png"]


def test_frame_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="frame folder not found"):
        list_frame_files(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoError, match="no image files"):
        list_frame_files(tmp_path / "empty")
