"""``valr eval run``: generate a benchmark's predictions with a checkpoint (resumable, multi-process), then score.

Outputs in ``--out`` (``OUT``):

* ``predictions.jsonl``: one JSON object per item, in the benchmark's item order once the run ends:
  ``id``, ``prediction`` (the answer to score), ``raw`` (the decoded output, latent segments shown as
  ``<latent>[K latent positions]</latent>``), ``generated_tokens`` (tokens generated, the ``<latent>`` and
  ``</latent>`` markers and the end-of-sequence token included), ``generated_positions`` (tokens plus latent
  positions: the decoder positions actually spent), ``latent_segments`` and ``finished`` (the model ended the
  answer itself; false when ``--max-new-tokens`` cut it). ``prediction`` is
  ``valr.eval.extract.extract_answer(answer_text, item.kind, item.options)`` where ``answer_text`` is the output
  with the latent segments removed (``GenerationResult.answer_text``), so the ``K`` written in the latent
  markup of ``raw`` can never be read as a number.
* ``run.json``: ``settings``, what determines the outputs: a fingerprint of the checkpoint (its config files, and
  the size, first and last MiB of each weight file), the benchmark and a fingerprint of its items (ids, prompts,
  options, image counts), loader options such as the frame count, latent policy, K, token budget, dtype,
  sampling, system prompt, step delimiter and the reasoning budget (``--min-steps``/``--max-steps``, recorded only
  when set; semantics in ``valr.generate``). A rerun into the same ``OUT`` with different settings is refused
  unless ``--force-new`` is given, which moves the previous outputs to ``OUT/replaced-<UTC time>/`` and starts
  afresh (so is a rerun into an ``OUT`` that holds predictions but no ``run.json``). ``info`` may change between
  reruns: model and data paths (a moved checkpoint or data file is still the same run), media roots, limit,
  batch size, number of processes, device, library versions and times; the limit and batch size do not change
  greedy outputs, a change of library versions or device warns.
* ``scores.json`` (``valr.eval.scoring.score`` over the items in scope, i.e. the first ``--limit`` items),
  ``length.json`` and ``length_positions.png`` / ``length_tokens.png`` (accuracy by generated length,
  ``valr.eval.length``, with length = ``generated_positions`` and = ``generated_tokens``).

Resume: predictions are appended and flushed (``fsync``) after every batch. A rerun reads what is there, skips
every id already present and generates only the rest, so no id is ever written twice. A last line cut short by
a crash (no final newline, or unparsable) is truncated away with a warning; a bad line anywhere else is an
error (nothing is dropped silently). Raising ``--limit`` on a rerun extends a run. With greedy decoding the
final ``predictions.jsonl`` is byte-for-byte the same whether the run was interrupted or not, and whatever the
batch size or number of processes (up to floating-point differences of batched kernels on some devices).

Multi-process: under ``accelerate launch`` (or ``torchrun``), process ``R`` of ``N`` takes the items
``remaining[R::N]`` and appends to ``OUT/predictions.rank{R}.jsonl``; after a barrier the main process merges
``predictions.jsonl`` and every rank file (deduplicated by id, in item order) into ``predictions.jsonl``
atomically, removes the rank files, and scores. Before generating, the main process repairs every file (cut
last lines) and all processes then read the same set of finished ids, so the shards are disjoint and a resumed
multi-process run (with the same or another process count) only does the missing items.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from valr.eval.benchmarks import BenchmarkError, EvalItem, canonical_name, load_benchmark
from valr.eval.extract import extract_answer

PREDICTIONS = "predictions.jsonl"
RUN_JSON = "run.json"
SCORES = "scores.json"
LENGTH_JSON = "length.json"
FORMAT = 1  # bump when the meaning of a predictions line changes
LINE_FIELDS = ("id", "prediction", "raw", "generated_tokens", "generated_positions", "latent_segments",
               "finished")


class RunError(ValueError):
    """The run cannot go on (settings mismatch, corrupt predictions file, bad option); the message says why."""


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ predictions I/O


def rank_file(out: Path, rank: int) -> Path:
    return out / f"predictions.rank{rank}.jsonl"


def rank_files(out: Path) -> list[Path]:
    """Existing per-process files, by rank."""
    found = []
    for p in out.glob("predictions.rank*.jsonl"):
        middle = p.name[len("predictions.rank"):-len(".jsonl")]
        if middle.isdigit():
            found.append((int(middle), p))
    return [p for _, p in sorted(found)]


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict) or isinstance(obj.get("id"), bool) or not isinstance(obj.get("id"), (str, int)):
        return None
    return obj


def read_jsonl(path: Path, *, repair: bool) -> list[dict[str, Any]]:
    """The complete lines of a predictions file being appended to.

    A cut last line (no final newline, or not a JSON object with an id, e.g. zero bytes after a power loss) is a
    crash remnant: with ``repair`` the file is truncated just before it (with a warning), otherwise it is
    ignored. A bad line before the last one raises ``RunError``.
    """
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    objs: list[dict[str, Any]] = []
    cut_at: int | None = len(data) - len(tail) if tail else None
    offset = 0
    for i, line in enumerate(lines):
        obj = _parse(line) if line.strip() else {}
        if obj is None:
            if i == len(lines) - 1 and not tail:
                cut_at = offset
                break
            raise RunError(f"{path}:{i + 1}: not a JSON object with an 'id' (and not the last line, so not a cut "
                           "write); fix or remove that line, then rerun")
        if obj:
            objs.append(obj)
        offset += len(line) + 1
    if cut_at is not None and repair:
        warn(f"{path}: the last line was cut short ({len(data) - cut_at} bytes, probably an interrupted run); "
             "truncating it away, its item will be generated again")
        with path.open("r+b") as fh:
            fh.truncate(cut_at)
            fh.flush()
            os.fsync(fh.fileno())
    return objs


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def dumps_line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


def append_lines(path: Path, objs: Iterable[dict[str, Any]]) -> None:
    """Append lines and make them durable (flush + fsync) before returning."""
    data = b"".join(dumps_line(o) for o in objs)
    if not data:
        return
    with path.open("ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def collect(out: Path, *, repair: bool) -> dict[str, dict[str, Any]]:
    """Finished predictions by id from ``predictions.jsonl`` then the rank files (the first line of an id wins)."""
    done: dict[str, dict[str, Any]] = {}
    for path in [out / PREDICTIONS, *rank_files(out)]:
        for obj in read_jsonl(path, repair=repair):
            rid = str(obj["id"])
            if rid in done:
                if done[rid] != obj:
                    warn(f"{path}: id {rid!r} appears again with a different content; keeping the first one")
                continue
            done[rid] = obj
    return done


def merge(out: Path, order: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Rewrite ``predictions.jsonl`` from itself and the rank files: one line per id, in ``order`` (ids not in it
    last, as found), then remove the rank files. Only the main process may call this, after a barrier."""
    done = collect(out, repair=True)
    position = {rid: i for i, rid in enumerate(order)}
    ids = sorted(done, key=lambda r: (0, position[r]) if r in position else (1, 0))
    data = b"".join(dumps_line(done[r]) for r in ids)
    target = out / PREDICTIONS
    if not target.is_file() or target.read_bytes() != data:
        write_atomic(target, data)
    for path in rank_files(out):
        path.unlink()
    return {r: done[r] for r in ids}


