"""Training on several processes: torchrun + gloo on CPU, DDP and FSDP2, resume, same result as one process.

One ``torchrun --nproc_per_node=2`` launch (``dist_worker.py``) runs every
two-process scenario through ``ditq train``; the tests compare what it wrote
with single-process runs of the same config made here. The noise of a step
is drawn for the global batch and sliced per rank, so two processes with a
global batch of 8 must give what one process with a batch of 8 gives, up to
float rounding (per-rank matmuls of 4 rows round differently from one of 8).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ditq
from ditq.checkpoint import load_tensors
from ditq.cli.main import main
from ditq.errors import DitqError
from ditq.train.checkpoint import load_state

WORKER = Path(__file__).with_name("dist_worker.py")
CONFIG = """\
seed: 1
device: cpu
model: {name: DiT-S/4, overrides: {depth: 2, hidden_size: 32, num_heads: 2}}
data: {kind: synthetic, image_size: 8, num_samples: 30}
optim: {steps: 4, batch_size: 8, lr: 1.0e-3, warmup_steps: 2, ema_decay: 0.8, grad_clip: 1.0, log_every: 1}
checkpoint: {every: 2, keep_last: 2}
"""


def _train(config, out, *extra):
    return ["train", "--config", str(config), "--out", str(out), "--quiet", *extra]


def _resume(out, *extra):
    return ["train", "--resume", "--out", str(out), "--quiet", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process references made here, then every two-process scenario in one torchrun launch."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    root = tmp_path_factory.mktemp("dist")
    config = root / "run.yaml"
    config.write_text(CONFIG)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_train(config, root / "ref")) == 0
        assert main(_train(config, root / "cross", "--steps", "2")) == 0  # resumed below by 2 processes
    finally:
        torch.set_num_threads(before)
    scenarios = [
        _train(config, root / "ddp"),
        _train(config, root / "ddp_resume", "--steps", "2"),
        _resume(root / "ddp_resume", "--steps", "4"),
        _train(config, root / "fsdp", "--strategy", "fsdp"),
        _train(config, root / "fsdp_resume", "--strategy", "fsdp", "--steps", "2"),
        _resume(root / "fsdp_resume", "--steps", "4"),
        _resume(root / "cross", "--steps", "4", "--strategy", "fsdp"),
        _train(config, root / "odd", "--batch-size", "7"),
    ]
    spec = root / "spec.json"
    spec.write_text(json.dumps(scenarios))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER)]
    proc = subprocess.run(
        [*cmd, str(spec)], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]
    return root, ranks


def _assert_same_weights(a_dir, b_dir, atol=1e-6):
    a, b = load_tensors(a_dir / "model.safetensors"), load_tensors(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)
    sa = load_state(a_dir / "checkpoints" / "step_0000004.pt")
    sb = load_state(b_dir / "checkpoints" / "step_0000004.pt")
    for k in sa["model"]:
        torch.testing.assert_close(sa["model"][k], sb["model"][k], atol=atol, rtol=1e-5, msg=k)


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.dist
def test_every_scenario_ran_on_both_ranks(runs):
    _, ranks = runs
    for rank in ranks:
        assert [r["rc"] for r in rank[:-1]] == [0] * (len(rank) - 1), [r["stderr"] for r in rank]


@pytest.mark.dist
def test_ddp_matches_one_process_with_the_same_global_batch(runs):
    root, _ = runs
    _assert_same_weights(root / "ref", root / "ddp")
    assert _losses(root / "ddp") == pytest.approx(_losses(root / "ref"), rel=1e-5)
    state = load_state(root / "ddp" / "checkpoints" / "step_0000004.pt")
    assert state["sampler"]["cursor"] == 4 * 8  # the global stream position
    assert len(state["rng_ranks"]) == 2


@pytest.mark.dist
def test_fsdp_runs_on_cpu_and_writes_full_loadable_checkpoints(runs):
    root, _ = runs
    out = root / "fsdp"
    state = load_state(out / "checkpoints" / "step_0000004.pt")
    assert state["opt_format"] == "names" and "blocks.0.attn.qkv.weight" in state["opt"]["state"]
    ref = load_state(root / "ref" / "checkpoints" / "step_0000004.pt")
    assert {k: v.shape for k, v in state["model"].items()} == {k: v.shape for k, v in ref["model"].items()}
    model = ditq.load(out / "model.safetensors")  # full (unsharded) EMA weights
    assert model.config.depth == 2
    _assert_same_weights(root / "ref", out)  # FSDP's reduce-scatter averages like DDP's all-reduce


@pytest.mark.dist
def test_resume_under_two_processes(runs):
    root, _ = runs
    _assert_same_weights(root / "ref", root / "ddp_resume")  # DDP from a DDP checkpoint
    _assert_same_weights(root / "ref", root / "fsdp_resume")  # FSDP from an FSDP checkpoint
    _assert_same_weights(root / "ref", root / "cross")  # 2 FSDP processes from a 1-process checkpoint
    steps = [json.loads(line)["step"] for line in (root / "cross" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.dist
def test_a_global_batch_that_does_not_divide_is_a_one_line_error(runs):
    root, ranks = runs
    for rank in ranks:
        last = rank[-1]
        assert last["rc"] == 2
        assert "batch_size 7 is the global batch and must divide by the 2 processes" in last["stderr"]
        assert last["stderr"].count("\n") == 1
    assert not (root / "odd").exists()


# --- single-process pieces of the distributed machinery ---------------------------------------


def test_without_torchrun_nothing_is_initialized(monkeypatch):
    from ditq.distributed import init_distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.started_here, ctx.backend) == (0, 1, False, None)
    assert not torch.distributed.is_initialized()
    ctx.close()


def test_world_size_without_the_rest_of_torchruns_environment(monkeypatch):
    from ditq.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(DitqError, match="launch with torchrun"):
        init_distributed("cpu")
