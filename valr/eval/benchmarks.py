"""Benchmark loaders: each published format in, a list of ``EvalItem`` (prompt, images, ground truth) out.

Every loader takes the data path plus keyword options and ``load_media``: with ``load_media=False`` no image
or video is opened or even checked (scoring needs only ids, tasks and answers). Every error names the file,
the row or line, what is wrong and what to do. Accepted formats (column names are case-sensitive):

* ``vsibench``: the VSI-Bench parquet (or a JSONL with the same fields): ``id``, ``dataset``, ``scene_name``,
  ``question_type``, ``question``, ``options`` (list of ``"A. ..."`` strings; null for numeric types),
  ``ground_truth``. Media per row: ``<video_root>/<dataset>/<scene_name>.mp4`` if that file exists, else the
  frame folder ``<video_root>/<dataset>/<scene_name>/``; ``video_root`` defaults to the data file's
  directory. ``num_frames`` (default 32) frames are sampled as in ``valr.eval.video``; mp4 frames are decoded
  lazily (``VideoFrames``), folder frames are given as paths. Prompt, as the official lmms-eval task:
  ``"These are frames of a video.\\n" + question`` then, for multiple choice,
  ``"\\nOptions:\\n" + "\\n".join(options) + "\\nAnswer with the option's letter from the given choices
  directly."``, for numeric ``"\\nPlease answer the question using a single word or phrase."``.
* ``blink``: the HF parquet files (a file, or a directory searched recursively for ``<split>*.parquet``,
  split ``val`` by default since test answers are hidden) or JSONL: ``idx``, ``question``, ``choices`` (or
  ``options``), ``answer`` (``"(A)"`` or ``"A"``), ``sub_task`` (else the parquet's folder name),
  ``image_1`` .. ``image_4`` (``{"bytes", "path"}`` structs, raw bytes, or paths; null when unused) and an
  optional ``prompt`` (question with its choices, used as is when present).
* ``mmvp``: ``Questions.csv`` (or its directory) with ``Index``, ``Question``, ``Options``
  (``"(a) Open (b) Closed"``), ``Correct Answer`` (``"(a)"``); images ``<dir>/MMVP Images/<Index>.jpg``
  (``image_dir`` to override). Letters are given uppercase in the prompt.
* ``mmstar``: parquet (HF) or TSV (VLMEvalKit) with ``index``, ``question``, ``answer`` (letter),
  ``category``, ``l2_category``, ``image`` (``{"bytes"}`` struct, raw bytes or base64 text). The options are
  written inside the question (``"Options: A: ..., B: ..."``) and parsed from it; when the file instead has
  ``A``.. ``D`` columns and the question has no ``Options:``, the options are taken from those columns.
* ``vstar``: ``test_questions.jsonl`` (or the bench directory holding it) with ``question_id``, ``image``,
  ``text`` (question, ``(A) ...`` option lines and the answer instruction), ``category``, ``label``. Without
  that file, the directory's ``direct_attributes/`` and ``relative_position/`` are scanned for ``<name>.json``
  (``question``, ``options``; ``options[0]`` is the correct one) next to ``<name>.jpg``; options are then
  ordered by the SHA-256 of ``"<id>#<original index>"`` (id = ``<category>/<name>``), a fixed shuffle that
  does not depend on Python's random module, and the answer is the letter where option 0 lands.
* ``cvbench``: parquet (``test_2d.parquet``/``test_3d.parquet``, a directory holding ``test*.parquet``) or
  JSONL: ``idx``, ``type``, ``task``, ``question``, ``choices``, ``answer`` (``"(A)"``), ``source``, optional
  ``prompt``, and ``image`` (struct/bytes) or ``filename`` (path relative to the data file).
* ``records``: a JSONL of the library's records (``valr.data.records``); the answer is an option letter
  (multiple choice; options from ``meta.options`` if given) or a number; the prompt is the question; the task
  is ``meta.task`` or ``meta.question_type`` or the kind.

Perception prompts without a ``prompt`` field are built as ``question + "\\n(A) opt\\n(B) opt..." +
"\\nAnswer with the option's letter from the given choices directly."`` (``post_prompt`` to change the last
line; ``post_prompt=""`` drops it). When a dataset ``prompt`` is used, the post prompt is appended to it.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import inspect
import io
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from valr.eval.video import DEFAULT_NUM_FRAMES, VideoError, VideoFrames, sample_frame_folder

ImageSource = str | Path | Image.Image
Kind = Literal["mc", "numeric"]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_POST_PROMPT = "Answer with the option's letter from the given choices directly."
VSI_PRE_PROMPT = "These are frames of a video."
VSI_MC_POST_PROMPT = MC_POST_PROMPT
VSI_NA_POST_PROMPT = "Please answer the question using a single word or phrase."


class BenchmarkError(ValueError):
    """A benchmark file is malformed or incomplete; the message says where and what to do."""


@dataclass
class EvalItem:
    """One question: the prompt to give the model, its images, and the ground truth."""

    id: str
    benchmark: str
    task: str
    question: str
    images: Sequence[ImageSource]
    answer: str
    kind: Kind
    options: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def load_images(self) -> list[Image.Image]:
        """The images as RGB PIL images (opens paths, decodes video frames)."""
        out: list[Image.Image] = []
        for src in self.images:
            if isinstance(src, Image.Image):
                out.append(src if src.mode == "RGB" else src.convert("RGB"))
                continue
            path = Path(src)
            if not path.is_file():
                raise BenchmarkError(f"item {self.id!r} ({self.benchmark}): image file {path} not found")
            with Image.open(path) as im:
                out.append(im.convert("RGB"))
        return out


# ----------------------------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class _Row:
    where: str  # "file.parquet row 3" or "file.jsonl:4"
    data: dict[str, Any]


def _fail(where: str, msg: str) -> BenchmarkError:
    return BenchmarkError(f"{where}: {msg}")


def _read_rows(path: Path, *, skip_columns: Iterable[str] = ()) -> list[_Row]:
    """Rows of a parquet, JSONL, JSON (list of objects), CSV or TSV file; ``skip_columns`` are not read."""
    if not path.is_file():
        raise BenchmarkError(f"{path}: data file not found")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
            skip = set(skip_columns)
            table = pq.read_table(path, columns=[n for n in names if n not in skip])
        except Exception as e:  # pyarrow raises several error types for unreadable files
            raise BenchmarkError(f"{path}: cannot read parquet ({e})") from e
        return [_Row(f"{path} row {i}", r) for i, r in enumerate(table.to_pylist())]
    if suffix == ".jsonl":
        rows: list[_Row] = []
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _fail(where, f"not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise _fail(where, f"expected a JSON object, got {type(obj).__name__}")
                rows.append(_Row(where, obj))
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise _fail(str(path), f"not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise _fail(str(path), "expected a JSON list of objects")
        return [_Row(f"{path} item {i}", r) for i, r in enumerate(data)]
    if suffix in (".csv", ".tsv"):
        csv.field_size_limit(sys.maxsize)  # TSV files carry base64 images in one field
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            return [_Row(f"{path}:{i}", dict(r)) for i, r in enumerate(reader, start=2)]
    raise BenchmarkError(f"{path}: unsupported file type {suffix!r}; "
                         "give a .parquet, .jsonl, .json, .csv or .tsv file")


def _require(row: _Row, *keys: str) -> None:
    missing = [k for k in keys if k not in row.data]
    if missing:
        raise _fail(row.where, f"missing field(s) {missing}; present: {sorted(row.data)}. Check the file is "
                               "the benchmark's published format (see valr.eval.benchmarks)")


def _text(row: _Row, key: str) -> str:
    value = row.data.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise _fail(row.where, f"field {key!r} must be a non-empty string, got {value!r}")
    return value


def _answer_letter(value: Any, where: str, n_options: int | None = None) -> str:
    """A ground-truth letter from ``"A"``, ``"(A)"``, ``"(a)"`` or ``"A."``."""
    text = str(value).strip() if value is not None else ""
    m = re.fullmatch(r"\(?([A-Za-z])[).]?", text)
    if not m:
        raise _fail(where, f"answer {value!r} is not an option letter like 'A' or '(A)' (test splits with "
                           "hidden answers cannot be scored; use the validation split)")
    letter = m.group(1).upper()
    if n_options is not None and LETTERS.index(letter) >= n_options:
        raise _fail(where, f"answer {letter!r} is beyond the {n_options} option(s)")
    return letter


def _string_list(value: Any, where: str, key: str) -> list[str]:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if not isinstance(value, list) or not value or not all(isinstance(v, (str, int, float)) for v in value):
        raise _fail(where, f"field {key!r} must be a non-empty list of option strings, got {value!r}")
    return [str(v) for v in value]


def mc_prompt(question: str, options: Sequence[str], post_prompt: str = MC_POST_PROMPT) -> str:
    """Question, ``(A) option`` lines, then the answer instruction (omitted when empty)."""
    lines = [question.strip()] + [f"({LETTERS[i]}) {o}" for i, o in enumerate(options)]
    if post_prompt:
        lines.append(post_prompt)
    return "\n".join(lines)


def _with_post(prompt: str, post_prompt: str) -> str:
    return prompt.rstrip() + ("\n" + post_prompt if post_prompt else "")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a base64 string taken for a path: name too long
        return False


def _looks_base64(text: str) -> bool:
    """Base64 image text (TSV files) rather than a path: long, base64 alphabet only, no file extension."""
    return len(text) >= 64 and len(text) % 4 == 0 and re.fullmatch(r"[A-Za-z0-9+/]+=*", text) is not None


def _image(value: Any, base: Path, where: str, key: str) -> ImageSource | None:
    """An image field: PIL image, ``{"bytes", "path"}`` struct, raw bytes, base64 text or a path."""
    if value is None:
        return None
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            return _image(bytes(value["bytes"]), base, where, key)
        if value.get("path"):
            return _image(str(value["path"]), base, where, key)
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return Image.open(io.BytesIO(bytes(value)))
        except Exception as e:  # PIL raises several error types for bad data
            raise _fail(where, f"field {key!r} holds bytes that are not a readable image ({e})") from e
    if isinstance(value, str) and value:
        path = Path(value) if Path(value).is_absolute() else base / value
        if _is_file(path):
            return path
        if _looks_base64(value):
            try:
                return _image(base64.b64decode(value, validate=True), base, where, key)
            except (binascii.Error, ValueError) as e:
                raise _fail(where, f"field {key!r} is neither a path nor valid base64 ({e})") from e
        raise _fail(where, f"image file {path} (field {key!r}) not found; check the image folder is next "
                           "to the data file or give the right path")
    raise _fail(where, f"field {key!r} is not an image (got {type(value).__name__})")


def _check_unique(items: list[EvalItem], source: Path) -> list[EvalItem]:
    seen: dict[str, str] = {}
    for it in items:
        where = str(it.meta.get("where", ""))
        if it.id in seen:
            raise BenchmarkError(f"{source}: duplicate id {it.id!r} ({seen[it.id]} and {where}); "
                                 "ids must be unique")
        seen[it.id] = where
    return items


# --------------------------------------------------------------------------------------------- VSI-Bench

_VSI_MC = frozenset({
    "object_rel_direction_easy", "object_rel_direction_medium", "object_rel_direction_hard",
    "object_rel_distance", "route_planning", "obj_appearance_order",
})
_VSI_NUMERIC = frozenset({
    "object_abs_distance", "object_counting", "object_size_estimation", "room_size_estimation",
})


def vsibench_prompt(question: str, options: Sequence[str] | None, *, mc_post_prompt: str = VSI_MC_POST_PROMPT,
                    na_post_prompt: str = VSI_NA_POST_PROMPT, pre_prompt: str = VSI_PRE_PROMPT) -> str:
    """The official VSI-Bench prompt (multiple choice when options are given, numeric otherwise)."""
    if options:
        return "\n".join([pre_prompt, question, "Options:\n" + "\n".join(options), mc_post_prompt])
    return pre_prompt + "\n" + question + "\n" + na_post_prompt


def load_vsibench(data_path: str | Path, *, video_root: str | Path | None = None,
                  num_frames: int = DEFAULT_NUM_FRAMES, load_media: bool = True,
                  pre_prompt: str = VSI_PRE_PROMPT, mc_post_prompt: str = VSI_MC_POST_PROMPT,
                  na_post_prompt: str = VSI_NA_POST_PROMPT) -> list[EvalItem]:
    """VSI-Bench from its parquet or JSONL (fields and media layout in the module docstring)."""
    path = Path(data_path)
    root = Path(video_root) if video_root is not None else path.parent
    media_cache: dict[tuple[str, str], tuple[Sequence[ImageSource], str]] = {}
    items: list[EvalItem] = []
    for row in _read_rows(path):
        _require(row, "id", "dataset", "scene_name", "question_type", "question", "ground_truth")
        qtype = _text(row, "question_type")
        question = _text(row, "question")
        gt = _text(row, "ground_truth").strip()
        if qtype in _VSI_MC:
            options = _string_list(row.data.get("options"), row.where, "options")
            kind, answer = "mc", _answer_letter(gt, row.where, len(options))
        elif qtype in _VSI_NUMERIC:
            options, kind = [], "numeric"
            try:
                value = float(gt)
            except ValueError:
                raise _fail(row.where, f"ground_truth {gt!r} of numeric type {qtype!r} is not a number") \
                    from None
            if not value > 0 or value == float("inf"):
                raise _fail(row.where, f"ground_truth {gt!r} must be a finite number > 0 for MRA scoring")
            answer = gt
        else:
            known = sorted(_VSI_MC | _VSI_NUMERIC)
            raise _fail(row.where, f"unknown question_type {qtype!r}; known: {known}")
        dataset, scene = _text(row, "dataset"), _text(row, "scene_name")
        images: Sequence[ImageSource] = []
        video = root / dataset / f"{scene}.mp4"
        if load_media:
            key = (dataset, scene)
            if key not in media_cache:
                folder = root / dataset / scene
                try:
                    if video.is_file():
                        media_cache[key] = (VideoFrames(video, num_frames), str(video))
                    elif folder.is_dir():
                        media_cache[key] = (sample_frame_folder(folder, num_frames), str(folder))
                    else:
                        raise _fail(row.where, f"no video {video} and no frame folder {folder}; put the "
                                               "videos under <video_root>/<dataset>/<scene_name>.mp4 or "
                                               "pass video_root")
                except VideoError as e:
                    raise _fail(row.where, str(e)) from None
            images, source = media_cache[key]
        else:
            source = str(video)
        prompt = vsibench_prompt(question, options if kind == "mc" else None, mc_post_prompt=mc_post_prompt,
                                 na_post_prompt=na_post_prompt, pre_prompt=pre_prompt)
        items.append(EvalItem(
            id=str(row.data["id"]), benchmark="vsibench", task=qtype, question=prompt, images=images,
            answer=answer, kind=kind, options=options,
            meta={"dataset": dataset, "scene_name": scene, "question_type": qtype, "video": source,
                  "raw_question": question, "where": row.where},
        ))
    return _check_unique(items, path)


# ------------------------------------------------------------------------------------------------- BLINK

_BLINK_IMAGES = ("image_1", "image_2", "image_3", "image_4")


def _data_files(path: Path, patterns: Sequence[str], what: str) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise BenchmarkError(f"{path}: {what} data not found")
    for pattern in patterns:
        found = sorted(p for p in path.rglob(pattern) if p.is_file())
        if found:
            return found
    raise BenchmarkError(f"{path}: no {what} data files matching {list(patterns)} under this directory")


def load_blink(data_path: str | Path, *, split: str = "val", load_media: bool = True,
               post_prompt: str = MC_POST_PROMPT) -> list[EvalItem]:
    """BLINK from its HF parquet files (one per sub-task) or a JSONL (module docstring)."""
    path = Path(data_path)
    files = _data_files(path, [f"{split}*.parquet", f"{split}*.jsonl"], "BLINK")
    items: list[EvalItem] = []
    for file in files:
        for row in _read_rows(file, skip_columns=() if load_media else _BLINK_IMAGES):
            _require(row, "idx", "question", "answer")
            options = _string_list(row.data.get("choices", row.data.get("options")), row.where, "choices")
            answer = _answer_letter(row.data["answer"], row.where, len(options))
            task = row.data.get("sub_task") or file.parent.name
            prompt_field = row.data.get("prompt")
            if isinstance(prompt_field, str) and prompt_field.strip():
                prompt = _with_post(prompt_field, post_prompt)
            else:
                prompt = mc_prompt(_text(row, "question"), options, post_prompt)
            images: list[ImageSource] = []
            if load_media:
                images = [im for key in _BLINK_IMAGES
                          if (im := _image(row.data.get(key), file.parent, row.where, key)) is not None]
                if not images:
                    raise _fail(row.where, f"no image in {list(_BLINK_IMAGES)}")
            items.append(EvalItem(
                id=str(row.data["idx"]), benchmark="blink", task=str(task), question=prompt, images=images,
                answer=answer, kind="mc", options=options, meta={"where": row.where},
            ))
    return _check_unique(items, path)


# -------------------------------------------------------------------------------------------------- MMVP


def _parse_mmvp_options(text: str, where: str) -> list[str]:
    parts = re.split(r"\(([a-zA-Z])\)", text)
    letters, values = parts[1::2], [p.strip() for p in parts[2::2]]
    if len(letters) < 2 or [c.upper() for c in letters] != list(LETTERS[: len(letters)]) or not all(values):
        raise _fail(where, f"Options {text!r} are not in the form '(a) first (b) second'")
    return values


def load_mmvp(data_path: str | Path, *, image_dir: str | Path | None = None, load_media: bool = True,
              post_prompt: str = MC_POST_PROMPT) -> list[EvalItem]:
    """MMVP from ``Questions.csv`` and its ``MMVP Images`` folder (module docstring)."""
    path = Path(data_path)
    csv_path = path / "Questions.csv" if path.is_dir() else path
    images_root = Path(image_dir) if image_dir is not None else csv_path.parent / "MMVP Images"
    items: list[EvalItem] = []
    for row in _read_rows(csv_path):
        _require(row, "Index", "Question", "Options", "Correct Answer")
        try:
            index = int(str(row.data["Index"]).strip())
        except ValueError:
            raise _fail(row.where, f"Index {row.data['Index']!r} is not an integer") from None
        options = _parse_mmvp_options(_text(row, "Options"), row.where)
        answer = _answer_letter(row.data["Correct Answer"], row.where, len(options))
        images: list[ImageSource] = []
        if load_media:
            image = images_root / f"{index}.jpg"
            if not image.is_file():
                raise _fail(row.where, f"image {image} not found; put the 'MMVP Images' folder next to "
                                       "Questions.csv or pass image_dir")
            images = [image]
        prompt = mc_prompt(_text(row, "Question"), options, post_prompt)
        items.append(EvalItem(
            id=str(index), benchmark="mmvp", task="mmvp", question=prompt, images=images, answer=answer,
            kind="mc", options=options, meta={"index": index, "where": row.where},
        ))
    return _check_unique(items, csv_path)


# ------------------------------------------------------------------------------------------------ MMStar


def _inline_options(question: str) -> list[str]:
    """``"... Options: A: x, B: y"`` -> ``["x", "y"]`` (empty when the question has no such list)."""
    m = re.search(r"Options:\s*(.*)$", question, re.DOTALL)
    if not m:
        return []
    parts = re.split(r"(?:^|,\s*|\n\s*)([A-Z]):\s*", m.group(1))
    letters, values = parts[1::2], [p.strip() for p in parts[2::2]]
    if not letters or letters != list(LETTERS[: len(letters)]):
        return []
    return values


def _mmstar_item(row: _Row, base: Path, load_media: bool, post_prompt: str) -> EvalItem:
    _require(row, "index", "question", "answer", "category")
    question = _text(row, "question")
    options = _inline_options(question)
    if options:
        prompt = _with_post(question, post_prompt)
    else:
        options = [str(row.data[c]) for c in LETTERS[:6] if isinstance(row.data.get(c), str) and row.data[c]]
        if not options:
            raise _fail(row.where, "found no options: neither 'Options: A: ..., B: ...' in the question nor "
                                   "columns A, B, ...")
        prompt = mc_prompt(question, options, post_prompt)
    answer = _answer_letter(row.data["answer"], row.where, len(options))
    images: list[ImageSource] = []
    if load_media:
        image = _image(row.data.get("image"), base, row.where, "image")
        if image is None:
            raise _fail(row.where, "field 'image' is empty")
        images = [image]
    return EvalItem(
        id=str(row.data["index"]), benchmark="mmstar", task=_text(row, "category"), question=prompt,
        images=images, answer=answer, kind="mc", options=options,
        meta={"l2_category": str(row.data.get("l2_category", "")), "where": row.where},
    )


def load_mmstar(data_path: str | Path, *, load_media: bool = True,
                post_prompt: str = MC_POST_PROMPT) -> list[EvalItem]:
    """MMStar from the HF parquet or the VLMEvalKit TSV (module docstring)."""
    path = Path(data_path)
    items = [_mmstar_item(row, file.parent, load_media, post_prompt)
             for file in _data_files(path, ["*.parquet", "*.tsv"], "MMStar")
             for row in _read_rows(file, skip_columns=() if load_media else ("image",))]
    return _check_unique(items, path)


# ---------------------------------------------------------------------------------------------------- V*

_VSTAR_CATEGORIES = ("direct_attributes", "relative_position")


def vstar_option_order(item_id: str, n: int) -> list[int]:
    """The fixed shuffle of V* folder options: original indices sorted by SHA-256 of ``"<id>#<index>"``."""
    return sorted(range(n), key=lambda i: hashlib.sha256(f"{item_id}#{i}".encode()).hexdigest())


def _vstar_jsonl(file: Path, load_media: bool, post_prompt: str) -> list[EvalItem]:
    items: list[EvalItem] = []
    for row in _read_rows(file):
        _require(row, "question_id", "image", "text", "label")
        text = _text(row, "text")
        options = [m.group(2).strip() for m in re.finditer(r"^\(([A-Z])\)\s*(.*)$", text, re.MULTILINE)]
        if not options:
            raise _fail(row.where, "field 'text' has no '(A) ...' option lines")
        prompt = text if "Answer with" in text or not post_prompt else _with_post(text, post_prompt)
        answer = _answer_letter(row.data["label"], row.where, len(options))
        image_field = _text(row, "image")
        images: list[ImageSource] = []
        if load_media:
            image = _image(image_field, file.parent, row.where, "image")
            images = [image] if image is not None else []
        category = str(row.data.get("category") or Path(image_field).parent.name)
        items.append(EvalItem(
            id=str(row.data["question_id"]), benchmark="vstar", task=category, question=prompt, images=images,
            answer=answer, kind="mc", options=options, meta={"image": image_field, "where": row.where},
        ))
    return items


def _vstar_folders(root: Path, load_media: bool, post_prompt: str) -> list[EvalItem]:
    items: list[EvalItem] = []
    for category in _VSTAR_CATEGORIES:
        folder = root / category
        if not folder.is_dir():
            continue
        for meta_file in sorted(folder.glob("*.json")):
            where = str(meta_file)
            try:
                data = json.loads(meta_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise _fail(where, f"not valid JSON ({e.msg} at line {e.lineno})") from None
            row = _Row(where, data if isinstance(data, dict) else {})
            _require(row, "question", "options")
            original = _string_list(data["options"], where, "options")
            item_id = f"{category}/{meta_file.stem}"
            order = vstar_option_order(item_id, len(original))
            options = [original[i] for i in order]
            images: list[ImageSource] = []
            if load_media:
                candidates = [p for p in meta_file.parent.glob(meta_file.stem + ".*")
                              if p.suffix.lower() != ".json"]
                if not candidates:
                    raise _fail(where, f"no image {meta_file.with_suffix('.jpg')} next to the question file")
                images = [sorted(candidates)[0]]
            prompt = mc_prompt(_text(row, "question"), options, post_prompt)
            items.append(EvalItem(
                id=item_id, benchmark="vstar", task=category, question=prompt,
                images=images, answer=LETTERS[order.index(0)], kind="mc", options=options,
                meta={"option_order": order, "where": where},
            ))
    if not items:
        raise BenchmarkError(f"{root}: no test_questions.jsonl and no question files in "
                             f"{list(_VSTAR_CATEGORIES)}")
    return items


def load_vstar(data_path: str | Path, *, load_media: bool = True,
               post_prompt: str = MC_POST_PROMPT) -> list[EvalItem]:
    """V* Bench from ``test_questions.jsonl`` or its category folders (module docstring)."""
    path = Path(data_path)
    if path.is_dir():
        jsonl = path / "test_questions.jsonl"
        items = _vstar_jsonl(jsonl, load_media, post_prompt) if jsonl.is_file() else \
            _vstar_folders(path, load_media, post_prompt)
    else:
        items = _vstar_jsonl(path, load_media, post_prompt)
    return _check_unique(items, path)


# ---------------------------------------------------------------------------------------------- CV-Bench


def load_cvbench(data_path: str | Path, *, load_media: bool = True,
                 post_prompt: str = MC_POST_PROMPT) -> list[EvalItem]:
    """CV-Bench from its parquet files or JSONL (module docstring)."""
    path = Path(data_path)
    files = _data_files(path, ["test*.parquet", "test*.jsonl"], "CV-Bench")
    items: list[EvalItem] = []
    for file in files:
        for row in _read_rows(file, skip_columns=() if load_media else ("image",)):
            _require(row, "idx", "task", "question", "choices", "answer")
            options = _string_list(row.data["choices"], row.where, "choices")
            answer = _answer_letter(row.data["answer"], row.where, len(options))
            prompt_field = row.data.get("prompt")
            if isinstance(prompt_field, str) and prompt_field.strip():
                prompt = _with_post(prompt_field, post_prompt)
            else:
                prompt = mc_prompt(_text(row, "question"), options, post_prompt)
            images: list[ImageSource] = []
            if load_media:
                image = _image(row.data.get("image"), file.parent, row.where, "image")
                if image is None:
                    image = _image(row.data.get("filename"), file.parent, row.where, "filename")
                if image is None:
                    raise _fail(row.where, "no image: fields 'image' and 'filename' are both empty")
                images = [image]
            items.append(EvalItem(
                id=str(row.data["idx"]), benchmark="cvbench", task=_text(row, "task"), question=prompt,
                images=images, answer=answer, kind="mc", options=options,
                meta={"type": str(row.data.get("type", "")), "source": str(row.data.get("source", "")),
                      "where": row.where},
            ))
    return _check_unique(items, path)


# ----------------------------------------------------------------------------------------------- records


def load_records_benchmark(data_path: str | Path, *, load_media: bool = True) -> list[EvalItem]:
    """The library's records JSONL as an evaluation set (letter answers -> mc, numbers -> numeric)."""
    from valr.data.records import RecordError, iter_records

    path = Path(data_path)
    items: list[EvalItem] = []
    try:
        records = list(iter_records(path, require_steps=False))
    except RecordError as e:
        raise BenchmarkError(str(e)) from None
    for rec in records:
        where = f"{path} (record {rec.id!r})"
        raw_options = rec.meta.get("options")
        options = _string_list(raw_options, where, "meta.options") if raw_options is not None else []
        answer = rec.answer.strip()
        if re.fullmatch(r"\(?[A-Za-z][).]?", answer):
            kind, answer = "mc", _answer_letter(answer, where, len(options) or None)
        else:
            try:
                value = float(answer)
            except ValueError:
                raise _fail(where, f"answer {rec.answer!r} is neither an option letter nor a number; only "
                                   "multiple-choice and numeric records can be scored") from None
            if not value > 0 or value == float("inf"):
                raise _fail(where, f"numeric answer {rec.answer!r} must be finite and > 0 "
                                   "(MRA divides by it)")
            kind = "numeric"
        if load_media:
            for p in rec.images:
                if not p.is_file():
                    raise _fail(where, f"image file {p} not found")
        task = rec.meta.get("task") or rec.meta.get("question_type") or kind
        items.append(EvalItem(
            id=rec.id, benchmark="records", task=str(task), question=rec.question, images=list(rec.images),
            answer=answer, kind=kind, options=options, meta={**rec.meta, "where": where},
        ))
    return _check_unique(items, path)


