"""Small files for evaluation-run tests: a tiny checkpoint, a records benchmark, a VSI-Bench parquet with mp4s."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

VSI_ROWS = [
    {"id": 0, "dataset": "arkitscenes", "scene_name": "41069025", "question_type": "object_counting",
     "question": "How many chair(s) are in this room?", "options": None, "ground_truth": "4"},
    {"id": 1, "dataset": "arkitscenes", "scene_name": "41069025",
     "question_type": "object_rel_direction_easy",
     "question": "If I am standing by the sofa and facing the TV, is the lamp to my left or right?",
     "options": ["A. left", "B. right"], "ground_truth": "B"},
    {"id": 2, "dataset": "scannet", "scene_name": "scene0011_00", "question_type": "room_size_estimation",
     "question": "What is the size of this room (in square meters)?", "options": None,
     "ground_truth": "21.5"},
]


def write_tiny_checkpoint(path: Path, k: int = 2) -> Path:
    """A random tiny Qwen2.5-VL checkpoint (as `valr tiny` writes it)."""
    from valr.checkpoint import save_checkpoint
    from valr.config import ValrConfig
    from valr.tiny import build_tiny

    model, tok, ip = build_tiny(seed=0)
    return save_checkpoint(path, model, tok, ip, ValrConfig(k=k, align_layer=2, projector_width=64))


def write_records_benchmark(root: Path, n: int = 7) -> Path:
    """``n`` records alternating multiple choice (two options) and numeric, over two images of different sizes."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (w, h) in {"a": (56, 56), "b": (84, 56)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{name}.png")
    rows = []
    for i in range(n):
        if i % 2:
            rows.append({"id": f"q{i}", "images": ["a.png"], "question": f"How many cubes are there? ({i})",
                         "steps": [], "answer": str(i + 1), "meta": {"task": "count"}})
        else:
            rows.append({"id": f"q{i}", "images": ["b.png"], "question": f"Which side is the ball on? ({i})",
                         "steps": [], "answer": "B", "meta": {"task": "side", "options": ["left", "right"]}})
    path = root / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_video(path: Path, n: int = 10, size: int = 32) -> Path:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(n):
            arr = np.full((size, size, 3), 25 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_vsibench(root: Path) -> Path:
    """A VSI-Bench-schema parquet (three rows, two scenes) with an mp4 per scene under ``root``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("id", pa.int64()), ("dataset", pa.string()), ("scene_name", pa.string()),
                        ("question_type", pa.string()), ("question", pa.string()),
                        ("options", pa.list_(pa.string())), ("ground_truth", pa.string())])
    path = root / "test.parquet"
    pq.write_table(pa.Table.from_pylist(VSI_ROWS, schema=schema), path)
    for row in VSI_ROWS:
        video = root / row["dataset"] / f"{row['scene_name']}.mp4"
        if not video.is_file():
            write_video(video)
    return path
