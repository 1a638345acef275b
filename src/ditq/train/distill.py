"""Data-free distillation: a student (ternary, usually) learns a full-precision teacher's outputs, no dataset.

    data: {kind: distill, teacher: ditq-fmnist, pool_size: 1024, pool_steps: 25, pool_refresh: 500}

**Inputs.** The teacher makes the data. It samples a *pool* of ``pool_size``
images x_0 (DDIM with ``pool_steps`` steps, η = 0, guidance
``pool_cfg_scale``, labels uniform over the classes), and every
``pool_refresh`` steps a new one. Each training step then treats the pool as
the dataset: the loop picks a batch, draws t uniformly in [0, 1000) and fresh
noise, and forms ``x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε`` exactly as it would on real
images; labels are the pool's, dropped to the null label with the student's
``class_dropout_prob`` by the loop's label dropout, so the student also learns
the unconditional outputs classifier-free guidance needs.

Why a forward-noised pool rather than running the teacher's reverse process
to a random t for every training input (on-trajectory x_t):

* cost -- one trajectory per training input costs ``pool_steps / 2`` teacher
  forwards on average, several times the student's own step; a pool spends one
  DDIM run per sample and reuses it ``pool_refresh · batch / pool_size`` times;
* coverage -- a DDIM-25 trajectory visits 25 timesteps; forward noising gives
  every t of the 1000, weighted as in training (uniform);
* the same distribution -- when the teacher's samples follow its model
  distribution, q(x_t | x_0) applied to them gives the marginals its
  reverse process has at t (DDIM with η = 0 follows the probability-flow ODE,
  which keeps the marginals), so the inputs are on the teacher's manifold
  without paying for the trajectory.

``pool_cfg_scale`` 1 (default) samples the teacher's plain p(x | y), the
distribution real data would have; > 1 sharpens classes at the cost of
diversity. Guidance, when used, covers every ε channel.

**Loss.** The mean squared difference between student and teacher outputs
over *all* output channels: the ε channels and, for learned-sigma models, the
variance channels (the interpolation value v in [-1, 1] between β_t and β̃_t,
of the same order as ε), equally weighted. Matching ε alone would leave the
student's variance head untrained (DDPM sampling reads it); the hybrid loss's
VB term is not needed, as the teacher's v already is its optimum. The teacher
runs frozen, in eval mode, without gradients.

**Reproducibility.** Pool ``k`` (the one for steps ``k·pool_refresh ..``) is
made in chunks of :data:`POOL_CHUNK` samples, chunk ``c`` from a generator
seeded by ``(seed, k, c)``; so a resumed run rebuilds the pool it stopped in,
bit for bit, and with several processes each makes its share of the chunks
(every ``world_size``-th) and they exchange them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ditq import distributed as dist
from ditq.diffusion import ClassifierFreeGuidance, create_diffusion, sample_loop
from ditq.errors import CheckpointError, InvalidArgumentError

POOL_CHUNK = 64
"""Teacher samples made per forward batch (fixed, so pools do not depend on the number of processes)."""


def load_teacher(name_or_path: str, *, device: str | torch.device = "cpu") -> nn.Module:
    """The teacher: anything :func:`ditq.load` takes, frozen, in eval mode."""
    from ditq.formats import load

    try:
        teacher = load(name_or_path, device=device)
    except CheckpointError as e:
        raise CheckpointError(f"data.teacher: {e}") from None
    if getattr(teacher, "config", None) is None:
        raise InvalidArgumentError(f"data.teacher {name_or_path} is not a ditq model (no config)")
    return teacher.requires_grad_(False).eval()


def check_teacher(teacher_config, student_config, name: str = "the teacher") -> None:
    """One-line error unless the student takes the teacher's inputs and predicts the same outputs."""
    for field in ("in_channels", "input_size", "num_classes"):
        have, want = getattr(student_config, field), getattr(teacher_config, field)
        if have != want:
            raise InvalidArgumentError(
                f"the student's {field} is {have} but teacher {name} has {want}; a distilled model takes the "
                f"teacher's inputs: drop {field} from the model config (it follows the teacher)"
            )
    if student_config.out_channels != teacher_config.out_channels:
        raise InvalidArgumentError(
            f"teacher {name} predicts {teacher_config.out_channels} channels and the student "
            f"{student_config.out_channels}; set the model's learn_sigma to the teacher's "
            f"({teacher_config.learn_sigma})"
        )
    if student_config.class_dropout_prob > 0 and not teacher_config.class_dropout_prob > 0:
        raise InvalidArgumentError(
            f"teacher {name} has no null label (class_dropout_prob 0), so it cannot teach guidance; set the "
            "model's class_dropout_prob to 0"
        )


