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
The ranks compare notes about every :data:`DIST_CHECK_SECONDS` seconds, not at
every boundary: on CPU processes sharing their cores, one gloo collective between
training steps took ~11 ms, 7% of a tiny model's 10 ms step when done every 16
steps (docs/benchmarks.md). Each check also agrees, from the slowest rank's pace,
on how many boundaries pass until the next one, so every rank checks at the same
boundaries. A distributed run thus stops within about that time after the signal
and saves the step it stops at: no work is lost, only a little more is done first.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch

SIGNALS = tuple(s for s in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, s))
"""The signals a run stops cleanly on (the ones this platform has)."""

DIST_CHECK_SECONDS = float(os.environ.get("DITQ_DIST_STOP_CHECK_S", "2.0"))
"""Under torch.distributed, about how long passes between the ranks' collective stop checks
(``DITQ_DIST_STOP_CHECK_S`` sets it: shorter when the grace period before the kill is short)."""


class StopSignals:
    """Catch :data:`SIGNALS` for the block: the first sets :attr:`received`, a second exits at once.

    Outside the main thread (where Python cannot install handlers) it catches
    nothing and :meth:`should_stop` only relays other ranks' decisions.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}
        self._calls = 0  # boundaries seen
        self._next = 1  # the boundary of the next collective check (the first calibrates the pace)
        self._since = (0, time.perf_counter())  # (boundary, time) of the last collective check

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
        """Whether to stop at this boundary: a signal arrived (one process), or arrived on any rank
        (under torch.distributed, checked about every :data:`DIST_CHECK_SECONDS`; see the module
        doc). Every rank must call it at the same boundaries when distributed."""
        local = self.received is not None
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return local
        self._calls += 1
        if self._calls < self._next:
            return False
        now = time.perf_counter()
        pace = (now - self._since[1]) / max(1, self._calls - self._since[0])  # seconds per boundary
        flag = torch.tensor([1.0 if local else 0.0, pace], dtype=torch.float64)
        if dist.get_backend(group) == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)  # any rank stopping; the slowest pace
        stop, pace = bool(flag[0].item()), float(flag[1].item())
        self._next = self._calls + max(1, min(10_000, int(DIST_CHECK_SECONDS / max(pace, 1e-9))))
        self._since = (self._calls, time.perf_counter())
        if stop and self.received is None:
            self.received = "a signal on another rank"
        return stop
