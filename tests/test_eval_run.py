"""`valr eval run`: generation into predictions.jsonl, resume after interruptions, settings checks, scoring."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from valr.cli import main
from valr.eval.run import LINE_FIELDS, RunError, read_jsonl, run_main

from eval_fixtures import write_records_benchmark, write_tiny_checkpoint, write_vsibench

REPO = Path(__file__).resolve().parents[1]
# force policy with K=2 so latent segments really occur; 12 tokens keeps every run well under a second
BASE = ["--benchmark", "records", "--latent-policy", "force", "--k", "2", "--max-new-tokens", "12"]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    model = write_tiny_checkpoint(root / "ck")
    data = write_records_benchmark(root / "bench")
    return model, data, root


def _args(files, out: Path, *extra: str) -> list[str]:
    model, data, _ = files
    return ["--model", str(model), "--data", str(data), "--out", str(out), *BASE, *extra]


@pytest.fixture(scope="module")
def reference(files):
    """An uninterrupted run over all 7 items (batch size 3), the reference for every resumed run."""
    out = files[2] / "reference"
    assert run_main(_args(files, out, "--batch-size", "3")) == 0
    return out / "predictions.jsonl"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_reference_run_outputs(files, reference, capsys):
    lines = _lines(reference)
    assert [o["id"] for o in lines] == [f"q{i}" for i in range(7)]
    assert all(tuple(o) == LINE_FIELDS for o in lines)
    for o in lines:
        assert o["latent_segments"] >= 1 and "<latent>[2 latent positions]</latent>" in o["raw"]
        assert o["generated_positions"] == o["generated_tokens"] + 2 * o["latent_segments"]
        assert isinstance(o["finished"], bool) and isinstance(o["prediction"], str)
    out = reference.parent
    scores = json.loads((out / "scores.json").read_text())
    assert scores["benchmark"] == "records" and scores["n"] == 7 and scores["n_missing"] == 0
    assert "overall" in scores and set(scores["tasks"]) == {"count", "side"}
    length = json.loads((out / "length.json").read_text())
    assert set(length) == {"generated_positions", "generated_tokens"}
    (series,) = length["generated_positions"]["models"].values()
    assert series["n"] == 7
    assert (out / "length_positions.png").stat().st_size > 0 and (out / "length_tokens.png").stat().st_size > 0
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["latent_policy"] == "force" and run["settings"]["k"] == 2
    assert run["info"]["model"] == str(files[0].resolve()) and run["info"]["limit"] is None
    assert len(run["settings"]["model_fingerprint"]) == 16 and len(run["settings"]["items_fingerprint"]) == 16
    assert {"torch", "transformers", "valr"} <= set(run["info"]["versions"])
    assert not list(out.glob("predictions.rank*"))


def test_limit_rerun_and_extend(files, reference, capsys):
    out = files[2] / "limited"
    assert run_main(_args(files, out, "--limit", "3", "--batch-size", "2")) == 0
    first = (out / "predictions.jsonl").read_bytes()
    assert len(first.splitlines()) == 3
    assert "overall" in capsys.readouterr().out  # the table is printed
    # a rerun generates nothing, duplicates nothing and leaves the file as it was
    assert run_main(_args(files, out, "--limit", "3", "--batch-size", "2")) == 0
    assert "3 already done, 0 to generate" in capsys.readouterr().err
    assert (out / "predictions.jsonl").read_bytes() == first
    # a larger limit extends the run; the result equals the uninterrupted run (batch size changed too)
    assert run_main(_args(files, out, "--limit", "5", "--batch-size", "3")) == 0
    assert "3 already done, 2 to generate" in capsys.readouterr().err
    assert (out / "predictions.jsonl").read_bytes().splitlines() == reference.read_bytes().splitlines()[:5]
    assert json.loads((out / "scores.json").read_text())["n"] == 5
    assert json.loads((out / "run.json").read_text())["info"]["limit"] == 5
    # the top-level command line dispatches to the same code
    assert main(["eval", "run", *_args(files, out, "--limit", "5")]) == 0


def test_truncated_last_line_is_repaired(files, reference, capsys):
    out = files[2] / "truncated"
    out.mkdir()
    shutil.copy(reference.parent / "run.json", out / "run.json")
    data = reference.read_bytes()
    lines = data.splitlines(keepends=True)
    (out / "predictions.jsonl").write_bytes(b"".join(lines[:4]) + lines[4][:25])  # crash in the middle of line 5
    assert run_main(_args(files, out, "--batch-size", "2")) == 0
    err = capsys.readouterr().err
    assert "cut short" in err and "4 already done, 3 to generate" in err
    assert (out / "predictions.jsonl").read_bytes() == data
    # zero bytes after a power loss count as a cut last line too
    (out / "predictions.jsonl").write_bytes(b"".join(lines[:6]) + b"\0" * 40 + b"\n")
    assert run_main(_args(files, out)) == 0
    assert (out / "predictions.jsonl").read_bytes() == data


def test_bad_line_in_the_middle_is_an_error(files, reference, capsys):
    out = files[2] / "corrupt"
    out.mkdir()
    shutil.copy(reference.parent / "run.json", out / "run.json")
    lines = reference.read_bytes().splitlines(keepends=True)
    broken = b"".join(lines[:2]) + b"{not json\n" + b"".join(lines[3:5])
    (out / "predictions.jsonl").write_bytes(broken)
    assert run_main(_args(files, out)) == 2
    assert "predictions.jsonl:3" in capsys.readouterr().err
    assert (out / "predictions.jsonl").read_bytes() == broken  # nothing dropped or rewritten


def test_read_jsonl_repair(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"id": "a", "prediction": "1"}\n\n{"id": 2, "prediction": "B"}\n{"id": "c", "pre')
    assert [o["id"] for o in read_jsonl(path, repair=False)] == ["a", 2]
    assert path.read_bytes().endswith(b'"pre')  # read-only: untouched
    assert [o["id"] for o in read_jsonl(path, repair=True)] == ["a", 2]
    assert path.read_bytes() == b'{"id": "a", "prediction": "1"}\n\n{"id": 2, "prediction": "B"}\n'
    path.write_bytes(b'[1, 2]\n{"id": "a"}\n')
    with pytest.raises(RunError, match=r"p.jsonl:1"):
        read_jsonl(path, repair=True)


def test_killed_run_resumes_to_the_same_file(files, reference):
    """A real SIGKILL half-way through writing the second batch, then a rerun."""
    out = files[2] / "killed"
    script = (
        "import os, signal, sys\n"
        "import valr.eval.run as r\n"
        "calls = []\n"
        "def dying_append(path, objs):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 1:\n"
        "        return r.append_lines_orig(path, objs)\n"
        "    data = b''.join(r.dumps_line(o) for o in objs)\n"
        "    with open(path, 'ab') as fh:\n"
        "        fh.write(data[:-20]); fh.flush(); os.fsync(fh.fileno())\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "r.append_lines_orig = r.append_lines\n"
        "r.append_lines = dying_append\n"
        "sys.exit(r.run_main(sys.argv[1:]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, *_args(files, out, "--batch-size", "2")],
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    partial = (out / "predictions.jsonl").read_bytes()
    assert partial.count(b"\n") == 3 and not partial.endswith(b"\n")  # batch 1 and a line written, one cut
    assert not (out / "scores.json").exists()
    assert run_main(_args(files, out, "--batch-size", "2")) == 0
    assert (out / "predictions.jsonl").read_bytes() == reference.read_bytes()


def test_settings_mismatch_refused_then_force_new(files, reference, capsys):
    out = files[2] / "mismatch"
    assert run_main(_args(files, out, "--limit", "2")) == 0
    before = (out / "predictions.jsonl").read_bytes()
    capsys.readouterr()
    model, data, _ = files
    changed = ["--model", str(model), "--data", str(data), "--out", str(out), "--benchmark", "records",
               "--latent-policy", "force", "--k", "3", "--max-new-tokens", "12", "--limit", "2"]
    assert run_main(changed) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "k: was 2, now 3" in err and "--force-new" in err
    assert (out / "predictions.jsonl").read_bytes() == before
    assert run_main([*changed, "--force-new"]) == 0
    assert "moved the previous outputs" in capsys.readouterr().err
    (old,) = out.glob("replaced-*")
    assert (old / "predictions.jsonl").read_bytes() == before
    assert json.loads((out / "run.json").read_text())["settings"]["k"] == 3
    assert "[3 latent positions]" in _lines(out / "predictions.jsonl")[0]["raw"]


def test_moved_checkpoint_resumes_but_changed_items_or_unknown_origin_refused(files, reference, tmp_path, capsys):
    model, data, _ = files
    out = tmp_path / "out"
    assert run_main(_args(files, out, "--limit", "2")) == 0
    moved = shutil.copytree(model, tmp_path / "moved-ck")  # same weights elsewhere: the same run
    args = ["--data", str(data), "--out", str(out), *BASE, "--limit", "4"]
    assert run_main(["--model", str(moved), *args]) == 0
    assert "2 already done, 2 to generate" in capsys.readouterr().err
    assert (out / "predictions.jsonl").read_bytes().splitlines() == reference.read_bytes().splitlines()[:4]
    assert json.loads((out / "run.json").read_text())["info"]["model"] == str(moved.resolve())
    # the same ids with another question: refused
    changed = tmp_path / "bench.jsonl"
    changed.write_text(data.read_text().replace("(3)", "(three)"))
    shutil.copy(data.parent / "a.png", tmp_path)
    shutil.copy(data.parent / "b.png", tmp_path)
    assert run_main(["--model", str(model), "--data", str(changed), "--out", str(out), *BASE]) == 2
    assert "items_fingerprint" in capsys.readouterr().err
    # predictions of unknown origin (no run.json): refused
    (out / "run.json").unlink()
    assert run_main(["--model", str(model), *args]) == 2
    assert "no run.json" in capsys.readouterr().err


def test_batching_does_not_change_greedy_outputs(files, capsys):
    outs = []
    for bs in ("1", "3"):
        out = files[2] / f"off-bs{bs}"
        model, data, _ = files
        assert run_main(["--model", str(model), "--data", str(data), "--out", str(out), "--benchmark", "records",
                         "--latent-policy", "off", "--max-new-tokens", "10", "--batch-size", bs]) == 0
        outs.append((out / "predictions.jsonl").read_bytes())
    assert outs[0] == outs[1]
    lines = [json.loads(x) for x in outs[0].splitlines()]
    assert len(lines) == 7 and all(o["latent_segments"] == 0 and "<latent>" not in o["raw"] for o in lines)
    assert json.loads((files[2] / "off-bs1" / "run.json").read_text())["settings"]["k"] is None


def test_vsibench_parquet_with_videos(files, tmp_path, capsys):
    data = write_vsibench(tmp_path / "vsi")
    out = tmp_path / "out"
    args = ["--model", str(files[0]), "--benchmark", "vsibench", "--data", str(data), "--out", str(out),
            "--num-frames", "4", "--max-new-tokens", "8", "--latent-policy", "force", "--batch-size", "2"]
    assert run_main(args) == 0
    lines = _lines(out / "predictions.jsonl")
    assert [o["id"] for o in lines] == ["0", "1", "2"]
    scores = json.loads((out / "scores.json").read_text())
    assert scores["benchmark"] == "vsibench" and "overall" in scores and scores["n"] == 3
    assert set(scores["tasks"]) == {"object_counting", "object_rel_direction", "room_size_estimation"}
    assert json.loads((out / "run.json").read_text())["settings"]["loader_options"]["num_frames"] == 4
    capsys.readouterr()
    assert run_main([*args, "--num-frames", "8"]) == 2  # another frame count: refused
    assert "num_frames" in capsys.readouterr().err


def test_bad_options(files, tmp_path, capsys):
    assert run_main(_args(files, tmp_path / "o", "--limit", "0")) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err
    assert run_main(["--model", str(tmp_path), "--benchmark", "records", "--data", str(files[1]),
                     "--out", str(tmp_path / "o")]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert run_main(_args(files, tmp_path / "o", "--num-frames", "4")) == 2  # records takes no frames
    assert "num_frames" in capsys.readouterr().err


def test_two_processes_with_resume_per_shard(files, reference):
    """`accelerate launch` with 2 CPU processes (gloo): shards are disjoint, rank files (one of them left cut by an
    earlier crash) are resumed and merged; the result equals the single-process run byte for byte."""
    out = files[2] / "two"
    out.mkdir()
    shutil.copy(reference.parent / "run.json", out / "run.json")
    lines = reference.read_bytes().splitlines(keepends=True)
    (out / "predictions.rank1.jsonl").write_bytes(lines[1] + lines[4] + lines[5][:30])
    (out / "predictions.jsonl").write_bytes(lines[0])
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.is_file():
        pytest.skip("accelerate launcher not installed next to the interpreter")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "valr.cli", "eval", "run", *_args(files, out, "--batch-size", "2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=REPO, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 already done, 4 to generate on 2 processes" in proc.stderr
    assert "[rank 1/2]" in proc.stderr and "cut short" in proc.stderr
    assert (out / "predictions.jsonl").read_bytes() == reference.read_bytes()
    assert not list(out.glob("predictions.rank*"))
    assert json.loads((out / "run.json").read_text())["info"]["num_processes"] == 2


def test_force_policy_refused_for_a_checkpoint_with_latents_after_step_heads(files, tmp_path, capsys):
    model, data, _ = files
    ck = tmp_path / "ck"
    shutil.copytree(model, ck)
    cfg_file = ck / "valr_config.json"
    meta = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    meta.setdefault("valr", {})["latent_after"] = r"View \d+"
    cfg_file.write_text(json.dumps(meta))
    args = ["--model", str(ck), "--data", str(data), "--out", str(tmp_path / "o"), *BASE]
    assert run_main(args) == 2
    assert "--latent-policy model" in capsys.readouterr().err
    assert not (tmp_path / "o" / "predictions.jsonl").exists()
