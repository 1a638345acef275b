"""ditq.formats.build: a file that does not fit the model names its missing, unexpected and misshapen
tensors in one line; the image size asked for must be the model's."""

import pytest
import torch

from ditq.checkpoint import save_checkpoint
from ditq.errors import CheckpointError
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


def test_mismatch_names_keys_and_shapes(tmp_path):
    tensors = dict(_tiny().state_dict())
    del tensors["blocks.1.mlp.fc2.bias"]
    tensors["blocks.0.extra.weight"] = torch.zeros(1)
    tensors["blocks.0.attn.qkv.weight"] = torch.zeros(90, 32)
    path = tmp_path / "bad.safetensors"
    save_checkpoint(path, tensors, {"model_config": TINY.to_dict()})
    with pytest.raises(CheckpointError) as e:
        load(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert "missing keys blocks.1.mlp.fc2.bias" in msg
    assert "unexpected keys blocks.0.extra.weight" in msg
    assert "blocks.0.attn.qkv.weight: expected (96, 32), found (90, 32)" in msg


def test_many_missing_keys_are_summarized(tmp_path):
    tensors = {k: v for k, v in _tiny().state_dict().items() if not k.startswith("blocks.1.")}
    path = tmp_path / "bad.safetensors"
    save_checkpoint(path, tensors, {"model_config": TINY.to_dict()})
    with pytest.raises(CheckpointError, match=r"\(\+\d+ more\)"):
        load(path)


def test_image_size_must_match_a_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save(_tiny(), path)  # input_size 8 -> 64 px
    assert load(path, image_size=64).config.input_size == 8
    with pytest.raises(CheckpointError, match="64 px"):
        load(path, image_size=256)
