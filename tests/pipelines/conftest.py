"""Shared by the tests of ditq.pipelines: a tiny random float DiT to distill from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ditq
from ditq import models


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory) -> Path:
    """A tiny float DiT with every weight random (adaLN-Zero would make it output zeros)."""
    torch.manual_seed(3)
    model = models.create_model(
        "DiT-S/4", input_size=8, depth=1, hidden_size=32, num_heads=2, in_channels=1, num_classes=4
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    ditq.save(model, path)
    return path
