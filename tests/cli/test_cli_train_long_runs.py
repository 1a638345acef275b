"""``ditq train`` survives the real world: SIGTERM and SIGKILL at random points, a second process on the
same run, a full disk and a read-only folder. Each is one line on stderr with a documented exit status
(75 stopped, 2 in use, 74 cannot write), loses at most the current step, and resumes bit for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ditq.checkpoint import FAULT_ENV, FAULT_ERRNO_ENV, load_tensors

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "synthetic_tiny.yaml")
STEPS = 300
TINY = ["--set", "data.image_size=8", "--set", "data.num_samples=40", "--set", "model.overrides.depth=1",
        "--set", "optim.log_every=5", "--set", "checkpoint.every=50", "--set", "checkpoint.keep_last=0",
        "--device", "cpu", "--steps", str(STEPS)]  # fmt: skip


def _argv(out: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "ditq", "train", "--config", CONFIG, "--out", str(out), *TINY, *more]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (FAULT_ENV, FAULT_ERRNO_ENV)}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _run(argv, **env) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=_env(**env))


def _steps_logged(out: Path) -> int:
    try:
        return len((out / "log.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _start_and_wait(out: Path, records: int, *more: str) -> subprocess.Popen:
    """A run in the background, once it has logged ``records`` records (5 steps each)."""
    proc = subprocess.Popen(_argv(out, *more), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())  # fmt: skip
    deadline = time.monotonic() + 240
    while _steps_logged(out) < records:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.02)
    return proc


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("full") / "run"
    proc = _run(_argv(out, "--quiet"))
    assert proc.returncode == 0, proc.stderr
    return load_tensors(out / "model.safetensors")


def _same(out: Path, want: dict) -> bool:
    got = load_tensors(out / "model.safetensors")
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("seed", [0, 1])
def test_sigterm_stops_after_the_current_step_and_the_resume_is_bit_identical(tmp_path, uninterrupted, seed):
    out = tmp_path / "run"
    proc = _start_and_wait(out, random.Random(seed).randint(2, 30))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ditq: stopped at step ") and "by SIGTERM" in lines[0]
    stopped = int(lines[0].split("stopped at step ")[1].split()[0])
    assert 0 < stopped < STEPS
    assert (out / "checkpoints" / f"step_{stopped:07d}.pt").is_file()  # the state of the very step
    assert not (out / "model.safetensors").exists()
    resume = lines[0].split("resume with: ")[1]
    assert "--resume" in resume
    again = _run([sys.executable, "-m", "ditq", *resume.split()[1:]])  # the printed command, as printed
    assert again.returncode == 0, again.stderr
    assert _same(out, uninterrupted)
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(5, STEPS + 1, 5))  # no record lost or doubled


def test_sigkill_loses_at_most_a_checkpoint_interval_and_the_resume_is_bit_identical(tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = _start_and_wait(out, 14)  # past the checkpoint at step 50
    proc.kill()
    proc.communicate(timeout=60)
    again = _run(_argv(out, "--resume"))
    assert again.returncode == 0, again.stderr
    assert "took over the lock" in again.stdout and f"pid {proc.pid}" in again.stdout
    assert _same(out, uninterrupted)


def test_a_second_process_on_the_run_is_refused_in_one_line(tmp_path):
    out = tmp_path / "run"
    first = _start_and_wait(out, 2)
    first.send_signal(signal.SIGSTOP)  # paused, so it is still running whatever the machine's load
    try:
        second = _run(_argv(out, "--resume"))
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"in use by pid {first.pid}" in lines[0], second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.send_signal(signal.SIGCONT)
        first.communicate(timeout=120)
    assert first.returncode == 75


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one_and_the_run_resumes(tmp_path, uninterrupted):
    out = tmp_path / "run"
    # The config, the log and two states fit; the third state does not.
    one_state = _run(_argv(tmp_path / "probe", "--set", "optim.steps=50", "--quiet"))
    assert one_state.returncode == 0, one_state.stderr
    size = (tmp_path / "probe" / "checkpoints" / "step_0000050.pt").stat().st_size
    proc = _run(_argv(out, "--quiet"), **{FAULT_ENV: str(int(2.5 * size))})
    assert proc.returncode == 74, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "disk is full" in lines[0] and "step_0000" in lines[0], proc.stderr
    states = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert states and all(not name.startswith(".") for name in states)  # no partial file
    last = out / "checkpoints" / states[-1]
    assert torch.load(last, weights_only=True)["step"] == 50 * len(states)  # the last good one loads
    again = _run(_argv(out, "--resume", "--quiet"))
    assert again.returncode == 0, again.stderr
    assert _same(out, uninterrupted)


def test_a_read_only_output_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    proc = _run(_argv(out, "--quiet"), **{FAULT_ERRNO_ENV: "EROFS"})
    assert proc.returncode == 74
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "read-only" in lines[0] and "Traceback" not in proc.stderr
    assert not [p for p in out.rglob("*") if p.is_file() and p.name != ".ditq.lock"]


def _torchrun(out: Path, *more: str) -> list[str]:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run = ["-m", "ditq", "train", "--config", CONFIG, "--out", str(out), *TINY]
    return [*launch, *run, "--set", "optim.batch_size=8", *more]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.dist
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's workers through /proc")
def test_sigterm_to_one_rank_stops_both_at_the_same_step_and_two_processes_resume_bit_identically(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    full = _run(_torchrun(tmp_path / "full", "--quiet"))
    assert full.returncode == 0, full.stderr[-3000:]
    want = load_tensors(tmp_path / "full" / "model.safetensors")

    out = tmp_path / "run"
    # The ranks compare notes about every DITQ_DIST_STOP_CHECK_S seconds (2 by default): often here.
    agent = subprocess.Popen(_torchrun(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_env(DITQ_DIST_STOP_CHECK_S="0.05"))  # fmt: skip
    deadline = time.monotonic() + 240
    while _steps_logged(out) < 6:
        assert agent.poll() is None, agent.communicate()
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.02)
    workers = sorted(_children(agent.pid))
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGTERM)  # one rank only: the other learns it at the step boundary
    _, err = agent.communicate(timeout=120)  # no rank waits forever in a collective
    stopped = [line for line in err.splitlines() if "stopped at step" in line]
    assert stopped, err[-3000:]
    step = int(stopped[0].split("stopped at step ")[1].split()[0])
    assert (out / "checkpoints" / f"step_{step:07d}.pt").is_file()
    again = _run(_torchrun(out, "--resume", "--quiet"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert _same(out, want)
