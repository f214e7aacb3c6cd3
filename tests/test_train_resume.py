"""A run killed with SIGKILL after a checkpoint and resumed with --resume ends with weights identical to an
uninterrupted run of the same steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from valr.data.smoke import write_smoke_setup
from valr.tiny import TinyShape
from valr.trainer import latest_checkpoint, load_train_config, train

SMALL = TinyShape(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64, vision_depth=1, vision_hidden=16,
                  vision_heads=1)
ROOT = Path(__file__).resolve().parents[1]


def _weights(final: Path) -> dict[str, torch.Tensor]:
    w = load_file(str(final / "model.safetensors"))
    w.update({f"proj.{k}": v for k, v in load_file(str(final / "projectors.safetensors")).items()})
    return w


def _config(tmp_path: Path, smoke) -> Path:
    cfg = dict(model=str(smoke["model"]), train_data=str(smoke["train"]), output_dir=str(tmp_path / "unset"),
               stage=2, max_steps=6, per_device_batch_size=2, grad_accum=2, lr_llm=2e-3, lr_projector=2e-3,
               warmup_ratio=0.2, save_every=2, keep_last=2, num_workers=0, progress=False, seed=3,
               valr={"k": 1, "align_layer": 1, "projector_width": 16, "feature_cache": str(tmp_path / "features"),
                     "teachers": [{"name": "dino", "path": str(smoke["teacher"]), "image_size": 56}]})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sigkill_after_checkpoint_then_resume_is_bit_exact(tmp_path):
    smoke = write_smoke_setup(tmp_path / "smoke", n_train=8, n_val=0, shape=SMALL)
    config = _config(tmp_path, smoke)
    # the interrupted run: a separate process, slowed down so the kill lands between checkpoint 4 and the end
    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", VALR_TRAIN_STEP_DELAY="0.7", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "valr.cli", "train", "--config", str(config),
                             f"output_dir={killed}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "checkpoints" / "step-00000004").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final").exists()
    assert latest_checkpoint(killed).name == "step-00000004"
    # keep_last=2 kept checkpoints 2 and 4; each holds everything resume needs
    kept = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert kept == ["step-00000002", "step-00000004"]
    files = {p.name for p in (killed / "checkpoints" / "step-00000004").iterdir()}
    assert {"model", "optimizer.pt", "scheduler.pt", "rng-rank0.pt", "trainer_state.json"} <= files
    state = json.loads((killed / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["step_in_epoch"], state["data_order_seed"]) == (4, 2, 0, 3)

    # resumed in this process; the reference runs uninterrupted in this process too
    resumed = train(load_train_config(config, [f"output_dir={killed}"]), resume=True)
    reference = train(load_train_config(config, [f"output_dir={tmp_path / 'reference'}"]))
    a, b = _weights(reference), _weights(resumed)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    start = load_file(str(smoke["model"] / "model.safetensors"))
    assert any(not torch.equal(start[k], a[k]) for k in start)
    rows = [json.loads(x)["step"] for x in (killed / "history.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 5, 6]  # the killed run's tail after the checkpoint was redone, not duplicated
