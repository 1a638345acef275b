"""Deployed low-bit checkpoints end to end: samples through the integer kernels equal to the fake-quant
model's, which kernels a checkpoint would run, backends a machine lacks; pipelines.deploy's size and
latency comparison. How Q-DiT files load (meta device, int4 layout, bad files) is
tests/formats/test_formats_qdit.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ditq
from ditq import quant
from ditq.checkpoint import read_metadata
from ditq.errors import InvalidArgumentError
from ditq.formats import qdit
from ditq.kernels import ops
from ditq.models import DiT, DiTConfig
from ditq.pipelines import deploy
from ditq.pipelines.qat import export_model
from ditq.pipelines.sample import sample

TINY = DiTConfig(
    depth=2, hidden_size=64, num_heads=2, patch_size=4, input_size=16, in_channels=1, num_classes=4
)
W8A8 = quant.QDiTConfig(w_bits=8, a_bits=8, w_group=0, w_sym=True, a_sym=True)  # w8a8_linear
W4A8 = quant.QDiTConfig(w_bits=4, a_bits=8, w_group=32)  # Q-DiT W4A8: w4a8_linear


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    ops.set_backend("auto")


def _dit(seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    model = DiT(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def _checkpoint(tmp_path, kind: str):
    model = _dit()
    path = tmp_path / f"{kind}.safetensors"
    if kind in ("w8a8", "w4a8"):
        config = W8A8 if kind == "w8a8" else W4A8
        return qdit.save(quant.quantize_(model, config), path, config)
    config = quant.TernaryQATConfig(act_bits=8 if kind == "ternary-a8" else None)
    quant.quantize_(model, config)
    return export_model(model, path, config)


def _sample(model, **kwargs) -> np.ndarray:
    images, _ = sample(
        model, num_samples=4, batch_size=4, sampler="ddim", steps=3, cfg_scale=2.0,
        class_labels=[0, 1, 2, 3], seed=0, **kwargs,
    )  # fmt: skip
    return images.astype(np.int16)


@pytest.mark.parametrize(
    "kind, op",
    [
        ("w8a8", "w8a8_linear"),
        ("w4a8", "w4a8_linear"),
        ("ternary-a8", "w158a8_linear"),
        ("ternary", "ternary_linear"),
    ],
)
def test_deployed_samples_equal_the_fake_quant_models(tmp_path, kind, op):
    model = ditq.load(_checkpoint(tmp_path, kind))
    quant.set_kernels(model, False)
    fake = _sample(model)
    quant.set_kernels(model, True)
    for backend in ["auto", *ops.available_backends()]:
        with ops.use_backend(backend):
            plan = set(quant.kernel_plan(model).values())
        if backend != "auto":  # forced: every layer runs the op, and says which implementation
            assert plan == {f"{op} [{ops.implementation(op, 'cpu', backend)}]"}
        images = _sample(model, kernel_backend=backend)
        assert np.abs(images - fake).max() <= 1, backend  # float rounding apart, one uint8 level at most
        assert np.abs(images - fake).mean() < 0.01, backend
    assert ops.get_backend() == "auto"  # sample() restored it


def test_describe_kernels_says_what_each_checkpoint_would_run(tmp_path):
    w8, w4 = _checkpoint(tmp_path, "w8a8"), _checkpoint(tmp_path, "w4a8")
    d = deploy.describe_kernels(w8, "cpu")
    assert d["backend"] == "auto" and d["device"] == "cpu" and d["available"] == ops.available_backends()
    slow = "float: no fast {} on cpu (backend auto)"

    def runs(op):  # header only: kernels not built yet count as buildable
        impl = ops.implementation(op, "cpu", build=False)
        return f"{op} [{impl}]" if impl != "reference" else slow.format(op)

    assert d["layers"] == {runs("w8a8_linear"): 8}
    assert deploy.describe_kernels(w4, "cpu")["layers"] == {runs("w4a8_linear"): 8}
    with ops.use_backend("reference"):
        d = deploy.describe_kernels(w4, "cpu")
    assert d["resolved"] == "reference" and d["layers"] == {"w4a8_linear [reference]": 8}
    ternary = deploy.describe_kernels(_checkpoint(tmp_path, "ternary-a8"), "cpu")
    assert sum(ternary["layers"].values()) == 10  # adaLN too, as TerDiT
    float_file = tmp_path / "fp.safetensors"
    ditq.save(_dit(), float_file)
    assert deploy.describe_kernels(float_file, "cpu")["layers"] == {}


def test_sample_refuses_a_backend_this_machine_lacks(tmp_path):
    model = ditq.load(_checkpoint(tmp_path, "w8a8"))
    with pytest.raises(InvalidArgumentError, match="unknown kernel backend 'fast'"):
        _sample(model, kernel_backend="fast")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgumentError, match="'triton' is not available here .*available: auto"):
            _sample(model, kernel_backend="triton")


# -- pipelines.deploy: the size and latency comparison ------------------------------------------------


def test_compare_times_every_checkpoint_and_tables_them(tmp_path):
    from ditq.pipelines import deploy

    model = _dit()
    fp_path = tmp_path / "fp32.safetensors"
    ditq.save(model, fp_path)
    w8_path = deploy.save_w8a8(model, tmp_path / "w8a8.safetensors")
    rows = deploy.compare({"FP32": fp_path, "W8A8": w8_path}, batch_size=2, repeats=2)
    assert [r.name for r in rows] == ["FP32", "W8A8"]
    fp, w8 = rows
    assert fp.kernels is None and fp.step_ms > 0 and w8.step_ms > 0
    assert fp.checkpoint_bytes == fp_path.stat().st_size and w8.checkpoint_bytes == w8_path.stat().st_size
    assert w8.held_bytes < fp.held_bytes  # int8 codes in place of float32 weights
    assert read_metadata(w8_path)["quant_config"]["w_sym"] is True
    if "cpu" in ops.available_backends():
        assert "w8a8_linear" in w8.kernels
    lines = deploy.table(rows)
    assert len(lines) == 3 and "1.00x" in lines[1] and "float (F.linear)" in lines[1]
    assert rows[1].to_dict()["name"] == "W8A8"


def test_compare_rejects_nothing_to_compare():
    from ditq.pipelines import deploy

    with pytest.raises(InvalidArgumentError, match="at least one checkpoint"):
        deploy.compare({})