# ---------------------------------------------------------------------------------------------- settings


def versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("valr", "torch", "transformers", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def model_fingerprint(model: Path) -> str:
    """A cheap fingerprint of a checkpoint directory: the config files in full, and for each weight file its size
    and its first and last MiB (a retrained or different model changes them; copying the directory does not)."""
    h = hashlib.sha256()
    for name in ("config.json", "valr_config.json", "generation_config.json", "tokenizer.json"):
        p = model / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
    for p in sorted(model.glob("*.safetensors")):
        size = p.stat().st_size
        h.update(f"{p.name}\0{size}\0".encode())
        with p.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


PATH_OPTIONS = frozenset({"video_root", "image_dir"})  # where media live, not what they are: info, not settings


def items_fingerprint(items: Sequence[EvalItem]) -> str:
    """A fingerprint of what the model is asked: every item's id, prompt, options and number of images."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.id, it.question, it.options, len(it.images)], ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()[:16]


def checkpoint_config(model: Path):
    """The checkpoint's valr config (K, step delimiter) without loading the model."""
    from valr.config import ValrConfig

    path = model / "valr_config.json"
    if not path.is_file():
        return ValrConfig()
    return ValrConfig.from_dict(json.loads(path.read_text()).get("valr", {}), str(path))


@dataclass
class Plan:
    settings: dict[str, Any]
    info: dict[str, Any]


def _check_settings(out: Path, plan: Plan, force_new: bool, is_main: bool) -> None:
    path = out / RUN_JSON
    if not path.is_file():
        if not force_new and ((out / PREDICTIONS).is_file() or rank_files(out)):
            raise RunError(f"{out} holds predictions but no {RUN_JSON}, so the settings that produced them are "
                           "unknown; use another --out, or pass --force-new to move them aside and start afresh")
        return
    try:
        old = json.loads(path.read_text())
        old_settings, old_info = old["settings"], old.get("info", {})
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise RunError(f"{path}: unreadable ({e}); pass --force-new to start afresh (the old outputs are kept "
                       "aside)") from None
    diffs = [f"  {k}: was {old_settings.get(k)!r}, now {plan.settings.get(k)!r}"
             for k in sorted(set(old_settings) | set(plan.settings)) if old_settings.get(k) != plan.settings.get(k)]
    if diffs and not force_new:
        raise RunError(f"{out} holds a run with other settings; its predictions would not be comparable:\n"
                       + "\n".join(diffs) + "\nuse another --out, or pass --force-new to move the previous outputs "
                       "aside and start afresh")
    if not diffs and is_main:
        if old_info.get("versions") != plan.info["versions"]:
            warn(f"library versions differ from the earlier part of this run ({old_info.get('versions')} -> "
                 f"{plan.info['versions']}); greedy outputs may differ slightly")
        if old_info.get("device") not in (None, plan.info["device"]):
            warn(f"device differs from the earlier part of this run ({old_info.get('device')} -> "
                 f"{plan.info['device']}); outputs may differ slightly")


def _read_settings(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _move_aside(out: Path) -> Path | None:
    names = [PREDICTIONS, RUN_JSON, SCORES, LENGTH_JSON, "length_positions.png", "length_tokens.png"]
    present = [out / n for n in names if (out / n).exists()] + rank_files(out)
    if not present:
        return None
    dest = out / f"replaced-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')}"
    dest.mkdir()
    for p in present:
        shutil.move(str(p), dest / p.name)
    return dest


# ---------------------------------------------------------------------------------------------- the run


def result_line(item: EvalItem, res: Any) -> dict[str, Any]:
    """One predictions line from a ``GenerationResult`` (fields in the module docstring)."""
    return {
        "id": item.id,
        "prediction": extract_answer(res.answer_text, item.kind, item.options, question=item.question),
        "raw": res.text,
        "generated_tokens": len(res.token_ids),
        "generated_positions": res.generated_positions,
        "latent_segments": res.latent_segments,
        "finished": bool(res.finished),
    }


def _batch_seed(seed: int, first_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{first_id}".encode()).digest()[:4], "little")


def generate_items(generator: Any, items: Sequence[EvalItem], cfg: Any, batch_size: int,
                   sink: Callable[[list[dict[str, Any]]], None], *, log: Callable[[str], None] | None = None) -> int:
    """Generate ``items`` in batches of ``batch_size``, handing each batch's lines to ``sink``; returns the count."""
    import dataclasses

    from valr.generate import Prompt

    start, n_done = time.monotonic(), 0
    for b in range(0, len(items), batch_size):
        batch = items[b:b + batch_size]
        prompts = []
        for it in batch:
            try:
                prompts.append(Prompt(it.question, it.load_images()))
            except (OSError, ValueError) as e:
                raise RunError(f"item {it.id!r}: cannot load its images or frames ({e})") from e
        bcfg = cfg
        if cfg.do_sample and cfg.seed is not None:
            bcfg = dataclasses.replace(cfg, seed=_batch_seed(cfg.seed, batch[0].id))
        try:
            results = generator(prompts, bcfg)
        except ValueError as e:
            raise RunError(f"batch of items {[it.id for it in batch]}: {e}") from e
        sink([result_line(it, r) for it, r in zip(batch, results, strict=True)])
        n_done += len(batch)
        if log is not None:
            rate = n_done / max(time.monotonic() - start, 1e-9)
            log(f"{n_done}/{len(items)} items ({rate:.2f} items/s)")
    return n_done


def _resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _loader_options(args: argparse.Namespace, name: str) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if args.num_frames is not None:
        opts["num_frames"] = args.num_frames
    if args.video_root is not None:
        opts["video_root"] = str(args.video_root.resolve())
    for spec in args.loader_option:
        key, sep, value = spec.partition("=")
        if not sep or not key:
            raise RunError(f"--loader-option {spec!r}: expected KEY=VALUE")
        opts[key] = value
    if name == "vsibench" and "num_frames" not in opts:
        from valr.eval.video import DEFAULT_NUM_FRAMES

        opts["num_frames"] = DEFAULT_NUM_FRAMES
    return opts


def score_outputs(out: Path, name: str, items: Sequence[EvalItem], lines: dict[str, dict[str, Any]],
                  scope: dict[str, Any], label: str = "model") -> dict[str, Any]:
    """Write ``scores.json`` and the length analysis for the items in scope; return the score result.

    ``length.json`` maps each length field (``generated_positions``, ``generated_tokens``) to a
    ``valr.eval.length.length_report`` whose one series is named ``label``."""
    from valr.eval.length import length_report, plot_length_report
    from valr.eval.predictions import Prediction
    from valr.eval.scoring import item_scores, score

    wanted = {it.id for it in items}
    preds = {rid: Prediction(rid, str(o["prediction"]), o.get("raw"), 0,
                             {k: v for k, v in o.items() if k not in ("id", "prediction", "raw")})
             for rid, o in lines.items() if rid in wanted}
    result = score(name, items, preds)
    result["scope"] = scope
    write_atomic(out / SCORES, (json.dumps(result, indent=2) + "\n").encode())
    per_item = {s.id: s.score for s in item_scores(name, items, preds) if not s.missing}
    series = {}
    for field in ("generated_positions", "generated_tokens"):
        series[field] = [(float(preds[i].extra[field]), v) for i, v in per_item.items()
                         if isinstance(preds[i].extra.get(field), int)]
    report = {}
    for field, pairs in series.items():
        if not pairs:
            continue
        rep = length_report({label: pairs})
        report[field] = rep
        png = out / ("length_positions.png" if field == "generated_positions" else "length_tokens.png")
        plot_length_report(rep, png, title=f"{name}: accuracy by {field.replace('_', ' ')}",
                           xlabel=field.replace("_", " "))
    write_atomic(out / LENGTH_JSON, (json.dumps(report, indent=2) + "\n").encode())
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="valr eval run",
        description="Generate predictions for a benchmark with a checkpoint (batched, greedy by default), "
                    "appending to OUT/predictions.jsonl after every batch; a rerun resumes. Then score and "
                    "analyse accuracy by generated length. Runs on several processes under `accelerate launch`.")
    p.add_argument("--model", required=True, type=Path, help="checkpoint directory")
    p.add_argument("--benchmark", required=True, help="vsibench, blink, mmvp, mmstar, vstar, cvbench or records")
    p.add_argument("--data", required=True, type=Path, help="the benchmark's data file or directory")
    p.add_argument("--out", required=True, type=Path, help="output directory (created; reruns resume)")
    p.add_argument("--limit", type=int, help="only the first N items (a rerun with a larger N extends the run)")
    p.add_argument("--latent-policy", choices=["model", "force", "off"], default="model",
                   help="model: latent mode when the model emits <latent>; force: also before the answer and after "
                        "every step delimiter; off: never (plain decoding)")
    p.add_argument("--k", type=int, help="latent positions per segment (default: the checkpoint's K)")
    p.add_argument("--min-steps", type=int, default=0,
                   help="reasoning budget: an answer (or end) before this many steps (lines) is suppressed and the "
                        "model continues with a new step (default 0; semantics in valr.generate)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="reasoning budget: after this many steps the answer prefix is forced (default: no maximum)")
    p.add_argument("--answer-prefix", default=None,
                   help="how the answer line starts, for the step budget (default: the checkpoint's, 'Answer: ')")
    p.add_argument("--batch-size", type=int, default=8, help="items per generation call (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="generated-token budget per item (default 512)")
    p.add_argument("--num-frames", type=int, help="video frames per item (VSI-Bench; default 32)")
    p.add_argument("--video-root", type=Path, help="VSI-Bench video root (default: the data file's directory)")
    p.add_argument("--loader-option", action="append", default=[], metavar="KEY=VALUE",
                   help="another keyword option of the benchmark loader (e.g. split=val, image_dir=DIR)")
    p.add_argument("--system-prompt", help="system prompt (default: the chat template's)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="model dtype (auto: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: the process's GPU if there is one, else CPU")
    p.add_argument("--sample", action="store_true",
                   help="sample instead of greedy decoding (reproducible only with the same --seed, batch size "
                        "and resume points)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--force-new", action="store_true",
                   help="when OUT holds a run with other settings, move its outputs to OUT/replaced-<time>/ and "
                        "start afresh (default: refuse)")
    p.add_argument("--no-score", action="store_true", help="only generate (no scores.json, no length analysis)")
    return p


def _lock(out: Path, rank: int):
    """Hold an exclusive lock on ``OUT/.lock.rank{R}`` for the process's lifetime: a second run writing to the
    same files at the same time is refused instead of duplicating ids."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no protection against concurrent runs
        return None
    fh = (out / f".lock.rank{rank}").open("a")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise RunError(f"another `valr eval run` (process {rank}) is writing to {out}; wait for it or use another "
                       "--out") from None
    return fh


def _state(device: str):
    """accelerate's PartialState (one process unless launched by accelerate/torchrun), on CPU when asked or when
    there is no GPU (gloo backend)."""
    import torch
    from accelerate import PartialState

    cpu = device == "cpu" or not torch.cuda.is_available()
    if device == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda but no GPU is visible")
    return PartialState(cpu=cpu, timeout=dt.timedelta(hours=24)), cpu


def _answer_prefix(args: argparse.Namespace, vcfg: Any) -> str:
    return args.answer_prefix if args.answer_prefix is not None else vcfg.answer_prefix


def _budget_settings(args: argparse.Namespace, vcfg: Any) -> dict[str, Any]:
    """The reasoning budget in the run's settings, only when one is set (so runs without one keep their settings)."""
    if not args.min_steps and args.max_steps is None:
        return {}
    return {"min_steps": args.min_steps, "max_steps": args.max_steps, "answer_prefix": _answer_prefix(args, vcfg)}


def run(args: argparse.Namespace) -> int:
    for opt in ("limit", "batch_size", "max_new_tokens", "num_frames", "k"):
        value = getattr(args, opt)
        if value is not None and value < 1:
            raise RunError(f"--{opt.replace('_', '-')} must be >= 1, got {value}")
    if args.min_steps < 0 or (args.max_steps is not None and not args.min_steps <= args.max_steps):
        raise RunError(f"--min-steps ({args.min_steps}) must be >= 0 and at most --max-steps ({args.max_steps})")
    model_dir = args.model.resolve()
    if not (model_dir / "config.json").is_file():
        raise RunError(f"{args.model} is not a model directory (no config.json)")
    name = canonical_name(args.benchmark)
    opts = _loader_options(args, name)
    items_all = load_benchmark(name, args.data, **opts)
    items = items_all[:args.limit] if args.limit is not None else items_all
    vcfg = checkpoint_config(model_dir)
    k = args.k if args.k is not None else vcfg.k
    if args.latent_policy == "force" and vcfg.latent_after:
        raise RunError(f"{args.model} was trained with its latent segments after each step's head (latent_after="
                       f"{vcfg.latent_after!r}); --latent-policy force puts them before every line, where it never "
                       "saw them. Use --latent-policy model (the model enters latent mode itself) or off")
    state, cpu = _state(args.device)
    rank, world, is_main = state.process_index, state.num_processes, state.is_main_process
    device = "cpu" if cpu else str(state.device)
    dtype = _resolve_dtype(args.dtype, "cpu" if cpu else "cuda")
    plan = Plan(
        settings={
            "format": FORMAT, "model_fingerprint": model_fingerprint(model_dir), "benchmark": name,
            "items_fingerprint": items_fingerprint(items_all),
            "loader_options": {k_: v for k_, v in opts.items() if k_ not in PATH_OPTIONS},
            "latent_policy": args.latent_policy, "k": None if args.latent_policy == "off" else k,
            "max_new_tokens": args.max_new_tokens, "dtype": str(dtype).removeprefix("torch."),
            "sampling": {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                         "seed": args.seed} if args.sample else None,
            "system_prompt": args.system_prompt, "step_delimiter": vcfg.step_delimiter,
            **_budget_settings(args, vcfg),
        },
        info={"model": str(model_dir), "data": str(args.data.resolve()),
              "paths": {k_: v for k_, v in opts.items() if k_ in PATH_OPTIONS},
              "limit": args.limit, "n_items": len(items), "n_items_benchmark": len(items_all),
              "batch_size": args.batch_size, "num_processes": world, "device": device.split(":")[0],
              "versions": versions()},
    )
    out = args.out
    log = (lambda m: print(f"[rank {rank}/{world}] {m}", file=sys.stderr, flush=True)) if world > 1 else \
        (lambda m: print(m, file=sys.stderr, flush=True))

    # 1. settings, repair; every process checks the same run.json before anything is written.
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    lock = _lock(out, rank)
    try:
        return _run_locked(args, state, plan, name, items_all, items, k, vcfg, device, dtype, log)
    finally:
        if lock is not None:
            lock.close()


def _run_locked(args: argparse.Namespace, state: Any, plan: Plan, name: str, items_all: list[EvalItem],
                items: list[EvalItem], k: int, vcfg: Any, device: str, dtype: Any, log: Callable[[str], None]) -> int:
    out, model_dir = args.out, args.model.resolve()
    rank, world, is_main = state.process_index, state.num_processes, state.is_main_process
    _check_settings(out, plan, args.force_new, is_main)
    state.wait_for_everyone()
    if is_main:
        run_path = out / RUN_JSON
        if args.force_new and _read_settings(run_path) != plan.settings:
            moved = _move_aside(out)
            if moved is not None:
                warn(f"--force-new: moved the previous outputs of {out} to {moved}")
        collect(out, repair=True)
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        started = now
        if run_path.is_file():
            started = json.loads(run_path.read_text()).get("info", {}).get("started", now)
        write_atomic(run_path, (json.dumps({"settings": plan.settings, "info": {**plan.info, "started": started,
                                                                                 "updated": now}},
                                           indent=2) + "\n").encode())
    state.wait_for_everyone()

    # 2. every process sees the same finished ids, takes its shard, and only then does anyone write.
    done = collect(out, repair=False)
    remaining = [it for it in items if it.id not in done]
    shard = remaining[rank::world]
    state.wait_for_everyone()
    if is_main:
        log(f"{name}: {len(items)} item(s) in scope, {len(items) - len(remaining)} already done, "
            f"{len(remaining)} to generate" + (f" on {world} processes" if world > 1 else ""))

    if shard:
        from valr.checkpoint import load_checkpoint
        from valr.generate import GenerationConfig, Generator

        loaded = load_checkpoint(model_dir, device=device, dtype=dtype)
        gen = Generator(loaded.backbone, loaded.tokenizer)
        cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, latent_policy=args.latent_policy, k=k,
                               do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, seed=args.seed, step_delimiter=vcfg.step_delimiter,
                               system_prompt=args.system_prompt, min_steps=args.min_steps, max_steps=args.max_steps,
                               answer_prefix=_answer_prefix(args, vcfg))
        target = out / PREDICTIONS if world == 1 else rank_file(out, rank)
        generate_items(gen, shard, cfg, args.batch_size, lambda lines: append_lines(target, lines), log=log)
    state.wait_for_everyone()

    # 3. the main process merges, orders and scores.
    if not is_main:
        return 0
    lines = merge(out, [it.id for it in items_all])
    missing = sum(1 for it in items if it.id not in lines)
    if missing:
        raise RunError(f"{missing} item(s) in scope have no prediction after generation; rerun to retry them")
    print(f"wrote {len(lines)} prediction(s) to {out / PREDICTIONS}", file=sys.stderr)
    if args.no_score:
        return 0
    from valr.eval.score_cmd import format_table

    label = f"{model_dir.name} ({args.latent_policy}" + (f", K={k})" if args.latent_policy != "off" else ")")
    result = score_outputs(out, name, items, lines, {"limit": args.limit, "n_items": len(items),
                                                     "n_items_benchmark": len(items_all)}, label)
    print(format_table(result))
    print(f"wrote {out / SCORES}, {out / LENGTH_JSON} and the length plots", file=sys.stderr)
    return 0


def run_main(argv: list[str]) -> int:
    """Entry point of ``valr eval run``; returns the exit status (2 on a usage or data error)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        return run(args)
    except (RunError, BenchmarkError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
