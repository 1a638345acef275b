"""quantize_ / calibrate / presets / model_size_bytes / load_quantized_state_dict on tiny models:
a ditq DiT, a diffusers DiT and PixArt built from configs, a Large-DiT-named module tree, plain
Sequentials."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ditq.errors import CheckpointError, InvalidArgumentError
from ditq.models import DiT, DiTConfig
from ditq.quant import QDiTConfig, QuantLinear, calibrate, model_size_bytes, quantize_, quantized_layers
from ditq.quant.api import select_layers
from ditq.quant.gptq import GPTQ
from ditq.quant.granularity import PerGroup
from ditq.quant.presets import get_preset, preset_for
from ditq.quant.state import load_quantized_state_dict

TINY = DiTConfig(depth=2, hidden_size=64, num_heads=2, patch_size=2, input_size=8, num_classes=10)
BLOCK_LAYERS = [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


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


def test_dit_preset_selects_block_linears_only():
    model = _dit()
    assert preset_for(model).name == "dit"
    quantize_(model, QDiTConfig(w_group=32))
    assert list(quantized_layers(model)) == BLOCK_LAYERS
    for name in (
        "t_embedder.mlp.0",
        "t_embedder.mlp.2",
        "final_layer.linear",
        "final_layer.adaLN_modulation.1",
    ):
        assert type(model.get_submodule(name)) is nn.Linear
    assert type(model.get_submodule("blocks.0.adaLN_modulation.1")) is nn.Linear
    adaln = quantize_(_dit(), QDiTConfig(w_group=32, quantize_adaln=True))
    expected = sorted(BLOCK_LAYERS + ["blocks.0.adaLN_modulation.1", "blocks.1.adaLN_modulation.1"])
    assert sorted(quantized_layers(adaln)) == expected


def test_include_exclude_patterns():
    cfg = QDiTConfig(w_group=32)
    model = _dit()
    assert select_layers(model, cfg, include=["blocks.*.mlp.*"], exclude=["blocks.1.*"]) == [
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
    ]
    assert select_layers(model, cfg, include=[r"re:blocks\.\d+\.attn\.(qkv|proj)"], exclude=[]) == [
        n for n in BLOCK_LAYERS if ".attn." in n
    ]
    from_cfg = QDiTConfig(w_group=32, include=["final_layer.*"], exclude=["*adaLN*"])
    assert select_layers(model, from_cfg) == ["final_layer.linear"]
    # the argument wins over the config
    assert select_layers(model, from_cfg, include=["t_embedder.*"], exclude=["*.0"]) == ["t_embedder.mlp.2"]
    every = select_layers(model, QDiTConfig(preset=None))
    assert len(every) == 2 + 8 + 2 + 2  # t_embedder, blocks (4 + adaLN each), final layer
    assert select_layers(model, QDiTConfig(exclude=["blocks.1.*"])) == BLOCK_LAYERS[:4]
    quantize_(model, cfg, include="blocks.0.mlp.fc2")
    assert list(quantized_layers(model)) == ["blocks.0.mlp.fc2"]


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
# Save and reload
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------


def test_model_size_bytes_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    assert preset_for(model) is None
    fp = (64 * 32 + 32 + 32 * 16 + 16) * 4
    assert model_size_bytes(model) == fp == 10432
    cfg = QDiTConfig(w_bits=4, w_group=16, include=["0"])
    # layer 0: 64*32 codes at 4 bits + 32*4 fp16 scales + 32*4 fp16 zeros + fp32 bias; layer 2 as is
    by_hand = 64 * 32 // 2 + 32 * 4 * 2 + 32 * 4 * 2 + 32 * 4 + (32 * 16 + 16) * 4
    assert by_hand == 3776
    assert model_size_bytes(model, cfg) == by_hand  # the plan, before quantizing
    quantize_(model, cfg)
    assert model_size_bytes(model) == by_hand == model_size_bytes(model, cfg)
    sym = QDiTConfig(w_bits=4, w_group=16, w_sym=True, include=["0"])
    assert model_size_bytes(nn.Sequential(nn.Linear(64, 32)), sym) == 1024 + 256 + 128  # no zero points
    static = QDiTConfig(w_bits=3, w_group=0, a_group=-1, dynamic=False, preset=None)
    tail = nn.Sequential(nn.Linear(32, 16))
    odd = (16 * 32 * 3 + 7) // 8 + 16 * 2 * 2 + 16 * 4 + 2 * 2  # ceil(bits/8), one static range
    assert model_size_bytes(tail, static) == odd
    assert model_size_bytes(quantize_(tail, static)) == odd


def test_model_size_bytes_on_a_dit_plan_equals_result():
    cfg = QDiTConfig(w_bits=4, w_group=32)
    model = _dit()
    fp = model_size_bytes(model)
    assert fp == sum(p.numel() * 4 for p in model.parameters())
    plan = model_size_bytes(model, cfg)
    quantize_(model, cfg)
    assert model_size_bytes(model) == plan < fp


# ----------------------------------------------------------------------------
# Other families
# ----------------------------------------------------------------------------


class _LargeDiTLike(nn.Module):
    """Module names of Large-DiT / TerDiT (fixtures/README.md §1.3), with plain linears."""

    def __init__(self, dim: int = 32, depth: int = 2):
        super().__init__()
        self.x_embedder = nn.Linear(16, dim)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(32, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.layers = nn.ModuleList()
        for _ in range(depth):
            block = nn.Module()
            block.attention = nn.Module()
            for n in ("wq", "wk", "wv", "wo"):
                setattr(block.attention, n, nn.Linear(dim, dim, bias=False))
            block.feed_forward = nn.Module()
            block.feed_forward.w1 = nn.Linear(dim, 64, bias=False)
            block.feed_forward.w2 = nn.Linear(64, dim, bias=False)
            block.feed_forward.w3 = nn.Linear(dim, 64, bias=False)
            block.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
            self.layers.append(block)
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(dim, 32)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))


def test_large_dit_preset():
    model = _LargeDiTLike()
    assert preset_for(model).name == "large-dit"
    expected = [
        f"layers.{i}.{n}"
        for i in range(2)
        for n in ("attention.wq", "attention.wk", "attention.wv", "attention.wo")
        + ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    ]
    assert select_layers(model, QDiTConfig(w_group=32)) == expected
    with_adaln = select_layers(model, QDiTConfig(w_group=32, quantize_adaln=True))
    assert sorted(with_adaln) == sorted(
        expected + ["layers.0.adaLN_modulation.1", "layers.1.adaLN_modulation.1"]
    )
    assert get_preset("large-dit") is preset_for(model)


def test_unknown_model_quantizes_every_linear():
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Sequential(nn.Linear(16, 8)))
    quantize_(model, QDiTConfig(w_group=8))
    assert list(quantized_layers(model)) == ["0", "2.0"]
    with pytest.raises(InvalidArgumentError, match="no nn.Linear layer matches"):
        quantize_(nn.Linear(8, 8), QDiTConfig(w_group=8))  # the root itself cannot be swapped in place


def _diffusers_dit():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=1,
    ).eval()


def test_diffusers_dit_w8a8():
    model = _diffusers_dit()
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.tensor([1, 3])
    with torch.no_grad():
        ref = model(x, timestep=t, class_labels=y).sample
    assert preset_for(model).name == "diffusers"
    quantize_(model, QDiTConfig(w_bits=8, a_bits=8, w_group=0))
    expected = [
        f"transformer_blocks.{i}.{n}"
        for i in range(2)
        for n in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")
    ]
    assert list(quantized_layers(model)) == expected
    for name in ("transformer_blocks.0.norm1.emb.timestep_embedder.linear_1", "proj_out_1", "proj_out_2"):
        assert type(model.get_submodule(name)) is nn.Linear
    assert type(model.get_submodule("transformer_blocks.0.norm1.linear")) is nn.Linear  # adaLN: optional
    with torch.no_grad():
        out = model(x, timestep=t, class_labels=y).sample
    assert _rel(out, ref) < 0.02
    assert "transformer_blocks.1.norm1.linear" in select_layers(
        _diffusers_dit(), QDiTConfig(quantize_adaln=True)
    )


def test_diffusers_pixart_names():
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=12,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=False,
    )
    assert preset_for(model).name == "diffusers"
    names = select_layers(model, QDiTConfig())
    assert names == [
        f"transformer_blocks.0.{n}"
        for n in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
        + ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
    ]
    assert select_layers(model, QDiTConfig(quantize_adaln=True)) == names + ["adaln_single.linear"]
    assert isinstance(
        quantize_(model, QDiTConfig(w_group=8)).get_submodule("transformer_blocks.0.ff.net.2"), QuantLinear
    )


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
