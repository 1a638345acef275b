"""Which elements share one (scale, zero): per tensor, per channel, per group, per token.

Every granularity except :class:`PerTensor` groups elements along the **last
axis**: a weight ``W[out, in]`` is quantized per output row (``PerChannel``) or
per row and block of ``g`` consecutive input channels (``PerGroup(g)``); an
activation ``x[..., C]`` per token (``PerToken``) or per token and block of
``g`` consecutive channels (``PerTokenGroup(g)``). This is Q-DiT's layout
(``reshape(-1, g)`` row-major), so the weight and activation cases are the same
arithmetic under two names; the names say which tensor a config talks about.

As in Q-DiT, a group size of 0 means "the whole last axis": ``PerGroup(0)`` is
``PerChannel()`` and ``PerTokenGroup(0)`` is ``PerToken()``.

Parameters are shaped like the tensor with its last axis replaced by the number
of groups (``scale[out, in // g]`` for a weight, ``scale[..., C // g]`` for an
activation; all ones for ``PerTensor``), so they broadcast after a
``reshape(..., n_groups, g)`` of the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

from ditq.errors import InvalidArgumentError

MIN_BITS, MAX_BITS = 2, 8


# ----------------------------------------------------------------------------
# Granularities
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PerTensor:
    """One (scale, zero) for the whole tensor."""

    def __str__(self) -> str:
        return "tensor"


@dataclass(frozen=True)
class PerChannel:
    """Weights: one (scale, zero) per output channel (row of ``W[out, in]``)."""

    def __str__(self) -> str:
        return "channel"


@dataclass(frozen=True)
class PerGroup:
    """Weights: one (scale, zero) per output row and block of ``group_size`` consecutive input channels."""

    group_size: int

    def __post_init__(self) -> None:
        _check_group_size(self.group_size, "PerGroup")

    def __str__(self) -> str:
        return f"group{self.group_size}"


@dataclass(frozen=True)
class PerToken:
    """Activations: one (scale, zero) per token (every index of the leading axes)."""

    def __str__(self) -> str:
        return "token"


@dataclass(frozen=True)
class PerTokenGroup:
    """Activations: one (scale, zero) per token and block of ``group_size`` consecutive channels."""

    group_size: int

    def __post_init__(self) -> None:
        _check_group_size(self.group_size, "PerTokenGroup")

    def __str__(self) -> str:
        return f"token_group{self.group_size}"


Granularity = PerTensor | PerChannel | PerGroup | PerToken | PerTokenGroup
GRANULARITIES = (PerTensor, PerChannel, PerGroup, PerToken, PerTokenGroup)
WEIGHT_GRANULARITIES = (PerTensor, PerChannel, PerGroup)


def _check_group_size(g, name: str) -> None:
    if isinstance(g, bool) or not isinstance(g, int) or g < 0:
        raise InvalidArgumentError(
            f"{name} group size must be an integer >= 0 (0 = the whole channel axis), got {g!r}"
        )


def weight_granularity(group_size: int) -> PerChannel | PerGroup:
    """Q-DiT's weight group size as a granularity: 0 is per output channel."""
    return PerChannel() if group_size == 0 else PerGroup(group_size)


def act_granularity(group_size: int) -> PerToken | PerTokenGroup:
    """Q-DiT's activation group size as a granularity: 0 is per token."""
    return PerToken() if group_size == 0 else PerTokenGroup(group_size)


def parse_granularity(spec: str | Granularity) -> Granularity:
    """``"tensor"``, ``"channel"``, ``"group128"``, ``"token"``, ``"token_group32"`` (the ``str()`` forms)."""
    if isinstance(spec, GRANULARITIES):
        return spec
    if not isinstance(spec, str):
        raise InvalidArgumentError(f"a granularity is a string like 'group128' or 'token', got {spec!r}")
    simple = {"tensor": PerTensor(), "channel": PerChannel(), "token": PerToken()}
    if spec in simple:
        return simple[spec]
    for prefix, cls in (("token_group", PerTokenGroup), ("group", PerGroup)):
        if spec.startswith(prefix) and spec[len(prefix) :].isdigit():
            return cls(int(spec[len(prefix) :]))
    raise InvalidArgumentError(
        f"unknown granularity {spec!r}; use tensor, channel, group<g>, token or token_group<g>"
    )


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------


def check_bits(bits) -> int:
    """Bit widths 2..8 only (integer codes must fit int8/uint8)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise InvalidArgumentError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return bits


def valid_group_sizes(channels: int) -> list[int]:
    """The group sizes that divide ``channels`` (all usable as PerGroup/PerTokenGroup sizes)."""
    return [g for g in range(1, channels + 1) if channels % g == 0]


def group_length(granularity: Granularity, channels: int, *, layer: str | None = None) -> int | None:
    """How many consecutive last-axis elements share one (scale, zero); None for PerTensor.

    Raises a one-line :class:`InvalidArgumentError` when the group size does not
    divide ``channels``, listing the sizes that do.
    """
    if not isinstance(granularity, GRANULARITIES):
        raise InvalidArgumentError(
            f"granularity must be one of PerTensor, PerChannel, PerGroup(g), PerToken, PerTokenGroup(g), "
            f"got {granularity!r}"
        )
    if isinstance(granularity, PerTensor):
        return None
    g = getattr(granularity, "group_size", 0)
    if g == 0:
        return channels
    if channels % g:
        what = "input channels" if isinstance(granularity, PerGroup) else "channels"
        where = f" of layer {layer!r}" if layer else ""
        sizes = ", ".join(str(s) for s in valid_group_sizes(channels))
        raise InvalidArgumentError(
            f"group size {g} does not divide the {channels} {what}{where}; valid group sizes: {sizes} "
            f"(or 0 for one group per row)"
        )
    return g


def num_groups(granularity: Granularity, channels: int, *, layer: str | None = None) -> int:
    """Number of (scale, zero) pairs along the last axis (1 for PerTensor and per channel/token)."""
    g = group_length(granularity, channels, layer=layer)
    return 1 if g is None else channels // g
