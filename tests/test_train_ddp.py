"""Two processes on CPU (gloo) through `accelerate launch`: DDP trains like one process with the same global batch,
and resuming a 2-process run from its checkpoint reproduces its final weights bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from valr.data.smoke import write_smoke_setup
from valr.tiny import TinyShape
from valr.trainer import load_train_config, train

SMALL = TinyShape(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64, vision_depth=1, vision_hidden=16,
                  vision_heads=1)
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: Path, *overrides: str, resume: bool = False) -> None:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/ddp.yaml"), "--num_processes", "2", "--main_process_port",
           str(_free_port()), "-m", "valr.cli", "train", "--config", str(config), *overrides]
    if resume:
        cmd.append("--resume")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-4000:]


def _weights(final: Path) -> dict[str, torch.Tensor]:
    w = load_file(str(final / "model.safetensors"))
    w.update({f"proj.{k}": v for k, v in load_file(str(final / "projectors.safetensors")).items()})
    return w


def test_two_process_ddp_matches_one_process_and_resumes_exactly(tmp_path):
    smoke = write_smoke_setup(tmp_path / "smoke", n_train=8, n_val=4, shape=SMALL)
    cfg = dict(model=str(smoke["model"]), train_data=str(smoke["train"]), val_data=str(smoke["val"]),
               output_dir=str(tmp_path / "ddp"), stage=2, max_steps=4, per_device_batch_size=2, grad_accum=1,
               lr_llm=1e-3, lr_projector=1e-3, warmup_ratio=0.0, save_every=2, keep_last=3, num_workers=1,
               progress=False, valr={"k": 1, "align_layer": 1, "projector_width": 16, "teachers": [
                   {"name": "dino", "path": str(smoke["teacher"]), "image_size": 56}]})
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(cfg))
    _launch(config)
    ddp = tmp_path / "ddp"
    assert (ddp / "final" / "model.safetensors").is_file()
    assert {p.name for p in (ddp / "checkpoints" / "step-00000002").iterdir()} >= {"rng-rank0.pt", "rng-rank1.pt"}
    state = json.loads((ddp / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["global_batch"] == 4

    # one process, same global batch (2 x grad_accum 2): same micro-batches, same mean gradient up to rounding
    single = train(load_train_config(config, [f"output_dir={tmp_path / 'single'}", "grad_accum=2",
                                              "num_workers=0"]))
    h_ddp = [json.loads(x) for x in (ddp / "history.jsonl").read_text().splitlines()]
    h_one = [json.loads(x) for x in (tmp_path / "single" / "history.jsonl").read_text().splitlines()]
    assert h_ddp[0]["tokens"] == h_one[0]["tokens"]  # both processes' tokens are counted
    assert abs(h_ddp[0]["loss"] - h_one[0]["loss"]) < 1e-5  # same weights, same data: the mean over both ranks
    a, b = _weights(ddp / "final"), _weights(single)
    start = load_file(str(smoke["model"] / "model.safetensors"))
    for k in start:
        moved = (a[k] - start[k]).abs().max()
        assert (a[k] - b[k]).abs().max() <= 0.05 * moved + 1e-6, k  # gradients were averaged across ranks
    ev = [json.loads(x) for x in (ddp / "eval.jsonl").read_text().splitlines()]
    assert len(ev) == 1 and ev[0]["val/ce"] > 0

    # resume the 2-process run from its step-2 checkpoint: identical final weights
    again = tmp_path / "again"
    shutil.copytree(ddp, again, ignore=shutil.ignore_patterns("final", "step-00000004", "tb"))
    _launch(config, f"output_dir={again}", resume=True)
    c = _weights(again / "final")
    assert all(torch.equal(a[k], c[k]) for k in a)
