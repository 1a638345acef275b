"""ditq.quant.state: quantized state dicts: packed_state_dict and pack_ (int4 codes for saving),
load_quantized_state_dict (layouts, a meta-device skeleton filled by adoption, a saved model rebuilt
from its state dict and config, one-line errors for a config that does not fit)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ditq.errors import CheckpointError
from ditq.models import DiT, DiTConfig
from ditq.quant import QDiTConfig, calibrate, pack_, quantize_, quantized_layers
from ditq.quant.state import load_quantized_state_dict, packed_state_dict


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16)).eval()


def test_load_quantized_state_dict_checks_the_layout_and_fills_a_meta_model():
    cfg = QDiTConfig(w_bits=4, w_group=16, a_bits=8, preset=None)
    model = quantize_(_tiny(), cfg)
    packed_sd, codes_sd = packed_state_dict(model), model.state_dict()
    with torch.device("meta"):
        skeleton = _tiny()
    load_quantized_state_dict(skeleton, packed_sd, cfg, layout="int4", packed=True)
    assert not any(t.is_meta for t in skeleton.state_dict().values())
    assert all(q.packed for q in quantized_layers(skeleton).values())
    assert skeleton[0].qweight.data_ptr() == packed_sd["0.qweight"].data_ptr()  # adopted, not copied
    x = torch.randn(5, 32)
    skeleton.eval()  # the same path as the model (the W4A8 kernel where it is fast, else the float path)
    with torch.no_grad():
        assert torch.equal(skeleton(x), model(x))
    with pytest.raises(CheckpointError) as e:
        load_quantized_state_dict(_tiny(), codes_sd, cfg, layout="int4")
    msg = str(e.value)
    assert "layer '0': qweight is torch.uint8 (64, 32) in the state dict but the config gives" in msg
    assert "torch.uint8 (64, 16) (int4-packed) for 4-bit weights" in msg and "\n" not in msg
    with pytest.raises(CheckpointError, match="layer '0': qweight is torch.uint8 \\(64, 16\\)"):
        load_quantized_state_dict(_tiny(), packed_sd, cfg, layout="codes")
    fresh = load_quantized_state_dict(_tiny(), codes_sd, cfg).eval()  # "auto": either layout
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_pack_converts_every_small_layer():
    cfg = QDiTConfig(w_bits=4, w_group=16, a_bits=8, preset=None, layers={"2": {"w_bits": 8}})
    model = pack_(quantize_(_tiny(), cfg))
    assert model[0].packed and not model[2].packed
    assert all(not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() < 2 or t.shape[1] < 32
               for n, t in model[0].state_dict().items())  # fmt: skip


TINY = DiTConfig(depth=2, hidden_size=64, num_heads=2, patch_size=2, input_size=8, num_classes=10)


def _dit(seed: int = 0) -> DiT:
    """A tiny DiT with every weight random; std 0.1 makes the blocks matter (~half of the output)."""
    torch.manual_seed(seed)
    model = DiT(TINY)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return model.eval()


def _inputs(seed: int = 1, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(4, 4, 8, 8, generator=g)
    return x, torch.tensor([0, 250, 500, 999]), torch.tensor([1, 3, 5, 10])


def _run(model, *inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(*(inputs or _inputs()))


def _one_line(exc_info, *words):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


def test_save_and_reload_gives_identical_outputs(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = QDiTConfig(
        w_bits=4,
        a_bits=8,
        w_group=32,
        a_group=16,
        dynamic=False,
        quantize_adaln=True,
        layers={"blocks.0.attn.qkv": {"w_group": 16, "a_group": 0}, "blocks.1.mlp.fc2": {"a_bits": None}},
    )
    model = quantize_(_dit(), cfg, exclude=["blocks.1.attn.proj"])
    with calibrate(model):
        _run(model)
    out = _run(model)
    save_file(model.state_dict(), tmp_path / "q.safetensors")
    (tmp_path / "q.json").write_text(cfg.to_json())

    fresh = _dit(seed=7)  # other float weights: everything must come from the file
    loaded = load_quantized_state_dict(
        fresh, load_file(tmp_path / "q.safetensors"), QDiTConfig.from_json((tmp_path / "q.json").read_text())
    )
    assert loaded is fresh
    assert list(quantized_layers(fresh)) == list(quantized_layers(model))
    assert type(fresh.get_submodule("blocks.1.attn.proj")) is nn.Linear
    assert torch.equal(_run(fresh), out)


def test_reload_with_the_wrong_config_is_one_line():
    model = quantize_(_dit(), QDiTConfig(w_group=32))
    sd = model.state_dict()
    fresh = _dit()
    with pytest.raises(CheckpointError) as e:
        load_quantized_state_dict(fresh, sd, QDiTConfig(w_group=16))
    _one_line(e, "layer 'blocks.0.attn.qkv': w_scale is", "(192, 2)", "(192, 4)")
    with pytest.raises(CheckpointError) as e:
        load_quantized_state_dict(fresh, sd, QDiTConfig(w_group=32, w_sym=True))
    _one_line(e, "qweight is torch.uint8")
    with pytest.raises(CheckpointError) as e:
        load_quantized_state_dict(fresh, sd, QDiTConfig(w_group=32, dynamic=False))
    _one_line(e, "missing", "act_quant.lo")
    with pytest.raises(CheckpointError) as e:
        load_quantized_state_dict(fresh, _dit().state_dict(), QDiTConfig(w_group=32))
    _one_line(e, "no quantized layers")
    with pytest.raises(CheckpointError) as e:
        load_quantized_state_dict(fresh, sd, QDiTConfig(w_group=32, layers={"final_layer.linear": {}}))
    _one_line(e, "does not quantize: final_layer.linear")
    assert not quantized_layers(fresh)  # failed loads leave the float model as it was
    load_quantized_state_dict(fresh, sd, QDiTConfig(w_group=32))
    assert torch.equal(_run(fresh), _run(model))
