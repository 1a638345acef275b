"""ditq.quant.api: quantize_ on a tiny DiT (accuracy, per-layer and GPTQ weight overrides), calibrate for
static ranges, one-line errors that leave the model alone, the handler registry keyed by config type."""

from __future__ import annotations

import pytest
import torch

from ditq.errors import InvalidArgumentError
from ditq.models import DiT, DiTConfig
from ditq.quant import QDiTConfig, calibrate, quantize_, quantized_layers
from ditq.quant.gptq import GPTQ
from ditq.quant.granularity import PerGroup

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


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def fp_out() -> torch.Tensor:
    return _run(_dit())


# ----------------------------------------------------------------------------
# Accuracy on a tiny DiT
# ----------------------------------------------------------------------------


def test_w8a8_close_to_fp_and_w4a8_worse(fp_out):
    w8a8 = _rel(_run(quantize_(_dit(), QDiTConfig(w_bits=8, a_bits=8, w_group=0))), fp_out)
    w4a8 = _rel(_run(quantize_(_dit(), QDiTConfig(w_bits=4, a_bits=8, w_group=32))), fp_out)
    assert w8a8 < 0.02
    assert w8a8 < w4a8 < 0.2


def test_per_layer_overrides_apply():
    cfg = QDiTConfig(
        w_bits=4,
        w_group=32,
        layers={
            "blocks.0.attn.qkv": {"w_group": 16, "a_group": 32, "w_bits": 8},
            "blocks.1.mlp.fc2": {"a_bits": None, "w_group": 0},
        },
    )
    layers = quantized_layers(quantize_(_dit(), cfg))
    qkv, fc2, proj = layers["blocks.0.attn.qkv"], layers["blocks.1.mlp.fc2"], layers["blocks.0.attn.proj"]
    assert (qkv.w_bits, qkv.w_group, qkv.w_scale.shape, qkv.act_quant.group) == (8, 16, (192, 4), 32)
    assert fc2.act_quant.bits is None and fc2.w_scale.shape == (64, 1)
    assert (proj.w_bits, proj.w_group, proj.act_quant.bits, proj.act_quant.group) == (4, 32, 8, 0)


def test_gptq_weight_overrides():
    model = _dit()
    fc1 = model.get_submodule("blocks.0.mlp.fc1")
    acc = GPTQ(64)
    hook = fc1.register_forward_hook(lambda m, inp, out: acc.add_batch(inp[0]))
    _run(model)
    hook.remove()
    res = acc.quantize(fc1.weight.detach(), bits=4, granularity=PerGroup(32))
    quantize_(model, QDiTConfig(w_group=32), weight_overrides={"blocks.0.mlp.fc1": res})
    layers = quantized_layers(model)
    assert torch.equal(layers["blocks.0.mlp.fc1"].qweight, res.codes)
    assert torch.equal(layers["blocks.0.mlp.fc1"].dequantized_weight(), res.weight)


# ----------------------------------------------------------------------------
# Static activations
# ----------------------------------------------------------------------------


def test_calibrate_then_freeze_differs_from_dynamic(fp_out):
    cfg = QDiTConfig(w_bits=8, a_bits=8, w_group=0, a_group=-1, dynamic=False)
    model = quantize_(_dit(), cfg)
    with pytest.raises(InvalidArgumentError, match="run calibration data"):
        _run(model)
    with calibrate(model) as m:
        assert m is model
        _run(model)
    static = _run(model)
    aq = quantized_layers(model)["blocks.0.mlp.fc2"].act_quant
    lo, hi = aq.lo.clone(), aq.hi.clone()
    _run(model, *_inputs(seed=2, scale=3.0))  # other data after the freeze leaves the ranges alone
    assert torch.equal(aq.lo, lo) and torch.equal(aq.hi, hi)
    dynamic = _run(quantize_(_dit(), QDiTConfig(w_bits=8, a_bits=8, w_group=0)))
    assert not torch.equal(static, dynamic)
    assert _rel(static, fp_out) < 0.05
    with calibrate(model, reset=False):  # widens the existing ranges
        _run(model, *_inputs(seed=2, scale=3.0))
    assert bool((aq.hi >= hi).all()) and bool((aq.lo <= lo).all()) and not torch.equal(aq.hi, hi)


def test_calibrate_is_a_no_op_for_dynamic_models(fp_out):
    model = quantize_(_dit(), QDiTConfig(w_bits=8, w_group=0))
    before = _run(model)
    with calibrate(model):
        assert torch.equal(_run(model), before)


# ----------------------------------------------------------------------------
# One-line errors
# ----------------------------------------------------------------------------


def _one_line(exc_info, *words):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


