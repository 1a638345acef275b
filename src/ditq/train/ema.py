"""Exponential moving average of model weights (the weights to sample from)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` to hold the average."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema.eval()


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float = 0.9999) -> None:
    """ema <- decay * ema + (1 - decay) * model, for every parameter (buffers are copied)."""
    ema_params = dict(ema.named_parameters())
    pairs = [(ema_params[name], p.detach()) for name, p in model.named_parameters() if p.requires_grad]
    if pairs:
        targets, sources = zip(*pairs, strict=True)
        # One fused kernel per op over all tensors: a per-parameter loop is launch-bound on GPU.
        torch._foreach_lerp_(list(targets), list(sources), 1 - decay)
    ema_buffers = dict(ema.named_buffers())
    for name, buf in model.named_buffers():
        ema_buffers[name].copy_(buf)
