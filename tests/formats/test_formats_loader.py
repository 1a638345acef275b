"""ditq.formats.loader: ditq.load dispatches on what a file is (quantized metadata, truncated files, missing
files, unknown names), describe() of each format, ditq info, models shipped in the package by name."""

import argparse
import json

import pytest
import torch

from ditq.checkpoint import load_tensors
from ditq.cli import info
from ditq.errors import CheckpointError, UnknownModelError
from ditq.formats import loader
from ditq.formats.loader import load, save
from ditq.models import DiT, DiTConfig, registry

TINY = DiTConfig(depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, num_classes=10)


def _tiny(config: DiTConfig = TINY, seed: int = 0) -> DiT:
    """A tiny DiT with every weight random (adaLN-Zero would make the output all zeros)."""
    torch.manual_seed(seed)
    model = DiT(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model.eval()


def _inputs(config: DiTConfig = TINY):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, config.in_channels, config.input_size, config.input_size, generator=g)
    return x, torch.tensor([0, 400, 999]), torch.tensor([1, 5, config.num_classes])


def _out(model, config: DiTConfig = TINY) -> torch.Tensor:
    with torch.no_grad():
        return model(*_inputs(config))


@pytest.fixture
def tiny_in_registry(monkeypatch):
    """Register the tiny size, so its heads can be looked up like DiT-S/B/L/XL."""
    monkeypatch.setitem(registry.MODEL_CONFIGS, "DiT-Tiny/2", TINY)


#################################################################################
#                                   Dispatch                                    #
#################################################################################


def test_quantized_checkpoint_is_not_loaded_as_full_precision(tmp_path):
    path = tmp_path / "q.safetensors"
    save(_tiny(), path, extra_metadata={"quant_config": {"w_bits": 4}})
    with pytest.raises(CheckpointError, match="quantized"):
        load(path)


@pytest.mark.parametrize("name", ["m.pt", "m.safetensors"])
def test_truncated_files_raise_one_line(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".pt"):
        torch.save(_tiny().state_dict(), path)
    else:
        save(_tiny(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load(path, num_heads=2)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_missing_file_and_unknown_names(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load(tmp_path / "nope.pt")
    with pytest.raises(UnknownModelError, match="DiT-XL/2"):
        load("DiT-Q/2")
    with pytest.raises(CheckpointError, match="create_model"):
        load("DiT-S/2")
    with pytest.raises(CheckpointError, match="256, 512"):
        load("DiT-XL/2", image_size=384)


#################################################################################
#                                   describe                                    #
#################################################################################


def test_describe_each_format(tmp_path, tiny_in_registry):
    model, ema = _tiny(seed=0), _tiny(seed=1)
    n_params = sum(v.numel() for v in model.state_dict().values())
    n_tensors = len(model.state_dict())
    files = {
        "ditq-safetensors": tmp_path / "m.safetensors",
        "dit-official": tmp_path / "official.pt",
        "dit-training": tmp_path / "train.pt",
        "safetensors": tmp_path / "plain.safetensors",
    }
    save(model, files["ditq-safetensors"], command="ditq train")
    torch.save(model.state_dict(), files["dit-official"])
    args = argparse.Namespace(model="DiT-Tiny/2", image_size=64)
    torch.save(
        {"model": model.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": args}, files["dit-training"]
    )
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(files["safetensors"]))

    for fmt, path in files.items():
        d = loader.describe(path)
        assert d["format"] == fmt
        assert d["config"] == TINY.to_dict()
        assert d["num_tensors"] == n_tensors
        assert d["num_parameters"] == n_params
        assert d["file_size"] == path.stat().st_size
        assert d["dtypes"] == {"float32": n_tensors}
        json.dumps(d)  # machine-readable as is
    assert loader.describe(files["ditq-safetensors"])["metadata"]["command"] == "ditq train"
    training = loader.describe(files["dit-training"])
    assert training["state_dict"] == "ema"
    assert training["metadata"]["args"] == {"model": "DiT-Tiny/2", "image_size": 64}


def test_describe_without_heads_reports_why(tmp_path):
    path = tmp_path / "official.pt"
    torch.save(_tiny().state_dict(), path)
    d = loader.describe(path)
    assert d["config"] is None and "num_heads" in d["config_error"]
    assert loader.describe(path, num_heads=2)["config"] == TINY.to_dict()


def test_load_of_plain_safetensors_state_dict(tmp_path, tiny_in_registry):
    from safetensors.torch import save_file

    model = _tiny()
    path = tmp_path / "plain.safetensors"
    save_file(model.state_dict(), str(path))
    assert torch.equal(_out(load(path)), _out(model))
    assert set(load_tensors(path)) == set(model.state_dict())


def test_info_cli(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    save(_tiny(), path, command="ditq train --config x.yaml")
    parser = argparse.ArgumentParser()
    info.add_parser(parser.add_subparsers())

    args = parser.parse_args(["info", str(path), "--json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "ditq-safetensors"

    args = parser.parse_args(["info", str(path)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "ditq-safetensors (format_version 1)" in text
    assert "ditq train --config x.yaml" in text
    assert "hidden_size=32" in text


def test_embedded_model_by_name(monkeypatch, tmp_path):
    model = _tiny()
    path = tmp_path / "ditq-fmnist.safetensors"
    save(model, path)
    monkeypatch.setattr(loader, "embedded_model_path", lambda name="ditq-fmnist": path)
    loaded = load("ditq-fmnist")
    assert loaded.config == model.config
    monkeypatch.setattr(loader, "embedded_model_path", lambda name="ditq-fmnist": None)
    with pytest.raises(CheckpointError, match="not in this install"):
        load("ditq-fmnist")
    monkeypatch.undo()
    with pytest.raises(UnknownModelError):
        loader.embedded_model_path("ditq-cifar")
