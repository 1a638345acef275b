"""Shared test helpers: where the golden fixtures live, and tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# The fixtures sit in ../shared beside the checkout (CI clones main there too);
# DITQ_SHARED overrides for other layouts.
SHARED = Path(os.environ.get("DITQ_SHARED", REPO_ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"


def load_fixture(name: str) -> dict:
    """Load a golden fixture, or skip the test when ../shared is absent."""
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"golden fixture {path} not present")
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="session")
def dit_ref() -> dict:
    return load_fixture("dit_ref_tiny.pt")


@pytest.fixture(scope="session")
def ref_model(dit_ref):
    """The fixture's tiny DiT, loaded strictly from the original's state dict."""
    from ditq.models import DiT, DiTConfig

    model = DiT(DiTConfig(**dit_ref["config"]))
    model.load_state_dict(dit_ref["state_dict"], strict=True)
    return model.eval()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
