"""A deployed DiT or Large-DiT block hands int8 codes from a producer fused with its quantization
(LayerNorm- or RMSNorm-modulate, GELU, SwiGLU) to its integer linears: the same numbers as the unfused
path, only where the consumers take them."""

from __future__ import annotations

import pytest
import torch

from ditq import quant
from ditq.errors import InvalidArgumentError
from ditq.kernels import ops
from ditq.models import DiT, DiTConfig, LargeDiT, LargeDiTConfig

TINY = DiTConfig(
    depth=2, hidden_size=64, num_heads=2, patch_size=4, input_size=16, in_channels=1, num_classes=4
)
TINY_LARGE = LargeDiTConfig(
    dim=64, n_layers=2, n_heads=4, patch_size=4, input_size=16, in_channels=1, num_classes=4, adaln_norm=True
)
W8A8 = quant.QDiTConfig(w_bits=8, a_bits=8, w_group=0, w_sym=True, a_sym=True)  # w8a8_linear, int8 tokens
W4A8_SYM = quant.QDiTConfig(w_bits=4, a_bits=8, w_group=32, a_sym=True)  # w4a8_linear, int8 tokens
W4A8_QDIT = quant.QDiTConfig(w_bits=4, a_bits=8, w_group=32)  # asymmetric activations: not int8 tokens
FUSED = (
    "layernorm_modulate_quantize_int8",
    "gelu_quantize_int8",
    "rmsnorm_modulate_quantize_int8",
    "swiglu_quantize_int8",
)
DEPTH = 2


def _fused_calls(family: str) -> dict[str, int]:
    """The fused calls of one forward: two norm-modulates and one hidden activation per block."""
    counts = dict.fromkeys(FUSED, 0)
    if family == "dit":  # norm1 -> qkv, norm2 -> fc1; GELU -> fc2
        counts.update(layernorm_modulate_quantize_int8=2 * DEPTH, gelu_quantize_int8=DEPTH)
    else:  # attention_norm -> wq, wk, wv; ffn_norm -> w1, w3; SwiGLU -> w2
        counts.update(rmsnorm_modulate_quantize_int8=2 * DEPTH, swiglu_quantize_int8=DEPTH)
    return counts


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    ops.set_backend("auto")


