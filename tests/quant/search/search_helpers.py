"""Shared by the tests of ditq.quant.search: a tiny five-linear model, its inputs, a fitness, traces."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ditq.quant import QDiTConfig

GROUPS = (32, 64, 128, 256, 0)
CFG = QDiTConfig(w_bits=4, a_bits=4, preset=None)
SMALL = dict(groups=GROUPS, population=10, generations=3, top_k=4, mutations=4, crossovers=4)
LAYERS = ("l0", "l1", "l2", "l3", "l4")


class Tiny(nn.Module):
    """Five linears; l2 has 128 inputs (group 256 does not fit), the others 256."""

    def __init__(self):
        super().__init__()
        self.l0, self.l1, self.l2 = nn.Linear(256, 256), nn.Linear(256, 128), nn.Linear(128, 256)
        self.l3, self.l4 = nn.Linear(256, 256), nn.Linear(256, 64)

    def forward(self, x):
        for layer in (self.l0, self.l1, self.l2, self.l3):
            x = F.gelu(layer(x))  # [B, C]
        return self.l4(x)  # [B, 64]


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().eval()


def sample_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 256, generator=g) * torch.linspace(0.1, 3.0, 256)  # uneven channel ranges


def output_error(model: nn.Module, calls: list | None = None):
    """Relative output error vs the float model; the reference is computed once, here."""
    x = sample_inputs()
    with torch.no_grad():
        ref = model(x)

    def fitness(m):
        if calls is not None:
            calls.append(1)
        return float((m(x) - ref).pow(2).mean() / ref.pow(2).mean())

    return fitness


def trace(result):
    """Everything deterministic about a result (not the seconds)."""
    return (
        [(c.genome, c.fitness, c.proxy, c.generation) for c in result.evaluated],
        [c for c in result.best],
        [{k: v for k, v in h.items() if k != "seconds"} for h in result.history],
    )


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg
