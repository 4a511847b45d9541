"""Shared fixtures: offline environment, tiny real models built locally."""

from __future__ import annotations

import os
from pathlib import Path

# No hub in tests, ever: everything is built locally.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["DO_NOT_TRACK"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from stages.lib import models, training  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with `teacher/` and `student/`: tiny random Llamas with the toy tokenizer."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("tiny_models")
    tok = models.build_char_tokenizer()
    for role, seed, width in (("teacher", 0, 32), ("student", 1, 16)):
        arch = models.ToyArch(hidden_size=width, num_layers=1, num_heads=2, intermediate_size=2 * width)
        model = models.build_toy_model(arch, len(tok), tok, seed=seed, max_positions=64)
        training.save_model(model, tok, root / role)
    return root
