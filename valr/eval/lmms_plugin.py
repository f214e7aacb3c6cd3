"""valr checkpoints as an lmms-eval model, registered from outside lmms-eval (no fork). lmms-eval is optional.

Model name ``valr``; ``--model_args`` (comma-separated ``key=value``):

* ``pretrained`` (required): checkpoint directory;
* ``latent_policy``: ``model`` (default), ``force`` or ``off``; ``k``: latent positions per segment (default: the
  checkpoint's K);
* ``max_new_tokens``: generated-token budget. When given it overrides the task's ``max_new_tokens`` (tasks
  written for direct answering ask for 16 or so, far too few for a reasoning chain); otherwise the task's value
  is used, else 512;
* ``batch_size`` (default 1), ``num_frames`` (frames sampled from a video visual, default 32, the rule of
  ``valr.eval.video``), ``dtype`` (``auto``: float32 on CPU, bfloat16 on GPU), ``device`` (``auto``/``cpu``/
  ``cuda``), ``system_prompt``;
* ``output``: what is returned to the task: ``answer`` (default; the output with the latent segments removed,
  ``GenerationResult.answer_text``), ``last_line`` (its last non-empty line: the answer line of a step-by-step
  output, for tasks whose scorer reads the first token) or ``raw`` (latent segments shown as markup).

``generate_until``: returns lmms-eval ``GenerationResult``s (text plus token counts: ``output_tokens`` = generated
tokens, ``reasoning_tokens`` = latent positions) where lmms-eval has them, else strings. Requests are batched in
their original order (consecutive requests with the same generation kwargs, up to ``batch_size``) through
``valr.generate.Generator``; greedy unless the task sets ``temperature > 0`` (then sampled with its
``temperature``/``top_p``). The task's ``until`` stop strings cut the returned text at their first occurrence,
except ``"\\n\\n"``, which is ignored (as lmms-eval's own Qwen2.5-VL wrapper does) because it would cut a
reasoning chain; pass ``ignore_until=true`` to ignore them all. Visuals may be PIL images, image file paths or
video file paths (frames sampled uniformly). ``loglikelihood`` and ``generate_until_multi_round`` raise
``NotImplementedError``: a latent-reasoning model is evaluated by what it generates, so use tasks whose
``output_type`` is ``generate_until`` (VSI-Bench, MMStar, BLINK, CV-Bench, MMVP and V* all have such tasks).

Multi-process: under ``torchrun`` (or ``accelerate launch``) each process loads the model on its own device and
lmms-eval shards the requests (it sets ``_rank``/``_world_size``); CPU-only runs use the gloo backend.

Registration, three ways (details in docs/evaluation.md):

1. ``python -m valr.eval.lmms_plugin <lmms-eval arguments>``: registers ``valr`` at run time in lmms-eval's model
   registry (``MODEL_REGISTRY_V2``), then runs lmms-eval's own command line.
2. Entry point (lmms-eval >= 0.7): a package declaring ``[project.entry-points."lmms_eval.models"]``
   ``valr = "valr.eval.lmms_plugin:manifest"`` makes plain ``lmms-eval --model valr`` work.
3. From Python: ``register()`` then ``lmms_eval.evaluator.simple_evaluate(model="valr", ...)``, or pass a
   ``ValrLMM(...)`` instance as ``model``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MODEL_NAME = "valr"
CLASS_PATH = "valr.eval.lmms_plugin.ValrLMM"
DEFAULT_MAX_NEW_TOKENS = 512
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
_OUTPUTS = ("answer", "last_line", "raw")


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "y", "on")
    return bool(value)


def _optional_int(value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    return int(value)


def apply_until(text: str, until: Any) -> str:
    """Cut ``text`` at the first occurrence of each stop string (``"\\n\\n"`` and empty strings ignored)."""
    if until is None:
        return text
    stops = [until] if isinstance(until, str) else list(until)
    for stop in stops:
        if stop and stop != "\n\n":
            text = text.split(stop)[0]
    return text


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


class ValrGeneration:
    """The lmms-eval model's behaviour, without lmms-eval: usable and testable on its own.

    ``generate_until`` takes objects with an ``args`` tuple ``(context, gen_kwargs, doc_to_visual, doc_id, task,
    split)`` (lmms-eval's ``Instance``) and reads documents from ``self.task_dict[task][split][doc_id]``.
    """

    def _setup(self, pretrained: str | Path, latent_policy: str = "model", k: Any = None,
               max_new_tokens: Any = None, batch_size: Any = 1, num_frames: Any = 32, dtype: str = "auto",
               device: str = "auto", system_prompt: str | None = None, output: str = "answer",
               ignore_until: Any = False, **unknown: Any) -> None:
        import torch
        from accelerate import Accelerator

        from valr.checkpoint import load_checkpoint
        from valr.generate import Generator

        if unknown:
            print(f"warning: valr lmms-eval model ignores unknown model_args {sorted(unknown)}", file=sys.stderr)
        if latent_policy not in ("model", "force", "off"):
            raise ValueError(f"latent_policy must be model, force or off, got {latent_policy!r}")
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}")
        cpu = device == "cpu" or not torch.cuda.is_available()
        if device == "cuda" and cpu:
            raise ValueError("device=cuda but no GPU is visible")
        self.accelerator = Accelerator(cpu=cpu)  # lmms-eval gathers through it when several processes run
        self._device = torch.device("cpu") if cpu else self.accelerator.device
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        torch_dtype = {"auto": torch.float32 if cpu else torch.bfloat16, "float32": torch.float32,
                       "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        self.loaded = load_checkpoint(pretrained, device=self._device, dtype=torch_dtype)
        self.generator = Generator(self.loaded.backbone, self.loaded.tokenizer)
        self.latent_policy = latent_policy
        self.k = _optional_int(k) or self.loaded.config.k
        self.max_new_tokens = _optional_int(max_new_tokens)
        self.batch_size_per_process = int(batch_size)
        self.num_frames = int(num_frames)
        self.system_prompt = system_prompt
        self.output = output
        self.ignore_until = _bool(ignore_until)
        self.last_results: list[Any] = []  # GenerationResult of the last generate_until call, request order
        if not hasattr(self, "task_dict"):
            self.task_dict: dict[str, Any] = {}

    # lmms-eval reads these
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_process

    @property
    def device(self) -> Any:
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def _images(self, visuals: Any) -> list[Any]:
        from PIL import Image

        from valr.eval.video import sample_video

        if visuals is None:
            return []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        images: list[Any] = []
        for v in visuals:
            if isinstance(v, Image.Image):
                images.append(v.convert("RGB") if v.mode != "RGB" else v)
            elif isinstance(v, (str, Path)) and str(v).lower().endswith(VIDEO_SUFFIXES):
                images.extend(sample_video(v, self.num_frames))
            elif isinstance(v, (str, Path)):
                with Image.open(v) as im:
                    images.append(im.convert("RGB"))
            else:
                raise ValueError(f"valr lmms-eval model: unsupported visual of type {type(v).__name__} (images, "
                                 "image paths and video paths are supported)")
        return images

    def _config(self, gen_kwargs: dict[str, Any]) -> Any:
        from valr.generate import GenerationConfig

        budget = self.max_new_tokens or _optional_int(gen_kwargs.get("max_new_tokens")) or DEFAULT_MAX_NEW_TOKENS
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        top_p = gen_kwargs.get("top_p")
        return GenerationConfig(
            max_new_tokens=budget, latent_policy=self.latent_policy, k=self.k, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0,
            top_p=float(top_p) if temperature > 0 and top_p is not None else 1.0,
            step_delimiter=self.loaded.config.step_delimiter, system_prompt=self.system_prompt)

    def _text(self, result: Any) -> str:
        if self.output == "raw":
            return result.text
        if self.output == "last_line":
            return _last_line(result.answer_text)
        return result.answer_text

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        from valr.generate import Prompt

        args = [r.args for r in requests]
        out: list[str] = [""] * len(args)
        results: list[Any] = [None] * len(args)
        i = 0
        while i < len(args):
            key = json.dumps(args[i][1], sort_keys=True, default=str)
            j = i
            while j < len(args) and j - i < self.batch_size and \
                    json.dumps(args[j][1], sort_keys=True, default=str) == key:
                j += 1
            prompts = []
            for context, _gen_kwargs, doc_to_visual, doc_id, task, split in args[i:j]:
                visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
                prompts.append(Prompt(context.replace("<image>", "").strip(), self._images(visuals)))
            gen_kwargs = dict(args[i][1] or {})
            batch = self.generator(prompts, self._config(gen_kwargs))
            for n, res in enumerate(batch):
                text = self._text(res)
                if not self.ignore_until:
                    text = apply_until(text, gen_kwargs.get("until"))
                out[i + n], results[i + n] = text, res
                hook = getattr(self, "cache_hook", None)
                if hook is not None:
                    hook.add_partial("generate_until", (args[i + n][0], gen_kwargs), text)
            i = j
        self.last_results = results
        return out

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "the valr model does not score log-likelihoods: a latent-reasoning model is evaluated by what it "
            "generates. Use tasks whose output_type is generate_until (the multiple-choice suites have them).")

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError("the valr model does not support multi-round generation tasks")


def _build_class() -> type:
    try:
        from lmms_eval.api.model import lmms
    except ImportError as e:
        raise ImportError("valr.eval.lmms_plugin.ValrLMM needs lmms-eval (`pip install lmms-eval`); it is an "
                          "optional dependency of valr") from e

    class ValrLMM(ValrGeneration, lmms):
        """A valr checkpoint as an lmms-eval model (model_args in ``valr.eval.lmms_plugin``'s docstring)."""

        is_simple = True

        def __init__(self, pretrained: str, **kwargs: Any) -> None:
            lmms.__init__(self)
            self._setup(pretrained, **kwargs)

        def generate_until(self, requests: Sequence[Any]) -> list[Any]:
            texts = ValrGeneration.generate_until(self, requests)
            try:  # lmms-eval >= 0.7 also takes per-sample token counts
                from lmms_eval.api.instance import GenerationResult, TokenCounts
            except ImportError:
                return texts
            return [GenerationResult(text, TokenCounts(
                input_tokens=len(r.prompt_token_ids), output_tokens=len(r.token_ids),
                reasoning_tokens=r.generated_positions - len(r.token_ids)))
                for text, r in zip(texts, self.last_results, strict=True)]

    ValrLMM.__module__ = __name__
    ValrLMM.__qualname__ = "ValrLMM"
    return ValrLMM


def __getattr__(name: str) -> Any:  # PEP 562: the lmms-eval class is built on first access only
    if name == "ValrLMM":
        cls = _build_class()
        globals()["ValrLMM"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def manifest() -> Any:
    """lmms-eval's ``ModelManifest`` for ``valr``: the payload of an ``lmms_eval.models`` entry point."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def register() -> None:
    """Register ``valr`` in lmms-eval's model registry of this process."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)


def main() -> None:
    """``python -m valr.eval.lmms_plugin <lmms-eval arguments>``: lmms-eval's command line with ``valr`` known."""
    try:
        register()
    except ImportError:
        print("error: lmms-eval is not installed (`pip install lmms-eval`); it is an optional dependency of valr",
              file=sys.stderr)
        raise SystemExit(2) from None
    from lmms_eval.cli.dispatch import main as lmms_main

    lmms_main()


if __name__ == "__main__":
    main()
