"""Q-DiT quantization settings as a dataclass that round-trips to JSON.

:class:`QDiTConfig` is what :func:`ditq.quant.quantize_` takes and what a
quantized checkpoint stores beside its tensors. Global settings apply to every
selected layer; ``layers`` overrides bits or group sizes of single layers (the
granularity search writes its result there)::

    QDiTConfig(w_bits=4, a_bits=8, w_group=128,
               layers={"blocks.0.attn.qkv": {"w_group": 64, "a_group": 32}})

Group sizes follow Q-DiT: weights are grouped along input channels
(``w_group`` consecutive inputs per (scale, zero) of each output row; 0 = one
group per row, i.e. per output channel). Activations:

* dynamic (``dynamic=True``, Q-DiT): parameters computed on every call, per
  token (``a_group=0``), per token and block of ``a_group`` channels
  (``a_group>0``), or over the whole input (``a_group=-1``; one range for the
  whole batch, so samples then affect each other);
* static (``dynamic=False``, the baseline Q-DiT beats): ranges recorded during
  calibration and then frozen, shared by every token: one range for the whole
  tensor (``a_group`` 0 or -1), or one per block of ``a_group`` channels
  (``a_group=1`` is per channel).

``a_bits=None`` (or 16) keeps activations in floating point (weight-only).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

from ditq.errors import InvalidArgumentError
from ditq.quant.granularity import MAX_BITS, MIN_BITS
from ditq.quant.primitives import as_clip

PER_TENSOR = -1
"""``a_group`` value for one activation range per tensor."""

OVERRIDE_KEYS = ("w_bits", "a_bits", "w_group", "a_group")
"""What ``QDiTConfig.layers`` may change per layer."""


# ----------------------------------------------------------------------------
# Field checks (each raises a one-line InvalidArgumentError naming the field)
# ----------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_w_bits(v, where: str) -> int:
    """The weight bit width, checked; ``where`` prefixes the one-line error."""
    if not _is_int(v) or not MIN_BITS <= v <= MAX_BITS:
        raise InvalidArgumentError(
            f"{where}w_bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {v!r}"
        )
    return v


def check_a_bits(v, where: str) -> int | None:
    """The activation bit width (None: float activations), checked; ``where`` prefixes the one-line error."""
    if v is None or (_is_int(v) and v == 16):
        return None  # 16 = "keep the float activations": weight-only
    if not _is_int(v) or not MIN_BITS <= v <= MAX_BITS:
        raise InvalidArgumentError(
            f"{where}a_bits must be an integer from {MIN_BITS} to {MAX_BITS}, or None/16 for float "
            f"activations (weight-only), got {v!r}"
        )
    return v


def check_w_group(v, where: str) -> int:
    """The weight group size (0: per channel), checked; ``where`` prefixes the one-line error."""
    if not _is_int(v) or v < 0:
        raise InvalidArgumentError(
            f"{where}w_group must be an integer >= 0 (0 = per output channel), got {v!r}"
        )
    return v


def check_a_group(v, where: str) -> int:
    """The activation group size (0: per token), checked; ``where`` prefixes the one-line error."""
    if not _is_int(v) or v < PER_TENSOR:
        raise InvalidArgumentError(
            f"{where}a_group must be an integer >= -1 (0 = per token, -1 = per tensor), got {v!r}"
        )
    return v


def _bool(v, name: str) -> bool:
    if not isinstance(v, bool):
        raise InvalidArgumentError(f"QDiTConfig.{name} must be true or false, got {v!r}")
    return v


def patterns(v, name: str, owner: str = "QDiTConfig") -> list[str] | None:
    """A list of layer-name patterns (one string counts as a list of one), each checked; None stays None.

    ``owner.name`` is what the one-line error calls the value (``QDiTConfig.include``)."""
    if v is None:
        return None
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)) or not all(isinstance(p, str) and p for p in v):
        raise InvalidArgumentError(
            f"{owner}.{name} must be a list of name patterns (fnmatch, or 're:' + a regex), got {v!r}"
        )
    return [check_pattern(p) for p in v]


def check_pattern(pattern: str) -> str:
    """A module-name pattern: fnmatch syntax (``blocks.*.attn.qkv``), or ``re:`` + a regex (full match)."""
    if not isinstance(pattern, str) or not pattern:
        raise InvalidArgumentError(f"a layer-name pattern must be a non-empty string, got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise InvalidArgumentError(f"bad regex in layer pattern {pattern!r}: {e}") from None
    return pattern


# ----------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------


class JSONConfig:
    """JSON round trip for config dataclasses: unknown fields and bad JSON are one-line errors."""

    @classmethod
    def _from_fields(cls, d: dict):
        names = {f.name for f in fields(cls)}
        unknown = sorted(map(str, set(d) - names))
        if unknown:
            raise InvalidArgumentError(
                f"unknown {cls.__name__} field(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        return cls(**d)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str):
        try:
            d = json.loads(text)
        except (TypeError, json.JSONDecodeError) as e:
            raise InvalidArgumentError(f"{cls.__name__} JSON does not parse: {e}") from None
        return cls.from_dict(d)


@dataclass(frozen=True)
class LayerQuant:
    """The resolved settings of one layer: global ones with that layer's overrides applied."""

    w_bits: int = 4
    w_group: int = 128
    w_sym: bool = False
    w_clip: str | float = "max"
    a_bits: int | None = 8
    a_group: int = 0
    a_sym: bool = False
    dynamic: bool = True


