"""Cached stages: a stage runs once per settings fingerprint and records its result and seconds in ``done.json``
(:class:`Stages`), variants train in parallel worker processes, and :func:`_train` is the one call into
``valr.trainer.train`` that every training stage makes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from valr.demo.config import FORMAT, DemoConfig


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _without_paths(obj: Any) -> Any:
    """``obj`` without its dict entries named ``path`` (what a stage key must not hold: a directory's place)."""
    if isinstance(obj, dict):
        return {k: _without_paths(v) for k, v in obj.items() if k != "path"}
    if isinstance(obj, list):
        return [_without_paths(v) for v in obj]
    return obj


# validation passes of a stage that keeps its lowest validation-CE model (``keep_best``); its stage key holds it
BEST_PASSES = 12


def _log(msg: str) -> None:
    print(f"[valr demo] {msg}", file=sys.stderr, flush=True)


class Stages:
    """Runs named stages once: ``OUT/<name>/done.json`` holds (fingerprint, result, seconds).

    A stage directory whose ``key.json`` names other settings is deleted before the stage reruns; one with the
    same settings but no ``done.json`` (an interrupted run) is kept, so a training stage resumes there.
    """

    def __init__(self, root: Path):
        self.root = root
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []
        self.fps: dict[str, str] = {}

    def run(self, name: str, key: dict[str, Any], fn) -> Any:
        found, d = self._open(name, key)
        if d is None:
            return found
        _log(f"{name}: running")
        t0 = time.perf_counter()
        result = fn(d)
        return self._close(name, d, result, time.perf_counter() - t0)

    def run_parallel(self, jobs: list[tuple[str, dict[str, Any], Callable[[Path], Any]]], workers: int) -> dict:
        """``run`` for independent stages, ``workers`` at a time, each in a fresh process with an equal share of
        this process's CPU threads (all of them for a lone stage). ``fn`` must be picklable (a module-level
        function or a ``functools.partial`` of one); it runs without its own progress bar, and one bar per running
        stage here follows the ``run/history.jsonl`` its trainer writes after every step (``total`` in the job's
        key: ``steps``). Finished stages are kept if another fails; the first failure is raised after the rest
        are done."""
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        import torch
        from tqdm import tqdm

        results: dict[str, Any] = {}
        todo = []
        for name, key, fn in jobs:
            found, d = self._open(name, key)
            if d is None:
                results[name] = found
            else:
                todo.append((name, key, fn, d))
        if not todo:
            return results
        workers = min(workers, len(todo))  # a lone stage gets every thread
        threads = max(1, torch.get_num_threads() // workers)
        _log(f"{', '.join(n for n, *_ in todo)}: running, {workers} at a time, {threads} thread(s) each")
        errors: list[BaseException] = []
        ctx = multiprocessing.get_context("spawn")  # no forked copies of this process's torch threads or state
        started = time.time()
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(threads, os.getpid())) as pool:
            pending = {pool.submit(_timed, fn, d): (name, key, d) for name, key, fn, d in todo}
            bars: dict[str, Any] = {}
            while pending:
                done, _ = wait(pending, timeout=5, return_when=FIRST_COMPLETED)
                for fut in done:
                    name, _, d = pending.pop(fut)
                    if name in bars:
                        bars.pop(name).close()
                    try:
                        result, secs = fut.result()
                    except BaseException as exc:  # keep the others running; report after
                        _log(f"{name}: failed: {exc!r}")
                        errors.append(exc)
                        continue
                    results[name] = self._close(name, d, result, secs)
                for name, key, d in pending.values():
                    step = _history_step(d / "run" / "history.jsonl", since=started)
                    if step is None:
                        continue
                    if name not in bars:
                        bars[name] = tqdm(total=key.get("steps"), desc=name, unit="step", file=sys.stderr,
                                          dynamic_ncols=True)
                    bars[name].update(step - bars[name].n)
            for bar in bars.values():
                bar.close()
        if errors:
            raise errors[0]
        return results

    def _open(self, name: str, key: dict[str, Any]) -> tuple[Any, Path | None]:
        """(the finished stage's result, None), or (None, its fresh or resumable directory)."""
        if _without_paths(key) != key:
            raise ValueError(f"stage {name}: its key holds a 'path'; key stages on settings and upstream "
                             "fingerprints, so that a run directory can be moved or copied")
        d = self.root / name
        fp = _fingerprint({"format": FORMAT, "key": key})
        marker = d / "done.json"
        done = json.loads(marker.read_text()) if marker.is_file() else None
        known = self._identity(d, fp, done)
        self.fps[name] = known or fp
        if known and done is not None and done.get("fingerprint") == known:
            self.seconds[name] = done["seconds"]
            self.reused.append(name)
            _log(f"{name}: reusing the finished stage ({done['seconds']:.0f} s when it ran)")
            return done["result"], None
        if d.exists() and not known:
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        if not known:
            (d / "key.json").write_text(json.dumps({"fingerprint": fp, "key": key}, indent=2, default=str))
        return None, d

    @staticmethod
    def _identity(d: Path, fp: str, done: dict[str, Any] | None) -> str | None:
        """The fingerprint stage directory ``d`` is known by if it holds the settings of ``fp``: ``fp`` itself,
        or, for a stage written when the aligned variants' keys held the teacher's absolute path, the
        fingerprint in its ``key.json`` (kept, so the stages keyed on it downstream still match, in the
        directory where it ran and in any copy of it). None: other settings, or nothing there. ``done``: the
        directory's done.json, read by the caller."""
        key_file = d / "key.json"
        stored = json.loads(key_file.read_text()) if key_file.is_file() else None
        if any(x and x.get("fingerprint") == fp for x in (stored, done)):
            return fp
        if stored and "key" in stored:
            if _fingerprint({"format": FORMAT, "key": _without_paths(stored["key"])}) == fp:
                return stored["fingerprint"]
        return None

    def _close(self, name: str, d: Path, result: Any, secs: float) -> Any:
        self.seconds[name] = secs
        marker = d / "done.json"
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fps[name], "seconds": secs, "result": result}, indent=2,
                                  default=str))
        tmp.replace(marker)
        _log(f"{name}: done in {secs:.0f} s")
        return result