def _model(kind: str, dtype=torch.float32, family: str = "dit") -> DiT | LargeDiT:
    torch.manual_seed(0)
    model = DiT(TINY) if family == "dit" else LargeDiT(TINY_LARGE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # RMSNorm weights: around 1, not all equal
                p.uniform_(0.5, 1.5)
            else:
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
    """Count calls of the fused ops (the real ones still run), and check that none is handed a
    tensor that wants a gradient (they have no autograd formula)."""
    counts = dict.fromkeys(FUSED, 0)
    for name in FUSED:
        real = getattr(ops, name)

        def spy(*args, _real=real, _name=name):
            counts[_name] += 1
            assert not any(
                a.requires_grad for a in args if isinstance(a, torch.Tensor) and torch.is_grad_enabled()
            )
            return _real(*args)

        monkeypatch.setattr(ops, name, spy)
    return counts


def _unfused(model, x, t, y):
    with ops.use_fusion(False):
        return model(x, t, y)


@pytest.mark.parametrize("family", ["dit", "large-dit"])
@pytest.mark.parametrize("kind", ["w8a8", "w4a8-sym", "ternary-a8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_block_equals_the_unfused_one_under_the_reference_backend(monkeypatch, family, kind, dtype):
    model, (x, t, y) = _model(kind, dtype, family), _inputs(dtype)
    ops.set_backend("reference")
    with torch.no_grad():
        expected = _unfused(model, x, t, y)
        counts = _calls(monkeypatch)
        out = model(x, t, y)
    assert counts == _fused_calls(family)
    assert out.dtype == dtype
    # The reference of a fused op is the unfused composition: the same numbers, bit for bit.
    assert torch.equal(out, expected)


@pytest.mark.parametrize("family", ["dit", "large-dit"])
@pytest.mark.parametrize("kind", ["float", "w4a8-qdit"])
def test_no_fusion_where_the_consumer_does_not_take_int8_tokens(monkeypatch, family, kind):
    model, (x, t, y) = _model(kind, family=family), _inputs()
    ops.set_backend("reference")
    counts = _calls(monkeypatch)
    with torch.no_grad():
        model(x, t, y)
    assert counts == dict.fromkeys(FUSED, 0)


def test_no_fusion_where_one_of_the_consumers_does_not_take_int8_tokens(monkeypatch):
    # wq, wk, wv share the codes of one fused call: wk quantizing Q-DiT's way rules it out for all three.
    model, (x, t, y) = _model("w8a8", family="large-dit"), _inputs()
    w4a8 = _model("w4a8-qdit", family="large-dit").layers[0].attention.wk
    for block in model.layers:
        block.attention.wk = w4a8
    ops.set_backend("reference")
    counts = _calls(monkeypatch)
    with torch.no_grad():
        model(x, t, y)
    assert counts == {**_fused_calls("large-dit"), "rmsnorm_modulate_quantize_int8": DEPTH}  # ffn_norm only


@pytest.mark.parametrize("family", ["dit", "large-dit"])
def test_no_fusion_on_the_fake_quant_path(monkeypatch, family):
    model, (x, t, y) = _model("w8a8", family=family), _inputs()
    ops.set_backend("reference")
    counts = _calls(monkeypatch)
    quant.set_kernels(model, False)
    with torch.no_grad():
        model(x, t, y)
    assert counts == dict.fromkeys(FUSED, 0)


@pytest.mark.parametrize("family", ["dit", "large-dit"])
@pytest.mark.parametrize("input_wants_grad", [True, False])
def test_no_fused_op_sees_a_tensor_that_wants_a_gradient(monkeypatch, family, input_wants_grad):
    # The fused ops have no autograd formula: where a gradient would flow through the producer (the
    # model's input, DiT's biases, RMSNorm's weight), the float path runs (the spy checks). Large-DiT's
    # bias-free linears behind Q-DiT's activation quantizer (which passes no gradient) may still fuse.
    model, (x, t, y) = _model("w8a8", family=family), _inputs()
    ops.set_backend("reference")
    _calls(monkeypatch)
    model(x.requires_grad_(input_wants_grad), t, y).sum().backward()
    assert all(p.grad is not None for p in model.final_layer.parameters())


def test_rmsnorm_weights_that_want_gradients_keep_the_float_path(monkeypatch):
    # Only the norms train, and the model's input wants no gradient: every linear could take codes,
    # but the fused RMSNorm op would drop the weights' gradients, so the norms run unfused.
    model, (x, t, y) = _model("ternary-a8", family="large-dit"), _inputs()  # STE: gradients pass
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("norm.weight"))
    ops.set_backend("reference")
    counts = _calls(monkeypatch)
    model(x, t, y).sum().backward()
    assert counts["rmsnorm_modulate_quantize_int8"] == 0
    assert model.layers[0].attention_norm.weight.grad is not None


@pytest.mark.parametrize("family", ["dit", "large-dit"])
def test_auto_backend_runs_the_cpu_kernels_of_the_fused_ops(monkeypatch, family):
    if not all(ops.has_fast_impl(op, "cpu") for op, n in _fused_calls(family).items() if n):
        pytest.skip("no C++ CPU kernels here")
    model, (x, t, y) = _model("w8a8", family=family), _inputs()
    with torch.no_grad():
        expected = _unfused(model, x, t, y)
        counts = _calls(monkeypatch)
        out = model(x, t, y)
    assert counts == _fused_calls(family)
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
    assert counts["gelu_quantize_int8"] == DEPTH


def test_a_layer_that_does_not_take_int8_codes_says_so():
    model = _model("w4a8-qdit")
    codes = ops.Int8Tokens(torch.zeros(2, 3, 64, dtype=torch.int8), torch.ones(2, 3, 1), torch.float32)
    with pytest.raises(InvalidArgumentError, match="does not take int8 per-token codes"):
        model.blocks[0].attn.qkv(codes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["dit", "large-dit"])
@pytest.mark.parametrize("kind", ["w8a8", "ternary-a8"])
def test_gpu_fused_block_matches_the_unfused_one(monkeypatch, family, kind):
    # Triton's fused kernels compute norms, tanh and exp with their own rounding: a code may move by one.
    model, (x, t, y) = _model(kind, torch.bfloat16, family).cuda(), _inputs(torch.bfloat16)
    x, t, y = x.cuda(), t.cuda(), y.cuda()
    with torch.no_grad():
        expected = _unfused(model, x, t, y).float()
        counts = _calls(monkeypatch)
        out = model(x, t, y).float()
    assert counts == _fused_calls(family)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.parametrize("family", ["dit", "large-dit"])
def test_no_fusion_on_cpu_for_dtypes_its_kernels_decline(monkeypatch, family):
    model, (x, t, y) = _model("w8a8", torch.bfloat16, family), _inputs(torch.bfloat16)
    counts = _calls(monkeypatch)
    with torch.no_grad():
        model(x, t, y)
    assert counts == dict.fromkeys(FUSED, 0)
