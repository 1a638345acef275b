"""SIGTERM, SIGINT and SIGUSR1 stop a run at its next boundary; a second signal exits at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from ditq.preemption import SIGNALS, StopSignals


@pytest.mark.parametrize("name", SIGNALS)
def test_the_first_signal_only_asks_to_stop(name):
    before = signal.getsignal(getattr(signal, name))
    with StopSignals() as stop:
        assert not stop.should_stop()
        os.kill(os.getpid(), getattr(signal, name))
        assert stop.received == name and stop.should_stop()
    assert signal.getsignal(getattr(signal, name)) is before  # handlers are given back


def test_a_second_signal_exits_at_once_as_the_signal_would():
    code = (
        "import os, signal, time; from ditq.preemption import StopSignals\n"
        "with StopSignals() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    print(stop.received, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "    print('not reached', flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "SIGTERM"
    assert proc.returncode == -signal.SIGTERM
