"""ditq.formats.qdit: Q-DiT checkpoints saved (qdit.save) and reloaded (ditq.load) give identical outputs,
for a DiT and a Large-DiT; loading builds no float weight of a quantized layer and keeps 4-bit codes
int4-packed (qweight_layout); older files with one code per byte still load; files whose codes disagree
with their metadata are one-line errors."""

from __future__ import annotations

import pytest
import torch

import ditq
from ditq import models, quant
from ditq.checkpoint import load_tensors, read_metadata, read_safetensors_header, save_checkpoint
from ditq.errors import CheckpointError, InvalidArgumentError
from ditq.formats import ditq_float, qdit
from ditq.kernels import ops
from ditq.models import DiT, DiTConfig
from ditq.pipelines import ptq
from ditq.pipelines.qat import export_model

TINY = DiTConfig(
    depth=2, hidden_size=64, num_heads=2, patch_size=4, input_size=16, in_channels=1, num_classes=4
)
CALIB = ptq.CalibSpec(num_samples=6, steps=4, cfg_scale=1.5, batch_size=4)
W8A8 = quant.QDiTConfig(w_bits=8, a_bits=8, w_group=0, w_sym=True, a_sym=True)  # w8a8_linear
W4A8 = quant.QDiTConfig(w_bits=4, a_bits=8, w_group=32)  # Q-DiT W4A8: w4a8_linear
QUANTIZED_SHAPES = {(192, 64), (256, 64)}  # qkv, fc1: no float tensor of the file has these shapes


