"""Every command that writes, with a read-only output or a full disk: one line on stderr, exit 74, and no
file written (train, sample, extract-latents, ptq and export have their own, longer checks beside their
tests; these are the rest)."""

from __future__ import annotations

import numpy as np
import pytest

from ditq import checkpoint
from ditq.cli.main import main


@pytest.fixture
def samples(tmp_path):
    path = tmp_path / "in" / "s.npz"
    path.parent.mkdir()
    np.savez(path, arr_0=np.zeros((4, 32, 32, 3), np.uint8), arr_1=np.arange(4) % 10)
    return path


COMMANDS = {
    "eval --json": lambda s, out: ["eval", str(s), "--evaluator", "fmnist", "--json", str(out / "r.json")],
    "sample (grid)": lambda s, out: ["sample", "--model", "ditq-fmnist", "--out", str(out / "g.png"),
                                     "--num-samples", "2", "--sampler", "ddim", "--steps", "2"],
    "demo": lambda s, out: ["demo", "--out", str(out), "--steps", "2", "--samples-per-class", "1",
                            "--eval-samples", "0", "--ptq-samples", "0", "--ternary-steps", "0",
                            "--skip-deploy"],
}  # fmt: skip


@pytest.mark.parametrize("fault", ["EROFS", "disk-full"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_unwritable_output_is_one_line_and_exit_74(tmp_path, capsys, monkeypatch, samples, command, fault):
    out = tmp_path / "out"
    if fault == "EROFS":
        monkeypatch.setenv(checkpoint.FAULT_ERRNO_ENV, "EROFS")
    else:
        monkeypatch.setattr(checkpoint, "_written", 0)
        monkeypatch.setenv(checkpoint.FAULT_ENV, "0")  # nothing fits
    status = main(COMMANDS[command](samples, out))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 74, err
    assert len(err) == 1 and err[0].startswith("ditq: error: cannot write the "), err
    assert ("read-only" if fault == "EROFS" else "disk is full") in err[0]
    assert not [p for p in out.rglob("*") if p.is_file()] if out.exists() else True
