"""A deployed DiT block hands int8 codes from a producer fused with its quantization (LayerNorm-modulate,
GELU) to its integer linears: the same numbers as the unfused path, only where the consumer takes them."""

from __future__ import annotations

import pytest
import torch

from ditq import quant
from ditq.errors import InvalidArgumentError
from ditq.kernels import ops
from ditq.models import DiT, DiTConfig

TINY = DiTConfig(
    depth=2, hidden_size=64, num_heads=2, patch_size=4, input_size=16, in_channels=1, num_classes=4
)
W8A8 = quant.QDiTConfig(w_bits=8, a_bits=8, w_group=0, w_sym=True, a_sym=True)  # w8a8_linear, int8 tokens
W4A8_SYM = quant.QDiTConfig(w_bits=4, a_bits=8, w_group=32, a_sym=True)  # w4a8_linear, int8 tokens
W4A8_QDIT = quant.QDiTConfig(w_bits=4, a_bits=8, w_group=32)  # asymmetric activations: not int8 tokens
FUSED = ("layernorm_modulate_quantize_int8", "gelu_quantize_int8")


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    ops.set_backend("auto")


def _model(kind: str, dtype=torch.float32) -> DiT:
    torch.manual_seed(0)
    model = DiT(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    if kind == "ternary-a8":
        quant.quantize_(model, quant.TernaryQATConfig(act_bits=8))  # prepare: QAT layers
        quant.quantize_(model, quant.TernaryQATConfig(act_bits=8, step="convert"))  # packed TernaryLinear
    elif kind != "float":
        quant.quantize_(model, {"w8a8": W8A8, "w4a8-sym": W4A8_SYM, "w4a8-qdit": W4A8_QDIT}[kind])
    return model.to(dtype).eval()


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 16, 16, generator=g).to(dtype)
    t = torch.tensor([1.0, 400.0, 999.0])
    y = torch.tensor([0, 3, 4])  # 4 = the null label
    return x, t, y


def _calls(monkeypatch) -> dict[str, int]:
    """Count calls of the fused ops (the real ones still run)."""
    counts = dict.fromkeys(FUSED, 0)
    for name in FUSED:
        real = getattr(ops, name)

        def spy(*args, _real=real, _name=name):
            counts[_name] += 1
            return _real(*args)

        monkeypatch.setattr(ops, name, spy)
    return counts


def _unfused(model, x, t, y):
    with ops.use_fusion(False):
        return model(x, t, y)


@pytest.mark.parametrize("kind", ["w8a8", "w4a8-sym", "ternary-a8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_block_equals_the_unfused_one_under_the_reference_backend(monkeypatch, kind, dtype):
    model, (x, t, y) = _model(kind, dtype), _inputs(dtype)
    ops.set_backend("reference")
    with torch.no_grad():
        expected = _unfused(model, x, t, y)
        counts = _calls(monkeypatch)
        out = model(x, t, y)
    # Per block: norm1 -> qkv and norm2 -> fc1 fused with LayerNorm-modulate, fc2's input with GELU.
    assert counts == {"layernorm_modulate_quantize_int8": 2 * TINY.depth, "gelu_quantize_int8": TINY.depth}
    assert out.dtype == dtype
    # The reference of a fused op is the unfused composition: the same numbers, bit for bit.
    assert torch.equal(out, expected)


@pytest.mark.parametrize("kind", ["float", "w4a8-qdit"])
def test_no_fusion_where_the_consumer_does_not_take_int8_tokens(monkeypatch, kind):
    model, (x, t, y) = _model(kind), _inputs()
    ops.set_backend("reference")
    counts = _calls(monkeypatch)
    with torch.no_grad():
        model(x, t, y)
    assert counts == dict.fromkeys(FUSED, 0)


def test_no_fusion_on_the_fake_quant_path_or_with_gradients(monkeypatch):
    model, (x, t, y) = _model("w8a8"), _inputs()
    ops.set_backend("reference")
    counts = _calls(monkeypatch)
    quant.set_kernels(model, False)
    with torch.no_grad():
        model(x, t, y)
    quant.set_kernels(model, True)
    model(x.requires_grad_(), t, y)  # the ops have no autograd formula: float path
    assert counts == dict.fromkeys(FUSED, 0)


def test_auto_backend_runs_the_cpu_kernels_of_the_fused_ops(monkeypatch):
    if not ops.has_fast_impl("layernorm_modulate_quantize_int8", "cpu"):
        pytest.skip("no C++ CPU kernels here")
    model, (x, t, y) = _model("w8a8"), _inputs()
    with torch.no_grad():
        expected = _unfused(model, x, t, y)
        counts = _calls(monkeypatch)
        out = model(x, t, y)
    assert counts == {"layernorm_modulate_quantize_int8": 2 * TINY.depth, "gelu_quantize_int8": TINY.depth}
    # The kernels' LayerNorm sums and exp round differently: a code may move by one.
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


def test_fusion_can_be_turned_off(monkeypatch):
    model, (x, t, y) = _model("w8a8"), _inputs()
    ops.set_backend("reference")
    counts = _calls(monkeypatch)
    with torch.no_grad(), ops.use_fusion(False):
        model(x, t, y)
    assert counts == dict.fromkeys(FUSED, 0)
    with torch.no_grad():
        model(x, t, y)  # restored on leaving the block
    assert counts["gelu_quantize_int8"] == TINY.depth


def test_a_layer_that_does_not_take_int8_codes_says_so():
    model = _model("w4a8-qdit")
    codes = ops.Int8Tokens(torch.zeros(2, 3, 64, dtype=torch.int8), torch.ones(2, 3, 1), torch.float32)
    with pytest.raises(InvalidArgumentError, match="does not take int8 per-token codes"):
        model.blocks[0].attn.qkv(codes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["w8a8", "ternary-a8"])
def test_gpu_fused_block_matches_the_unfused_one(monkeypatch, kind):
    # Triton's fused kernels compute LayerNorm and tanh with their own rounding: a code may move by one.
    model, (x, t, y) = _model(kind, torch.bfloat16).cuda(), _inputs(torch.bfloat16)
    x, t, y = x.cuda(), t.cuda(), y.cuda()
    with torch.no_grad():
        expected = _unfused(model, x, t, y).float()
        counts = _calls(monkeypatch)
        out = model(x, t, y).float()
    assert counts == {"layernorm_modulate_quantize_int8": 2 * TINY.depth, "gelu_quantize_int8": TINY.depth}
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_no_fusion_on_cpu_for_dtypes_its_kernels_decline(monkeypatch):
    model, (x, t, y) = _model("w8a8", torch.bfloat16), _inputs(torch.bfloat16)
    counts = _calls(monkeypatch)
    with torch.no_grad():
        model(x, t, y)
    assert counts == dict.fromkeys(FUSED, 0)
