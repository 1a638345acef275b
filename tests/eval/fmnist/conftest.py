"""The evaluator file built once per test module that reads it (ditq.eval.fmnist.build)."""

from __future__ import annotations

import pytest
import torch
from fmnist_helpers import FAST, TINY, textures

from ditq.eval.fmnist import build_fmnist_evaluator


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("clf") / "clf.safetensors"
    x, y = textures(320, 0)
    xt, yt = textures(150, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: set up before the autouse single-thread fixture
    try:
        result = build_fmnist_evaluator(
            x, y, xt, yt, path, config=FAST, model_config=TINY, floor_images=250, command="test"
        )
    finally:
        torch.set_num_threads(threads)
    return result, (xt, yt)
