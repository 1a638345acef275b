"""Ternary QAT through ditq train: from scratch, from full-precision weights, data-free distillation;
exact resume; the recipes in configs/; one-line errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import ditq
from ditq import models
from ditq.checkpoint import load_tensors, read_metadata
from ditq.errors import CheckpointError, DitqError
from ditq.kernels import ops
from ditq.pipelines.qat import qat_model_from_state
from ditq.pipelines.train import init_from, run_training
from ditq.quant import TernaryLinear, TernaryQATLinear, ternary_layers
from ditq.train.checkpoint import load_state
from ditq.train.config import ConfigError, TrainRun

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY_MODEL = {"name": "DiT-S/4", "overrides": {"depth": 1, "hidden_size": 32, "num_heads": 2}}


def _run(out, **changes) -> dict:
    d = {
        "out": str(out),
        "seed": 1,
        "device": "cpu",
        "model": json.loads(json.dumps(TINY_MODEL)),
        "data": {"kind": "synthetic", "image_size": 8, "num_samples": 64},
        "optim": {
            "steps": 6,
            "batch_size": 8,
            "lr": 3e-3,
            "ema_decay": 0.8,
            "grad_clip": 1.0,
            "log_every": 1,
        },
        "checkpoint": {"every": 2, "keep_last": 2},
        "quant": {"method": "ternary"},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            d[section][field] = value
        else:
            d[section] = value
    return d


def _train(d: dict, **kw):
    return run_training(TrainRun.from_dict(d), log=kw.pop("log", lambda _: None), **kw)


def _distill(out, teacher, **changes) -> dict:
    data = {"kind": "distill", "teacher": str(teacher), "pool_size": 12, "pool_steps": 3, "pool_refresh": 3}
    return _run(out, data=data, **changes)


#################################################################################
#                           From scratch, and exact resume                      #
#################################################################################


def test_qat_from_scratch_learns_and_writes_the_converted_raw_weights(tmp_path):
    d = _run(tmp_path / "run", optim__steps=24, optim__batch_size=16, checkpoint={"every": 0, "keep_last": 1})
    lines = []
    result = _train(d, log=lines.append)
    losses = [r["loss"] for r in result.records]
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4])
    assert any("ternary QAT (5 layers, scale alpha)" in line for line in lines)

    # Training states hold the QAT state (latent float weights and alphas) ...
    state = load_state(result.last_checkpoint)
    assert state["model"]["blocks.0.attn.qkv.weight"].dtype == torch.float32
    assert "blocks.0.attn.qkv.alphas" in state["ema"]
    assert state["config"]["quant_config"]["method"] == "ternary"
    # ... and model.safetensors the converted raw weights (checkpoint.export auto), packed, computing
    # exactly what the QAT model computes.
    meta = read_metadata(result.model_path)
    assert meta["weights"].startswith("raw")
    assert meta["quant_kind"] == "ternary" and meta["quant_config"]["step"] == "convert"
    assert meta["ternary"]["layout"] == "k4" and meta["ternary"]["bits"] == 2
    assert load_tensors(result.model_path)["blocks.0.attn.qkv.weight"].dtype == torch.uint8
    loaded = ditq.load(result.model_path)
    assert all(isinstance(m, TernaryLinear) for m in ternary_layers(loaded).values())
    qat = qat_model_from_state(state, weights="model")
    assert all(isinstance(m, TernaryQATLinear) for m in ternary_layers(qat).values())
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([0, 3, 10])
    with torch.no_grad():
        want = qat(x, t, y)
        with ops.use_backend("reference"):  # the same float operations as the QAT layers: exact
            assert torch.equal(loaded(x, t, y), want)
        got = loaded(x, t, y)  # a weight-only kernel where the CPU has one: another summation order
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("export", ["ema", "model"])
def test_checkpoint_export_chooses_the_weights_of_model_safetensors(tmp_path, export):
    d = _run(tmp_path / "run", checkpoint={"every": 0, "keep_last": 1, "export": export})
    result = _train(d)
    state = load_state(result.last_checkpoint)
    assert read_metadata(result.model_path)["weights"].startswith("EMA" if export == "ema" else "raw")
    qat = qat_model_from_state(state, weights=export)
    other = qat_model_from_state(state, weights="model" if export == "ema" else "ema")
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 2])
    with torch.no_grad(), ops.use_backend("reference"):
        got = ditq.load(result.model_path)(x, t, y)
        assert torch.equal(got, qat(x, t, y)) and not torch.equal(got, other(x, t, y))


def _kill_at(step):
    def on_log(rec):
        if rec["step"] == step:
            raise KeyboardInterrupt

    return on_log


def _same_run(a: Path, b: Path, state_a: Path, state_b: Path) -> None:
    ta, tb = load_tensors(a / "model.safetensors"), load_tensors(b / "model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    sa, sb = load_state(state_a), load_state(state_b)
    for part in ("model", "ema"):
        assert all(torch.equal(sa[part][k], sb[part][k]) for k in sa[part])


def test_qat_resume_is_exact(tmp_path):
    full = _train(_run(tmp_path / "full"))
    with pytest.raises(KeyboardInterrupt):
        _train(_run(tmp_path / "cut"), on_log=_kill_at(5))  # the state of step 4 is written
    lines = []
    resumed = _train(_run(tmp_path / "cut"), resume=True, log=lines.append)
    assert resumed.start_step == 4 and any("resuming from step 4" in line for line in lines)
    _same_run(tmp_path / "full", tmp_path / "cut", full.last_checkpoint, resumed.last_checkpoint)


def test_resume_with_other_quantization_is_refused(tmp_path):
    _train(_run(tmp_path / "run", optim__steps=2))
    other = _run(tmp_path / "run", optim__steps=4, quant={"method": "ternary", "act_bits": 8})
    with pytest.raises(CheckpointError, match="trained with quantization .*act_bits=None") as e:
        _train(other, resume=True)
    assert "\n" not in str(e.value)
    model = json.loads(json.dumps(TINY_MODEL))
    model["overrides"]["adaln_norm"] = True  # the same architecture, trained in float
    with pytest.raises(CheckpointError, match="this run asks for none \\(full precision\\)"):
        _train(_run(tmp_path / "run", optim__steps=4, quant=None, model=model), resume=True)


#################################################################################
#                          Fine-tuning from float weights                       #
#################################################################################


def _float_model(path: Path, seed: int = 5, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = models.create_model(
        "DiT-S/4",
        **{
            "input_size": 8,
            "depth": 1,
            "hidden_size": 32,
            "num_heads": 2,
            "in_channels": 1,
            "num_classes": 10,
        }
        | overrides,
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.05)
    ditq.save(model, path)
    return model


def test_fine_tune_starts_from_the_float_weights(tmp_path):
    fp = _float_model(tmp_path / "fp.safetensors")
    d = _run(tmp_path / "run", init={"from": str(tmp_path / "fp.safetensors")}, optim__steps=1)
    d["optim"]["lr"] = 1e-9  # one step that moves nothing measurably
    lines = []
    result = _train(d, log=lines.append)
    assert any(
        "init: full-precision weights from" in line and "1 new adaLN RMSNorm gains" in line for line in lines
    )
    state = load_state(result.last_checkpoint)["model"]
    for k, v in fp.state_dict().items():
        torch.testing.assert_close(state[k], v, atol=1e-6, rtol=0)
    # The new RMSNorm's gain: the mean RMS of the float adaLN outputs over timesteps and labels.
    t, y = torch.arange(256) * 1000 // 256, torch.arange(256) % 11
    with torch.no_grad():
        c = fp.t_embedder(t) + fp.y_embedder(y, False)
        rms = fp.blocks[0].adaLN_modulation(c).pow(2).mean(-1).sqrt().mean()
    gain = state["blocks.0.adaLN_modulation.2.weight"]
    torch.testing.assert_close(gain, torch.full((192,), float(rms)), atol=1e-6, rtol=0)
    # alpha starts at the least-squares scale of the loaded weights, not of a random init.
    w = fp.blocks[0].attn.qkv.weight
    gamma = w.abs().mean()
    w_t = (w / (gamma + 1e-6)).round().clamp(-1, 1)
    alpha = (w * w_t).sum() / (w_t * w_t).sum()
    torch.testing.assert_close(state["blocks.0.attn.qkv.alphas"], alpha.reshape(1), atol=1e-6, rtol=0)
    assert TrainRun.load(tmp_path / "run" / "config.yaml").init.from_ == str(tmp_path / "fp.safetensors")


def test_rms_gains_keep_the_float_model_closer_than_gains_of_one(tmp_path):
    fp = _float_model(tmp_path / "fp.safetensors", depth=2).eval()
    x, t, y = torch.randn(8, 1, 8, 8), torch.arange(8) * 125, torch.arange(8) % 11
    errors = {}
    for gain in ("one", "rms"):
        model = models.build_model(replace(fp.config, adaln_norm=True))
        init_from(model, str(tmp_path / "fp.safetensors"), adaln_gain=gain)
        norms = [b.adaLN_modulation[2].weight for b in model.blocks]
        assert all(torch.equal(g, g[0].expand_as(g)) for g in norms)  # one value per block
        assert all((g == 1).all() for g in norms) == (gain == "one")
        with torch.no_grad():
            errors[gain] = float((model.eval()(x, t, y) - fp(x, t, y)).pow(2).mean())
    assert errors["rms"] < 0.1 * errors["one"]
    with pytest.raises(ConfigError, match="init.adaln_gain must be one of rms, one"):
        TrainRun.from_dict(_run(tmp_path / "run", init={"from": "x", "adaln_gain": "two"}))


def test_fine_tune_from_another_model_is_a_one_line_error(tmp_path):
    _float_model(tmp_path / "deep.safetensors", depth=2)
    with pytest.raises(ConfigError, match="is another model: depth 2 \\(run: 1\\)") as e:
        _train(_run(tmp_path / "run", init={"from": str(tmp_path / "deep.safetensors")}))
    assert "\n" not in str(e.value)
    model = models.create_model("DiT-S/4", **{"input_size": 8, "depth": 1, "hidden_size": 32, "num_heads": 2})
    model.config.in_channels = 1
    with pytest.raises(CheckpointError, match="init.from: checkpoint not found"):
        init_from(model, str(tmp_path / "missing.safetensors"))


#################################################################################
#                              Data-free distillation                           #
#################################################################################


def test_distillation_loss_decreases_on_the_embedded_model(tmp_path):
    """A ternary student, from scratch, learns ditq-fmnist's outputs on its own samples, no dataset."""
    student = {
        "name": "DiT-S/4",
        "overrides": {"depth": 2, "hidden_size": 64, "num_heads": 2, "patch_size": 4},
    }
    data = {"kind": "distill", "teacher": "ditq-fmnist", "pool_size": 16, "pool_steps": 4, "pool_refresh": 0}
    d = _run(tmp_path / "run", model=student, data=data, optim__steps=30, optim__lr=2e-3, seed=0)
    d["checkpoint"] = {"every": 0, "keep_last": 1}
    lines = []
    result = _train(d, log=lines.append)
    losses = [r["loss"] for r in result.records]
    assert sum(losses[-5:]) < 0.75 * sum(losses[:5])
    assert any("distill: teacher pool 0: 16 samples (DDIM-4)" in line for line in lines)
    assert result.model_config.in_channels == 1 and result.model_config.num_classes == 10  # from the teacher
    assert read_metadata(result.model_path)["quant_kind"] == "ternary"