def _dit(seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    model = DiT(TINY)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model.eval()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DITQ_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    ops.set_backend("auto")


def _inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(3, 1, 16, 16, generator=g), torch.tensor([3, 300, 900]), torch.tensor([0, 2, 4])


@pytest.mark.parametrize(
    "config,gptq",
    [
        (quant.QDiTConfig(w_bits=8, a_bits=8, w_group=0), False),
        (quant.QDiTConfig(w_bits=4, w_group=0, a_group=-1, dynamic=False), False),
        (
            quant.QDiTConfig(w_bits=4, w_group=32, a_group=32, layers={"blocks.1.mlp.fc2": {"w_group": 64}}),
            True,
        ),
    ],
)
def test_saved_quantized_checkpoints_reload_to_identical_outputs(tmp_path, cache, config, gptq):
    model = _dit()
    calib = ptq.record_calibration(model, CALIB, cache=False)
    ptq.quantize_model(model, config, calib=calib, gptq=gptq)
    path = qdit.save(model, tmp_path / "q.safetensors", config, command="test")
    assert ditq.formats.is_quantized(path) and not ditq.formats.is_quantized(tmp_path / "nope")
    back = ditq.load(path)
    assert back.quant_config == config
    assert set(quant.quantized_layers(back)) == set(quant.quantized_layers(model))
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(back(x, t, y), model(x, t, y))


def test_a_quantized_large_dit_reloads_as_a_large_dit(tmp_path):
    # ditq ptq calibrates DiTs only; a Large-DiT quantized through the API saves and reloads too.
    torch.manual_seed(0)
    config = models.LargeDiTConfig(dim=64, n_layers=2, n_heads=4, input_size=16, in_channels=1)
    model = models.LargeDiT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    config = quant.QDiTConfig(w_bits=8, a_bits=8, w_group=0, w_sym=True, a_sym=True)
    quant.quantize_(model.eval(), config)
    back = ditq.load(qdit.save(model, tmp_path / "q.safetensors", config, command="test"))
    assert isinstance(back, models.LargeDiT)
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(back(x, t, y), model(x, t, y))


def test_ditq_load_reads_float_checkpoints_too(tmp_path):
    model = _dit()
    ditq.save(model, tmp_path / "fp.safetensors")
    back = ditq.load(tmp_path / "fp.safetensors")
    assert not quant.quantized_layers(back)
    with pytest.raises(InvalidArgumentError, match="no quantized layers"):
        qdit.save(model, tmp_path / "q.safetensors", quant.QDiTConfig())


def _checkpoint(tmp_path, kind: str):
    model = _dit()
    path = tmp_path / f"{kind}.safetensors"
    if kind in ("w8a8", "w4a8"):
        config = W8A8 if kind == "w8a8" else W4A8
        return qdit.save(quant.quantize_(model, config), path, config)
    config = quant.TernaryQATConfig(act_bits=8 if kind == "ternary-a8" else None)
    quant.quantize_(model, config)
    return export_model(model, path, config)


@pytest.mark.parametrize("kind", ["w8a8", "w4a8"])
def test_loading_builds_no_float_weight_of_a_quantized_layer(tmp_path, kind, float_allocations):
    path = _checkpoint(tmp_path, kind)
    info, _ = read_safetensors_header(path)
    assert not QUANTIZED_SHAPES & {tuple(v["shape"]) for v in info.values() if v["dtype"] == "F32"}
    spy = float_allocations
    with spy:
        model = ditq.load(path)
    assert not QUANTIZED_SHAPES & set(spy.shapes)
    held = {tuple(t.shape) for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}
    assert not QUANTIZED_SHAPES & held
    layers = quant.quantized_layers(model)
    assert len(layers) == 8
    qkv = layers["blocks.0.attn.qkv"]
    if kind == "w4a8":  # two codes per byte in the file and in memory
        assert info["blocks.0.attn.qkv.qweight"]["shape"] == [192, 32] and qkv.packed
        assert read_metadata(path)["qweight_layout"] == "int4"
    else:
        assert qkv.qweight.dtype == torch.int8 and qkv.qweight.shape == (192, 64)
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([5, 500]), torch.tensor([0, 3])
    with torch.no_grad():
        model(x, t, y)
    assert all(q._cache is None for q in layers.values())  # no float weight kept after a forward either
    # the spy does see a float weight of a quantized layer when one is made (it can fail):
    with spy:
        qkv.dequantized_weight()
    assert (192, 64) in spy.shapes


def test_older_files_with_codes_one_per_byte_still_load(tmp_path):
    model = quant.quantize_(_dit(), W4A8)
    path = tmp_path / "old.safetensors"
    ditq_float.write(model, path, extra_metadata={"quant_kind": "qdit", "quant_config": W4A8.to_dict()})
    back = ditq.load(path)
    assert back.blocks[0].attn.qkv.packed  # packed on the way in
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([5, 500]), torch.tensor([0, 3])
    with torch.no_grad(), ops.use_backend("reference"):
        assert torch.equal(back(x, t, y), model(x, t, y))


def _rewrite(src, dst, tensors=None, meta=None):
    save_checkpoint(dst, {**load_tensors(src), **(tensors or {})}, {**read_metadata(src), **(meta or {})})
    return dst


def _one_line(exc_info, *fragments):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg


def test_files_whose_codes_disagree_with_their_metadata_are_one_line_errors(tmp_path):
    w4 = _checkpoint(tmp_path, "w4a8")
    unpacked = quant.quantize_(_dit(), W4A8).blocks[0].attn.qkv.qweight  # 4-bit codes, one per byte
    bad = _rewrite(w4, tmp_path / "a.safetensors", {"blocks.0.attn.qkv.qweight": unpacked})
    with pytest.raises(CheckpointError) as e:
        ditq.load(bad)
    _one_line(e, "layer 'blocks.0.attn.qkv': qweight is torch.uint8 (192, 64)", "(192, 32) (int4-packed)")
    with pytest.raises(CheckpointError) as e:
        ditq.load(_rewrite(w4, tmp_path / "b.safetensors", meta={"qweight_layout": "int3"}))
    _one_line(e, "qweight_layout 'int3' is not one this ditq reads")

    eight = quant.QDiTConfig(w_bits=8, a_bits=8, w_group=32)  # metadata will say 4 bits
    model = quant.quantize_(_dit(), eight)
    path = tmp_path / "c.safetensors"
    four = dict(eight.to_dict(), w_bits=4)
    ditq_float.write(
        model, path, extra_metadata={"quant_kind": "qdit", "quant_config": four}
    )  # codes per byte
    with pytest.raises(CheckpointError) as e:
        ditq.load(path)
    _one_line(e, "layer 'blocks.0.attn.qkv': qweight holds codes from 0 to 255", "4-bit range [0, 15]")

    ternary = _checkpoint(tmp_path, "ternary")
    narrow = torch.zeros(192, 8, dtype=torch.uint8)
    with pytest.raises(CheckpointError) as e:
        ditq.load(_rewrite(ternary, tmp_path / "d.safetensors", {"blocks.0.attn.qkv.weight": narrow}))
    _one_line(e, "blocks.0.attn.qkv.weight: expected (192, 16) (packed 2-bit codes, 4 per byte)")
