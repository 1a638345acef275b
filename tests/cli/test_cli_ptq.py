"""``ditq ptq`` end to end on a tiny checkpoint; the result samples with ``ditq sample``; one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ditq
from ditq import models
from ditq.cli.main import main


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = models.create_model(
        "DiT-S/4", input_size=16, depth=2, hidden_size=64, num_heads=2, in_channels=1, num_classes=4
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.05)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    ditq.save(model, path, command="test")
    return path


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DITQ_CACHE", str(tmp_path / "cache"))


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


CALIB = ("--calib-samples", 4, "--calib-steps", 3)


def test_ptq_gptq_then_sample_the_checkpoint(tmp_path, capsys, tiny_ckpt):
    out = tmp_path / "q.safetensors"
    code, stdout, err = run(
        capsys, "ptq", "--model", tiny_ckpt, "--wbits", 4, "--w-group", 32, "--gptq", *CALIB,
        "--out", out, "--report", tmp_path / "r",
    )  # fmt: skip
    assert code == 0, err
    assert "calibration: recorded 8 inputs" in stdout and "wrote" in stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["quant_config"]["w_group"] == 32 and report["settings"]["gptq"]
    code, stdout, err = run(
        capsys, "sample", "--model", out, "--sampler", "ddim", "--steps", 2, "--num-samples", 4,
        "--out", tmp_path / "s.npz",
    )  # fmt: skip
    assert code == 0, err
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (4, 16, 16, 3)
    code, stdout, _ = run(capsys, "info", out)
    assert code == 0 and "quant_config" in stdout


def test_static_activations_record_calibration(tmp_path, capsys, tiny_ckpt):
    code, stdout, err = run(
        capsys, "ptq", "--model", tiny_ckpt, "--wbits", 8, "--w-group", 0, "--a-group", -1, "--static",
        *CALIB, "--out", tmp_path / "q.safetensors",
    )  # fmt: skip
    assert code == 0, err
    assert "calibration" in stdout


@pytest.mark.parametrize(
    "extra,message",
    [
        (("--wbits", 9), "w_bits must be an integer from 2 to 8"),
        (("--abits", 1), "a_bits must be an integer from 2 to 8"),
        (
            ("--w-group", 48),
            "does not divide the 64 input channels of layer 'blocks.0.attn.qkv'; valid group",
        ),
        (("--search", "--layer-config", "x.json"), "exclude each other"),
        (("--search-groups", "a,b"), "--search-groups must be integers"),
        (("--calib-samples", 0), "--calib-samples must be positive"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, capsys, tiny_ckpt, extra, message):
    code, _, err = run(capsys, "ptq", "--model", tiny_ckpt, "--out", tmp_path / "q.safetensors", *extra)
    assert code == 2
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "q.safetensors").exists()


def test_layer_config_naming_missing_layers_is_a_one_line_error(tmp_path, capsys, tiny_ckpt):
    cfg = tmp_path / "layers.json"
    cfg.write_text(
        json.dumps(
            {"format": "ditq-layer-config", "version": 1, "layers": {"blocks.7.mlp.fc1": {"w_group": 32}}}
        )
    )
    code, _, err = run(
        capsys, "ptq", "--model", tiny_ckpt, "--layer-config", cfg, "--out", tmp_path / "q.safetensors"
    )
    assert code == 2 and "blocks.7.mlp.fc1" in err and err.count("\n") == 1


def test_calibration_data_of_the_wrong_shape_is_a_one_line_error(tmp_path, capsys, tiny_ckpt):
    from ditq.quant import CalibrationData

    CalibrationData(torch.zeros(2, 4, 8, 8), torch.zeros(2), {"y": torch.zeros(2).long()}).save(
        tmp_path / "c.safetensors"
    )
    code, _, err = run(
        capsys, "ptq", "--model", tiny_ckpt, "--gptq", "--calib-data", tmp_path / "c.safetensors",
        "--out", tmp_path / "q.safetensors",
    )  # fmt: skip
    assert code == 2 and "per sample but the model takes [1, 16, 16]" in err
