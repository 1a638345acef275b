"""``ditq info`` on quantized checkpoints counts the model's weights, not stored bytes; the CLI starts
without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import ditq
from ditq import quant
from ditq.cli.main import main
from ditq.formats import qdit
from ditq.formats.ternary import checkpoint_sizes, save_ternary
from ditq.models import DiTConfig, build_model
from ditq.quant import QDiTConfig, TernaryQATConfig, quantize_

TINY = DiTConfig(
    depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=4, num_classes=5
)


def _random() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(TINY)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model.eval()


def _float_params() -> int:
    """Elements of the float model's state dict: what ``info`` counts for a float checkpoint."""
    return sum(v.numel() for v in build_model(TINY).state_dict().values())


def _info(capsys, path, *flags) -> tuple[int, str]:
    code = main(["info", str(path), *flags])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return code, captured.out


def _stored(path) -> int:
    from ditq.checkpoint import read_safetensors_header

    info, _ = read_safetensors_header(path)
    return sum(torch.Size(v["shape"]).numel() for v in info.values())


def _header_bytes(path, suffix: str) -> int:
    from ditq.checkpoint import read_safetensors_header

    info, _ = read_safetensors_header(path)
    size = {"U8": 1, "I8": 1, "F32": 4}
    return sum(
        torch.Size(v["shape"]).numel() * size[v["dtype"]] for k, v in info.items() if k.endswith(suffix)
    )


def test_ternary_checkpoint_counts_four_weights_per_packed_byte(tmp_path, capsys):
    model = quantize_(_random(), TernaryQATConfig())
    model = quantize_(model, TernaryQATConfig(step="convert"))
    path = save_ternary(model, tmp_path / "t.safetensors")
    _, out = _info(capsys, path, "--json")
    d = json.loads(out)
    q, sizes = d["quantized"], checkpoint_sizes(path)
    # The float model's count; the packed uint8 weights alone would give a quarter of the layers' weights.
    assert d["num_parameters"] == _float_params() == sizes["float_params"]
    assert d["num_stored_values"] == _stored(path) < d["num_parameters"]
    assert q["kind"] == "ternary" and q["layers"] == 10 and q["bits_per_weight"] == 2.0
    assert q["bytes"]["weight_codes"] * 4 == q["weights"] == sizes["ternary"]["weights"]
    assert q["bytes"]["quant_params"] == 10 * 4  # one float32 alpha per layer
    assert sum(q["bytes"].values()) == path.stat().st_size == d["file_size"]
    assert q["fp32_bytes"] == 4 * d["num_parameters"]

    _, text = _info(capsys, path)
    assert f"{_float_params():,} ({q['weights']:,} ternary weights in 10 layers, stored at 2 bits" in text
    assert f"{_stored(path):,} stored values" in text and "weight codes" in text


def test_qdit_checkpoint_counts_weights_not_scales(tmp_path, capsys):
    config = QDiTConfig(w_bits=4, w_group=16, a_bits=8)
    model = quantize_(_random(), config)
    path = qdit.save(model, tmp_path / "q.safetensors", config)
    _, out = _info(capsys, path, "--json")
    d = json.loads(out)
    q = d["quantized"]
    layers = quant.quantized_layers(model)
    assert d["num_parameters"] == _float_params()
    # The stored elements (what was counted before) are neither: scales and zero points are no
    # weights, and packed 4-bit codes hold two weights a byte.
    assert d["num_stored_values"] == _stored(path) != d["num_parameters"]
    assert q["kind"] == "qdit" and q["layers"] == len(layers) > 0
    assert q["weights"] == sum(m.in_features * m.out_features for m in layers.values())
    # Codes one per byte, or two per byte where 4-bit layers are stored packed (int4 layout).
    assert q["bytes"]["weight_codes"] == _header_bytes(path, ".qweight")
    assert q["bits_per_weight"] == 8 * q["bytes"]["weight_codes"] / q["weights"] in (4.0, 8.0)
    assert q["bytes"]["quant_params"] == sum(
        4 * (m.w_scale.numel() + m.w_zero.numel()) for m in layers.values()
    )
    assert sum(q["bytes"].values()) == path.stat().st_size

    _, text = _info(capsys, path)
    assert f"{_float_params():,} ({q['weights']:,} quantized weights" in text and "quant_config" in text


def test_float_checkpoint_is_described_as_before(tmp_path, capsys):

    path = tmp_path / "f.safetensors"
    ditq.save(_random(), path)
    _, out = _info(capsys, path, "--json")
    d = json.loads(out)
    assert d["num_parameters"] == _float_params() == _stored(path)
    assert "quantized" not in d and "num_stored_values" not in d
    _, text = _info(capsys, path)
    assert f"({_float_params():,} parameters;" in text


@pytest.mark.parametrize("argv", [["--version"], ["--help"]])
def test_version_and_help_do_not_import_torch(argv):
    # Importing torch takes seconds; the CLI's parser must be buildable without it.
    code = (
        "import sys\nfrom ditq.cli.main import main\n"
        f"status = main({argv!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(status)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ditq" in done.stdout