def test_errors_are_one_line_and_leave_the_model_alone():
    model = _dit()
    with pytest.raises(InvalidArgumentError) as e:
        quantize_(model, QDiTConfig(w_group=32, layers={"blocks.9.attn.qkv": {"w_group": 16}}))
    _one_line(e, "lacks: blocks.9.attn.qkv", "e.g. blocks.0.attn.qkv")
    with pytest.raises(InvalidArgumentError) as e:
        quantize_(model, QDiTConfig(w_group=32, layers={"final_layer.linear": {"w_bits": 8}}))
    _one_line(e, "leave unquantized", "final_layer.linear")
    with pytest.raises(InvalidArgumentError) as e:
        quantize_(model, QDiTConfig(w_group=48))
    _one_line(e, "group size 48 does not divide the 64 input channels of layer 'blocks.0.attn.qkv'", "valid")
    with pytest.raises(InvalidArgumentError) as e:
        quantize_(model, QDiTConfig(w_group=32, layers={"blocks.1.mlp.fc2": {"w_group": 96}}))
    _one_line(e, "'blocks.1.mlp.fc2'", "256 input channels")
    with pytest.raises(InvalidArgumentError) as e:
        quantize_(model, QDiTConfig(w_group=32), include=["blocks.*.attention.*"])
    _one_line(e, "no nn.Linear layer matches", "t_embedder.mlp.0")
    with pytest.raises(InvalidArgumentError) as e:
        quantize_(model, QDiTConfig(w_group=32), weight_overrides={"blocks.0.mlp.fc3": (None, None, None)})
    _one_line(e, "weight_overrides names layer(s) the model lacks")
    with pytest.raises(InvalidArgumentError, match="unknown quantization preset 'sd3'"):
        quantize_(model, QDiTConfig(preset="sd3"))
    assert not quantized_layers(model)  # nothing swapped by the failed calls
    quantize_(model, QDiTConfig(w_group=32))
    with pytest.raises(InvalidArgumentError) as e:
        quantize_(model, QDiTConfig(w_group=32))
    _one_line(e, "8 layers are already quantized")


# ----------------------------------------------------------------------------
# quantize_ is a handler registry keyed by config type
# ----------------------------------------------------------------------------


def _calib(n: int = 12, seed: int = 3):
    from ditq.quant import CalibrationData

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return CalibrationData(x, t, {"y": y})


def test_gptq_config_equals_gptq_model():
    from ditq.quant import GPTQConfig
    from ditq.quant.gptq import gptq_model

    config = QDiTConfig(w_bits=4, a_bits=8, w_group=32)
    data = _calib()
    direct = _dit()
    gptq_model(direct, config, data, batch_size=4)
    via_door = quantize_(_dit(), GPTQConfig(config, lambda model: data, batch_size=4))  # a callable source
    got, want = quantized_layers(via_door), quantized_layers(direct)
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name].qweight, want[name].qweight), name
        assert torch.equal(got[name].w_scale, want[name].w_scale), name


def test_static_ranges_are_calibrated_by_quantize_when_given_data():
    from ditq.quant import run_calibration

    config = QDiTConfig(w_bits=8, a_bits=8, w_group=32, dynamic=False)
    data = _calib()
    by_hand = quantize_(_dit(), config)
    with calibrate(by_hand):
        run_calibration(by_hand, data, 64)
    at_once = quantize_(_dit(), config, calibration=data)
    x, t, y = _inputs()
    assert torch.equal(_run(at_once, x, t, y), _run(by_hand, x, t, y))


def test_dict_configs_and_registered_types_dispatch():
    from ditq.quant import TernaryQATConfig, TernaryQATLinear, register_quantize_handler

    model = quantize_(_dit(), TernaryQATConfig().to_dict())
    assert any(isinstance(m, TernaryQATLinear) for m in model.modules())
    assert quantized_layers(quantize_(_dit(), QDiTConfig(w_bits=8, w_group=32).to_dict()))

    class HalfConfig:
        pass

    with pytest.raises(InvalidArgumentError, match="no handler for a HalfConfig") as e:
        quantize_(_dit(), HalfConfig())
    assert "QDiTConfig" in str(e.value) and "\n" not in str(e.value)
    try:

        @register_quantize_handler(HalfConfig)
        def _half(model, config, *, include=None, exclude=None):
            return model.half()

        assert next(quantize_(_dit(), HalfConfig()).parameters()).dtype == torch.float16
    finally:
        from ditq.quant import api

        api._HANDLERS.pop(HalfConfig)


def test_options_a_handler_does_not_take_are_one_line_errors():
    from ditq.quant import TernaryQATConfig

    with pytest.raises(InvalidArgumentError, match="calibration do not apply to a TernaryQATConfig") as e:
        quantize_(_dit(), TernaryQATConfig(), calibration=_calib())
    assert "\n" not in str(e.value)
    with pytest.raises(InvalidArgumentError, match="GPTQConfig needs calibration"):
        from ditq.quant import GPTQConfig

        GPTQConfig(QDiTConfig())
