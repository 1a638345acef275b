"""TrainRun: round trips through dicts, YAML and JSON; strict, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from ditq.train.config import ConfigError, TrainRun, read_config_file, set_dotted

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _run() -> TrainRun:
    return TrainRun.from_dict(
        {
            "seed": 3,
            "out": "out/x",
            "model": {"name": "DiT-S/4", "overrides": {"depth": 2, "hidden_size": 64, "num_heads": 2}},
            "data": {"kind": "synthetic", "image_size": 16, "channels": 3},
            "optim": {"steps": 10, "lr": 1e-3, "warmup_steps": 2},
            "checkpoint": {"every": 5, "keep_last": 2},
        }
    )


def test_round_trips_through_dict_yaml_and_json(tmp_path):
    run = _run()
    assert TrainRun.from_dict(run.to_dict()) == run
    for name in ("run.yaml", "run.json"):
        run.save(tmp_path / name)
        assert TrainRun.load(tmp_path / name) == run
    assert "seed" not in run.to_dict()["optim"]
    cfg = run.train_config()
    assert cfg.seed == 3 and cfg.steps == 10 and cfg.lr == 1e-3


def test_empty_config_is_all_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert TrainRun.load(tmp_path / "empty.yaml") == TrainRun()


@pytest.mark.parametrize("name", ["fmnist_tiny.yaml", "synthetic_tiny.yaml", "imagenet256_latents.yaml"])
def test_shipped_configs_load(name):
    run = TrainRun.load(CONFIGS / name)
    assert TrainRun.from_dict(run.to_dict()) == run


def test_fmnist_recipe_is_the_embedded_model():
    run = TrainRun.load(CONFIGS / "fmnist_tiny.yaml")
    assert run.model.overrides == {
        "depth": 6,
        "hidden_size": 128,
        "num_heads": 4,
        "patch_size": 4,
        "input_size": 32,
        "in_channels": 1,
        "num_classes": 10,
    }
    o = run.optim
    assert (o.steps, o.batch_size, o.lr, o.warmup_steps) == (8000, 128, 1e-3, 300)
    assert (o.decay_at, o.decay_factor, o.ema_decay, o.grad_clip) == (0.85, 0.1, 0.9995, 1.0)
    assert run.data.kind == "idx" and run.data.path == "/usr/share/datasets/fashion-mnist"


def test_yaml_exponent_without_a_dot_is_a_number(tmp_path):
    (tmp_path / "r.yaml").write_text("optim:\n  lr: 1e-3\n  steps: 8_000\n")
    run = TrainRun.load(tmp_path / "r.yaml")
    assert run.optim.lr == 1e-3 and run.optim.steps == 8000


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        ({"optimizer": {}}, "unknown key optimizer in the config; valid keys: model, data"),
        ({"optim": {"lr": 1e-3, "learning_rate": 1}}, "unknown key learning_rate in optim"),
        ({"data": {"kind": "folder"}}, "data.path is required"),
        ({"data": {"kind": "lmdb"}}, "data.kind must be one of synthetic, idx, folder, latents"),
        (
            {"data": {"kind": "latents", "path": "x", "channels": 3}},
            "data.channels does not apply to latents",
        ),
        ({"distributed": {"strategy": "zero3"}}, "distributed.strategy must be one of ddp, fsdp"),
        ({"distributed": {"backend": "mpi"}}, "distributed.backend must be one of auto, gloo, nccl"),
        ({"distributed": {"world_size": 2}}, "unknown key world_size in distributed"),
        ({"optim": {"lr": -1}}, "optim.lr must be positive"),
        ({"optim": {"lr": "fast"}}, "optim.lr must be a number, got 'fast'"),
        ({"optim": {"steps": 1.5}}, "optim.steps must be an integer"),
        ({"optim": {"steps": 0}}, "optim.steps must be at least 1"),
        ({"optim": {"precision": "fp8"}}, "optim.precision must be one of"),
        ({"optim": {"compile": "yes"}}, "optim.compile must be true/false"),
        ({"optim": {"seed": 1}}, "set the seed at the top level"),
        ({"checkpoint": {"keep_last": -1}}, "checkpoint.keep_last must be >= 0"),
        ({"checkpoint": {"export": "best"}}, "checkpoint.export must be one of auto, ema, model"),
        ({"model": {"overrides": {"depht": 2}}}, "unknown key depht in model.overrides"),
        ({"model": {"overrides": {"depth": "two"}}}, "model.overrides.depth must be an integer"),
        ({"model": {"config": {"depth": 2}}}, "either name .* or config, not both"),
        ({"model": "DiT-S/4"}, "model must be a mapping"),
        ({"seed": None}, "seed must not be null"),
    ],
)
def test_bad_configs_are_one_line_errors(patch, match):
    data = _run().to_dict()
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    with pytest.raises(ConfigError, match=match) as e:
        TrainRun.from_dict(data)
    assert "\n" not in str(e.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        read_config_file(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_config_file(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        read_config_file(tmp_path / "list.yaml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_config_file(tmp_path / "bad.json")


def test_set_dotted():
    d = {"optim": {"lr": 1.0}}
    set_dotted(d, "optim.lr", 2.0)
    set_dotted(d, "model.overrides.depth", 3)
    assert d == {"optim": {"lr": 2.0}, "model": {"overrides": {"depth": 3}}}
    with pytest.raises(ConfigError, match="not a section"):
        set_dotted(d, "optim.lr.x", 1)
