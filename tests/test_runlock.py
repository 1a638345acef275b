"""One process per run folder: a second live one gets one line naming the holder; a dead holder's lock is
taken over with a notice."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ditq.errors import RunLockedError
from ditq.runlock import LOCK_FILE, RunLock


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
    code = (
        "import sys, time; from ditq.runlock import RunLock; "
        f"RunLock({str(tmp_path)!r}, 'training run').acquire(); print('held', flush=True); time.sleep(30)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError) as e:
            RunLock(tmp_path, "training run").acquire()
        message = str(e.value)
        assert f"pid {holder.pid}" in message and "training run" in message and "\n" not in message
        assert e.value.exit_status == 2
    finally:
        holder.kill()
        holder.wait()
    notices = []
    with RunLock(tmp_path, "training run", log=notices.append) as lock:  # the dead holder's lock
        assert lock.previous["pid"] == holder.pid
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert len(notices) == 1 and f"pid {holder.pid}" in notices[0] and "no longer running" in notices[0]


def test_release_leaves_no_holder_and_a_clean_rerun_says_nothing(tmp_path):
    with RunLock(tmp_path):
        pass
    assert not (tmp_path / LOCK_FILE).exists()
    with RunLock(tmp_path / "new" / "run"):
        pass
    assert not (tmp_path / "new" / "run").exists()  # a folder the lock made and nothing else used goes
    notices = []
    with RunLock(tmp_path, log=notices.append) as lock:
        assert lock.previous is None
    assert notices == []
