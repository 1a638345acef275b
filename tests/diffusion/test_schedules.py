"""Noise schedules (ditq.diffusion.schedules): linear and cosine betas; unknown names are clear errors."""

import math

import numpy as np
import pytest

from ditq.diffusion import get_named_beta_schedule
from ditq.errors import InvalidArgumentError


def test_linear_schedule_endpoints_and_scaling():
    b = get_named_beta_schedule("linear", 1000)
    assert b.dtype == np.float64 and b[0] == 1e-4 and math.isclose(b[-1], 0.02)
    b100 = get_named_beta_schedule("linear", 100)
    assert math.isclose(b100[0], 1e-3) and math.isclose(b100[-1], 0.2)


def test_cosine_schedule():
    b = get_named_beta_schedule("cosine", 1000)
    assert b.shape == (1000,) and b.max() <= 0.999 and np.all(np.diff(b) >= 0)
    ac = np.cumprod(1 - b)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    assert math.isclose(ac[499], f(0.5) / f(0.0), rel_tol=1e-9)


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(InvalidArgumentError, match="unknown noise schedule 'quad'"):
        get_named_beta_schedule("quad", 1000)
