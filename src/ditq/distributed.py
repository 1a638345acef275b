"""Multi-process runs: process groups from ``torchrun``, DDP and FSDP2 wrapping, rank 0 writes.

Training and sampling both use it, so it sits outside :mod:`ditq.train`. The same
``ditq train`` (or ``ditq sample``) command runs alone or under ``torchrun --nproc_per_node=K``.
:func:`init_distributed` reads the environment torchrun sets (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and, only when
``WORLD_SIZE > 1``, starts the default process group: NCCL on CUDA (each
process on ``cuda:LOCAL_RANK``), gloo on CPU. Everything else asks
:func:`get_rank` / :func:`get_world_size` instead of ``torch.distributed``, so
one process is simply rank 0 of 1.

Two ways to spread a model (``distributed.strategy`` in the run config):

- ``ddp``: every process holds the whole model; gradients are averaged by
  :class:`~torch.nn.parallel.DistributedDataParallel` in backward.
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on each
  transformer block (``model.blocks`` or ``model.layers``) and on the root, so each process holds
  ``1/K`` of the parameters, gradients and optimizer state. Checkpoints
  gather a full (unsharded, CPU) state dict first, so they are the same files
  DDP and single-process runs write, and any of them resumes any other.

Only rank 0 logs and writes; the others wait for it at :func:`agree`, which
is a barrier that also carries whether rank 0 succeeded, so a failed write
stops every process instead of leaving the others waiting until a timeout.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch import nn

from ditq.errors import DitqError, InvalidArgumentError, RunLockedError

STRATEGIES = ("ddp", "fsdp")
BACKENDS = ("auto", "gloo", "nccl")


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


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise InvalidArgumentError(
            f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}"
        ) from None


@dataclass
class DistContext:
    """Where this process stands: rank, world size, its device; :meth:`close` ends what it started."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None when not distributed
    started_here: bool = False  # this context created the process group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self.started_here and _initialized():
            torch.distributed.destroy_process_group()
        self.started_here = False


def init_distributed(device: torch.device | str, backend: str = "auto", timeout_s: int = 1800) -> DistContext:
    """Start the default process group when launched by ``torchrun`` with ``WORLD_SIZE > 1``.

    ``device`` is the device asked for (already resolved from ``"auto"``). On
    CUDA with several processes, each uses ``cuda:LOCAL_RANK`` whatever index
    was asked for. An already initialized group is used as it is (and left
    open by :meth:`DistContext.close`).
    """
    device = torch.device(device)
    if backend not in BACKENDS:
        raise InvalidArgumentError(
            f"distributed backend must be one of {', '.join(BACKENDS)}, got {backend!r}"
        )
    if _initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        if device.type == "cuda" and world > 1:
            device = torch.device("cuda", local)
        return DistContext(rank, world, local, device, torch.distributed.get_backend(), started_here=False)
    world = env_world_size()
    if world <= 1:
        return DistContext(device=device)
    if not torch.distributed.is_available():
        raise DitqError(
            "this PyTorch build has no torch.distributed; run a single process (without torchrun)"
        )
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DitqError(
            f"WORLD_SIZE is {world} but {', '.join(missing)} is not set; launch with torchrun "
            "(torchrun --nproc_per_node=K -m ditq.cli.main train ...)"
        )
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise InvalidArgumentError("the nccl backend needs CUDA devices; use --device cuda or backend gloo")
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise DitqError(
                f"local rank {local} has no GPU (this machine has {torch.cuda.device_count()}); "
                "start at most as many processes per node as there are GPUs"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    torch.distributed.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return DistContext(rank, world, local, device, backend, started_here=True)


#################################################################################
#                          Collectives used by the loop                         #
#################################################################################


def agree(ok: bool, device: torch.device | str = "cpu") -> bool:
    """A barrier that returns whether every process passed ``ok=True`` (always ``ok`` alone)."""
    if get_world_size() == 1:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=_comm_device(device))
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag) == 0


