"""TernaryQATConfig: the ternary QAT method as a ``quantize_`` config (prepare -> train -> convert)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from ditq.errors import InvalidArgumentError
from ditq.quant.config import JSONConfig, patterns
from ditq.quant.presets import get_preset
from ditq.quant.ternary.layers import ACT_BITS, ALPHA_INITS, SCALES, check_choice

STEPS = ("prepare", "convert")
"""``TernaryQATConfig.step``: swap float linears for QAT layers, or QAT layers for packed ones."""


@dataclass
class TernaryQATConfig(JSONConfig):
    """Ternary QAT: ``step="prepare"`` swaps float linears for :class:`TernaryQATLinear`,
    ``step="convert"`` swaps those for packed :class:`TernaryLinear`.

    ``scale``: ``"alpha"`` (TerDiT, learnable per-layer α) or ``"gamma"``
    (BitNet b1.58, α = mean|W|). ``alpha_init``: ``"lsq"`` (least squares,
    default), ``"gamma"`` or ``"normal"`` (the original's). ``act_bits``:
    None (weights only, TerDiT) or 8 (W1.58A8, per-token int8 inputs).
    Layer selection as in :class:`~ditq.quant.QDiTConfig`: ``include`` patterns,
    else the preset's (``"auto"`` recognizes DiT/Large-DiT/diffusers naming;
    None = every ``nn.Linear``); ``quantize_adaln`` (default True, as TerDiT)
    adds each block's adaLN linear; minus ``exclude``. At ``convert``, every
    :class:`TernaryQATLinear` (matching ``include`` when given, minus
    ``exclude``) is converted with its own scale mode and ``act_bits``.
    """

    step: str = "prepare"
    scale: str = "alpha"
    alpha_init: str = "lsq"
    act_bits: int | None = None
    quantize_adaln: bool = True
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    preset: str | None = "auto"

    method = "ternary"  # marks the JSON form; not a field

    def __post_init__(self) -> None:
        check_choice("step", self.step, STEPS)
        check_choice("scale", self.scale, SCALES)
        check_choice("alpha_init", self.alpha_init, ALPHA_INITS)
        check_choice("act_bits", self.act_bits, ACT_BITS)
        if not isinstance(self.quantize_adaln, bool):
            raise InvalidArgumentError(
                f"TernaryQATConfig.quantize_adaln must be true or false, got {self.quantize_adaln!r}"
            )
        self.include = patterns(self.include, "include", "TernaryQATConfig")
        self.exclude = patterns(self.exclude, "exclude", "TernaryQATConfig") or []
        if self.preset is not None and not isinstance(self.preset, str):
            raise InvalidArgumentError(
                f"TernaryQATConfig.preset must be 'auto', a preset name or None, got {self.preset!r}"
            )
        if self.preset not in (None, "auto"):
            get_preset(self.preset)  # validates the name

    def to_dict(self) -> dict:
        """Plain JSON-able values (with ``"method": "ternary"``); ``from_dict(to_dict())`` is equal."""
        return {"method": self.method, **asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping) -> TernaryQATConfig:
        if not isinstance(d, Mapping):
            raise InvalidArgumentError(f"a TernaryQATConfig is read from a dict, got {type(d).__name__}")
        d = dict(d)
        method = d.pop("method", cls.method)
        if method != cls.method:
            raise InvalidArgumentError(f"not a ternary config: method is {method!r}, expected 'ternary'")
        return cls._from_fields(d)
