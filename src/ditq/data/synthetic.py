"""An embedded class-conditional image dataset: ten procedurally drawn shapes, no download.

Each image shows one shape on a plain background. The class is the shape
(:data:`SYNTHETIC_CLASSES`); everything else is random per image, drawn from
the seed: position, size, a small rotation, foreground and background
intensity (a colour tint with 3 channels), stripe/checker phase and pixel
noise. So the classes are easy to tell apart for a classifier, yet a
generative model has a real distribution to learn, at any image size.

Shapes are rendered from signed distance functions with one-pixel
anti-aliased edges, so they look the same at 16 px and at 256 px.
The same arguments always give the same tensors (CPU float32).
"""

from __future__ import annotations

import math

import torch

from ditq.errors import InvalidArgumentError

SYNTHETIC_CLASSES = (
    "disk",
    "ring",
    "square",
    "frame",
    "plus",
    "x",
    "triangle",
    "h-stripes",
    "v-stripes",
    "checker",
)

# Images rendered at once: bounds the temporaries (a few floats per pixel) at large sizes.
_CHUNK = 256


def load_synthetic_dataset(
    num_samples: int = 10_000,
    image_size: int = 32,
    channels: int = 1,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, C, S, S) float32 in [-1, 1] and labels (N,) int64 of the synthetic shapes.

    Classes are balanced (``num_samples // 10`` each, the remainder spread over
    the first classes) and shuffled. ``channels`` is 1 (grey) or 3 (tinted).
    """
    if num_samples < 1:
        raise InvalidArgumentError(f"num_samples must be positive, got {num_samples}")
    if image_size < 4:
        raise InvalidArgumentError(f"image_size must be at least 4, got {image_size}")
    if channels not in (1, 3):
        raise InvalidArgumentError(f"channels must be 1 or 3, got {channels}")
    gen = torch.Generator().manual_seed(seed)
    n, k = num_samples, len(SYNTHETIC_CLASSES)
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=gen)]

    # Every per-image parameter is drawn up front, so an image depends only on
    # (seed, num_samples, index), not on how rendering is chunked.
    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=gen)

    params = {
        "scale": u(0.26, 0.36) * image_size,  # pixels per shape unit (shapes span about 2 units)
        "cx": image_size / 2 + u(-0.1, 0.1) * image_size,
        "cy": image_size / 2 + u(-0.1, 0.1) * image_size,
        "angle": u(-0.15, 0.15),  # radians
        "phase": u(0.0, 1.0),  # of stripes and checkers
        "fg": u(0.3, 1.0),
        "bg": u(-1.0, -0.5),
        "noise": u(0.0, 0.08),
        "tint": u(0.35, 1.0, 3),
    }
    params["tint"] = params["tint"] / params["tint"].amax(dim=1, keepdim=True)

    images = torch.empty(n, channels, image_size, image_size)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(start + _CHUNK, n))
        alpha = _render(labels[sl], {k: v[sl] for k, v in params.items()}, image_size)  # (B, S, S)
        bg = params["bg"][sl].view(-1, 1, 1, 1)
        fg = params["fg"][sl].view(-1, 1, 1, 1)
        if channels == 3:
            fg = bg + (fg - bg) * params["tint"][sl].view(-1, 3, 1, 1)  # (B, 3, 1, 1)
        img = bg + (fg - bg) * alpha.unsqueeze(1)  # (B, C, S, S)
        noise = torch.randn(img.shape, generator=gen) * params["noise"][sl].view(-1, 1, 1, 1)
        images[sl] = (img + noise).clamp_(-1.0, 1.0)
    return images, labels


def _render(labels: torch.Tensor, p: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """Coverage in [0, 1] (B, S, S) of each image's shape, anti-aliased over one pixel."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5  # pixel centres
    x = coords.view(1, 1, size) - p["cx"].view(-1, 1, 1)  # (B, 1, S)
    y = coords.view(1, size, 1) - p["cy"].view(-1, 1, 1)  # (B, S, 1)
    cos, sin = torch.cos(p["angle"]).view(-1, 1, 1), torch.sin(p["angle"]).view(-1, 1, 1)
    scale = p["scale"].view(-1, 1, 1)
    u = (cos * x + sin * y) / scale  # (B, S, S) shape units, y pointing down
    v = (-sin * x + cos * y) / scale
    phase = p["phase"].view(-1, 1, 1)
    sdf = torch.empty(len(labels), size, size)
    for c in range(len(SYNTHETIC_CLASSES)):
        m = labels == c
        if m.any():
            sdf[m] = _SDFS[c](u[m], v[m], phase[m])
    # Signed distance in pixels -> coverage: 1 inside, 0 outside, linear across the edge pixel.
    return (0.5 - sdf * scale).clamp_(0.0, 1.0)


# Signed distance functions in shape units (negative inside); u right, v down.


def _box(u, v, r):
    return torch.maximum(u.abs(), v.abs()) - r


def _stripes(w, phase, freq=2.0):
    t = torch.frac(w * freq + phase + 8.0)  # +8 keeps the argument positive for frac
    return ((t - 0.5).abs() - 0.25) / freq


def _checker(u, v, phase, freq=1.5):
    a, b = u * freq + phase + 8.0, v * freq + phase + 8.0
    edge = torch.minimum((a - a.round()).abs(), (b - b.round()).abs()) / freq
    inside = (torch.floor(a) + torch.floor(b)) % 2 == 0
    return torch.where(inside, -edge, edge)


def _plus(u, v, _):
    arm = lambda a, b: torch.maximum(a.abs() - 0.28, b.abs() - 1.0)
    return torch.minimum(arm(u, v), arm(v, u))


def _x(u, v, _):
    p, q = (u + v) / math.sqrt(2), (u - v) / math.sqrt(2)
    arm = lambda a, b: torch.maximum(a.abs() - 0.25, b.abs() - 1.1)
    return torch.minimum(arm(p, q), arm(q, p))


def _triangle(u, v, _):
    # Apex at the top (v = -0.95), base at v = 0.75; sides of slope 0.65.
    side = (u.abs() - 0.65 * (v + 0.95)) / math.sqrt(1 + 0.65**2)
    return torch.maximum(v - 0.75, side)


_SDFS = (
    lambda u, v, _: torch.hypot(u, v) - 1.0,  # disk
    lambda u, v, _: (torch.hypot(u, v) - 0.72).abs() - 0.24,  # ring
    lambda u, v, _: _box(u, v, 0.8),  # square
    lambda u, v, _: _box(u, v, 0.72).abs() - 0.2,  # frame
    _plus,
    _x,
    _triangle,
    lambda u, v, ph: torch.maximum(_box(u, v, 0.95), _stripes(v, ph)),  # h-stripes
    lambda u, v, ph: torch.maximum(_box(u, v, 0.95), _stripes(u, ph)),  # v-stripes
    lambda u, v, ph: torch.maximum(_box(u, v, 0.95), _checker(u, v, ph)),  # checker
)
