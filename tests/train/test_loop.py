import torch

from ditq.models import create_model
from ditq.train.ema import make_ema, update_ema
from ditq.train.loop import TrainConfig, lr_at, train


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
    _, _, rec = train(_model(), x, y, cfg)
    assert rec[-1]["loss"] < 0.7 * rec[0]["loss"]


def test_resume_is_exact(tmp_path):
    x, y = _data()
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-3, ema_decay=0.5, log_every=3)
    full, full_ema, _ = train(_model(), x, y, cfg)
    state = tmp_path / "state.pt"
    train(_model(), x, y, TrainConfig(**{**cfg.__dict__, "steps": 3}), state_path=state)
    resumed, resumed_ema, _ = train(_model(), x, y, cfg, state_path=state)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(full_ema.state_dict().values(), resumed_ema.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_lr_schedule_warmup_and_step_decay():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, decay_at=0.8, decay_factor=0.1)
    assert lr_at(0, cfg) == 0.1 and lr_at(9, cfg) == 1.0 and lr_at(79, cfg) == 1.0
    assert abs(lr_at(80, cfg) - 0.1) < 1e-12


def test_ema_update():
    m = torch.nn.Linear(3, 3)
    e = make_ema(m)
    with torch.no_grad():
        m.weight.add_(1.0)
    before = e.weight.clone()
    update_ema(e, m, 0.9)
    torch.testing.assert_close(e.weight, 0.9 * before + 0.1 * m.weight)
    assert not e.weight.requires_grad