def test_distillation_resumes_exactly_across_pool_refreshes(tmp_path, teacher_path):
    full = _train(_distill(tmp_path / "full", teacher_path))
    with pytest.raises(KeyboardInterrupt):
        _train(_distill(tmp_path / "cut", teacher_path), on_log=_kill_at(5))
    resumed = _train(_distill(tmp_path / "cut", teacher_path), resume=True)
    assert resumed.start_step == 4  # in pool 1 (steps 3-5), rebuilt on resume
    _same_run(tmp_path / "full", tmp_path / "cut", full.last_checkpoint, resumed.last_checkpoint)


#################################################################################
#                               Bad input, recipes                              #
#################################################################################


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"quant": {"method": "qdit"}}, "quant.method must be one of ternary, got 'qdit'"),
        ({"quant": {"scale": "beta"}}, "quant: TernaryQATConfig.scale must be one of"),
        ({"quant": {"act_bits": 4}}, "quant: TernaryQATConfig.act_bits must be one of"),
        ({"quant": {"bits": 2}}, "unknown key bits in quant"),
        ({"quant": {"include": "blocks.*"}}, "quant.include must be a list or null"),
        ({"init": {"path": "x"}}, "unknown key path in init; valid keys: from"),
        ({"init": {}}, "init.from must name full-precision weights"),
        ({"data": {"kind": "distill"}}, "data.kind distill needs data.teacher"),
        (
            {"data": {"kind": "synthetic", "teacher": "ditq-fmnist"}},
            "data.teacher applies to data.kind distill",
        ),
        ({"data": {"kind": "distill", "teacher": "t", "path": "p"}}, "data.path does not apply"),
        (
            {"data": {"kind": "distill", "teacher": "t", "pool_steps": 0}},
            "data.pool_steps must be at least 1",
        ),
        ({"data": {"kind": "distill", "teacher": "t", "pool_cfg_scale": 0.5}}, "pool_cfg_scale must be >= 1"),
        ({"model": {"name": "DiT-S/4", "overrides": {"adaln_norm": False}}}, "quant.adaln_norm is True"),
        (
            {"model": {"name": "TerDiT-tiny", "overrides": {"depth": 2}}},
            "unknown key depth in model.overrides",
        ),
    ],
)
def test_bad_configs_are_one_line_errors(tmp_path, changes, match):
    with pytest.raises(ConfigError, match=match) as e:
        TrainRun.from_dict(_run(tmp_path / "run", **changes))
    assert "\n" not in str(e.value)