@dataclass
class QDiTConfig(JSONConfig):
    """Q-DiT post-training quantization: bits, group sizes, clipping, activation mode, layer selection.

    ``include``/``exclude``: layer-name patterns (fnmatch, or ``re:`` + regex,
    full match on names from ``named_modules``); ``include=None`` takes the
    preset's layers (``preset="auto"`` picks one from the module names; a
    preset name forces it; ``None`` means every ``nn.Linear``).
    ``quantize_adaln`` adds the preset's adaLN linears. ``layers`` maps exact
    layer names to overrides of ``w_bits``, ``a_bits``, ``w_group``, ``a_group``.
    """

    w_bits: int = 4
    a_bits: int | None = 8
    w_group: int = 128
    a_group: int = 0
    w_sym: bool = False
    a_sym: bool = False
    w_clip: str | float = "max"
    dynamic: bool = True
    quantize_adaln: bool = False
    layers: dict[str, dict] = field(default_factory=dict)
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    preset: str | None = "auto"

    def __post_init__(self) -> None:
        self.w_bits = check_w_bits(self.w_bits, "QDiTConfig.")
        self.a_bits = check_a_bits(self.a_bits, "QDiTConfig.")
        self.w_group = check_w_group(self.w_group, "QDiTConfig.")
        self.a_group = check_a_group(self.a_group, "QDiTConfig.")
        for name in ("w_sym", "a_sym", "dynamic", "quantize_adaln"):
            _bool(getattr(self, name), name)
        if isinstance(self.w_clip, bool) or not isinstance(self.w_clip, (str, int, float)):
            raise InvalidArgumentError(
                f"QDiTConfig.w_clip must be 'max', 'mse', 'percentile' or a ratio in (0, 1], "
                f"got {self.w_clip!r}"
            )
        as_clip(self.w_clip)  # validates
        self.include = patterns(self.include, "include")
        self.exclude = patterns(self.exclude, "exclude") or []
        if self.preset is not None and not isinstance(self.preset, str):
            raise InvalidArgumentError(
                f"QDiTConfig.preset must be 'auto', a preset name or None, got {self.preset!r}"
            )
        if not isinstance(self.layers, dict):
            raise InvalidArgumentError(
                f"QDiTConfig.layers must map layer names to overrides, got {type(self.layers).__name__}"
            )
        self.layers = {name: self._check_override(name, ov) for name, ov in self.layers.items()}

    @staticmethod
    def _check_override(name, ov) -> dict:
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"QDiTConfig.layers keys must be layer names, got {name!r}")
        if not isinstance(ov, dict):
            raise InvalidArgumentError(
                f"QDiTConfig.layers[{name!r}] must be a dict of overrides ({', '.join(OVERRIDE_KEYS)}), "
                f"got {ov!r}"
            )
        unknown = sorted(set(ov) - set(OVERRIDE_KEYS))
        if unknown:
            raise InvalidArgumentError(
                f"QDiTConfig.layers[{name!r}] has unknown key(s) {', '.join(map(str, unknown))}; "
                f"per-layer overrides are {', '.join(OVERRIDE_KEYS)}"
            )
        where = f"QDiTConfig.layers[{name!r}]."
        checks = {
            "w_bits": check_w_bits,
            "a_bits": check_a_bits,
            "w_group": check_w_group,
            "a_group": check_a_group,
        }
        return {k: checks[k](v, where) for k, v in ov.items()}

    # -- per layer ---------------------------------------------------------------------------------

    def for_layer(self, name: str | None = None) -> LayerQuant:
        """The settings of layer ``name``: the global ones with its ``layers`` overrides applied."""
        ov = self.layers.get(name, {}) if name is not None else {}
        return LayerQuant(
            w_bits=ov.get("w_bits", self.w_bits),
            w_group=ov.get("w_group", self.w_group),
            w_sym=self.w_sym,
            w_clip=self.w_clip,
            a_bits=ov.get("a_bits", self.a_bits),
            a_group=ov.get("a_group", self.a_group),
            a_sym=self.a_sym,
            dynamic=self.dynamic,
        )

    @property
    def weight_only(self) -> bool:
        """True when no layer quantizes activations."""
        return self.a_bits is None and all(ov.get("a_bits") is None for ov in self.layers.values())

    # -- serialization -----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Plain JSON-able values; ``from_dict(to_dict())`` gives an equal config."""
        d = asdict(self)
        d["layers"] = {k: dict(v) for k, v in self.layers.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QDiTConfig:
        if not isinstance(d, dict):
            raise InvalidArgumentError(f"a QDiTConfig is read from a dict, got {type(d).__name__}")
        return cls._from_fields(d)


def as_qdit_config(config) -> QDiTConfig:
    """``config`` as a :class:`QDiTConfig`: None is the default, a dict is parsed; else a one-line error."""
    if config is None:
        return QDiTConfig()
    if isinstance(config, Mapping):
        return QDiTConfig.from_dict(dict(config))
    if not isinstance(config, QDiTConfig):
        raise InvalidArgumentError(f"config must be a QDiTConfig (or its dict), got {type(config).__name__}")
    return config
