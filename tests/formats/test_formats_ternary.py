"""Ternary checkpoints: prepare -> train -> convert -> export -> load is exact; loading never builds the
float weights of ternary layers; sizes are 2 bits per weight plus the float rest; bad files: one line."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

import ditq
from ditq.checkpoint import load_tensors, read_metadata, read_safetensors_header, save_checkpoint
from ditq.errors import CheckpointError, InvalidArgumentError
from ditq.formats.ternary import checkpoint_sizes, is_ternary_checkpoint, save_ternary, sizes_line
from ditq.models import DiTConfig, LargeDiTConfig, build_model
from ditq.pipelines.qat import export_model
from ditq.quant import TernaryLinear, TernaryQATConfig, quantize_, set_kernels, ternary_layers

DIT = DiTConfig(
    depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=4, num_classes=5
)
LARGE = LargeDiTConfig(dim=32, n_layers=2, n_heads=2, input_size=8, num_classes=5, adaln_norm=True)


def _random(config, seed: int = 0) -> torch.nn.Module:
    """A tiny model with every weight random (adaLN-Zero would hide the blocks)."""
    torch.manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model


def _inputs(batch: int = 4):
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(batch, 4, 8, 8, generator=g),
        torch.tensor([0, 10, 500, 999][:batch]),
        torch.tensor([0, 1, 4, 5][:batch]),
    )


def _trained_qat(config, qconfig: TernaryQATConfig) -> torch.nn.Module:
    model = _random(config)
    quantize_(model, qconfig)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, t, y = _inputs()
    model.train()
    for _ in range(3):
        loss = model(x, t, y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize(
    "config, qconfig",
    [
        (DIT, TernaryQATConfig()),
        (replace(DIT, adaln_norm=True), TernaryQATConfig(act_bits=8)),
        (LARGE, TernaryQATConfig(scale="gamma")),
    ],
    ids=["dit", "dit-adaln-norm-a8", "large-dit-gamma"],
)
def test_prepare_train_convert_export_load_is_exact(tmp_path, config, qconfig):
    qat = _trained_qat(config, qconfig)
    x, t, y = _inputs()
    with torch.no_grad():
        want = qat(x, t, y)
        want_cfg = qat.forward_with_cfg(x, t, torch.tensor([1, 2, 5, 5]), 3.0, cfg_channels=None)
    path = export_model(copy.deepcopy(qat), tmp_path / "t.safetensors", qconfig, command="test")
    assert is_ternary_checkpoint(path)
    for loaded in (ditq.load(path), ditq.load(path)):
        assert loaded.config == config and not loaded.training
        assert list(ternary_layers(loaded)) == list(ternary_layers(qat))
        assert all(isinstance(m, TernaryLinear) for m in ternary_layers(loaded).values())
        assert all(m.act_bits == qconfig.act_bits for m in ternary_layers(loaded).values())
        with torch.no_grad():
            set_kernels(loaded, False)  # the float path: the QAT model's numbers, bit for bit
            assert torch.equal(loaded(x, t, y), want)
            got_cfg = loaded.forward_with_cfg(x, t, torch.tensor([1, 2, 5, 5]), 3.0, cfg_channels=None)
            assert torch.equal(got_cfg, want_cfg)
            set_kernels(loaded, True)  # integer kernels (W1.58A8 with act_bits=8): float rounding apart
            torch.testing.assert_close(loaded(x, t, y), want, rtol=1e-4, atol=1e-5)
    meta = read_metadata(path)
    assert meta["quant_kind"] == "ternary" and meta["command"] == "test"
    assert TernaryQATConfig.from_dict(meta["quant_config"]) == replace(qconfig, step="convert")
    assert meta["ternary"]["layers"] == list(ternary_layers(qat))
    assert meta["ternary"]["float_dtype"] == "float32"


def test_loading_never_materializes_float_ternary_weights(tmp_path, float_allocations):
    qat = _trained_qat(DIT, TernaryQATConfig())
    path = export_model(copy.deepcopy(qat), tmp_path / "t.safetensors")
    # Shapes of ternary weights that no float tensor of the file has (attn.proj is D x D, like t_embedder's
    # second linear, so it cannot tell): qkv, fc1, fc2, adaLN.
    info, _ = read_safetensors_header(path)
    floats = {tuple(v["shape"]) for v in info.values() if v["dtype"] == "F32"}
    ternary = {(m.out_features, m.in_features) for m in ternary_layers(qat).values()} - floats
    assert len(ternary) == 4
    spy = float_allocations
    with spy:
        model = ditq.load(path)
    # What the dispatcher saw (the float rest, cast on the way in) and what the model holds.
    assert not ternary & set(spy.shapes)
    held = {tuple(t.shape) for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}
    assert not ternary & held
    # The spy does see a float weight of a ternary layer when one is made (it can fail):
    with spy:
        ternary_layers(model)["blocks.0.attn.qkv"].dequantized_weight()
    assert (96, 32) in spy.shapes


def test_sizes_are_two_bits_per_weight_plus_the_float_rest(tmp_path):
    qat = _trained_qat(DIT, TernaryQATConfig())
    converted = quantize_(copy.deepcopy(qat), TernaryQATConfig(step="convert"))
    path = save_ternary(converted, tmp_path / "t.safetensors")
    sizes = checkpoint_sizes(path)
    in_memory = checkpoint_sizes(converted)  # the same counts; ratios against the tensors, not the file
    assert {k: v for k, v in sizes.items() if not k.startswith("vs_")} == {
        k: v for k, v in in_memory.items() if not k.startswith("vs_")
    } | {"file_bytes": path.stat().st_size}
    assert in_memory["vs_fp32"] == in_memory["fp32_bytes"] / in_memory["tensor_bytes"]
    t, fp = sizes["ternary"], sizes["full_precision"]
    layers = ternary_layers(converted).values()
    assert t["layers"] == 10 and t["weights"] == sum(m.out_features * m.in_features for m in layers)
    assert t["packed_bytes"] * 4 == t["weights"] and t["bits_per_weight"] == 2.0
    assert t["scale_bytes"] == 10 * 4 and t["bias_bytes"] == 4 * sum(m.out_features for m in layers)
    info, _ = read_safetensors_header(path)
    assert sizes["tensor_bytes"] == t["packed_bytes"] + t["scale_bytes"] + t["bias_bytes"] + fp["bytes"]
    assert sizes["file_bytes"] > sizes["tensor_bytes"] and len(info) == 30 + sum(
        g["tensors"] for g in fp["tensors"].values()
    )
    assert set(fp["tensors"]) >= {"pos_embed", "x_embedder.proj.weight", "final_layer.linear.weight"}
    assert fp["tensors"]["t_embedder.mlp.0.weight"]["dtypes"] == ["float32"]
    float_params = sum(p.numel() for p in build_model(DIT).parameters())  # the same model in float
    assert sizes["float_params"] == float_params and sizes["fp32_bytes"] == 4 * float_params
    assert sizes["vs_fp32"] == 4 * float_params / sizes["file_bytes"]
    assert "at 2 bits" in sizes_line(sizes)

    half = export_model(copy.deepcopy(converted), tmp_path / "h.safetensors", float_dtype="bfloat16")
    h = checkpoint_sizes(half)
    assert (
        h["ternary"]["packed_bytes"] == t["packed_bytes"] and h["full_precision"]["bytes"] * 2 == fp["bytes"]
    )
    assert read_metadata(half)["ternary"]["float_dtype"] == "bfloat16"
    x, t_, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ditq.load(half)(x, t_, y), converted(x, t_, y), atol=0.05, rtol=0.05)


def test_embedded_size_model():
    """The embedded model's architecture, ternary: about 8x smaller than float32 (numbers for the docs)."""
    model = ditq.load("ditq-fmnist")
    quantize_(model, TernaryQATConfig())
    quantize_(model, TernaryQATConfig(step="convert"))
    sizes = checkpoint_sizes(model)
    assert sizes["ternary"]["layers"] == 30 and sizes["ternary"]["weights"] == 1_769_472
    assert sizes["ternary"]["packed_bytes"] == 442_368 and sizes["float_params"] == 1_879_328
    assert 7 < sizes["vs_fp32"] < 9


