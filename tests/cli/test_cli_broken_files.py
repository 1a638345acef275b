"""Every broken file, in every format, through every command that reads files: one line on stderr, exit 2,
no traceback, and no output file left behind (DESIGN.md: a traceback is a bug)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ditq
from ditq.checkpoint import read_metadata, save_checkpoint
from ditq.cli.main import main
from ditq.models import DiTConfig, build_model
from ditq.quant import QDiTConfig, TernaryQATConfig, quantize_

TINY = DiTConfig(
    depth=1, hidden_size=16, num_heads=2, patch_size=2, input_size=8, in_channels=1, num_classes=4
)


class Pickled:
    """A class of the test module: weights_only refuses to unpickle it."""


def _good_files(folder: Path) -> dict[str, Path]:
    """One valid file per format: a ditq safetensors checkpoint, an official-style state dict (.pt),
    a ditq training state (.pt) and an ADM sample batch (.npz)."""
    model = build_model(TINY)
    qdit = quantize_(build_model(TINY), QDiTConfig(w_bits=8, a_bits=8, w_group=0))
    ternary = quantize_(build_model(TINY), TernaryQATConfig(step="prepare"))
    quantize_(ternary, TernaryQATConfig(step="convert"))
    files = {
        "safetensors": ditq.save(model, folder / "good.safetensors"),
        "qdit": ditq.save(
            qdit, folder / "qdit.safetensors", config=QDiTConfig(w_bits=8, a_bits=8, w_group=0)
        ),
        "ternary": ditq.save(ternary, folder / "ternary.safetensors"),
        "pt": folder / "good.pt",
        "state": folder / "state.pt",
        "npz": folder / "good.npz",
    }
    torch.save(model.state_dict(), files["pt"])
    torch.save({"step": 3, "model": model.state_dict(), "ema": model.state_dict()}, files["state"])
    np.savez(files["npz"], arr_0=np.zeros((4, 32, 32, 1), np.uint8), arr_1=np.zeros(4, np.int64))
    return files


def _broken(folder: Path, good: Path, how: str) -> Path:
    """A broken file with ``good``'s suffix."""
    path = folder / f"{how}{good.suffix}"
    data = good.read_bytes()
    if how == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "text":
        path.write_text("this is not a checkpoint\n")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "lying-header":  # a safetensors header that claims 10^15 bytes
        path.write_bytes((10**15).to_bytes(8, "little") + b'{"__metadata__": {}}')
    elif how == "pickled-class":
        torch.save({"model": {"w": torch.zeros(1)}, "step": 1, "extra": Pickled()}, path)
    elif how == "another-model":
        other = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
        if good.suffix == ".safetensors":  # the metadata of the good file, another model's tensors
            save_checkpoint(path, other.state_dict(), read_metadata(good))
        elif good.suffix == ".npz":
            np.savez(path, weights=np.zeros(3))
        else:
            torch.save(other.state_dict(), path)
    return path


KINDS = ["random", "empty", "text", "truncated", "lying-header", "pickled-class", "another-model"]

# command -> (format of the file it reads, argv builder given the file and an output path)
COMMANDS = {
    "sample": (
        "safetensors",
        lambda f, out: ["sample", "--model", str(f), "--out", str(out), "--num-samples", "2"],
    ),
    "sample-pt": (
        "pt",
        lambda f, out: ["sample", "--model", str(f), "--out", str(out), "--num-samples", "2"],
    ),
    "info": ("safetensors", lambda f, out: ["info", str(f)]),
    "info-qdit": ("qdit", lambda f, out: ["info", str(f)]),
    "info-ternary": ("ternary", lambda f, out: ["info", str(f)]),
    "sample-qdit": (
        "qdit",
        lambda f, out: ["sample", "--model", str(f), "--out", str(out), "--num-samples", "2"],
    ),
    "sample-ternary": (
        "ternary",
        lambda f, out: ["sample", "--model", str(f), "--out", str(out), "--num-samples", "2"],
    ),
    "info-pt": ("pt", lambda f, out: ["info", str(f)]),
    "ptq": ("safetensors", lambda f, out: ["ptq", "--model", str(f), "--out", str(out)]),
    "ptq-pt": ("pt", lambda f, out: ["ptq", "--model", str(f), "--out", str(out)]),
    "export": ("state", lambda f, out: ["export", str(f), "--out", str(out)]),
    "export-safetensors": ("safetensors", lambda f, out: ["export", str(f), "--out", str(out)]),
    "eval": ("npz", lambda f, out: ["eval", str(f), "--evaluator", "fmnist", "--json", str(out)]),
    "info-npz": ("npz", lambda f, out: ["info", str(f)]),
}
OUTPUT_SUFFIX = {"sample": ".npz", "eval": ".json"}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    return _good_files(tmp_path_factory.mktemp("good"))


@pytest.mark.parametrize("how", KINDS)
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_broken_file_is_one_line_and_status_2(tmp_path, capsys, good, command, how):
    fmt, argv = COMMANDS[command]
    if how == "lying-header" and fmt not in ("safetensors", "qdit", "ternary"):
        pytest.skip("only safetensors files have a header that states a size")
    if how == "pickled-class" and fmt not in ("pt", "state"):
        pytest.skip("only PyTorch files are pickles")
    path = _broken(tmp_path, good[fmt], how)
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / ("result" + OUTPUT_SUFFIX.get(command.split("-")[0], ".safetensors"))
    status = main(argv(path, out))
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    if command.startswith("info") and how == "another-model" and fmt in ("pt", "npz"):
        # info describes any state dict or .npz it can read (the model is "unknown"); nothing is written.
        assert status == 0 and not lines
    else:
        assert status == 2, err
        assert len(lines) == 1 and lines[0].startswith("ditq"), err
        assert "Traceback" not in err
        assert path.name in lines[0] or "--" in lines[0], err  # says which file (or which option)
    assert not list(outdir.iterdir()), "an output file was left behind"


def test_good_files_pass_the_same_commands(tmp_path, capsys, good):
    """The broken-file matrix above is meaningful: the same commands accept the good files."""
    assert main(["info", str(good["safetensors"])]) == 0
    assert main(["info", str(good["pt"]), "--num-heads", "2"]) == 0
    assert main(["info", str(good["npz"])]) == 0
    assert main(["info", str(good["qdit"])]) == 0 and main(["info", str(good["ternary"])]) == 0
    assert "quantized_error" not in ditq.describe(good["qdit"]) and "quantized" in ditq.describe(
        good["ternary"]
    )
    out = tmp_path / "s.npz"
    assert main(["sample", "--model", str(good["safetensors"]), "--out", str(out), "--num-samples", "2",
                 "--sampler", "ddim", "--steps", "2"]) == 0  # fmt: skip
    assert out.is_file()


@pytest.mark.parametrize("how", ["random", "text", "pickled-class"])
def test_in_a_fresh_process_stderr_holds_the_one_line_only(tmp_path, good, how):
    """No warning or traceback reaches stderr from a real ``ditq`` process either."""
    src = good["pt"] if how == "pickled-class" else good["safetensors"]
    path = _broken(tmp_path, src, how)
    proc = subprocess.run(
        [sys.executable, "-m", "ditq", "sample", "--model", str(path), "--out", str(tmp_path / "o.npz")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    if how == "pickled-class":
        assert "Pickled" in proc.stderr and "does not load" in proc.stderr
    assert not (tmp_path / "o.npz").exists()
    json.dumps(proc.stderr)  # plain text
