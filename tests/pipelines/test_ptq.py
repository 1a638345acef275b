"""ditq.pipelines.ptq: calibration recording and cache, RTN/static/GPTQ, run_ptq (checkpoint, report, search).

Saving and reloading Q-DiT checkpoints is tests/formats/test_formats_qdit.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ditq
from ditq import quant
from ditq.errors import InvalidArgumentError
from ditq.models import DiT, DiTConfig
from ditq.pipelines import ptq

TINY = DiTConfig(
    depth=2, hidden_size=64, num_heads=2, patch_size=4, input_size=16, in_channels=1, num_classes=4
)
CALIB = ptq.CalibSpec(num_samples=6, steps=4, cfg_scale=1.5, batch_size=4)


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


def test_record_calibration_is_cached_by_model_and_settings(cache, monkeypatch):
    model = _dit()
    data = ptq.record_calibration(model, CALIB)
    assert len(data) == 2 * CALIB.num_samples  # guided: conditional and null rows
    assert data.input_shape == (1, 16, 16)
    files = list((cache / "calibration").glob("*.safetensors"))
    assert len(files) == 1

    def no_sampling(*a, **k):
        raise AssertionError("sampled again instead of reading the cache")

    with monkeypatch.context() as m:
        m.setattr(ptq, "sample", no_sampling)
        again = ptq.record_calibration(model, CALIB)
    assert torch.equal(again.x, data.x) and torch.equal(again.t, data.t)
    other = ptq.record_calibration(_dit(seed=1), CALIB)  # other weights: another cache entry
    assert not torch.equal(other.x, data.x)
    assert len(list((cache / "calibration").glob("*.safetensors"))) == 2


def test_a_calibration_cache_that_cannot_be_written_is_one_warning(cache, monkeypatch):
    monkeypatch.setenv("DITQ_FAULT_WRITE_ERRNO", "EROFS")
    warnings: list[str] = []
    data = ptq.record_calibration(_dit(), CALIB, warn=warnings.append)
    assert len(data) == 2 * CALIB.num_samples
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith(f"warning: cannot write the calibration cache {cache / 'calibration'}/")
    assert ": the file system is read-only; going on without caching the calibration inputs" in warnings[0]
    assert "run the same command again" not in warnings[0]  # the run goes on: no advice to rerun
    assert not list((cache / "calibration").glob("*"))


def test_calibration_of_the_wrong_shape_is_a_one_line_error():
    model = _dit()
    bad = quant.CalibrationData(torch.zeros(2, 4, 32, 32), torch.zeros(2), {"y": torch.zeros(2).long()})
    with pytest.raises(
        InvalidArgumentError, match=r"\[4, 32, 32\] per sample but the model takes \[1, 16, 16\]"
    ):
        ptq.quantize_model(model, quant.QDiTConfig(), calib=bad, gptq=True)
    assert not quant.quantized_layers(model)
    with pytest.raises(InvalidArgumentError, match="needs calibration data"):
        ptq.quantize_model(model, quant.QDiTConfig(dynamic=False))


def _fake_quality(calls):
    """A deterministic stand-in for FID: mean pixel distance to a fixed gray level (lower is better)."""

    def quality(images: np.ndarray, labels: np.ndarray) -> dict:
        calls.append(len(images))
        return {"fid": float(np.abs(images.astype(np.float64) - 128).mean()), "n": float(len(labels))}

    return quality


def test_run_ptq_writes_checkpoint_and_report(tmp_path, cache):
    ditq.save(_dit(), tmp_path / "fp.safetensors")
    calls: list[int] = []
    opts = ptq.PTQOptions(
        model=str(tmp_path / "fp.safetensors"), out=str(tmp_path / "q.safetensors"), w_bits=4, w_group=32,
        gptq=True, calib=CALIB, eval=ptq.EvalSpec(num_samples=8, steps=3, batch_size=8),
        report=str(tmp_path / "report"), device="cpu",
    )  # fmt: skip
    lines: list[str] = []
    result = ptq.run_ptq(opts, log=lines.append, quality=_fake_quality(calls))
    assert calls == [8, 8]  # FP and quantized, same seeds and labels
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["gptq"] and report["settings"]["calibration"]["inputs"] == 12
    assert report["size_mb"]["quantized"] < report["size_mb"]["fp"]
    assert set(report["quality"]["fp"]) == {"fid", "n"}
    assert "| fid |" in (tmp_path / "report.md").read_text()
    assert [p.name for p in result.report_paths] == ["report.json", "report.md"]
    assert any("GPTQ blocks.1" in line for line in lines)
    back = ditq.load(result.checkpoint)
    assert back.quant_config.w_group == 32


def test_run_ptq_search_writes_a_layer_config_that_applies(tmp_path, cache):
    ditq.save(_dit(), tmp_path / "fp.safetensors")
    calls: list[int] = []
    opts = ptq.PTQOptions(
        model=str(tmp_path / "fp.safetensors"), out=str(tmp_path / "q.safetensors"), w_bits=4,
        w_group=32, calib=CALIB, search=True, search_groups=(16, 32, 64), search_population=4,
        search_generations=2, search_prescreen=2, search_state=str(tmp_path / "state.json"),
        search_eval=ptq.EvalSpec(num_samples=4, steps=2, batch_size=4), device="cpu",
    )  # fmt: skip
    result = ptq.run_ptq(opts, log=lambda _: None, quality=_fake_quality(calls))
    assert result.layer_config is not None and result.layer_config.is_file()
    assert (tmp_path / "state.json").is_file()
    assert 0 < len(calls) <= 2 * 2  # prescreen: at most 2 real fitness calls per generation
    layers = quant.read_layer_config(result.layer_config)["layers"]
    assert result.config.layers == layers
    # the map applies directly
    opts2 = ptq.PTQOptions(
        model=str(tmp_path / "fp.safetensors"), out=str(tmp_path / "q2.safetensors"), w_bits=4, w_group=32,
        layer_config=str(result.layer_config), device="cpu",
    )  # fmt: skip
    r2 = ptq.run_ptq(opts2, log=lambda _: None)
    assert r2.config.layers == layers


@pytest.mark.parametrize("keep", [True, False])
def test_a_signal_during_the_search_stops_it_after_the_generation_with_how_to_go_on(tmp_path, cache, keep):
    import os
    import signal

    from ditq.errors import StoppedBySignal

    ditq.save(_dit(), tmp_path / "fp.safetensors")
    quality = _fake_quality([])

    def interrupted(images, labels):  # SIGTERM arrives during the first evaluation
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
        return quality(images, labels)

    sent: list[int] = []
    state = tmp_path / "state.json"
    opts = ptq.PTQOptions(
        model=str(tmp_path / "fp.safetensors"), out=str(tmp_path / "q.safetensors"), w_bits=4,
        w_group=32, search=True, search_groups=(16, 32, 64), search_population=4, search_generations=3,
        search_state=str(state) if keep else None, device="cpu",
        search_eval=ptq.EvalSpec(num_samples=4, steps=2, batch_size=4),
    )  # fmt: skip
    with pytest.raises(StoppedBySignal) as e:
        ptq.run_ptq(opts, log=lambda _: None, quality=interrupted)
    message = str(e.value)
    assert message.startswith("stopped after generation 1 of 3 by SIGTERM; ") and "\n" not in message
    if keep:
        assert message.endswith(
            f"the search state is {state}; resume with: the same options (search_state {state})"
        )
        assert json.loads(state.read_text())["generation"] == 1
        result = ptq.run_ptq(opts, log=lambda _: None, quality=quality)  # no signal: it goes on to the end
        assert result.checkpoint.is_file() and json.loads(state.read_text())["generation"] == 3
    else:
        assert "without --search-state its progress is not kept" in message
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are given back


def test_quality_function_needs_a_reference_for_other_models():
    with pytest.raises(InvalidArgumentError, match="--ref"):
        ptq.quality_function(_dit())
