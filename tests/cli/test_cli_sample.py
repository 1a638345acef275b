"""``ditq sample`` end to end on a tiny checkpoint, and its one-line errors; sharded .npz under torchrun."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ditq
from ditq import models
from ditq.cli.main import build_parser, main
from ditq.eval.sampling import list_shards
from ditq.formats import official_dit, qdit


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A two-block pixel-space DiT (8x8 RGB, 5 classes) saved as a ditq checkpoint."""
    torch.manual_seed(0)
    model = models.create_model(
        "DiT-S/2", input_size=8, depth=2, hidden_size=64, num_heads=2, in_channels=3, num_classes=5
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name or "final_layer" in name:
                p.normal_(std=0.05)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    ditq.save(model, path, command="test")
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def sample_args(ckpt, out, *extra):
    return ["sample", "--model", ckpt, "--sampler", "ddim", "--steps", "3", "--out", out, "--quiet", *extra]


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    assert err.startswith("ditq: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_npz_has_adm_keys_and_is_deterministic(tmp_path, capsys, tiny_ckpt):
    a, b, c = tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "c.npz"
    common = ["--num-samples", "5", "--batch-size", "2", "--cfg-scale", "2", "--class-labels", "0,4"]
    assert run(capsys, *sample_args(tiny_ckpt, a, *common, "--seed", "3")) == (0, "", "")
    assert run(capsys, *sample_args(tiny_ckpt, b, *common, "--seed", "3"))[0] == 0
    assert run(capsys, *sample_args(tiny_ckpt, c, *common, "--seed", "4"))[0] == 0
    with np.load(a) as da, np.load(b) as db, np.load(c) as dc:
        assert sorted(da.files) == ["arr_0", "arr_1"]
        assert da["arr_0"].shape == (5, 8, 8, 3) and da["arr_0"].dtype == np.uint8
        assert da["arr_1"].dtype == np.int64 and da["arr_1"].tolist() == [0, 4, 0, 4, 0]
        np.testing.assert_array_equal(da["arr_0"], db["arr_0"])
        assert not np.array_equal(da["arr_0"], dc["arr_0"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz", "c.npz"]  # shards merged, removed


def test_grid_png_is_written(tmp_path, capsys, tiny_ckpt):
    out = tmp_path / "grids" / "grid.png"
    argv = [
        "sample",
        "--model",
        tiny_ckpt,
        "--sampler",
        "ddpm",
        "--steps",
        "2",
        "--num-samples",
        "4",
        "--out",
        out,
    ]
    code, stdout, _ = run(capsys, *argv)
    assert code == 0
    assert str(out) in stdout and "4 images" in stdout
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "RGB"


def test_unknown_model_name_lists_valid_names(tmp_path, capsys):
    code, _, err = run(capsys, "sample", "--model", "DiT-Q/2", "--out", tmp_path / "x.npz")
    assert_one_line_error(code, err, "DiT-Q/2", "DiT-XL/2", "DiT-S/2")


def test_missing_checkpoint_file(tmp_path, capsys):
    code, _, err = run(
        capsys, "sample", "--model", tmp_path / "nope.safetensors", "--out", tmp_path / "x.npz"
    )
    assert_one_line_error(code, err, "not found", "nope.safetensors")


@pytest.mark.parametrize("labels", ["5", "0,-1"])
def test_class_label_out_of_range(tmp_path, capsys, tiny_ckpt, labels):
    code, _, err = run(capsys, *sample_args(tiny_ckpt, tmp_path / "x.npz", "--class-labels", labels))
    assert_one_line_error(code, err, "out of range", "5 classes")
    assert not (tmp_path / "x.npz").exists()


def test_malformed_class_labels(tmp_path, capsys, tiny_ckpt):
    code, _, err = run(capsys, *sample_args(tiny_ckpt, tmp_path / "x.npz", "--class-labels", "1,cat"))
    assert_one_line_error(code, err, "--class-labels")


@pytest.mark.parametrize("n", ["0", "-3"])
def test_nonpositive_num_samples(tmp_path, capsys, tiny_ckpt, n):
    code, _, err = run(capsys, *sample_args(tiny_ckpt, tmp_path / "x.npz", "--num-samples", n))
    assert_one_line_error(code, err, "num_samples must be a positive integer")


def test_options_are_checked_before_any_download(tmp_path, capsys, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setenv("DITQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(official_dit, "fetch_url", no_download)
    for bad in (["--num-samples", "0"], ["--batch-size", "0"], ["--cfg-scale", "0.5"], ["--steps", "0"]):
        code, _, err = run(capsys, "sample", "--model", "DiT-XL/2", "--out", tmp_path / "x.npz", *bad)
        assert_one_line_error(code, err)
    code, _, err = run(capsys, "sample", "--model", "DiT-XL/2", "--out", tmp_path / "x.txt")
    assert_one_line_error(code, err, "x.txt", ".npz")


def test_latent_model_without_diffusers_says_how_to_install(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "diffusers", None)
    monkeypatch.setitem(sys.modules, "diffusers.models", None)
    model = models.create_model("DiT-S/8", input_size=8, depth=1, hidden_size=32, num_heads=2)
    path = tmp_path / "latent.safetensors"
    ditq.save(model, path)
    code, _, err = run(capsys, *sample_args(path, tmp_path / "x.npz"))
    assert_one_line_error(code, err, "pip install 'ditq[vae]'")


def test_label_out_of_range_is_reported_before_the_vae(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "diffusers", None)
    model = models.create_model("DiT-S/8", input_size=8, depth=1, hidden_size=32, num_heads=2, num_classes=7)
    path = tmp_path / "latent.safetensors"
    ditq.save(model, path)
    code, _, err = run(capsys, *sample_args(path, tmp_path / "x.npz", "--class-labels", "7"))
    assert_one_line_error(code, err, "class label 7 is out of range")


# --- sharded .npz: resume, settings, balanced labels, torchrun -------------------------------


def read(path):
    with np.load(path) as data:
        return data["arr_0"], data["arr_1"]


SHARDED = ["--num-samples", "7", "--batch-size", "2", "--shard-size", "2", "--cfg-scale", "2", "--seed", "5"]


def test_npz_resumes_from_its_shards(tmp_path, capsys, tiny_ckpt):
    out, shards = tmp_path / "s.npz", tmp_path / "s.shards"
    assert run(capsys, *sample_args(tiny_ckpt, out, *SHARDED, "--keep-shards"))[0] == 0
    first = read(out)
    assert sorted(p.name for p in shards.iterdir()) == ["manifest.json"] + [
        f"shard_00000{k}.npz" for k in range(4)
    ]  # the lock file goes when the lock is released
    (shards / "shard_000002.npz").unlink()
    argv = sample_args(tiny_ckpt, out, *SHARDED)
    argv.remove("--quiet")
    code, stdout, _ = run(capsys, *argv)
    assert code == 0
    assert "resuming: 3 of 4 shards are already there" in stdout and "wrote 7 images (8x8)" in stdout
    assert not shards.exists()  # merged without --keep-shards: removed
    for a, b in zip(read(out), first, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_shard_folder_of_other_settings_is_a_one_line_error(tmp_path, capsys, tiny_ckpt):
    folder = tmp_path / "shards"
    argv = sample_args(tiny_ckpt, tmp_path / "a.npz", *SHARDED, "--shard-dir", folder, "--keep-shards")
    assert run(capsys, *argv)[0] == 0
    code, _, err = run(capsys, *argv, "--cfg-scale", "3")
    assert_one_line_error(code, err, str(folder), "cfg_scale was 2.0, now 3.0", "use another shard folder")
    code, _, err = run(capsys, *argv, "--sampler", "ddpm")
    assert_one_line_error(code, err, "sampler was 'ddim', now 'ddpm'")


def test_balanced_labels(tmp_path, capsys, tiny_ckpt):
    out, grid = tmp_path / "b.npz", tmp_path / "b.png"
    assert run(capsys, *sample_args(tiny_ckpt, out, "--num-samples", "12", "--balanced"))[0] == 0
    images, labels = read(out)
    assert images.shape == (12, 8, 8, 3) and np.bincount(labels).tolist() == [3, 3, 2, 2, 2]
    assert run(capsys, *sample_args(tiny_ckpt, grid, "--num-samples", "12", "--balanced"))[0] == 0
    assert grid.is_file()


@pytest.mark.parametrize(
    "out, extra, fragments",
    [
        ("x.png", ["--shard-size", "2"], ["--shard-size applies to .npz output only"]),
        ("x.png", ["--shard-dir", "d"], ["--shard-dir applies to .npz output only"]),
        ("x.png", ["--keep-shards"], ["--keep-shards applies to .npz output only"]),
        ("x.npz", ["--shard-size", "0"], ["--shard-size must be a positive integer, got 0"]),
        (
            "x.npz",
            ["--balanced", "--class-labels", "1"],
            ["--balanced and --class-labels exclude each other"],
        ),
    ],
)
def test_shard_options_are_checked_before_the_model_loads(tmp_path, capsys, out, extra, fragments):
    code, _, err = run(capsys, *sample_args(tmp_path / "missing.safetensors", tmp_path / out, *extra))
    assert_one_line_error(code, err, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_a_grid_under_torchrun_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run(capsys, *sample_args(tmp_path / "missing.safetensors", tmp_path / "g.png"))
    assert_one_line_error(code, err, "is drawn by one process; run it without torchrun")


def test_backend_chooses_the_kernels_of_a_quantized_checkpoint(tmp_path, capsys, tiny_ckpt):
    from ditq import quant
    from ditq.kernels import ops

    config = quant.QDiTConfig(w_bits=8, a_bits=8, w_group=0, w_sym=True, a_sym=True)
    model = quant.quantize_(ditq.load(tiny_ckpt), config)
    path = qdit.save(model, tmp_path / "w8a8.safetensors", config)
    common = ["--num-samples", "3", "--batch-size", "3", "--cfg-scale", "2", "--class-labels", "0,4"]
    images = {}
    for backend in ("auto", *ops.available_backends()):
        out = tmp_path / f"{backend}.npz"
        assert run(capsys, *sample_args(path, out, *common, "--backend", backend))[0] == 0
        images[backend] = read(out)[0].astype(int)
    assert all(np.abs(v - images["reference"]).max() <= 1 for v in images.values())
    grid = ["--steps", "2", "--num-samples", "2", "--backend", "reference", "--out", tmp_path / "g.png"]
    code, out, _ = run(capsys, "sample", "--model", path, "--sampler", "ddim", *grid)
    assert code == 0 and "kernel backend reference on cpu: 8 layers w8a8_linear" in out
    code, out, _ = run(capsys, "info", path)
    assert code == 0 and "kernels" in out and "backend auto -> " in out and "8 layers" in out
    if not torch.cuda.is_available():
        code, _, err = run(capsys, *sample_args(path, tmp_path / "t.npz", "--backend", "triton"))
        assert_one_line_error(code, err, "'triton' is not available here", "available: auto, reference")
        assert not (tmp_path / "t.npz").exists()


@pytest.mark.dist
def test_two_processes_write_what_one_writes_and_resume(tmp_path, capsys, tiny_ckpt):
    """``torchrun --nproc_per_node=2 -m ditq.cli.main sample`` with gloo: the same .npz as one process."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    common = [*SHARDED, "--device", "cpu", "--keep-shards"]
    one = tmp_path / "one.npz"
    assert run(capsys, *sample_args(tiny_ckpt, one, *common))[0] == 0
    # The two processes resume a run killed after drawing shard 1 (rank 1's): it must be kept, not redrawn.
    two, shards = tmp_path / "two.npz", tmp_path / "two.shards"
    shards.mkdir()
    for name in ("manifest.json", "shard_000001.npz"):
        shutil.copy2(tmp_path / "one.shards" / name, shards / name)
    kept = (shards / "shard_000001.npz").stat().st_mtime_ns

    argv = sample_args(tiny_ckpt, two, *common)
    argv.remove("--quiet")  # to see who prints
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*launch, "-m", "ditq.cli.main", *map(str, argv)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    # Rank 0 alone speaks and writes.
    assert proc.stdout.count("sampling 7 images") == 1 and "on 2 processes (gloo, cpu)" in proc.stdout
    assert proc.stdout.count("resuming: 1 of 4 shards") == 1
    assert proc.stdout.count("wrote 7 images (8x8)") == 1
    for a, b in zip(read(two), read(one), strict=True):
        np.testing.assert_array_equal(a, b)  # bit for bit
    assert (shards / "shard_000001.npz").stat().st_mtime_ns == kept
    assert sorted(p.name for p in shards.iterdir()) == sorted(
        p.name for p in (tmp_path / "one.shards").iterdir()
    )


# --- long runs: a signal stops after a shard, one process per shard folder, a full disk -------

# 12 shards of one image, 40 steps each: a few tens of ms a shard, so that a signal sent when the
# first shard appears lands well before the last.
LONG = ["--num-samples", "12", "--batch-size", "1", "--shard-size", "1", "--steps", "40", "--seed", "3"]


def long_args(ckpt, out, *extra):
    return [*sample_args(ckpt, out), *LONG, *extra]


@pytest.fixture(scope="module")
def long_baseline(tiny_ckpt, tmp_path_factory):
    """The uninterrupted run of LONG (merged images, labels), in this process."""
    out = tmp_path_factory.mktemp("baseline") / "whole.npz"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as conftest's per-test fixture does, which has not run yet for this one
    try:
        assert main(list(map(str, long_args(tiny_ckpt, out)))) == 0
    finally:
        torch.set_num_threads(before)
    return read(out)


def start(argv):
    """``python -m ditq`` with ``argv`` in a subprocess, once its first shard exists (or it ended)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ditq", *map(str, argv)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = Path(argv[argv.index("--out") + 1]).with_suffix(".shards") / "shard_000000.npz"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    return proc


def assert_same(path, baseline):
    for a, b in zip(read(path), baseline, strict=True):
        np.testing.assert_array_equal(a, b)  # bit for bit


def no_temp_files(folder):
    return not [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp")]


def test_sigterm_stops_after_a_shard_and_the_printed_command_resumes(
    tmp_path, capsys, tiny_ckpt, long_baseline
):
    out, shards = tmp_path / "s.npz", tmp_path / "s.shards"
    proc = start(long_args(tiny_ckpt, out))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert err.count("\n") == 1, err  # one line, no traceback, not an "error"
    m = re.fullmatch(r"ditq: stopped after (\d+) of 12 shards by SIGTERM; the finished shards are in (.+); "
                     r"resume with: (ditq sample .+)\n", err)  # fmt: skip
    assert m and m[2] == str(shards), err
    done = int(m[1])
    assert 1 <= done < 12 and list_shards(shards) == list(range(done))
    assert not out.exists() and no_temp_files(tmp_path)
    assert not (shards / ".ditq.lock").exists()  # released

    resume = shlex.split(m[3])  # the same command: the same options
    parse = build_parser().parse_args
    assert resume[0] == "ditq" and parse(resume[1:]) == parse(list(map(str, long_args(tiny_ckpt, out))))
    code, _, err = run(capsys, *resume[1:])
    assert (code, err) == (0, "")
    assert_same(out, long_baseline)
    assert not shards.exists()


def test_a_second_process_is_refused_and_a_killed_ones_lock_is_taken_over(
    tmp_path, capsys, tiny_ckpt, long_baseline
):
    out, shards = tmp_path / "s.npz", tmp_path / "s.shards"
    argv = long_args(tiny_ckpt, out)
    proc = start(argv)
    try:
        proc.send_signal(signal.SIGSTOP)  # it holds the lock and stays put while the second one tries
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"ditq: error: the shard folder {shards} is in use by pid {proc.pid} on "), err
        assert "wait for it to finish or stop it" in err
        done = list_shards(shards)
    finally:
        proc.kill()  # SIGKILL: no clean-up at all
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and list_shards(shards) == done and done

    argv.remove("--quiet")
    code, stdout, err = run(capsys, *argv)
    assert code == 0 and err == "", err
    assert f"took over the lock of shard folder {shards} from pid {proc.pid}" in stdout
    assert f"resuming: {len(done)} of 12 shards" in stdout
    assert_same(out, long_baseline)
    assert no_temp_files(tmp_path)


@pytest.mark.parametrize("where", ["shard", "merge", "read-only"])
def test_a_full_disk_or_read_only_folder_is_one_line_and_the_same_command_resumes(
    tmp_path, capsys, tiny_ckpt, monkeypatch, where
):
    from ditq import checkpoint

    base = tmp_path / "base"
    base.mkdir()
    argv = sample_args(tiny_ckpt, base / "s.npz", *SHARDED, "--keep-shards")
    assert run(capsys, *argv)[0] == 0
    whole = read(base / "s.npz")
    manifest = (base / "s.shards" / "manifest.json").stat().st_size
    sizes = [(base / "s.shards" / f"shard_00000{k}.npz").stat().st_size for k in range(4)]

    out, shards = tmp_path / "s.npz", tmp_path / "s.shards"
    argv = sample_args(tiny_ckpt, out, *SHARDED)
    monkeypatch.setattr(checkpoint, "_written", 0)  # the fault counts this process's bytes from here
    if where == "shard":  # the third shard fills the disk
        monkeypatch.setenv("DITQ_FAULT_DISK_FULL_AFTER", str(manifest + sum(sizes[:2]) + sizes[2] // 2))
        fragments, kept = ["cannot write the sample shard", "shard_000002.npz: the disk is full"], 2
    elif where == "merge":
        monkeypatch.setenv("DITQ_FAULT_DISK_FULL_AFTER", str(manifest + sum(sizes) + 100))
        fragments, kept = [f"cannot write the merged samples {out}: the disk is full"], 4
    else:  # a run that drew two shards, then the folder became read-only
        shards.mkdir()
        for name in ("manifest.json", "shard_000000.npz", "shard_000001.npz"):
            shutil.copy2(base / "s.shards" / name, shards / name)
        monkeypatch.setenv("DITQ_FAULT_WRITE_ERRNO", "EROFS")
        fragments, kept = ["shard_000002.npz: the file system is read-only", f"make {shards} writable"], 2
    code, _, err = run(capsys, *argv)
    assert code == 74 and err.startswith("ditq: error: ") and err.count("\n") == 1, err
    for fragment in [*fragments, "then run the same command again"]:
        assert fragment in err, err
    assert list_shards(shards) == list(range(kept)) and not out.exists() and no_temp_files(tmp_path)
    for k in range(kept):  # the shards written before are whole
        assert (shards / f"shard_00000{k}.npz").read_bytes() == (
            base / "s.shards" / f"shard_00000{k}.npz"
        ).read_bytes()

    monkeypatch.delenv("DITQ_FAULT_DISK_FULL_AFTER", raising=False)
    monkeypatch.delenv("DITQ_FAULT_WRITE_ERRNO", raising=False)
    argv.remove("--quiet")
    code, stdout, _ = run(capsys, *argv)
    assert code == 0 and f"resuming: {kept} of 4 shards" in stdout
    assert_same(out, whole)
    assert not shards.exists() and no_temp_files(tmp_path)


def test_sigterm_during_the_merge_leaves_no_file_and_the_rerun_merges(
    tmp_path, capsys, tiny_ckpt, monkeypatch
):
    import importlib

    pipeline = importlib.import_module("ditq.pipelines.sample")  # the module (the package exports sample())

    def merge_after_a_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # caught by the run's StopSignals: it only sets the flag
        return merge(*args, **kwargs)

    merge = pipeline.merge_shards
    monkeypatch.setattr(pipeline, "merge_shards", merge_after_a_signal)
    out, shards = tmp_path / "s.npz", tmp_path / "s.shards"
    argv = sample_args(tiny_ckpt, out, *SHARDED)
    code, _, err = run(capsys, *argv)
    assert code == 75 and err.count("\n") == 1, err
    assert err.startswith(
        f"ditq: stopped while merging the 4 shards by SIGTERM; they are in {shards}; resume "
    )
    assert list_shards(shards) == [0, 1, 2, 3] and not out.exists() and no_temp_files(tmp_path)

    monkeypatch.setattr(pipeline, "merge_shards", merge)
    argv.remove("--quiet")
    code, stdout, _ = run(capsys, *argv)
    assert code == 0 and "resuming: 4 of 4 shards" in stdout and read(out)[0].shape == (7, 8, 8, 3)


def _worker_pid(parent: int, rank: int) -> int | None:
    """The pid of the torchrun worker of ``rank`` among ``parent``'s children (Linux: /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            env = (stat.parent / "environ").read_bytes().split(b"\0") if ppid == parent else []
        except (OSError, IndexError, ValueError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(stat.parent.name)
    return None


@pytest.mark.dist
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_shard(tmp_path, capsys, tiny_ckpt, long_baseline):
    """Under ``torchrun --nproc_per_node=2`` (gloo) SIGTERM reaches rank 1 only: both ranks stop after the
    same round of shards, exit 75 and say so; one process resumes to the same images."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if not Path("/proc/self/environ").exists():
        pytest.skip("finding a worker's pid needs /proc")
    out, shards = tmp_path / "s.npz", tmp_path / "s.shards"
    argv = list(map(str, long_args(tiny_ckpt, out, "--device", "cpu")))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps([argv]))
    worker = Path(__file__).parents[1] / "dist_worker.py"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker, spec],
        # The ranks compare notes about every DITQ_DIST_STOP_CHECK_S seconds (2 by default): at every
        # shard round here.
        env={**os.environ, "OMP_NUM_THREADS": "1", "DITQ_DIST_STOP_CHECK_S": "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, to kill the whole launch if it hangs
    )
    try:
        deadline, rank1 = time.monotonic() + 120, None
        while rank1 is None and proc.poll() is None and time.monotonic() < deadline:
            rank1 = _worker_pid(proc.pid, 1)
            time.sleep(0.01)
        assert rank1 is not None, "no worker of rank 1 found"
        while (
            not (shards / "shard_000000.npz").exists() and proc.poll() is None and time.monotonic() < deadline
        ):
            time.sleep(0.002)
        os.kill(rank1, signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)  # neither rank may hang
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, output[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text())[0] for r in (0, 1)]
    assert [r["rc"] for r in ranks] == [75, 75], ranks
    said = r"ditq: stopped after (\d+) of 12 shards by {}; the finished shards are in {}; resume with: ditq "
    m0 = re.match(said.format("a signal on another rank", re.escape(str(shards))), ranks[0]["stderr"])
    m1 = re.match(said.format("SIGTERM", re.escape(str(shards))), ranks[1]["stderr"])
    assert m0 and m1 and m0[1] == m1[1], ranks
    done = int(m0[1])  # whole rounds of two shards, all of them written
    assert 2 <= done < 12 and done % 2 == 0 and list_shards(shards) == list(range(done))

    code, _, err = run(capsys, *argv)  # one process takes over where two stopped
    assert (code, err) == (0, "")
    assert_same(out, long_baseline)