@contextmanager
def held_by_rank0(lock, ctx: DistContext):
    """``lock`` (a :class:`~ditq.runlock.RunLock`) held by rank 0 for the block; every rank raises if it
    could not be taken, so no rank starts work (or waits in a collective) on a run another process holds."""
    error = None
    if ctx.is_main:
        try:
            lock.acquire()
        except DitqError as e:
            error = e
    if not agree(error is None, ctx.device):
        raise error or RunLockedError(f"rank 0 could not lock the {lock.what} {lock.subject} (see its error)")
    try:
        yield lock
    finally:
        lock.release()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over processes (``x`` itself alone)."""
    if get_world_size() == 1:
        return x
    x = x.clone()
    torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM)
    return x / get_world_size()


def all_reduce_min(x: torch.Tensor) -> torch.Tensor:
    if get_world_size() == 1:
        return x
    x = x.clone()
    torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MIN)
    return x


def all_gather_objects(obj) -> list:
    """``obj`` of every process, in rank order (``[obj]`` alone)."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_module_(module: nn.Module, src: int = 0) -> None:
    """Make every process's parameters and buffers those of rank ``src`` (before sharding)."""
    if get_world_size() == 1:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            torch.distributed.broadcast(t.data, src)


def _comm_device(device) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo CPU ones.
    backend = torch.distributed.get_backend() if _initialized() else None
    return torch.device(device) if backend == "nccl" else torch.device("cpu")


#################################################################################
#                              DDP and FSDP2 wrapping                           #
#################################################################################


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel (rank 0's weights are broadcast to all on wrapping)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def shard_fsdp(modules: list[nn.Module], device: torch.device) -> None:
    """FSDP2 ``fully_shard`` on each block (DiT ``blocks``, Large-DiT ``layers``) and on the root, in place.

    Several modules (the model and its EMA) are sharded the same way over one
    device mesh, so their shards line up parameter for parameter.
    """
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:  # torch < 2.6 keeps FSDP2 under _composable
        raise DitqError(
            f"FSDP2 (torch.distributed.fsdp.fully_shard) is not in this PyTorch ({torch.__version__}: {e}); "
            "upgrade PyTorch or use distributed.strategy: ddp"
        ) from None
    mesh = init_device_mesh(device.type, (get_world_size(),))
    for module in modules:
        blocks = getattr(module, "blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            blocks = getattr(module, "layers", None)  # Large-DiT / TerDiT
        if isinstance(blocks, nn.ModuleList):
            for block in blocks:
                fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)


def full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def fsdp_model_state(module: nn.Module) -> dict:
    """The full, unsharded CPU state dict of an FSDP2 module on rank 0 (empty elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=full_options())


def fsdp_optim_state(module: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The full optimizer state (keyed by parameter names) on rank 0 (empty elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, opt, options=full_options())


def fsdp_load(module: nn.Module, state: dict, opt=None, opt_state: dict | None = None) -> None:
    """Load full (unsharded) state dicts, read by every process, into an FSDP2 module and optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, state, options=options)
    if opt is not None and opt_state is not None:
        set_optimizer_state_dict(module, opt, opt_state, options=options)


def meta_copy(model: nn.Module) -> nn.Module:
    """A weightless copy of ``model`` (to rebuild an unsharded module from a full state dict later)."""
    non_persistent = any(
        name in m._non_persistent_buffers_set for m in model.modules() for name in m._buffers
    )
    # Non-persistent buffers are not in a state dict: keep them by keeping a real copy.
    return copy.deepcopy(model).cpu() if non_persistent else copy.deepcopy(model).to("meta")


def unsharded(template: nn.Module, state: dict) -> nn.Module:
    """``template`` (from :func:`meta_copy`) holding the full ``state`` on CPU."""
    if any(p.is_meta for p in template.parameters()):
        template = template.to_empty(device="cpu")
    template.load_state_dict(state)
    return template


__all__ = [
    "BACKENDS",
    "STRATEGIES",
    "DistContext",
    "agree",
    "all_gather_objects",
    "all_reduce_mean",
    "broadcast_module_",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
    "shard_fsdp",
    "wrap_ddp",
]
