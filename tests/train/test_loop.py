import pytest
import torch

from ditq.errors import DitqError
from ditq.models import create_model
from ditq.train.checkpoint import CheckpointDir, SingleFileState, load_state
from ditq.train.loop import TrainConfig, fit, lr_at


def _data(n=32):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 4
    # class-dependent mean so there is something to learn
    images = (labels.float().view(-1, 1, 1, 1) / 2 - 0.75) + 0.1 * torch.randn(n, 1, 8, 8, generator=g)
    return images.clamp(-1, 1), labels


def _model():
    torch.manual_seed(0)
    return create_model(
        "DiT-S/4", input_size=8, in_channels=1, num_classes=4, hidden_size=32, depth=2, num_heads=2
    )


def test_loss_goes_down():
    x, y = _data()
    cfg = TrainConfig(steps=150, batch_size=16, lr=1e-3, log_every=50, ema_decay=0.9)
    rec = fit(_model(), (x, y), cfg).records
    assert rec[-1]["loss"] < 0.7 * rec[0]["loss"]


def test_resume_is_exact(tmp_path):
    x, y = _data()
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-3, ema_decay=0.5, log_every=3)
    whole = fit(_model(), (x, y), cfg)
    full, full_ema = whole.model, whole.ema
    state = SingleFileState(tmp_path / "state.pt")  # one file, overwritten: the form scripts use
    fit(_model(), (x, y), TrainConfig(**{**cfg.__dict__, "steps": 3}), store=state, resume=True)
    again = fit(_model(), (x, y), cfg, store=state, resume=True)
    resumed, resumed_ema = again.model, again.ema
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(full_ema.state_dict().values(), resumed_ema.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_lr_schedule_warmup_and_step_decay():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, decay_at=0.8, decay_factor=0.1)
    assert lr_at(0, cfg) == 0.1 and lr_at(9, cfg) == 1.0 and lr_at(79, cfg) == 1.0
    assert abs(lr_at(80, cfg) - 0.1) < 1e-12


# --- fit: data loaders, checkpoint folders, non-finite losses --------------------------------


class _Pairs(torch.utils.data.Dataset):
    """A plain map-style dataset (knows indices only, not sampler keys)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _params(module):
    return [t.clone() for t in module.state_dict().values()]


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_dataloader_path_matches_in_memory_data():
    x, y = _data(10)  # 10 items, batches of 4: batches straddle epochs
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-3, ema_decay=0.5, log_every=2)
    ref = fit(_model(), (x, y), cfg)
    for workers in (0, 1):
        other = fit(_model(), _Pairs(x, y), cfg, num_workers=workers)
        assert _same(_params(ref.model), _params(other.model))
        assert _same(_params(ref.ema), _params(other.ema))
        assert [r["loss"] for r in other.records] == [r["loss"] for r in ref.records]


def test_resume_from_a_checkpoint_folder_keeping_the_last_two(tmp_path):
    x, y = _data(12)
    cfg = TrainConfig(steps=6, batch_size=5, lr=1e-3, warmup_steps=4, ema_decay=0.5, log_every=1)
    full = fit(_model(), _Pairs(x, y), cfg)
    store = CheckpointDir(tmp_path, keep_last=2)

    def stop_at_4(rec):  # a kill after the state of step 4 was written
        if rec["step"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_model(), _Pairs(x, y), cfg, store=store, save_every=2, on_log=stop_at_4)
    assert [s for s, _ in store.list()] == [2, 4]
    resumed = fit(_model(), _Pairs(x, y), cfg, store=store, save_every=2, resume=True)
    assert resumed.start_step == 4 and resumed.resumed_from == tmp_path / "step_0000004.pt"
    assert [r["step"] for r in resumed.records] == [5, 6]
    assert _same(_params(full.model), _params(resumed.model))
    assert _same(_params(full.ema), _params(resumed.ema))
    assert [s for s, _ in store.list()] == [4, 6]


class _BlowsUp(torch.nn.Module):
    """A model whose output turns to NaN from its ``after``-th call on."""

    def __init__(self, model, after):
        super().__init__()
        self.inner, self.after, self.calls = model, after, 0

    def forward(self, x, t, y):
        self.calls += 1
        out = self.inner(x, t, y)
        return out * float("nan") if self.calls > self.after else out


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    x, y = _data(8)
    cfg = TrainConfig(steps=10, batch_size=4, lr=1e-3, log_every=100)
    store = CheckpointDir(tmp_path, keep_last=3)
    log = tmp_path / "log.jsonl"
    with pytest.raises(DitqError, match="loss became nan at step 6") as e:
        fit(_BlowsUp(_model(), after=5), (x, y), cfg, store=store, save_every=2, log_path=log)
    message = str(e.value)
    assert "\n" not in message and "step_0000004.pt" in message
    assert [s for s, _ in store.list()] == [2, 4]
    state = load_state(store.latest())
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert log.read_text() == ""  # no NaN record was logged


def test_half_precision_needs_cuda():
    x, y = _data(4)
    with pytest.raises(DitqError, match="needs a CUDA device"):
        fit(_model(), (x, y), TrainConfig(steps=1, batch_size=2, precision="bf16"))


def test_step_noise_is_a_slice_of_the_global_draw():
    from ditq.train.loop import _StepNoise

    gen = _StepNoise(seed=3, device=torch.device("cpu"))
    whole = gen.draw(5, 6, (1, 2, 2), 1000, 0, 6)
    halves = [gen.draw(5, 6, (1, 2, 2), 1000, lo, lo + 3) for lo in (0, 3)]
    for i in range(3):
        assert torch.equal(whole[i], torch.cat([h[i] for h in halves]))
    assert not torch.equal(whole[1], gen.draw(6, 6, (1, 2, 2), 1000, 0, 6)[1])  # a new draw per step