def _init_worker(threads: int, parent: int) -> None:
    """Give a stage worker its share of threads, and end it once the process that started it is gone. A pool
    worker outlives a parent that is killed (not interrupted: Ctrl-C reaches the whole process group) and would
    go on training unseen; its stage resumes from its last checkpoint on the next run."""
    import threading

    import torch

    torch.set_num_threads(threads)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, name="valr-parent-watch", daemon=True).start()


def _timed(fn: Callable[[Path], Any], d: Path) -> tuple[Any, float]:
    t0 = time.perf_counter()
    result = fn(d)
    return result, time.perf_counter() - t0


def _history_step(path: Path, since: float = 0.0) -> int | None:
    """The last step a trainer logged to its history.jsonl (None before the first, and for a file not written
    since ``since``: an interrupted earlier run's history, which the trainer trims when it starts)."""
    try:
        if path.stat().st_mtime < since:
            return None
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a line being written
    return None


def _train(cfg: DemoConfig, out: Path, *, model: Path, data: Path, stage: int, steps: int, lr: float,
           lr_vision: float = 0.0, lambda_align: float = 0.0, teachers: list | None = None,
           data_fraction: float = 1.0, val_data: Path | None = None, progress: bool = True,
           batch_size: int | None = None, save_every: int | None = None, keep_last: int = 1,
           latent_feed: str | None = None, keep_best: bool = False, ce_weight: float = 1.0) -> dict[str, Any]:
    """One ``valr.trainer.train`` call; returns the final checkpoint path and a summary of its history.
    ``save_every``/``keep_last`` space and keep the resumable checkpoints (default: four per run, the last kept);
    ``latent_feed`` overrides the config's for a stage-2 run. ``keep_best``: BEST_PASSES validation passes, and the
    checkpoint returned is the one of lowest validation CE (its step and metrics under ``best``); ``ce_weight``
    0: a stage 2 on the alignment alone."""
    import torch

    from valr.config import ValrConfig
    from valr.trainer import TrainConfig, train

    vcfg = ValrConfig(k=cfg.k, align_layer=cfg.align_layer, lambda_align=lambda_align,
                      projector_width=cfg.projector_width, teachers=list(teachers or []),
                      train_mode=cfg.train_mode, center_targets=cfg.center_targets, latent_after=cfg.latent_after,
                      latent_feed=(latent_feed or cfg.latent_feed) if stage == 2 else "hidden",
                      aligned_latents=cfg.aligned_latents, image_bottleneck=cfg.image_bottleneck and stage == 2,
                      latent_positions=cfg.latent_positions if stage == 2 else "text",
                      ce_weight=ce_weight,
                      feature_cache=str(out / "features") if teachers else None)
    tcfg = TrainConfig(model=str(model), train_data=str(data), val_data=str(val_data) if val_data else None,
                       output_dir=str(out / "run"), stage=stage, max_steps=steps,
                       per_device_batch_size=batch_size or cfg.batch_size, grad_accum=1, lr_llm=lr,
                       lr_projector=cfg.projector_lr,
                       lr_vision=lr_vision, weight_decay=0.01, warmup_ratio=cfg.warmup_ratio, scheduler="cosine",
                       max_grad_norm=1.0, save_every=save_every or max(50, steps // 4), keep_last=keep_last,
                       log_every=10, eval_every=max(1, steps // BEST_PASSES) if keep_best else 0, keep_best=keep_best,
                       seed=cfg.seed, data_fraction=data_fraction, num_workers=cfg.num_workers, preflight="quick",
                       tensorboard=False, progress=progress, valr=vcfg)
    torch.manual_seed(cfg.seed)
    final = train(tcfg, resume=True)
    summary = _history_summary(out / "run")
    if keep_best:
        best = out / "run" / "best"
        return {"checkpoint": str(best), **summary, "best": json.loads((best / "valr_best.json").read_text())}
    return {"checkpoint": str(final), **summary}


def _history_summary(run_dir: Path) -> dict[str, Any]:
    from valr.trainer import read_log

    rows = read_log(run_dir)
    out: dict[str, Any] = {"steps": len(rows)}
    if rows:
        w = max(1, min(20, len(rows) // 5))
        for key in ("loss", "ce", "align", "latent_norm"):
            vals = [r[key] for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
            if vals and (key in ("loss", "ce") or any(v > 0 for v in vals)):  # stage 1 logs zeros there
                out[f"{key}_first"] = sum(vals[:w]) / len(vals[:w])
                out[f"{key}_last"] = sum(vals[-w:]) / len(vals[-w:])
        out["train_seconds"] = sum(r.get("time_s", 0.0) for r in rows)
        out["curve"] = {k: [round(sum(r[k] for r in rows[i:i + w]) / len(rows[i:i + w]), 5)
                            for i in range(0, len(rows), w)]
                        for k in ("ce", "align") if all(k in r for r in rows) and any(r[k] > 0 for r in rows)}
    evals = read_log(run_dir, "eval.jsonl")
    if evals:
        out["val"] = evals[-1]
    return out
