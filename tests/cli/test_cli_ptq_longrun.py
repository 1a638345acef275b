"""``ditq ptq --search`` survives what long runs meet: SIGTERM (exit 75, resumes to the same bits),
SIGKILL (resumes, taking the dead run's lock over), a second process on the same search state (exit 2
naming the first), and a full disk or read-only folder under any of its writes (exit 74, one line,
nothing partial, the previous file kept; the same command then resumes and finishes).

The model is a tiny FMNIST-shaped DiT (one block of width 256, so group sizes 64/128/256 really
differ), scored by the embedded FID-FMNIST on 10 samples: a search generation takes ~0.1 s.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ditq
from ditq import checkpoint
from ditq.cli.main import main
from ditq.models import create_model

SRC = Path(ditq.__file__).resolve().parents[1]
GENERATIONS = 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model(
        "DiT-S/4", input_size=32, patch_size=8, depth=1, hidden_size=256, num_heads=4, in_channels=1,
        num_classes=10,
    )  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.06)  # large enough that quantization changes the samples
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    ditq.save(model, path, command="test")
    return path


def _argv(model: Path, generations: int = GENERATIONS, out: str = "q.safetensors") -> list[str]:
    """A search with every output relative, so runs in different folders have the same command line
    (which the checkpoint records)."""
    return [
        "ptq", "--model", str(model), "--out", out, "--wbits", "3", "--abits", "4", "--search",
        "--search-groups", "64,128,256", "--search-population", "4", "--search-generations",
        str(generations), "--search-samples", "10", "--search-steps", "2", "--search-state", "state.json",
        "--report", "r",
    ]  # fmt: skip


def _env(cache: Path) -> dict:
    # One thread (same arithmetic in every run) and no C++ kernel build in each fresh process.
    env = {**os.environ, "PYTHONPATH": str(SRC), "DITQ_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env["DITQ_CPU_KERNELS"] = "0"
    for name in (checkpoint.FAULT_ENV, checkpoint.FAULT_ERRNO_ENV):
        env.pop(name, None)
    return env


def _start(argv: list[str], folder: Path) -> subprocess.Popen:
    folder.mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "ditq", *argv], cwd=folder, env=_env(folder.parent / "cache"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def _wait_for(check, proc: subprocess.Popen, what: str, timeout: float = 120.0):
    """Poll ``check()`` until it returns something true; fail if ``proc`` ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the run ended ({proc.returncode}) before {what}: {proc.communicate()[1]}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _generation(state: Path) -> int:
    try:
        return json.loads(state.read_text())["generation"]  # written atomically: whole or absent
    except (OSError, ValueError, KeyError):
        return 0


def _outputs(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in ("q.safetensors", "q.safetensors.layers.json")}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp"))


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory) -> dict[str, bytes]:
    """The checkpoint and layer config of an uninterrupted run."""
    folder = tmp_path_factory.mktemp("straight") / "run"
    code, _, err = _finish(_start(_argv(tiny), folder))
    assert code == 0, err
    return _outputs(folder)


def test_sigterm_stops_after_a_generation_and_the_printed_command_resumes_it_to_the_same_bits(
    tiny, straight, tmp_path
):
    folder = tmp_path / "run"
    proc = _start(_argv(tiny), folder)
    _wait_for(lambda: _generation(folder / "state.json") >= 1, proc, "generation 1 was saved")
    proc.send_signal(signal.SIGTERM)
    code, _, err = _finish(proc)
    assert code == 75, err
    assert err.count("\n") == 1, err  # one line, no traceback
    done = _generation(folder / "state.json")
    command = shlex.join(["ditq", *_argv(tiny)]).replace(f" --search-generations {GENERATIONS}", "")
    assert err == (
        f"ditq: stopped after generation {done} of {GENERATIONS} by SIGTERM; the search state is "
        f"state.json; resume with: {command}\n"
    )
    assert not (folder / "q.safetensors").exists() and not _leftovers(folder)

    again = shlex.split(err.split("resume with: ", 1)[1])
    assert again[:2] == ["ditq", "ptq"]
    code, out, err = _finish(_start(again[1:], folder))
    assert code == 0, err
    assert f"search resumed from state.json after {done} generation(s)" in out
    assert "took over" not in out  # the stopped run released its lock
    assert _outputs(folder) == straight


def test_sigkill_then_the_same_command_resumes_to_the_same_bits(tiny, straight, tmp_path):
    folder = tmp_path / "run"
    proc = _start(_argv(tiny), folder)
    _wait_for(lambda: _generation(folder / "state.json") >= 1, proc, "generation 1 was saved")
    proc.kill()
    assert _finish(proc)[0] == -signal.SIGKILL
    done = _generation(folder / "state.json")
    assert 1 <= done and not (folder / "q.safetensors").exists()

    code, out, err = _finish(_start(_argv(tiny), folder))
    assert code == 0, err
    assert f"took over the lock of search state state.json from pid {proc.pid} " in out
    assert f"search resumed from state.json after {done} generation(s)" in out
    assert _outputs(folder) == straight and not _leftovers(folder)