# ---------------------------------------------------------------------------------------------- registry

Loader = Callable[..., list[EvalItem]]

BENCHMARKS: dict[str, Loader] = {
    "vsibench": load_vsibench,
    "blink": load_blink,
    "mmvp": load_mmvp,
    "mmstar": load_mmstar,
    "vstar": load_vstar,
    "cvbench": load_cvbench,
    "records": load_records_benchmark,
}

_ALIASES = {"vsi": "vsibench", "v*": "vstar", "v*bench": "vstar", "vstarbench": "vstar", "jsonl": "records"}


def canonical_name(name: str) -> str:
    """The registry name for a benchmark name (``"VSI-Bench"`` -> ``"vsibench"``, ``"V*"`` -> ``"vstar"``)."""
    key = re.sub(r"[\s_\-]", "", name.strip().lower())
    key = _ALIASES.get(key, key)
    if key not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    return key


def load_benchmark(name: str, data_path: str | Path, **opts: Any) -> list[EvalItem]:
    """Load a registered benchmark; ``opts`` are the loader's keyword options (e.g. ``load_media=False``)."""
    loader = BENCHMARKS[canonical_name(name)]
    params = inspect.signature(loader).parameters
    unknown = sorted(set(opts) - {k for k, p in params.items() if p.kind is p.KEYWORD_ONLY})
    if unknown:
        allowed = sorted(k for k, p in params.items() if p.kind is p.KEYWORD_ONLY)
        raise BenchmarkError(f"benchmark {canonical_name(name)!r} does not take option(s) {unknown}; "
                             f"it takes {allowed}")
    return loader(data_path, **opts)