def test_a_teacher_of_another_shape_is_a_one_line_error(tmp_path, teacher_path):
    def model(**extra):
        return {"model": {"name": "DiT-S/4", "overrides": {**TINY_MODEL["overrides"], **extra}}}

    cases = [
        (model(in_channels=3), "model in_channels is 3 but teacher .* gives 1; drop it"),
        (model(num_classes=10), "model num_classes is 10 but teacher .* gives 4"),
        (model(learn_sigma=False), "predicts 2 channels and the student 1; set the model's learn_sigma"),
    ]
    for changes, match in cases:
        with pytest.raises(ConfigError, match=match) as e:
            _train(_distill(tmp_path / "run", teacher_path, **changes))
        assert "\n" not in str(e.value)
    with pytest.raises(DitqError, match="data.teacher: checkpoint not found"):
        _train(_distill(tmp_path / "run", tmp_path / "nope.safetensors"))
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_recipes_parse():
    runs = {name: TrainRun.load(CONFIGS / f"{name}.yaml") for name in
            ("terdit_600m", "terdit_4b", "fmnist_ternary", "fmnist_ternary_distill")}  # fmt: skip
    for name in ("terdit_600m", "terdit_4b"):
        r = runs[name]
        assert r.quant.method == "ternary" and r.quant.adaln_norm and r.data.kind == "latents"
        assert (r.optim.lr, r.optim.ema_decay, r.optim.grad_clip) == (5e-4, 0.9999, 2.0)
        assert (r.optim.precision, r.optim.batch_size) == ("bf16", 512) and r.optim.decay_at < 1
        assert models.get_config(r.model.name).arch == "large-dit"
    assert runs["terdit_600m"].model.name == "TerDiT-600M" and runs["terdit_4b"].model.name == "TerDiT-4.2B"
    assert runs["terdit_4b"].distributed.strategy == "fsdp"
    assert runs["fmnist_ternary"].data.kind == "idx" and runs["fmnist_ternary"].quant is not None
    distill = runs["fmnist_ternary_distill"]
    assert distill.data.kind == "distill" and distill.data.teacher == "ditq-fmnist"
    assert distill.quant is not None and distill.init.from_ == "ditq-fmnist"
    # The embedded architecture, so the teacher's weights initialize the student.
    embedded = ditq.load("ditq-fmnist").config
    for r in (runs["fmnist_ternary"], distill):
        o = r.model.overrides
        assert (o["depth"], o["hidden_size"], o["num_heads"], o["patch_size"]) == (
            embedded.depth, embedded.hidden_size, embedded.num_heads, embedded.patch_size
        )  # fmt: skip


def test_cli_flags_set_init_and_quant():
    from ditq.cli.main import build_parser
    from ditq.cli.train import _command, build_run

    argv = ["train", "--config", str(CONFIGS / "fmnist_ternary.yaml"), "--init", "ditq-fmnist"]
    args = build_parser().parse_args([*argv, "--set", "quant.act_bits=8"])
    run = build_run(args)
    assert run.init.from_ == "ditq-fmnist" and run.init.adaln_gain == "rms" and run.quant.act_bits == 8
    assert "--init ditq-fmnist" in _command(args)
    assert TrainRun.from_dict(run.to_dict()) == run  # init round-trips as {from: ...}
    assert run.to_dict()["init"] == {"from": "ditq-fmnist", "adaln_gain": "rms"}
