"""``ditq export`` end to end: a tiny ternary run packed from its folder and from a training state,
sampled with ``ditq sample``; one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ditq import checkpoint
from ditq.checkpoint import load_tensors, read_metadata
from ditq.cli.main import main

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "synthetic_tiny.yaml")
TINY = ["--set", "data.image_size=8", "--set", "data.num_samples=40", "--set", "model.overrides.depth=1"]
TINY += ["--set", "optim.batch_size=8", "--set", "checkpoint.every=2", "--device", "cpu", "--quiet"]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A ternary run and a float run of the tiny recipe, 3 steps each."""
    root = tmp_path_factory.mktemp("runs")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ternary = ["--set", "quant.method=ternary", "--set", "quant.act_bits=8"]
        assert (
            main(["train", "--config", CONFIG, "--out", str(root / "qat"), "--steps", "3", *TINY, *ternary])
            == 0
        )
        assert main(["train", "--config", CONFIG, "--out", str(root / "fp"), "--steps", "1", *TINY]) == 0
    finally:
        torch.set_num_threads(before)
    return root


def _error(argv, capsys) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ditq: error: ") and err.count("\n") == 1
    return err


def test_export_a_run_then_sample_it(runs, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    assert (
        main(["export", str(runs / "qat"), "--out", str(out), "--sizes", str(tmp_path / "sizes.json")]) == 0
    )
    stdout = capsys.readouterr().out
    assert f"wrote {out} from {runs / 'qat' / 'checkpoints' / 'step_0000003.pt'}" in stdout
    assert "ternary weights in 5 layers at 2 bits" in stdout and "x smaller" in stdout
    # The run's newest state, the weights the run exports itself (auto: raw for ternary QAT): what the
    # run wrote as model.safetensors.
    a, b = load_tensors(out), load_tensors(runs / "qat" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = read_metadata(out)
    assert meta["command"] == f"ditq export {runs / 'qat'} --out {out}"
    assert meta["quant_config"]["act_bits"] == 8 and meta["train_steps"] == 3 and "train_run" in meta
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sizes["checkpoint"] == str(out) and sizes["file_bytes"] == out.stat().st_size

    grid = tmp_path / "grid.png"
    argv = ["sample", "--model", str(out), "--num-samples", "2", "--sampler", "ddim", "--steps", "2"]
    assert main([*argv, "--device", "cpu", "--out", str(grid), "--quiet"]) == 0
    assert grid.is_file()


def test_export_weights_ema_auto_and_the_runs_own_choice(runs, tmp_path, capsys):
    from ditq.pipelines.qat import export_ternary
    from ditq.train.checkpoint import load_state, save_state

    ema, auto = tmp_path / "ema.safetensors", tmp_path / "auto.safetensors"
    assert main(["export", str(runs / "qat"), "--out", str(ema), "--weights", "ema", "--quiet"]) == 0
    assert main(["export", str(runs / "qat"), "--out", str(auto), "--quiet"]) == 0
    assert (
        read_metadata(ema)["weights"] == "ema of step 3"
        and read_metadata(auto)["weights"] == "model of step 3"
    )
    a, b = load_tensors(ema), load_tensors(auto)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # a run that chose checkpoint.export: ema exports its EMA under auto
    state = load_state(runs / "qat" / "checkpoints" / "step_0000003.pt")
    state["config"]["run"]["checkpoint"]["export"] = "ema"
    chose_ema = tmp_path / "step_0000003.pt"
    save_state(chose_ema, state)
    out = export_ternary(chose_ema, tmp_path / "chose.safetensors")
    assert read_metadata(out.path)["weights"] == "ema of step 3"


def test_export_a_training_state_raw_weights_in_bfloat16(runs, tmp_path, capsys):
    out = tmp_path / "raw.safetensors"
    state = runs / "qat" / "checkpoints" / "step_0000002.pt"
    argv = [
        "export",
        str(state),
        "--out",
        str(out),
        "--weights",
        "model",
        "--float-dtype",
        "bfloat16",
        "--quiet",
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out == ""
    meta = read_metadata(out)
    assert meta["weights"] == "model of step 2" and meta["ternary"]["float_dtype"] == "bfloat16"
    tensors = load_tensors(out)
    assert tensors["blocks.0.attn.qkv.weight"].dtype == torch.uint8
    assert tensors["x_embedder.proj.weight"].dtype == torch.bfloat16
    # A ternary checkpoint can be rewritten (here back to float32 storage of the rounded values).
    again = tmp_path / "again.safetensors"
    assert main(["export", str(out), "--out", str(again), "--float-dtype", "float32", "--quiet"]) == 0
    assert read_metadata(again)["weights"] == "model of step 2"
    assert load_tensors(again)["x_embedder.proj.weight"].dtype == torch.float32


def test_bad_sources_are_one_line_errors(runs, tmp_path, capsys):
    out = str(tmp_path / "x.safetensors")
    assert "is of a full-precision run (no quant_config)" in _error(
        ["export", runs / "fp", "--out", out], capsys
    )
    fp_model = runs / "fp" / "model.safetensors"
    assert "holds a full-precision model; ditq export packs" in _error(
        ["export", fp_model, "--out", out], capsys
    )
    assert "export source not found" in _error(["export", tmp_path / "nope.pt", "--out", out], capsys)
    assert "holds no training state" in _error(["export", tmp_path, "--out", out], capsys)
    assert "--out must be a .safetensors file" in _error(["export", runs / "qat", "--out", "x.pt"], capsys)
    assert not Path(out).exists()


@pytest.mark.parametrize("fault", ["disk-full", "read-only"])
def test_a_full_disk_or_read_only_folder_is_one_line_exit_74_and_nothing_partial(
    runs, tmp_path, capsys, monkeypatch, fault
):
    out, sizes = tmp_path / "t.safetensors", tmp_path / "sizes.json"
    argv = ["export", str(runs / "qat"), "--out", str(out), "--sizes", str(sizes), "--quiet"]
    monkeypatch.setattr(checkpoint, "_written", 0)
    if fault == "disk-full":
        monkeypatch.setenv(checkpoint.FAULT_ENV, "1000")
        reason = f"cannot write the ternary checkpoint {out}: the disk is full (it needs "
    else:
        monkeypatch.setenv(checkpoint.FAULT_ERRNO_ENV, "EROFS")
        reason = f"cannot write the ternary checkpoint {out}: the file system is read-only"
    assert main(argv) == 74
    err = capsys.readouterr().err
    assert err.startswith(f"ditq: error: {reason}") and err.count("\n") == 1, err
    assert fault == "disk-full" or f"; make {tmp_path} writable or write elsewhere" in err
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no temporary file

    # Room for the checkpoint but not the size breakdown: the checkpoint is whole, the breakdown absent.
    monkeypatch.delenv(checkpoint.FAULT_ERRNO_ENV, raising=False)
    monkeypatch.delenv(checkpoint.FAULT_ENV, raising=False)
    assert main(argv[:4]) == 0  # the checkpoint alone, to know its size
    capsys.readouterr()
    monkeypatch.setattr(checkpoint, "_written", 0)
    monkeypatch.setenv(checkpoint.FAULT_ENV, str(out.stat().st_size + 10))
    assert main(argv) == 74
    err = capsys.readouterr().err
    assert err.startswith(f"ditq: error: cannot write the size breakdown {sizes}: the disk is full"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]

    # A checkpoint written before is kept as it was, and the message says so.
    before = out.read_bytes()
    monkeypatch.setattr(checkpoint, "_written", 0)
    if fault == "disk-full":
        monkeypatch.setenv(checkpoint.FAULT_ENV, "1000")
    else:
        monkeypatch.setenv(checkpoint.FAULT_ERRNO_ENV, "EROFS")
    assert main(argv) == 74
    err = capsys.readouterr().err
    assert err.startswith(f"ditq: error: {reason}") and "; the previous t.safetensors is kept; " in err
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]