def _rewrite(src, dst, change) -> None:
    meta = read_metadata(src)
    change(meta)
    save_checkpoint(dst, load_tensors(src), meta)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda m: m["ternary"].update(layout="terdit"), "layout 'terdit' is not supported; .* reads 'k4'"),
        (lambda m: m["ternary"].update(bits=3), "ternary weights of 3 bits .* are not supported"),
        (lambda m: m["ternary"].update(layers=[]), "its metadata lists no ternary layers"),
        (lambda m: m["ternary"].update(layers=["blocks.0.attn.no"]), "has no linear for: blocks.0.attn.no"),
        (lambda m: m["ternary"].update(layers=["blocks.0.attn.qkv"]), "does not fit the model of its own"),
        (lambda m: m.pop("ternary"), "has no 'ternary' entry"),
        (lambda m: m["quant_config"].update(scale="beta"), "its quant_config does not parse"),
        (lambda m: m["model_config"].update(hidden_size=48), "the model of its own metadata: mismatched"),
    ],
)  # fmt: skip
def test_bad_files_are_one_line_errors(tmp_path, change, match):
    path = export_model(_trained_qat(DIT, TernaryQATConfig()), tmp_path / "t.safetensors")
    _rewrite(path, tmp_path / "bad.safetensors", change)
    with pytest.raises(CheckpointError, match=match) as e:
        ditq.load(tmp_path / "bad.safetensors")
    assert "\n" not in str(e.value)


