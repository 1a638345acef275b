"""ditq.formats.ditq_float: float ditq checkpoints round-trip bit for bit with their metadata, half
precision loads as float32, reserved metadata cannot be overwritten."""

import pytest
import torch

from ditq.checkpoint import read_metadata, save_checkpoint
from ditq.formats.loader import load, save
from ditq.models import DiT, DiTConfig

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


def test_save_load_round_trip_is_bit_identical(tmp_path):
    model = _tiny()
    path = tmp_path / "m.safetensors"
    save(model, path, command="ditq test", extra_metadata={"note": "hi"})
    loaded = load(path)
    assert loaded.config == TINY
    assert not loaded.training
    assert not loaded.pos_embed.requires_grad
    assert all(p.requires_grad for n, p in loaded.named_parameters() if n != "pos_embed")
    assert torch.equal(_out(loaded), _out(model))
    meta = read_metadata(path)
    assert meta["model_config"] == TINY.to_dict()
    assert meta["command"] == "ditq test" and meta["note"] == "hi"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_half_precision_checkpoint_loads_as_float32(tmp_path):
    model = _tiny()
    path = tmp_path / "m16.safetensors"
    tensors = {k: v.half() for k, v in model.state_dict().items()}
    save_checkpoint(path, tensors, {"model_config": TINY.to_dict()})
    loaded = load(path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight.half().float())


def test_save_refuses_to_overwrite_reserved_metadata(tmp_path):
    with pytest.raises(ValueError, match="model_config"):
        save(_tiny(), tmp_path / "m.safetensors", extra_metadata={"model_config": {}})
