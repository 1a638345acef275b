"""ditq.pipelines.train: a TrainRun in, log + checkpoints + EMA model out; exact resume."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import ditq
from ditq.checkpoint import load_tensors, read_metadata
from ditq.errors import CheckpointError, DitqError
from ditq.pipelines.train import run_training
from ditq.train.checkpoint import load_state
from ditq.train.config import ConfigError, TrainRun


def _run(out, **changes) -> TrainRun:
    d = {
        "out": str(out),
        "seed": 1,
        "device": "cpu",
        "model": {"name": "DiT-S/4", "overrides": {"depth": 1, "hidden_size": 32, "num_heads": 2}},
        "data": {"kind": "synthetic", "image_size": 8, "num_samples": 30},
        "optim": {
            "steps": 6,
            "batch_size": 4,
            "lr": 1e-3,
            "warmup_steps": 2,
            "decay_at": 0.5,
            "ema_decay": 0.8,
            "grad_clip": 1.0,
            "log_every": 1,
        },
        "checkpoint": {"every": 2, "keep_last": 2},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            d[section][field] = value
        else:
            d[section] = value
    return TrainRun.from_dict(d)


def _quiet(**kw):
    return run_training(log=lambda _: None, **kw)


def test_writes_config_log_checkpoints_and_the_ema_model(tmp_path):
    run = _run(tmp_path / "out")
    lines = []
    result = run_training(run, command="ditq train --config x.yaml", log=lines.append)
    out = tmp_path / "out"
    assert TrainRun.load(out / "config.yaml") == run
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] == [r["step"] for r in result.records]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000004.pt", "step_0000006.pt"]
    assert result.last_checkpoint == out / "checkpoints" / "step_0000006.pt"

    meta = read_metadata(out / "model.safetensors")
    assert meta["command"] == "ditq train --config x.yaml"
    assert TrainRun.from_dict(meta["train_run"]) == run
    assert meta["class_names"][0] == "disk" and meta["train_steps"] == 6
    model = ditq.load(out / "model.safetensors")
    cfg = model.config
    assert (cfg.input_size, cfg.in_channels, cfg.num_classes, cfg.depth) == (8, 1, 10, 1)
    state = load_state(result.last_checkpoint)
    for k, v in load_tensors(out / "model.safetensors").items():  # float runs: the EMA (export auto)
        assert torch.equal(v, state["ema"][k])
    assert state["config"]["run"] == run.to_dict() and state["step"] == 6
    assert any("training a" in line for line in lines) and any("wrote" in line for line in lines)


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    full = _quiet(run=_run(tmp_path / "full"))

    def kill_at_5(rec):  # killed after the state of step 4 was written, before step 6's
        if rec["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _quiet(run=_run(tmp_path / "cut"), on_log=kill_at_5)
    lines = []
    resumed = run_training(_run(tmp_path / "cut"), resume=True, log=lines.append)
    assert resumed.start_step == 4 and any("resuming from step 4" in line for line in lines)
    a = load_tensors(tmp_path / "full" / "model.safetensors")
    b = load_tensors(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = load_state(full.last_checkpoint), load_state(resumed.last_checkpoint)
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # step 5 of the killed run was dropped, then written again


def test_resume_continues_to_more_steps(tmp_path):
    # N steps, then --resume with 2N, equals 2N at once when the schedule does not depend on N.
    kw = {"optim__decay_at": 1.0, "checkpoint__keep_last": 1}
    _quiet(run=_run(tmp_path / "once", optim__steps=6, **kw))
    _quiet(run=_run(tmp_path / "twice", optim__steps=3, **kw))
    second = _quiet(run=_run(tmp_path / "twice", optim__steps=6, **kw), resume=True)
    assert second.start_step == 3
    a = load_tensors(tmp_path / "once" / "model.safetensors")
    b = load_tensors(tmp_path / "twice" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in (tmp_path / "twice" / "checkpoints").iterdir()] == ["step_0000006.pt"]


def test_image_folder_data_resumes_exactly(tmp_path):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "dog" / "broken.png").write_bytes(b"nope")
    kw = {"data": {"kind": "folder", "path": str(root), "image_size": 8, "num_workers": 0}}
    warned = []
    full = run_training(_run(tmp_path / "full", **kw), log=lambda _: None, warn=warned.append)
    assert full.model_config.in_channels == 3 and full.model_config.num_classes == 2
    assert len(warned) == 1 and "skipped 1 unreadable" in warned[0]
    with pytest.raises(KeyboardInterrupt):
        run_training(
            _run(tmp_path / "cut", **kw), log=lambda _: None, warn=lambda _: None, on_log=_kill_at(3)
        )
    run_training(_run(tmp_path / "cut", **kw), resume=True, log=lambda _: None, warn=lambda _: None)
    a = load_tensors(tmp_path / "full" / "model.safetensors")
    b = load_tensors(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_metadata(tmp_path / "full" / "model.safetensors")["class_names"] == ["cat", "dog"]


def _kill_at(step):
    def on_log(rec):
        if rec["step"] == step:
            raise KeyboardInterrupt

    return on_log


def test_an_existing_run_is_not_overwritten_without_resume(tmp_path):
    _quiet(run=_run(tmp_path, optim__steps=1))
    with pytest.raises(DitqError, match="already holds a training run; pass --resume"):
        _quiet(run=_run(tmp_path, optim__steps=1))


def test_resuming_another_model_is_refused(tmp_path):
    _quiet(run=_run(tmp_path, optim__steps=2))
    other = _run(
        tmp_path,
        optim__steps=4,
        model={"name": "DiT-S/4", "overrides": {"depth": 1, "hidden_size": 32, "num_heads": 4}},
    )
    with pytest.raises(CheckpointError, match=r"another model \(num_heads 2 -> 4\)"):
        _quiet(run=other, resume=True)


def test_resume_without_a_checkpoint_starts_over(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"step": 1}\n')
    lines = []
    result = run_training(_run(tmp_path, optim__steps=2), resume=True, log=lines.append)
    assert result.start_step == 0 and any("starting from step 0" in line for line in lines)
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 2


def test_data_and_model_mismatches_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.path not found"):
        _quiet(run=_run(tmp_path, data={"kind": "idx", "path": str(tmp_path / "nope")}))
    model = {
        "name": "DiT-S/4",
        "overrides": {"depth": 1, "hidden_size": 32, "num_heads": 2, "in_channels": 3},
    }
    with pytest.raises(ConfigError, match="model in_channels is 3 but the data gives 1"):
        _quiet(run=_run(tmp_path, model=model))
    model = {"name": "DiT-S/4", "overrides": {"depth": 1, "hidden_size": 30, "num_heads": 4}}
    with pytest.raises(DitqError, match="not divisible by num_heads"):
        _quiet(run=_run(tmp_path, model=model))
    assert not (tmp_path / "log.jsonl").exists()


def test_idx_data(tmp_path):
    import gzip
    import struct

    root = tmp_path / "idx"
    root.mkdir()
    images = np.random.default_rng(0).integers(0, 256, (12, 28, 28), dtype=np.uint8)
    labels = np.arange(12, dtype=np.uint8) % 3
    with gzip.open(root / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">4B3I", 0, 0, 8, 3, 12, 28, 28) + images.tobytes())
    with gzip.open(root / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">4BI", 0, 0, 8, 1, 12) + labels.tobytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = _quiet(
            run=_run(
                tmp_path / "out", data={"kind": "idx", "path": str(root), "image_size": 32}, optim__steps=1
            )
        )
    assert result.model_config.num_classes == 3 and result.model_config.input_size == 32