def test_packed_weights_of_another_dtype_or_code_are_refused(tmp_path):
    path = export_model(_trained_qat(DIT, TernaryQATConfig()), tmp_path / "t.safetensors")
    tensors, meta = load_tensors(path), read_metadata(path)
    qkv = tensors["blocks.0.attn.qkv.weight"]
    save_checkpoint(tmp_path / "f.safetensors", {**tensors, "blocks.0.attn.qkv.weight": qkv.float()}, meta)
    with pytest.raises(
        CheckpointError, match="blocks.0.attn.qkv.weight: expected uint8 \\(packed 2-bit codes\\)"
    ):
        ditq.load(tmp_path / "f.safetensors")
    threes = torch.full_like(qkv, 255)  # code 3 everywhere: not ternary
    save_checkpoint(tmp_path / "c.safetensors", {**tensors, "blocks.0.attn.qkv.weight": threes}, meta)
    with pytest.raises(CheckpointError, match="code"):
        ditq.load(tmp_path / "c.safetensors")


def test_saving_needs_a_converted_model(tmp_path):
    qat = _trained_qat(DIT, TernaryQATConfig())
    with pytest.raises(InvalidArgumentError, match="still has 10 ternary QAT layers .*convert it first"):
        save_ternary(qat, tmp_path / "t.safetensors")
    with pytest.raises(InvalidArgumentError, match="no ternary layers"):
        save_ternary(_random(DIT), tmp_path / "t.safetensors")
    converted = quantize_(qat, TernaryQATConfig(step="convert"))
    with pytest.raises(InvalidArgumentError, match="act_bits \\[None\\] but the config says 8"):
        save_ternary(converted, tmp_path / "t.safetensors", TernaryQATConfig(act_bits=8))
    with pytest.raises(InvalidArgumentError, match="float_dtype must be one of"):
        save_ternary(converted, tmp_path / "t.safetensors", float_dtype="int8")
    assert not (tmp_path / "t.safetensors").exists()
    json.dumps(checkpoint_sizes(converted))  # JSON-able, as docs/results want it
