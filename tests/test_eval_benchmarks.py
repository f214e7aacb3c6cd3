"""Benchmark loaders on tiny fixtures written in each benchmark's published schema."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from valr.eval.benchmarks import (
    BENCHMARKS,
    BenchmarkError,
    EvalItem,
    canonical_name,
    load_benchmark,
    vsibench_prompt,
    vstar_option_order,
)
from valr.eval.video import FRAME_CACHE, VideoFrames

from eval_fixtures import write_video

POST = "Answer with the option's letter from the given choices directly."


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- VSI-Bench

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


def write_vsi(tmp_path: Path, rows: list[dict] | None = None, name: str = "test.parquet") -> Path:
    rows = VSI_ROWS if rows is None else rows
    path = tmp_path / name
    if name.endswith(".parquet"):
        schema = pa.schema([("id", pa.int64()), ("dataset", pa.string()), ("scene_name", pa.string()),
                            ("question_type", pa.string()), ("question", pa.string()),
                            ("options", pa.list_(pa.string())), ("ground_truth", pa.string())])
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_vsibench_prompts_exact() -> None:
    assert vsibench_prompt("How many chairs?", None) == (
        "These are frames of a video.\nHow many chairs?\n"
        "Please answer the question using a single word or phrase.")
    assert vsibench_prompt("Left or right?", ["A. left", "B. right"]) == (
        "These are frames of a video.\nLeft or right?\nOptions:\nA. left\nB. right\n"
        "Answer with the option's letter from the given choices directly.")


def test_vsibench_parquet_with_videos(tmp_path: Path) -> None:
    FRAME_CACHE.clear()
    path = write_vsi(tmp_path)
    write_video(tmp_path / "arkitscenes" / "41069025.mp4")
    folder = tmp_path / "scannet" / "scene0011_00"
    folder.mkdir(parents=True)
    for i in range(40):
        Image.new("RGB", (16, 12), (i, i, i)).save(folder / f"{i:05d}.jpg")
    items = load_benchmark("VSI-Bench", path, num_frames=8)
    assert [it.id for it in items] == ["0", "1", "2"]
    count, direction, room = items
    assert (count.kind, count.answer, count.task, count.options) == ("numeric", "4", "object_counting", [])
    assert (direction.kind, direction.answer, direction.options) == ("mc", "B", ["A. left", "B. right"])
    assert direction.question == vsibench_prompt(VSI_ROWS[1]["question"], ["A. left", "B. right"])
    assert count.question.endswith("\nPlease answer the question using a single word or phrase.")
    assert isinstance(count.images, VideoFrames) and count.images is direction.images  # one video per scene
    frames = count.load_images()
    assert len(frames) == 8 and frames[0].size == (32, 32) and frames[0].mode == "RGB"
    assert count.meta["video"] == str(tmp_path / "arkitscenes" / "41069025.mp4")
    assert [Path(p).name for p in room.images] == ["00000.jpg", "00006.jpg", "00011.jpg", "00017.jpg",
                                                   "00022.jpg", "00028.jpg", "00033.jpg", "00039.jpg"]
    assert [im.size for im in room.load_images()] == [(16, 12)] * 8


def test_vsibench_jsonl_video_root_and_no_media(tmp_path: Path) -> None:
    path = write_vsi(tmp_path, name="vsi.jsonl")
    items = load_benchmark("vsibench", path, load_media=False)  # nothing on disk: media not checked
    assert [it.images for it in items] == [[], [], []]
    assert items[2].meta["video"] == str(tmp_path / "scannet" / "scene0011_00.mp4")
    root = tmp_path / "videos"
    write_video(root / "arkitscenes" / "41069025.mp4")
    write_video(root / "scannet" / "scene0011_00.mp4")
    items = load_benchmark("vsibench", path, video_root=root, num_frames=4)
    assert len(items[2].images) == 4


def test_vsibench_errors_name_file_and_row(tmp_path: Path) -> None:
    path = write_vsi(tmp_path)
    no_media = r"test\.parquet row 0: no video .*41069025\.mp4 and no frame folder"
    with pytest.raises(BenchmarkError, match=no_media):
        load_benchmark("vsibench", path)
    bad = [dict(VSI_ROWS[0], question_type="object_colour")]
    with pytest.raises(BenchmarkError, match=r"bad\.jsonl:1: unknown question_type 'object_colour'"):
        load_benchmark("vsibench", write_vsi(tmp_path, bad, "bad.jsonl"), load_media=False)
    missing = [{k: v for k, v in VSI_ROWS[0].items() if k != "scene_name"}]
    with pytest.raises(BenchmarkError, match=r"m\.jsonl:1: missing field\(s\) \['scene_name'\]"):
        load_benchmark("vsibench", write_vsi(tmp_path, missing, "m.jsonl"), load_media=False)
    gt = [dict(VSI_ROWS[1], ground_truth="C")]
    with pytest.raises(BenchmarkError, match=r"g\.jsonl:1: answer 'C' is beyond the 2 option"):
        load_benchmark("vsibench", write_vsi(tmp_path, gt, "g.jsonl"), load_media=False)
    num = [dict(VSI_ROWS[0], ground_truth="0")]
    with pytest.raises(BenchmarkError, match=r"finite number > 0"):
        load_benchmark("vsibench", write_vsi(tmp_path, num, "n.jsonl"), load_media=False)
    dup = [VSI_ROWS[0], VSI_ROWS[0]]
    with pytest.raises(BenchmarkError, match=r"duplicate id '0' \(.*d\.jsonl:1 and .*d\.jsonl:2\)"):
        load_benchmark("vsibench", write_vsi(tmp_path, dup, "d.jsonl"), load_media=False)
    with pytest.raises(BenchmarkError, match="does not take option"):
        load_benchmark("vsibench", path, image_dir="x")
    with pytest.raises(BenchmarkError, match="data file not found"):
        load_benchmark("vsibench", tmp_path / "none.parquet")


# ----------------------------------------------------------------------------------------------- BLINK

BLINK_PROMPT = "How many cats?\nSelect from the following choices.\n(A) 1\n(B) 2\n(C) 3"
BLINK_SCHEMA = pa.schema(
    [("idx", pa.string()), ("question", pa.string()), ("sub_task", pa.string()),
     ("choices", pa.list_(pa.string())), ("answer", pa.string()), ("prompt", pa.string())]
    + [(f"image_{k}", pa.struct([("bytes", pa.binary()), ("path", pa.string())])) for k in range(1, 5)])


def write_blink(root: Path) -> Path:
    def row(idx: str, task: str, answer: str, n_images: int) -> dict:
        images = {f"image_{k}": {"bytes": png_bytes((10 * k, 0, 0)), "path": None} if k <= n_images else None
                  for k in range(1, 5)}
        return {"idx": idx, "question": "How many cats?", "sub_task": task, "choices": ["1", "2", "3"],
                "answer": answer, "prompt": BLINK_PROMPT, **images}

    for task, rows in {"Counting": [row("val_Counting_1", "Counting", "(B)", 1),
                                    row("val_Counting_2", "Counting", "(C)", 1)],
                       "Jigsaw": [row("val_Jigsaw_1", "Jigsaw", "(A)", 3)]}.items():
        (root / task).mkdir(parents=True, exist_ok=True)
        for split, answered in (("val", rows), ("test", [dict(r, answer="") for r in rows])):
            table = pa.Table.from_pylist(answered, schema=BLINK_SCHEMA)
            pq.write_table(table, root / task / f"{split}-00000-of-00001.parquet")
    return root


def test_blink(tmp_path: Path) -> None:
    root = write_blink(tmp_path / "BLINK")
    items = load_benchmark("blink", root)
    assert [(it.id, it.task, it.answer) for it in items] == [
        ("val_Counting_1", "Counting", "B"), ("val_Counting_2", "Counting", "C"),
        ("val_Jigsaw_1", "Jigsaw", "A")]
    assert items[0].question == BLINK_PROMPT + "\n" + POST
    assert items[0].options == ["1", "2", "3"]
    assert len(items[2].images) == 3
    assert [im.getpixel((0, 0)) for im in items[2].load_images()] == [(10, 0, 0), (20, 0, 0), (30, 0, 0)]
    no_media = load_benchmark("blink", root / "Jigsaw" / "val-00000-of-00001.parquet", load_media=False)
    assert no_media[0].images == []
    hidden = r"test-00000-of-00001\.parquet row 0: answer '' is not an option"
    with pytest.raises(BenchmarkError, match=hidden):
        load_benchmark("blink", root, split="test")


# ------------------------------------------------------------------------------------------------ MMVP


def write_mmvp(root: Path) -> Path:
    (root / "MMVP Images").mkdir(parents=True)
    rows = [("1", "Are the butterfly's wings closer to being open or closed?", "(a) Open (b) Closed", "(a)"),
            ("2", "Are the butterfly's wings closer to being open or closed?", "(a) Open (b) Closed", "(b)"),
            ("3", "Is the dog facing left or right?", "(a) Left (b) Right", "(b)"),
            ("4", "Is the dog facing left or right?", "(a) Left (b) Right", "(a)")]
    with (root / "Questions.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Index", "Question", "Options", "Correct Answer"])
        writer.writerows(rows)
    for i in range(1, 5):
        Image.new("RGB", (9, 7), (i, 0, 0)).save(root / "MMVP Images" / f"{i}.jpg")
    return root


def test_mmvp(tmp_path: Path) -> None:
    root = write_mmvp(tmp_path / "MMVP")
    items = load_benchmark("mmvp", root)
    assert [(it.id, it.answer, it.options) for it in items] == [
        ("1", "A", ["Open", "Closed"]), ("2", "B", ["Open", "Closed"]),
        ("3", "B", ["Left", "Right"]), ("4", "A", ["Left", "Right"])]
    assert items[0].question == ("Are the butterfly's wings closer to being open or closed?\n"
                                 "(A) Open\n(B) Closed\n" + POST)
    assert items[0].meta["index"] == 1
    assert items[3].load_images()[0].size == (9, 7)
    (root / "MMVP Images" / "3.jpg").unlink()
    with pytest.raises(BenchmarkError, match=r"Questions\.csv:4: image .*3\.jpg not found"):
        load_benchmark("mmvp", root / "Questions.csv")
    assert len(load_benchmark("mmvp", root, load_media=False)) == 4


# ---------------------------------------------------------------------------------------------- MMStar

MMSTAR_Q = ("Which option describe the object relationship in the image correctly?\nOptions: A: The suitcase "
            "is on the book., B: The suitcase is beneath the cat., C: The suitcase is beneath the bed., "
            "D: The suitcase is beneath the book.")


def test_mmstar_parquet_and_tsv(tmp_path: Path) -> None:
    rows = [{"index": 0, "question": MMSTAR_Q, "image": {"bytes": png_bytes((1, 2, 3)), "path": "0.jpg"},
             "answer": "A", "category": "coarse perception", "l2_category": "image scene and topic",
             "meta_info": None},
            {"index": 1, "question": "What is 2+2?\nOptions: A: 3, B: 4",
             "image": {"bytes": png_bytes((4, 5, 6))},
             "answer": "B", "category": "math", "l2_category": "numeric commonsense and calculation",
             "meta_info": None}]
    parquet = tmp_path / "mmstar.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    items = load_benchmark("mmstar", tmp_path)
    assert [(it.id, it.task, it.answer) for it in items] == [("0", "coarse perception", "A"),
                                                             ("1", "math", "B")]
    assert items[0].options == ["The suitcase is on the book.", "The suitcase is beneath the cat.",
                                "The suitcase is beneath the bed.", "The suitcase is beneath the book."]
    assert items[1].options == ["3", "4"]
    assert items[0].question == MMSTAR_Q + "\n" + POST
    assert items[0].meta["l2_category"] == "image scene and topic"
    assert items[1].load_images()[0].getpixel((0, 0)) == (4, 5, 6)

    tsv = tmp_path / "MMStar.tsv"
    with tsv.open("w", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t")
        writer.writerow(["index", "question", "answer", "category", "l2_category", "image", "A", "B"])
        writer.writerow([7, "Which is bigger?", "B", "math", "calc",
                         base64.b64encode(png_bytes((7, 8, 9), (40, 40))).decode(), "one", "two"])
    (item,) = load_benchmark("mmstar", tsv)
    assert item.options == ["one", "two"]
    assert item.question == "Which is bigger?\n(A) one\n(B) two\n" + POST
    assert item.load_images()[0].getpixel((3, 3)) == (7, 8, 9)


# -------------------------------------------------------------------------------------------------- V*


def test_vstar_jsonl(tmp_path: Path) -> None:
    (tmp_path / "direct_attributes").mkdir()
    Image.new("RGB", (20, 10)).save(tmp_path / "direct_attributes" / "sa_4690.jpg")
    text = ("What is the material of the glove?\n(A) rubber\n(B) cotton\n(C) kevlar\n(D) leather\n" + POST)
    row = {"question_id": 0, "image": "direct_attributes/sa_4690.jpg", "text": text,
           "category": "direct_attributes", "label": "A"}
    (tmp_path / "test_questions.jsonl").write_text(json.dumps(row) + "\n")
    (item,) = load_benchmark("V*", tmp_path)
    assert (item.id, item.task, item.answer, item.question) == ("0", "direct_attributes", "A", text)
    assert item.options == ["rubber", "cotton", "kevlar", "leather"]
    assert item.load_images()[0].size == (20, 10)


def test_vstar_folders_deterministic_letters(tmp_path: Path) -> None:
    for category, name, opts in [("direct_attributes", "sa_1", ["red", "blue", "green", "white"]),
                                 ("relative_position", "sa_2", ["left", "right"])]:
        (tmp_path / category).mkdir()
        (tmp_path / category / f"{name}.json").write_text(json.dumps(
            {"target_object": ["cup"], "bbox": [[1, 2, 3, 4]], "question": f"Question about {name}?",
             "options": opts}))
        Image.new("RGB", (5, 5)).save(tmp_path / category / f"{name}.jpg")
    items = load_benchmark("vstar", tmp_path)
    assert [it.id for it in items] == ["direct_attributes/sa_1", "relative_position/sa_2"]
    for it, original in zip(items, (["red", "blue", "green", "white"], ["left", "right"]), strict=True):
        order = vstar_option_order(it.id, len(original))
        assert sorted(order) == list(range(len(original)))
        assert it.options == [original[i] for i in order]
        assert it.options["ABCD".index(it.answer)] == original[0]  # the correct option is options[0]
        assert it.question == mc_lines(f"Question about {it.id.split('/')[1]}?", it.options)
    assert vstar_option_order("direct_attributes/sa_1", 4) == [3, 2, 1, 0]  # fixed across runs and versions
    no_media = load_benchmark("vstar", tmp_path, load_media=False)
    assert [it.answer for it in no_media] == [it.answer for it in items]


def mc_lines(question: str, options: list[str]) -> str:
    return "\n".join([question] + [f"({'ABCD'[i]}) {o}" for i, o in enumerate(options)] + [POST])


# -------------------------------------------------------------------------------------------- CV-Bench


def test_cvbench_parquet_and_jsonl(tmp_path: Path) -> None:
    def row(idx: int, typ: str, task: str, source: str, answer: str) -> dict:
        return {"idx": idx, "type": typ, "task": task,
                "image": {"bytes": png_bytes((idx, 0, 0)), "path": None},
                "question": "Which is closer?", "choices": ["the lamp", "the chair"], "answer": answer,
                "prompt": "Which is closer? Select from the following choices.\n(A) the lamp\n(B) the chair",
                "filename": f"img/{idx}.png", "source": source}

    rows_2d = [row(0, "2D", "Count", "ADE20K", "(A)"), row(1, "2D", "Relation", "COCO", "(B)")]
    pq.write_table(pa.Table.from_pylist(rows_2d), tmp_path / "test_2d.parquet")
    rows_3d = [row(2, "3D", "Depth", "Omni3D", "(B)")]
    pq.write_table(pa.Table.from_pylist(rows_3d), tmp_path / "test_3d.parquet")
    items = load_benchmark("cvbench", tmp_path)
    assert [(it.id, it.task, it.answer, it.meta["source"], it.meta["type"]) for it in items] == [
        ("0", "Count", "A", "ADE20K", "2D"), ("1", "Relation", "B", "COCO", "2D"),
        ("2", "Depth", "B", "Omni3D", "3D")]
    assert items[0].question == ("Which is closer? Select from the following choices.\n"
                                 "(A) the lamp\n(B) the chair\n" + POST)
    assert items[2].load_images()[0].getpixel((0, 0)) == (2, 0, 0)

    jdir = tmp_path / "raw"
    (jdir / "img").mkdir(parents=True)
    Image.new("RGB", (3, 3)).save(jdir / "img" / "5.png")
    jrow = {k: v for k, v in row(5, "2D", "Count", "COCO", "(A)").items() if k != "image"}
    (jdir / "test_2d.jsonl").write_text(json.dumps(jrow) + "\n")
    (item,) = load_benchmark("cvbench", jdir)
    assert item.images == [jdir / "img" / "5.png"]
    (jdir / "img" / "5.png").unlink()
    gone = r"test_2d\.jsonl:1: image file .*5\.png \(field 'filename'\) not found"
    with pytest.raises(BenchmarkError, match=gone):
        load_benchmark("cvbench", jdir)


# --------------------------------------------------------------------------------------------- records


def test_records(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "v.png")
    lines = [
        {"id": "q1", "images": ["v.png"], "question": "Which? (A) x (B) y", "steps": [], "answer": "B",
         "meta": {"options": ["x", "y"], "task": "spatial"}},
        {"id": 2, "images": ["v.png"], "question": "How far?", "steps": [], "answer": "2.5"},
    ]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    items = load_benchmark("records", path)
    assert [(it.id, it.kind, it.answer, it.task, it.options) for it in items] == [
        ("q1", "mc", "B", "spatial", ["x", "y"]), ("2", "numeric", "2.5", "numeric", [])]
    assert items[0].question == "Which? (A) x (B) y"
    assert items[0].images == [tmp_path / "v.png"]
    path.write_text(json.dumps({**lines[1], "answer": "two and a half"}) + "\n")
    with pytest.raises(BenchmarkError, match=r"r\.jsonl \(record '2'\): answer 'two and a half' is neither"):
        load_benchmark("records", path)


def test_registry() -> None:
    assert set(BENCHMARKS) == {"vsibench", "blink", "mmvp", "mmstar", "vstar", "cvbench", "records"}
    assert canonical_name("VSI-Bench") == "vsibench"
    assert canonical_name("CV_Bench") == "cvbench"
    assert canonical_name("V*") == "vstar"
    with pytest.raises(BenchmarkError, match="unknown benchmark 'mmmu'"):
        canonical_name("mmmu")


def test_eval_item_missing_image_file(tmp_path: Path) -> None:
    item = EvalItem("x", "records", "t", "q", [tmp_path / "gone.png"], "A", "mc")
    with pytest.raises(BenchmarkError, match=r"item 'x' \(records\): image file .*gone\.png not found"):
        item.load_images()
