"""The exponential moving average of the weights (ditq.train.ema)."""

import torch

from ditq.train.ema import make_ema, update_ema


def test_ema_update():
    m = torch.nn.Linear(3, 3)
    e = make_ema(m)
    with torch.no_grad():
        m.weight.add_(1.0)
    before = e.weight.clone()
    update_ema(e, m, 0.9)
    torch.testing.assert_close(e.weight, 0.9 * before + 0.1 * m.weight)
    assert not e.weight.requires_grad
