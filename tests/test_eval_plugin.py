"""The lmms-eval model (valr.eval.lmms_plugin): its behaviour without lmms-eval, and the registration with it.

The lmms-eval tests are skipped when lmms_eval is not importable (it is an optional dependency, not installed in
the project's environment); docs/evaluation.md says how they were run in a separate environment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from valr.eval.lmms_plugin import ValrGeneration, apply_until

from eval_fixtures import write_records_benchmark, write_tiny_checkpoint

HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None
needs_lmms = pytest.mark.skipif(not HAS_LMMS, reason="lmms-eval is not installed (optional dependency)")
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    model = write_tiny_checkpoint(root / "ck")
    bench = write_records_benchmark(root / "bench")
    return model, bench.parent, root


@dataclass
class Req:  # what lmms-eval's Instance offers the model
    args: tuple


def _requests(images: Path, gen_kwargs: list[dict[str, Any]]):
    docs = [{"image": str(images / ("a.png" if i % 2 else "b.png")), "q": f"<image>How many cubes? ({i})"}
            for i in range(len(gen_kwargs))]
    task_dict = {"smoke": {"test": docs}}
    to_visual = lambda doc: [Image.open(doc["image"]).convert("RGB")]  # noqa: E731
    reqs = [Req((d["q"], kw, to_visual, i, "smoke", "test")) for i, (d, kw) in enumerate(zip(docs, gen_kwargs,
                                                                                             strict=True))]
    return reqs, task_dict, docs


def test_module_imports_without_lmms_eval():
    import valr.eval.lmms_plugin as plugin

    assert plugin.MODEL_NAME == "valr" and plugin.CLASS_PATH == "valr.eval.lmms_plugin.ValrLMM"
    if not HAS_LMMS:
        with pytest.raises(ImportError, match="pip install lmms-eval"):
            plugin.ValrLMM  # noqa: B018


def test_apply_until():
    assert apply_until("step one\n\nAnswer: B</s>tail", ["\n\n", "</s>"]) == "step one\n\nAnswer: B"
    assert apply_until("B. right", ".") == "B"
    assert apply_until("abc", None) == "abc" and apply_until("abc", ["", "\n\n"]) == "abc"


def test_generate_until_matches_generator(files):
    from valr.generate import GenerationConfig, Prompt

    model, images, _ = files
    gen_kwargs = [{"max_new_tokens": 6}] * 3 + [{"max_new_tokens": 6, "until": ["\n\n", "e"]}] * 2
    reqs, task_dict, docs = _requests(images, gen_kwargs)
    lm = ValrGeneration()
    lm.task_dict = task_dict
    lm._setup(str(model), latent_policy="force", k="2", batch_size="2", output="raw")
    texts = lm.generate_until(reqs)
    assert len(texts) == 5 and lm.rank == 0 and lm.world_size == 1 and lm.batch_size == 2
    cfg = GenerationConfig(max_new_tokens=6, latent_policy="force", k=2)
    for i, (doc, text) in enumerate(zip(docs, texts, strict=True)):
        (alone,) = lm.generator([Prompt(doc["q"].replace("<image>", ""), [Image.open(doc["image"]).convert("RGB")])],
                                cfg)
        assert lm.last_results[i].token_ids == alone.token_ids  # batching changes nothing
        assert text == (alone.text if i < 3 else alone.text.split("e")[0])
        assert "<latent>[2 latent positions]</latent>" in alone.text
    # the default output drops the latent markup; a model_args budget overrides the task's
    lm._setup(str(model), latent_policy="force", k=2, max_new_tokens=4)
    lm.task_dict = task_dict
    texts = lm.generate_until(reqs[:2])
    assert all(len(r.token_ids) <= 4 for r in lm.last_results)
    assert texts == [r.answer_text for r in lm.last_results] and all("<latent>" not in t for t in texts)
    with pytest.raises(NotImplementedError, match="generate_until"):
        lm.loglikelihood(reqs)
    with pytest.raises(ValueError, match="latent_policy"):
        lm._setup(str(model), latent_policy="sometimes")


@needs_lmms
def test_registered_in_lmms_eval(files):
    from lmms_eval.api.model import lmms
    from lmms_eval.models import get_model

    import valr.eval.lmms_plugin as plugin

    plugin.register()
    cls = get_model("valr")
    assert cls is plugin.ValrLMM and issubclass(cls, lmms) and cls.is_simple
    model, images, _ = files
    lm = cls.create_from_arg_string(f"pretrained={model},latent_policy=off,max_new_tokens=5", {"batch_size": 2})
    reqs, task_dict, _ = _requests(images, [{"until": ["\n\n"]}] * 3)
    lm.task_dict = task_dict
    out = lm.generate_until(reqs)
    assert [o.text for o in out] == [r.answer_text for r in lm.last_results]
    assert [o.token_counts.output_tokens for o in out] == [len(r.token_ids) for r in lm.last_results]


@needs_lmms
def test_entry_point_manifest(tmp_path, monkeypatch):
    """An installed package declaring the entry point makes `lmms-eval --model valr` resolve (no fork)."""
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    dist = tmp_path / "valr_lmms_ep-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: valr-lmms-ep\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[lmms_eval.models]\nvalr = valr.eval.lmms_plugin:manifest\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = ModelRegistryV2()
    registry.load_entrypoint_manifests()
    assert registry.resolve("valr").class_path == "valr.eval.lmms_plugin.ValrLMM"


TASK_YAML = """task: valr_smoke
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 16
  until: ["\\n\\n"]
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
TASK_UTILS = """from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
"""


@needs_lmms
def test_lmms_eval_end_to_end(files, tmp_path):
    """`python -m valr.eval.lmms_plugin` runs lmms-eval's own CLI on a local task (no network)."""
    model, images, _ = files
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"image": str(images / "a.png"), "question": f"Count ({i})",
                                        "answer": "B"}) + "\n" for i in range(3)))
    task = tmp_path / "task"
    task.mkdir()
    (task / "valr_smoke.yaml").write_text(TASK_YAML.format(docs=docs))
    (task / "utils.py").write_text(TASK_UTILS)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "valr.eval.lmms_plugin", "--model", "valr", "--model_args",
           f"pretrained={model},latent_policy=force,k=2,max_new_tokens=6", "--tasks", "valr_smoke",
           "--include_path", str(task), "--batch_size", "2", "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (samples,) = out.glob("*/*_samples_valr_smoke.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert sorted(r["doc_id"] for r in rows) == [0, 1, 2]
    assert all("<latent>" not in r["filtered_resps"] for r in rows)
