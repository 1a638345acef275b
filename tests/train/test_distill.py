"""Data-free distillation's teacher pool (ditq.train.distill): pools drawn per refresh, reproducible,
and the loss against the teacher's outputs. Distillation through ``ditq train``: see
tests/pipelines/test_pipeline_qat.py."""

from __future__ import annotations

import torch

import ditq
from ditq.train.distill import TeacherPool


def test_teacher_pool_and_loss(teacher_path):
    teacher = ditq.load(teacher_path)
    pool = TeacherPool(teacher, size=5, steps=2, refresh=4, seed=0)
    x, y = pool.batch(0, torch.tensor([0, 1, 7]))
    assert x.shape == (3, 1, 8, 8) and torch.equal(x[0], pool.images[0]) and torch.equal(x[2], pool.images[2])
    assert y.min() >= 0 and y.max() < 4 and x.abs().max() <= 1  # pixel space: clipped like ditq sample
    first = pool.images.clone()
    pool.batch(3, torch.tensor([0]))
    assert torch.equal(pool.images, first)  # same pool until step 4
    pool.batch(4, torch.tensor([0]))
    assert pool.index == 1 and not torch.equal(pool.images, first)
    pool.batch(0, torch.tensor([0]))
    assert torch.equal(pool.images, first)  # pool 0 again, bit for bit

    from ditq.diffusion import create_diffusion

    diffusion = create_diffusion("")
    t, noise = torch.tensor([10, 500, 990]), torch.randn(3, 1, 8, 8)
    assert pool.loss(teacher, diffusion, x, t, y, noise) == 0  # the teacher matches itself
    y_null = torch.full_like(y, 4)  # the null label reaches the teacher, for guidance
    student = lambda x_t, t, y: torch.zeros(3, 2, 8, 8)  # noqa: E731
    x_t = diffusion.q_sample(x, t, noise)
    with torch.no_grad():
        want = teacher(x_t, t, y_null).pow(2).mean()  # every channel: eps and variance
    torch.testing.assert_close(pool.loss(student, diffusion, x, t, y_null, noise), want)