class TeacherPool:
    """The data of a distillation run (a :class:`~ditq.train.loop.StepData`) and its loss (:meth:`loss`).

    ``batch(step, keys)`` returns pool images and labels for the sampler's
    keys, making pool ``step // refresh`` first when it is not the one held.
    Pass the pool as data and ``loss_fn=pool.loss`` to :func:`ditq.train.loop.fit`.
    """

    def __init__(
        self,
        teacher: nn.Module,
        *,
        size: int,
        steps: int,
        refresh: int,
        cfg_scale: float = 1.0,
        seed: int = 0,
        device: str | torch.device = "cpu",
        autocast_dtype: torch.dtype | None = None,
        log: Callable[[str], None] | None = None,
    ):
        if size < 1 or steps < 1 or refresh < 0 or not cfg_scale >= 1.0:
            raise InvalidArgumentError(
                f"pool size and steps must be >= 1, refresh >= 0 and cfg_scale >= 1, got {size}, {steps}, "
                f"{refresh}, {cfg_scale}"
            )
        self.device = torch.device(device)
        self.teacher = teacher.to(self.device).requires_grad_(False).eval()
        self.size, self.steps, self.refresh, self.cfg_scale = size, steps, refresh, cfg_scale
        self.seed, self.autocast_dtype, self.log = seed, autocast_dtype, log
        c = teacher.config
        self.shape = (c.in_channels, c.input_size, c.input_size)
        self.num_classes = c.num_classes
        self.learn_sigma = c.learn_sigma
        # Pixel-space models (1 or 3 channels) clip x_0 predictions to [-1, 1] as ditq sample does.
        self.clip = c.in_channels in (1, 3)
        self.index: int | None = None
        self.images: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.size

    def pool_index(self, step: int) -> int:
        return step // self.refresh if self.refresh else 0

    def batch(self, step: int, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.pool_index(step)
        if k != self.index:
            self.make(k)
        idx = (keys % self.size).to(self.device)
        return self.images[idx], self.labels[idx]

    # -- the pool ----------------------------------------------------------------

    def make(self, k: int) -> None:
        """Make pool ``k`` (each process its share of the chunks, then all of them everywhere)."""
        started = time.perf_counter()
        chunks = math.ceil(self.size / POOL_CHUNK)
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = {c: self._chunk(k, c) for c in range(rank, chunks, world)}
        if world > 1:
            made = {}
            for part in dist.all_gather_objects({c: (x.cpu(), y.cpu()) for c, (x, y) in mine.items()}):
                made.update(part)
        else:
            made = mine
        self.images = torch.cat([made[c][0] for c in range(chunks)]).to(self.device)
        self.labels = torch.cat([made[c][1] for c in range(chunks)]).to(self.device)
        self.index = k
        if self.log is not None and dist.is_main_process():
            guidance = f", cfg {self.cfg_scale:g}" if self.cfg_scale > 1 else ""
            self.log(
                f"distill: teacher pool {k}: {self.size} samples (DDIM-{self.steps}{guidance}) in "
                f"{time.perf_counter() - started:.1f} s"
            )

    @torch.no_grad()
    def _chunk(self, k: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = min(POOL_CHUNK, self.size - c * POOL_CHUNK)
        gen = torch.Generator(device=self.device).manual_seed(_chunk_seed(self.seed, k, c))
        y = torch.randint(0, self.num_classes, (n,), generator=gen, device=self.device)
        z = torch.randn((n, *self.shape), generator=gen, device=self.device)
        model = self.teacher
        if self.cfg_scale > 1:
            z = torch.cat([z, z])
            y_in = torch.cat([y, torch.full_like(y, self.num_classes)])
            model = ClassifierFreeGuidance(model, self.cfg_scale, None, learn_sigma=self.learn_sigma)
        else:
            y_in = y
        diffusion = create_diffusion(f"ddim{self.steps}", learn_sigma=self.learn_sigma)
        dtype = self.autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            x = sample_loop(
                diffusion, model, tuple(z.shape), sampler="ddim", noise=z, clip_denoised=self.clip,
                model_kwargs={"y": y_in}, device=self.device, generator=gen,
            )  # fmt: skip
        return x[:n].float(), y

    # -- the objective -----------------------------------------------------------

    def loss(self, forward, diffusion, x0, t, y, noise) -> torch.Tensor:
        """MSE between the student's and the teacher's outputs (every channel) at ``x_t ~ q(x_t | x0)``."""
        x_t = diffusion.q_sample(x0, t, noise=noise)
        with torch.no_grad():
            target = self.teacher(x_t, t, y)
        out = forward(x_t, t, y=y)
        return F.mse_loss(out.float(), target.float())


def _chunk_seed(seed: int, k: int, c: int) -> int:
    # Unrelated 63-bit seeds per (seed, pool, chunk); the tag keeps them apart from the loop's.
    return int(np.random.SeedSequence([seed, k, c, 0x64697374]).generate_state(2, np.uint64)[0]) >> 1


__all__ = ["POOL_CHUNK", "TeacherPool", "check_teacher", "load_teacher"]
