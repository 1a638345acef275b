"""fuse_: a deployed DiT or Large-DiT block hands int8 codes from a producer fused with its quantization
(LayerNorm- or RMSNorm-modulate, GELU, SwiGLU) to its integer linears: the same numbers as the unfused
path, only where the consumers take them; bit for bit what the blocks computed when the fusion lived in
the models (the oracle below); state dicts unchanged; where quantize_ and the loaders fuse."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ditq import quant
from ditq.errors import InvalidArgumentError
from ditq.formats.ternary import load_ternary_into, save_ternary
from ditq.kernels import ops
from ditq.models import DiT, DiTConfig, LargeDiT, LargeDiTConfig
from ditq.models.dit import DiTBlock
from ditq.models.large_dit import FeedForward, TransformerBlock
from ditq.models.layers import Mlp, RMSNorm, modulate
from ditq.quant.fuse import (
    GELUQuantize,
    LayerNormModulateQuantize,
    RMSNormModulateQuantize,
    SwiGLUQuantize,
    fuse_,
    fused_producers,
    unfuse_,
)
from ditq.quant.gptq import gptq_model
from ditq.quant.state import load_quantized_state_dict, packed_state_dict

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


# ----------------------------------------------------------------------------
# Bit for bit what the blocks computed when models/ did the fusing
# ----------------------------------------------------------------------------
# The oracle: the forwards of DiTBlock, Mlp, TransformerBlock and FeedForward, and
# models.layers.norm_modulate, as they were before fusion moved to ditq.quant.fuse (ditq
# 8f97317), run on an unfused copy of the model. Both sides call the same ops, so every
# backend must give the same bits, the fused ops' own rounding included.

BACKENDS = ("reference", "auto", "cpu")
KINDS = ("float", "w8a8", "w4a8-sym", "w4a8-qdit", "ternary-a8")


def _takes_codes_then(op, consumers, x) -> bool:
    return bool(consumers) and all(ops.should_fuse(op, c, x) for c in consumers)


def _norm_modulate_then(norm, x, shift, scale, *consumers):
    if shift.dtype == scale.dtype == x.dtype:
        if isinstance(norm, nn.LayerNorm) and norm.weight is None:
            if _takes_codes_then("layernorm_modulate_quantize_int8", consumers, x):
                codes = ops.layernorm_modulate_quantize_int8(x, shift, scale, norm.eps)
                return ops.Int8Tokens(*codes, x.dtype)
        elif isinstance(norm, RMSNorm) and norm.weight.dtype == x.dtype:
            no_grad = not (torch.is_grad_enabled() and norm.weight.requires_grad)
            if no_grad and _takes_codes_then("rmsnorm_modulate_quantize_int8", consumers, x):
                codes = ops.rmsnorm_modulate_quantize_int8(x, norm.weight, shift, scale, norm.eps)
                return ops.Int8Tokens(*codes, x.dtype)
    if isinstance(norm, nn.LayerNorm):
        return modulate(F.layer_norm(x, norm.normalized_shape, None, None, norm.eps), shift, scale)
    return modulate(RMSNorm.forward(norm, x), shift, scale)


def _dit_block_then(self, x, c):
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
    h = _norm_modulate_then(self.norm1, x, shift_msa, scale_msa, self.attn.qkv)
    x = x + gate_msa.unsqueeze(1) * self.attn(h)
    h = _norm_modulate_then(self.norm2, x, shift_mlp, scale_mlp, self.mlp.fc1)
    return x + gate_mlp.unsqueeze(1) * self.mlp(h)


def _mlp_then(self, x):
    h = self.fc1(x)
    if ops.should_fuse("gelu_quantize_int8", self.fc2, h):
        return self.fc2(ops.Int8Tokens(*ops.gelu_quantize_int8(h), h.dtype))
    return self.fc2(self.act(h))


def _large_dit_block_then(self, x, c, cos, sin):
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
    attn, ffn = self.attention, self.feed_forward
    h = _norm_modulate_then(self.attention_norm, x, shift_msa, scale_msa, attn.wq, attn.wk, attn.wv)
    x = x + gate_msa.unsqueeze(1) * attn(h, cos, sin)
    h = _norm_modulate_then(self.ffn_norm, x, shift_mlp, scale_mlp, ffn.w1, ffn.w3)
    return x + gate_mlp.unsqueeze(1) * self.feed_forward(h)


def _feed_forward_then(self, x):
    gate, up = self.w1(x), self.w3(x)
    if gate.dtype == up.dtype and ops.should_fuse("swiglu_quantize_int8", self.w2, gate):
        return self.w2(ops.Int8Tokens(*ops.swiglu_quantize_int8(gate, up), gate.dtype))
    return self.w2(F.silu(gate) * up)


def _as_then(monkeypatch) -> None:
    """From here on, every DiT and Large-DiT block runs as it did before (see above)."""
    monkeypatch.setattr(DiTBlock, "forward", _dit_block_then)
    monkeypatch.setattr(Mlp, "forward", _mlp_then)
    monkeypatch.setattr(TransformerBlock, "forward", _large_dit_block_then)
    monkeypatch.setattr(FeedForward, "forward", _feed_forward_then)


def _set_backend(backend: str) -> None:
    if backend != "auto" and backend not in ops.available_backends():
        pytest.skip(f"no {backend} backend here")
    ops.set_backend(backend)


def _equal(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["dit", "large-dit"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fused_model_computes_what_the_blocks_did_before(monkeypatch, backend, family, kind, dtype):
    model, (x, t, y) = _model(kind, dtype, family), _inputs(dtype)
    guided = x[:2].repeat(2, 1, 1, 1), t[:2].repeat(2), torch.tensor([0, 3, 4, 4])  # 4: the null label
    then = unfuse_(copy.deepcopy(model))
    assert not fused_producers(then)
    _set_backend(backend)
    runs = {}
    with torch.no_grad():
        for fusion in (True, False):
            with ops.use_fusion(fusion):
                runs[fusion] = model(x, t, y), model.forward_with_cfg(*guided, 2.0)
        _as_then(monkeypatch)
        for fusion in (True, False):
            with ops.use_fusion(fusion):
                expected = then(x, t, y), then.forward_with_cfg(*guided, 2.0)
            assert all(map(_equal, runs[fusion], expected))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "family, kind, trains",
    [
        ("dit", "w8a8", "input"),
        ("dit", "ternary-a8", "input"),
        ("large-dit", "w8a8", "input"),
        ("large-dit", "ternary-a8", "input"),
        ("large-dit", "ternary-a8", "norms"),  # the STE passes gradients to the RMSNorm weights
    ],
)
def test_gradients_are_what_they_were_before(monkeypatch, backend, family, kind, trains):
    # Where a gradient would flow through a producer the float path runs; elsewhere the codes do.
    _set_backend(backend)

    def run(model):
        x, t, y = _inputs()
        if trains == "input":
            x.requires_grad_(True)
        else:
            for name, p in model.named_parameters():
                p.requires_grad_(name.endswith("norm.weight"))
        out = model(x, t, y)
        out.square().sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return out.detach(), x.grad, grads

    model = _model(kind, family=family)
    then = unfuse_(copy.deepcopy(model))
    out, x_grad, grads = run(model)
    _as_then(monkeypatch)
    out_then, x_grad_then, grads_then = run(then)
    assert _equal(out, out_then)
    assert (x_grad is None) == (x_grad_then is None) and (x_grad is None or _equal(x_grad, x_grad_then))
    assert grads.keys() == grads_then.keys() and grads
    assert all(_equal(grads[n], grads_then[n]) for n in grads)


# ----------------------------------------------------------------------------
# What fuse_ swaps, and what it leaves alone
# ----------------------------------------------------------------------------


def _fused_types(model) -> dict[type, int]:
    counts: dict[type, int] = {}
    for m in fused_producers(model).values():
        counts[type(m)] = counts.get(type(m), 0) + 1
    return counts


EXPECTED_TYPES = {
    "dit": {LayerNormModulateQuantize: 2 * DEPTH, GELUQuantize: DEPTH},
    "large-dit": {RMSNormModulateQuantize: 2 * DEPTH, SwiGLUQuantize: DEPTH},
}


@pytest.mark.parametrize("family", ["dit", "large-dit"])
@pytest.mark.parametrize("kind", ["w8a8", "w4a8-qdit", "ternary-a8"])
def test_quantize_fuses_every_producer_of_integer_layers(family, kind):
    # Every integer consumer counts (a W4A8 Q-DiT layer too): whether it takes codes is asked per call.
    model = _model(kind, family=family)
    assert _fused_types(model) == EXPECTED_TYPES[family]
    block = model.blocks[0] if family == "dit" else model.layers[0]
    producer = block.norm1 if family == "dit" else block.attention_norm
    assert producer.block is block
    consumers = ("attn.qkv",) if family == "dit" else ("attention.wq", "attention.wk", "attention.wv")
    assert producer.consumers == consumers
    assert repr(producer).endswith(f"-> {', '.join(consumers)})")


@pytest.mark.parametrize("family", ["dit", "large-dit"])
@pytest.mark.parametrize("kind", ["w8a8", "ternary-a8"])
def test_fusing_keeps_the_state_dict(family, kind):
    model = _model(kind, family=family)
    plain = unfuse_(copy.deepcopy(model))
    fused_sd, plain_sd = model.state_dict(), plain.state_dict()
    assert list(fused_sd) == list(plain_sd)  # the same keys, in the same order
    assert all(_equal(fused_sd[k], plain_sd[k]) for k in fused_sd)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    for m in fused_producers(model).values():  # the replaced module's very tensors, held once
        assert dict(m.named_parameters()) == dict(m.plain.named_parameters())
    if family == "large-dit":
        norm = model.layers[0].attention_norm
        assert isinstance(norm, RMSNormModulateQuantize) and norm.weight is norm.plain.weight
    model.load_state_dict(plain_sd, strict=True)


@pytest.mark.parametrize("family", ["dit", "large-dit"])
@pytest.mark.parametrize("assign", [False, True])
def test_a_fused_model_takes_a_state_dict_copied_or_assigned(family, assign):
    # assign=True replaces the Parameters: the fused module and the module it runs unfused see the new ones.
    model, other = _model("ternary-a8", family=family), _model("ternary-a8", family=family)
    with torch.no_grad():
        torch.manual_seed(7)
        for p in other.parameters():
            if p.is_floating_point():
                p.mul_(torch.empty_like(p).uniform_(0.8, 1.2))
    x, t, y = _inputs()
    ops.set_backend("reference")
    with torch.no_grad():
        expected = {}
        for fusion in (True, False):
            with ops.use_fusion(fusion):
                expected[fusion] = other(x, t, y)
        model.load_state_dict(other.state_dict(), strict=True, assign=assign)
        for fusion in (True, False):
            with ops.use_fusion(fusion):
                assert _equal(model(x, t, y), expected[fusion])
    for m in fused_producers(model).values():
        assert all(p is q for p, q in zip(m.parameters(), m.plain.parameters(), strict=True))


@pytest.mark.parametrize("family", ["dit", "large-dit"])
def test_fuse_leaves_a_float_model_as_it_is(family):
    model = _model("float", family=family)
    before = [(n, id(m)) for n, m in model.named_modules()]
    assert fuse_(model) is model
    assert [(n, id(m)) for n, m in model.named_modules()] == before
    assert not fused_producers(model)


def test_fuse_leaves_a_qat_model_and_unknown_blocks_as_they_are():
    model = _model("float", family="large-dit")
    quant.quantize_(model, quant.TernaryQATConfig(act_bits=8))  # prepare: QAT layers take no codes
    assert not fused_producers(model)
    w8a8 = quant.QuantLinear.from_float(nn.Linear(64, 64), W8A8.for_layer("fc"))
    other = nn.Sequential(nn.LayerNorm(64, elementwise_affine=False), nn.GELU(approximate="tanh"), w8a8)
    before = [(n, id(m)) for n, m in other.named_modules()]
    fuse_(other)
    assert [(n, id(m)) for n, m in other.named_modules()] == before


@pytest.mark.parametrize("family", ["dit", "large-dit"])
def test_fuse_is_idempotent_and_unfuse_puts_the_plain_modules_back(family):
    model = _model("w8a8", family=family)
    fused = fused_producers(model)
    assert fuse_(model) is model and fused_producers(model) == fused  # the same modules, kept
    plain = {n: m.plain for n, m in fused.items()}
    assert unfuse_(model) is model and not fused_producers(model)
    assert all(model.get_submodule(n) is m for n, m in plain.items())
    assert fuse_(model) is model and _fused_types(model) == EXPECTED_TYPES[family]


@pytest.mark.parametrize("family", ["dit", "large-dit"])
def test_a_layer_swapped_after_fuse_is_the_one_asked(family):
    # What search's quantized views do: quantize_, run, then put the float layers back.
    from ditq.quant.presets import set_module

    float_model, (x, t, y) = _model("float", family=family).eval(), _inputs()
    model = copy.deepcopy(float_model)
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    quant.quantize_(model, W8A8)
    for name, linear in originals.items():
        set_module(model, name, linear)
    ops.set_backend("reference")
    with torch.no_grad():
        assert fused_producers(model)  # still there, running the plain modules
        assert _equal(model(x, t, y), float_model(x, t, y))
    fuse_(model)  # and fuse_ puts the plain modules back where the consumers are float again
    assert not fused_producers(model)


@pytest.mark.parametrize("family", ["dit", "large-dit"])
def test_a_deep_copy_asks_its_own_layers(family):
    model, (x, t, y) = _model("w8a8", family=family), _inputs()
    clone = copy.deepcopy(model)
    blocks = {id(m) for m in clone.modules()}
    assert all(id(m.block) in blocks for m in fused_producers(clone).values())
    ops.set_backend("reference")
    with torch.no_grad():
        assert _equal(clone(x, t, y), model(x, t, y))


def test_set_fusion_turns_the_fused_modules_off(monkeypatch):
    model, (x, t, y) = _model("w8a8", family="large-dit"), _inputs()
    ops.set_backend("reference")
    counts = _calls(monkeypatch)
    previous = ops.set_fusion(False)
    try:
        with torch.no_grad():
            model(x, t, y)
    finally:
        assert ops.set_fusion(previous) is False
    assert counts == dict.fromkeys(FUSED, 0)
    with torch.no_grad():
        model(x, t, y)
    assert counts == _fused_calls("large-dit")


# ----------------------------------------------------------------------------
# Where fuse_ is called: quantize_, gptq_model and the loaders of integer layers
# ----------------------------------------------------------------------------


def _build(family: str, device=None):
    with torch.device(device or "cpu"):
        return DiT(TINY) if family == "dit" else LargeDiT(TINY_LARGE)


@pytest.mark.parametrize("family", ["dit", "large-dit"])
def test_load_quantized_state_dict_fuses(family):
    model, (x, t, y) = _model("w8a8", family=family), _inputs()
    loaded = load_quantized_state_dict(_build(family, "meta"), packed_state_dict(model), W8A8)
    assert _fused_types(loaded) == EXPECTED_TYPES[family]
    ops.set_backend("reference")
    with torch.no_grad():
        assert _equal(loaded.eval()(x, t, y), model(x, t, y))


@pytest.mark.parametrize("family", ["dit", "large-dit"])
def test_the_ternary_convert_step_and_load_ternary_into_fuse(tmp_path, family):
    model, (x, t, y) = _model("ternary-a8", family=family), _inputs()
    assert _fused_types(model) == EXPECTED_TYPES[family]
    path = save_ternary(model, tmp_path / "t.safetensors", quant.TernaryQATConfig(act_bits=8))
    loaded = load_ternary_into(_build(family, "meta"), path)
    assert _fused_types(loaded) == EXPECTED_TYPES[family]
    ops.set_backend("reference")
    with torch.no_grad():
        assert _equal(loaded.eval()(x, t, y), model(x, t, y))


@pytest.mark.parametrize("family", ["dit", "large-dit"])
def test_gptq_model_fuses(family):
    model = _model("float", family=family)
    g = torch.Generator().manual_seed(3)
    data = quant.CalibrationData(
        torch.randn(4, 1, 16, 16, generator=g),
        torch.tensor([1.0, 250.0, 500.0, 999.0]),
        {"y": torch.arange(4)},
    )
    gptq_model(model, W8A8, data, batch_size=4)
    assert _fused_types(model) == EXPECTED_TYPES[family]
