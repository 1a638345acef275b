"""Where this process stands in a (possibly) distributed run: rank, world size, main process.

Training code asks these instead of ``torch.distributed`` directly, so the
same loop runs alone (rank 0 of 1) and under ``torchrun``: only the main
process writes logs and checkpoints, and each rank reads its own share of
every global batch (:class:`ditq.train.sampler.ResumableSampler`).
Setting up process groups (DDP, FSDP2) is not done here yet.
"""

from __future__ import annotations

import torch


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_rank() -> int:
    """This process's rank in the default process group; 0 when not distributed."""
    return torch.distributed.get_rank() if _initialized() else 0


def get_world_size() -> int:
    """Number of processes in the default process group; 1 when not distributed."""
    return torch.distributed.get_world_size() if _initialized() else 1


def is_main_process() -> bool:
    """Whether this process logs and writes files (rank 0)."""
    return get_rank() == 0
