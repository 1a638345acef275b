"""CalibrationRecorder / CalibrationData: one random step per sample while sampling, files, checks."""

from __future__ import annotations

import pytest
import torch

from ditq.diffusion import ClassifierFreeGuidance, create_diffusion, sample_loop
from ditq.errors import CheckpointError, InvalidArgumentError
from ditq.models import DiT, DiTConfig
from ditq.quant import CalibrationData, CalibrationRecorder, run_calibration

TINY = DiTConfig(
    depth=1, hidden_size=32, num_heads=2, patch_size=4, input_size=8, in_channels=1, num_classes=3
)
STEPS = 5


def _model() -> DiT:
    torch.manual_seed(0)
    return DiT(TINY).eval()


def _run(recorder, n: int, cfg: bool, seed: int = 0) -> None:
    """One DDIM-5 run of ``n`` samples through the recorder (guided: a doubled batch, labels positional)."""
    diffusion = create_diffusion(f"ddim{STEPS}", learn_sigma=True)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.arange(n) % 3
    fn = recorder
    if cfg:
        z, y = torch.cat([z, z]), torch.cat([y, torch.full_like(y, 3)])
        fn = ClassifierFreeGuidance(recorder, 2.0, learn_sigma=True)
    with recorder.batch():
        sample_loop(diffusion, fn, tuple(z.shape), sampler="ddim", noise=z, model_kwargs={"y": y})


def test_one_random_step_per_sample_and_both_guided_rows():
    rec = CalibrationRecorder(_model(), steps=STEPS, seed=1)
    _run(rec, 6, cfg=True)
    _run(rec, 4, cfg=False)
    data = rec.data()
    assert rec.num_samples == 10
    assert len(data) == 2 * 6 + 4  # guided samples give their conditional and null-label rows
    assert data.input_shape == (1, 8, 8)
    y = data.kwargs["y"]
    assert int((y == 3).sum()) == 6  # one null-label row per guided sample
    ddim_ts = set(range(0, 1000, 200))
    assert set(data.t.tolist()) <= ddim_ts
    # a guided sample's two rows are recorded at the same step with the same x_t
    x, t = data.x[:12], data.t[:12]
    cond = y[:12] != 3
    for i in torch.nonzero(cond).flatten().tolist():
        j = [k for k in range(12) if not cond[k] and torch.equal(x[k], x[i])]
        assert j and t[j[0]] == t[i]


def test_steps_are_drawn_from_the_seed():
    def record(seed):
        rec = CalibrationRecorder(_model(), steps=STEPS, seed=seed)
        for s in range(3):
            _run(rec, 8, cfg=False, seed=s)
        return rec.data().t

    assert torch.equal(record(3), record(3))
    assert not torch.equal(record(3), record(4))
    assert len(set(record(3).tolist())) > 1  # not all at one step


def test_recorder_checks_the_number_of_steps_and_nesting():
    rec = CalibrationRecorder(_model(), steps=STEPS + 1)
    with pytest.raises(InvalidArgumentError, match="called the model 5 times"):
        _run(rec, 2, cfg=False)
    with pytest.raises(InvalidArgumentError, match="nested"), rec.batch(), rec.batch():
        pass
    with pytest.raises(InvalidArgumentError, match="nothing was recorded"):
        CalibrationRecorder(_model(), steps=2).data()
    with pytest.raises(InvalidArgumentError, match="steps"):
        CalibrationRecorder(_model(), steps=0)


def test_outside_a_batch_the_recorder_is_the_model():
    model = _model()
    rec = CalibrationRecorder(model, steps=3)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])
    assert torch.equal(rec(x, t, y), model(x, t, y))
    assert rec.config is model.config
    assert rec._rows == []


def test_file_round_trip_and_checks(tmp_path):
    rec = CalibrationRecorder(_model(), steps=STEPS)
    _run(rec, 4, cfg=True)
    data = rec.data(meta={"steps": STEPS})
    data.save(tmp_path / "c.safetensors")
    back = CalibrationData.load(tmp_path / "c.safetensors")
    assert torch.equal(back.x, data.x) and torch.equal(back.t, data.t)
    assert torch.equal(back.kwargs["y"], data.kwargs["y"])
    assert back.meta == {"steps": STEPS}
    data.check_input_shape((1, 8, 8))
    with pytest.raises(InvalidArgumentError, match=r"\[1, 8, 8\] per sample but the model takes \[4, 32"):
        data.check_input_shape((4, 32, 32))
    from ditq.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "other.safetensors", {"w": torch.zeros(2)}, {"model_config": {}})
    with pytest.raises(CheckpointError, match="not a ditq calibration file"):
        CalibrationData.load(tmp_path / "other.safetensors")


def test_data_checks_rows_and_batches():
    with pytest.raises(InvalidArgumentError, match="has 3 rows but x has 2"):
        CalibrationData(torch.zeros(2, 1), torch.zeros(3))
    with pytest.raises(InvalidArgumentError, match="empty"):
        CalibrationData(torch.zeros(0, 1), torch.zeros(0))
    data = CalibrationData(torch.arange(5.0).reshape(5, 1), torch.arange(5), {"y": torch.arange(5)})
    sizes = [len(x) for x, _, _ in data.batches(2)]
    assert sizes == [2, 2, 1]
    assert len(data.subset(3)) == 3
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        next(data.batches(0))


def test_run_calibration_feeds_every_row():
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, y):
            seen.append(len(x))
            return x

    data = CalibrationData(torch.zeros(5, 1), torch.zeros(5), {"y": torch.zeros(5)})
    run_calibration(Probe(), data, batch_size=2)
    assert seen == [2, 2, 1]


@pytest.mark.parametrize("training", [False, True])
def test_the_recorder_takes_the_models_mode(training):
    # A sampler that switches the recorder to eval and back must leave the wrapped model as it was.
    model = _model().train(training)
    rec = CalibrationRecorder(model, steps=3)
    assert rec.training == training
    was = rec.training
    rec.eval()
    rec.train(was)
    assert model.training == training
