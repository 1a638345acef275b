"""ditq.quant.state: quantized state dicts: packed_state_dict and pack_ (int4 codes for saving),
load_quantized_state_dict (layouts, a meta-device skeleton filled by adoption, a saved model rebuilt
from its state dict and config, one-line errors for a config that does not fit)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ditq.errors import CheckpointError
from ditq.quant import QDiTConfig, pack_, quantize_, quantized_layers
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
