"""Shared test helpers: where the golden fixtures live, and tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

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


@pytest.fixture(scope="session")
def qdit_ref() -> dict:
    """Q-DiT quantizer outputs (``qdit_quantizer_ref.pt``)."""
    return load_fixture("qdit_quantizer_ref.pt")


@pytest.fixture(autouse=True)
def _deterministic_single_thread():
    """Seeded, and single-threaded: test tensors are tiny, and on a busy 2-core machine
    torch's intra-op threads wait on each other far longer than the work takes."""
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def terdit_ref() -> dict:
    """TerDiT inference outputs and packed state dict (``terdit_ref_tiny.pt``)."""
    return load_fixture("terdit_ref_tiny.pt")


class FloatAllocations(TorchDispatchMode):
    """Records the shape of every floating-point tensor any op produces off the meta device
    (``with spy: ...``, then ``spy.shapes``): proof that loading never built a float weight."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
                self.shapes.append(tuple(t.shape))
        return out


@pytest.fixture
def float_allocations() -> FloatAllocations:
    """A fresh :class:`FloatAllocations` spy."""
    return FloatAllocations()


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory) -> Path:
    """A tiny float DiT to distill from, every weight random (adaLN-Zero would make it output zeros)."""
    import ditq
    from ditq import models

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
