"""Shared fixtures: a tiny random Qwen2.5-VL, images of several sizes, and records using them."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models run fastest on one thread; two threads on a busy 2-core machine spin-wait on each other. The resume
# tests also rely on it: their killed runs are subprocesses with OMP_NUM_THREADS=1, so the arithmetic matches.
torch.set_num_threads(1)


@pytest.fixture
def tiny():
    """(model, tokenizer, image_processor, backbone, latent ids) on a fresh random tiny model."""
    from valr.backbones import backbone_for
    from valr.tiny import build_tiny
    from valr.tokens import LatentTokenIds

    model, tok, ip = build_tiny(seed=0)
    return model, tok, ip, backbone_for(model, image_processor=ip), LatentTokenIds.from_tokenizer(tok)


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    """Random-noise PNGs of different sizes (so samples get different visual-token counts)."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, (w, h) in {"a": (112, 112), "b": (56, 84), "c": (84, 56), "d": (56, 56)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"{name}.png")
    return d


@pytest.fixture(scope="session")
def records(image_dir):
    """Three records that differ in images, number of steps, step lengths and targets."""
    from valr.data import parse_record

    raw = [
        {"id": "one", "images": ["a.png"], "question": "What is left of the cube?",
         "steps": ["Look at the left side.", "The ball is there."], "answer": "B"},
        {"id": "two", "images": ["b.png", "c.png"], "question": "Count the objects in both views.",
         "steps": [{"text": "View 1 has two objects.", "target": 0},
                   {"text": "View 2 has one more object in the corner.", "target": 1},
                   {"text": "So three in total.", "target": None}], "answer": "3"},
        {"id": "three", "images": ["d.png"], "question": "Is it red?",
         "steps": [{"text": "Yes.", "target": 0}], "answer": "A"},
    ]
    return [parse_record(r, root=image_dir) for r in raw]
