"""`valr eval run` passes the reasoning budget through, records it in the run's settings only when set."""

from __future__ import annotations

import json

import pytest

from valr.eval.run import run_main

from eval_fixtures import write_records_benchmark, write_tiny_checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalbudget")
    return write_tiny_checkpoint(root / "ck"), write_records_benchmark(root / "bench", n=3)


def _args(files, out, *extra):
    model, data = files
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--benchmark", "records",
            "--latent-policy", "force", "--k", "2", "--max-new-tokens", "12", "--no-score", *extra]


def test_budget_flags_reach_generation_and_settings(files, tmp_path, monkeypatch):
    from valr.generate import Generator

    seen = []
    original = Generator.__call__

    def spy(self, prompts, cfg):
        seen.append((cfg.min_steps, cfg.max_steps, cfg.answer_prefix))
        return original(self, prompts, cfg)

    monkeypatch.setattr(Generator, "__call__", spy)
    out = tmp_path / "budget"
    assert run_main(_args(files, out, "--min-steps", "1", "--max-steps", "2", "--answer-prefix", "Final: ")) == 0
    assert seen and all(s == (1, 2, "Final: ") for s in seen)
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert (settings["min_steps"], settings["max_steps"], settings["answer_prefix"]) == (1, 2, "Final: ")
    # another budget into the same OUT is another run: refused
    assert run_main(_args(files, out, "--max-steps", "3")) == 2


def test_no_budget_keeps_the_settings_as_before(files, tmp_path):
    out = tmp_path / "plain"
    assert run_main(_args(files, out)) == 0
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert not {"min_steps", "max_steps", "answer_prefix"} & set(settings)


def test_bad_budget_is_a_usage_error(files, tmp_path, capsys):
    assert run_main(_args(files, tmp_path / "bad", "--min-steps", "3", "--max-steps", "1")) == 2
    assert "--min-steps" in capsys.readouterr().err
