"""gptq_model: whole models block by block, earlier blocks quantized, activation quantizers active."""

from __future__ import annotations

import copy

import pytest
import torch

from ditq.errors import InvalidArgumentError
from ditq.models import DiT, DiTConfig
from ditq.quant import CalibrationData, QDiTConfig, QuantLinear, quantize_, quantized_layers
from ditq.quant.api import select_layers
from ditq.quant.gptq import find_stages, gptq_model

TINY = DiTConfig(depth=2, hidden_size=64, num_heads=2, patch_size=2, input_size=8, num_classes=10)


def _dit(seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    model = DiT(TINY)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return model.eval()


def _data(n: int = 24, seed: int = 1) -> CalibrationData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, 11, (n,), generator=g)
    return CalibrationData(x, t, {"y": y})


def _err(model, ref, data):
    x, t, kw = next(data.batches(len(data)))
    with torch.no_grad():
        return float((model(x, t, **kw) - ref(x, t, **kw)).pow(2).mean())


def test_stages_follow_the_blocks_in_forward_order():
    model = _dit()
    names = select_layers(model, QDiTConfig(quantize_adaln=True))
    stages = find_stages(model, list(reversed(names)))
    assert [s for s, _ in stages] == ["blocks.0", "blocks.1"]
    assert sorted(stages[0][1]) == sorted(n for n in names if n.startswith("blocks.0."))
    loose = find_stages(model, ["final_layer.linear", "blocks.1.mlp.fc1"])
    assert loose == [("blocks.1", ["blocks.1.mlp.fc1"]), ("", ["final_layer.linear"])]


@pytest.mark.parametrize("dynamic", [True, False])
def test_gptq_beats_round_to_nearest_on_the_model_output(dynamic):
    fp, data = _dit(), _data()
    config = QDiTConfig(w_bits=3, w_group=32, a_group=0 if dynamic else -1, dynamic=dynamic)
    rtn = quantize_(copy.deepcopy(fp), config)
    if not dynamic:
        from ditq.quant import calibrate, run_calibration

        with calibrate(rtn):
            run_calibration(rtn, data)
    g = copy.deepcopy(fp)
    results = gptq_model(g, config, data)
    assert set(results) == set(quantized_layers(g)) == set(select_layers(fp, config))
    assert all(isinstance(m, QuantLinear) for m in quantized_layers(g).values())
    if not dynamic:
        assert all(q.act_quant.calibrated for q in quantized_layers(g).values())
    e_rtn, e_gptq = _err(rtn, fp, data), _err(g, fp, data)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


def test_later_blocks_see_the_quantized_earlier_blocks():
    """The Hessian of block 1 comes from inputs produced by the already-quantized block 0."""
    fp, data = _dit(), _data()
    config = QDiTConfig(w_bits=2, w_group=32)
    model = copy.deepcopy(fp)
    hook_inputs = []
    model.blocks[1].attn.qkv.register_forward_pre_hook(
        lambda m, a: hook_inputs.append(isinstance(model.blocks[0].attn.qkv, QuantLinear))
    )
    gptq_model(model, config, data, batch_size=8)
    # block 0's pass stops after block 0, so block 1 runs only once block 0 is quantized
    assert hook_inputs and all(hook_inputs)


def test_errors_leave_the_model_as_it_was():
    model, data = _dit(), _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidArgumentError, match="valid group sizes"):
        gptq_model(model, QDiTConfig(w_group=48), data)
    with pytest.raises(InvalidArgumentError, match="lacks"):
        gptq_model(model, QDiTConfig(layers={"blocks.9.attn.qkv": {"w_group": 32}}), data)
    assert not quantized_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
