"""Stopping a long run cleanly when the machine is taken away: SIGTERM, SIGINT and SIGUSR1.

Preemptible clouds and SLURM send SIGTERM (SLURM: SIGUSR1 with ``--signal``)
some time before they kill. Inside ``with StopSignals() as stop:`` the first of
those signals only sets a flag; the run checks :meth:`StopSignals.should_stop`
at its step, shard or generation boundary, saves what it has, says one line
and exits with :data:`~ditq.errors.EXIT_STOPPED` (75). A second signal exits at
once, as the signal would have without ditq (143 for SIGTERM, 130 for SIGINT).

Under ``torchrun`` a signal reaches one process or several, not always all:
:meth:`~StopSignals.should_stop` takes a collective OR over the ranks, so every
rank stops at the same step and none waits in a collective for a rank that left.
"""

from __future__ import annotations

import os
import signal
import threading

import torch

SIGNALS = tuple(s for s in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, s))
"""The signals a run stops cleanly on (the ones this platform has)."""


class StopSignals:
    """Catch :data:`SIGNALS` for the block: the first sets :attr:`received`, a second exits at once.

    Outside the main thread (where Python cannot install handlers) it catches
    nothing and :meth:`should_stop` only relays other ranks' decisions.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in SIGNALS:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame) -> None:
        if self.received is not None:  # the second signal: leave now, as the signal itself would
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
            return
        self.received = signal.Signals(number).name

    def should_stop(self, group=None) -> bool:
        """Whether to stop at this boundary: a signal arrived here, or (under torch.distributed) on any
        rank. Every rank must call it at the same boundaries when distributed."""
        local = self.received is not None
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return local
        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        if dist.get_backend(group) == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        stop = bool(flag.item())
        if stop and self.received is None:
            self.received = "a signal on another rank"
        return stop