def test_a_second_process_on_the_same_search_state_exits_2_naming_the_first(
    tiny, tmp_path, capsys, monkeypatch
):
    folder = tmp_path / "run"
    first = _start(_argv(tiny, generations=1000), folder)
    try:
        lock = folder / ".state.json.lock"

        def holder():
            try:
                return json.loads(lock.read_text()).get("pid") == first.pid
            except (OSError, ValueError):
                return False

        _wait_for(holder, first, "the first run took the lock")
        monkeypatch.chdir(folder)
        code = main(_argv(tiny, generations=1000))
        err = capsys.readouterr().err
        assert code == 2
        assert err.startswith(f"ditq: error: the search state state.json is in use by pid {first.pid} on ")
        assert "ditq ptq --model" in err and err.count("\n") == 1
    finally:
        first.kill()
        first.communicate()


@pytest.mark.parametrize("fault", ["disk-full", "read-only"])
def test_a_full_disk_or_read_only_folder_while_saving_the_search_state_keeps_the_previous_one(
    tiny, tmp_path, capsys, monkeypatch, fault
):
    monkeypatch.chdir(tmp_path)
    assert main(_argv(tiny, generations=1, out="first.safetensors")) == 0  # the state after generation 1
    saved = (tmp_path / "state.json").read_bytes()
    capsys.readouterr()

    monkeypatch.setattr(checkpoint, "_written", 0)
    if fault == "disk-full":
        monkeypatch.setenv(checkpoint.FAULT_ENV, "0")
    else:
        monkeypatch.setenv(checkpoint.FAULT_ERRNO_ENV, "EROFS")
    argv = _argv(tiny, generations=3)
    assert main(argv) == 74
    err = capsys.readouterr().err
    reason = "the disk is full (it needs" if fault == "disk-full" else "the file system is read-only"
    assert err.startswith(f"ditq: error: cannot write the search state state.json: {reason}"), err
    assert "the previous state.json is kept" in err and err.count("\n") == 1
    assert (tmp_path / "state.json").read_bytes() == saved  # generation 2 is lost, generation 1 kept
    assert not (tmp_path / "q.safetensors").exists() and not _leftovers(tmp_path)

    monkeypatch.delenv(checkpoint.FAULT_ENV, raising=False)
    monkeypatch.delenv(checkpoint.FAULT_ERRNO_ENV, raising=False)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "search resumed from state.json after 1 generation(s)" in out
    assert _generation(tmp_path / "state.json") == 3 and (tmp_path / "q.safetensors").is_file()


def test_a_full_disk_while_writing_the_checkpoint_or_the_report_is_one_line_and_nothing_partial(
    tiny, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    argv = _argv(tiny, generations=2)
    assert main(argv) == 0
    capsys.readouterr()
    layers, ckpt, report = (tmp_path / n for n in ("q.safetensors.layers.json", "q.safetensors", "r.json"))
    old_report = report.read_bytes()
    ckpt_size = ckpt.stat().st_size
    ckpt.unlink()

    # The search is done, so the same command writes the layer config, then the checkpoint: the disk
    # fills during the checkpoint.
    monkeypatch.setattr(checkpoint, "_written", 0)
    monkeypatch.setenv(checkpoint.FAULT_ENV, str(layers.stat().st_size + 100))
    assert main(argv) == 74
    err = capsys.readouterr().err
    assert err.startswith(
        "ditq: error: cannot write the quantized checkpoint q.safetensors: the disk is full"
    )
    assert "(it needs 3." in err and " MB; " in err and err.count("\n") == 1
    assert not ckpt.exists() and not _leftovers(tmp_path)

    # Room for the checkpoint, not for the report: the previous report stays as it was.
    monkeypatch.setattr(checkpoint, "_written", 0)
    monkeypatch.setenv(checkpoint.FAULT_ENV, str(layers.stat().st_size + ckpt_size + 100))
    assert main(argv) == 74
    err = capsys.readouterr().err
    assert err.startswith("ditq: error: cannot write the report r.json: the disk is full"), err
    assert "the previous r.json is kept" in err and err.count("\n") == 1
    assert report.read_bytes() == old_report and not _leftovers(tmp_path)

    monkeypatch.delenv(checkpoint.FAULT_ENV)
    assert main(argv) == 0
    assert json.loads(report.read_text())["checkpoint"] == "q.safetensors"


def test_an_unwritable_calibration_cache_is_a_warning_and_the_run_goes_on(
    tiny, tmp_path, capsys, monkeypatch
):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "calibration").write_text("a file where the cache folder should be\n")
    monkeypatch.setenv("DITQ_CACHE", str(cache))
    out = tmp_path / "q.safetensors"
    argv = ["ptq", "--model", tiny, "--wbits", 8, "--w-group", 0, "--a-group", -1, "--static"]
    code = main([str(a) for a in [*argv, "--calib-samples", 2, "--calib-steps", 2, "--out", out]])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.startswith("warning: cannot write the calibration cache ") and err.count("\n") == 1
    assert "going on without caching the calibration inputs" in err
    assert out.is_file()
