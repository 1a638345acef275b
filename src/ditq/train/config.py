"""A training run as data: :class:`TrainRun`, read from and written to YAML or JSON.

A recipe file (``configs/*.yaml``) looks like::

    seed: 0
    out: out/fmnist_tiny
    model:
      name: DiT-S/4                 # a registry name, with fields overridden ...
      overrides: {depth: 6, hidden_size: 128, num_heads: 4}
      # config: {...}               # ... or a full DiT config instead
    data:
      kind: idx                     # synthetic | idx | folder | latents
      path: /usr/share/datasets/fashion-mnist
      image_size: 32
    optim:                          # the fields of ditq.train.loop.TrainConfig (but seed)
      steps: 8000
      batch_size: 128               # the global batch (split over torchrun's processes)
      lr: 1.0e-3
    checkpoint:
      every: 500                    # steps between training states (0: only at the end)
      keep_last: 3                  # how many to keep (0: all)
      export: auto                  # model.safetensors: auto (EMA; raw for ternary QAT) | ema | model
    distributed:                    # used only under torchrun (WORLD_SIZE > 1)
      strategy: ddp                 # ddp | fsdp (FSDP2: blocks and root sharded)
      backend: auto                 # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    init:                           # optional: fine-tune from full-precision weights
      from: ditq-fmnist             # anything ditq.load takes (name, file)
      adaln_gain: rms               # new adaLN RMSNorm gains: rms (the float outputs' scale) | one
    quant:                          # optional: quantization-aware training (TerDiT)
      method: ternary               # the one QAT method (Q-DiT is post-training: ditq ptq)
      scale: alpha                  # alpha (TerDiT, learnable) | gamma (BitNet b1.58, mean|W|)
      alpha_init: lsq               # lsq | gamma | normal (see ditq.quant.ternary)
      act_bits: null                # null (weights only, TerDiT) | 8 (W1.58A8)
      adaln_norm: true              # TerDiT's RMSNorm after each block's adaLN linear

Data-free distillation replaces the dataset by a full-precision teacher
(``data: {kind: distill, teacher: ditq-fmnist, pool_size: 1024, pool_steps: 25,
pool_refresh: 500, pool_cfg_scale: 1.0}``, see :mod:`ditq.train.distill`); the
model's ``input_size``, ``in_channels`` and ``num_classes`` then follow the
teacher.

Every section and field is optional (the dataclass defaults fill in), but an
unknown key or a value of the wrong type is a one-line :class:`DitqError`
naming it, never a silently ignored typo. The model's ``input_size``,
``in_channels`` and ``num_classes`` follow the data unless set; for
``kind: latents`` (a folder written by ``ditq extract-latents``) they are the
latents' side and channels, and ``image_size`` and ``channels`` are not used.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from ditq.distributed import BACKENDS, STRATEGIES
from ditq.errors import InvalidArgumentError
from ditq.train.loop import TrainConfig

DATA_KINDS = ("synthetic", "idx", "folder", "latents", "distill")
QUANT_METHODS = ("ternary",)
ADALN_GAINS = ("rms", "one")


class ConfigError(InvalidArgumentError):
    """A training config that cannot be read or holds a bad key or value."""


@dataclass
class ModelSpec:
    """Which model to train: a registry name with field overrides, or a full model config."""

    name: str | None = "DiT-S/4"
    overrides: dict = field(default_factory=dict)
    config: dict | None = None  # a full DiTConfig dict; then name must be null and overrides empty


@dataclass
class DataSpec:
    """Where the images come from."""

    kind: str = "synthetic"  # synthetic | idx | folder | latents
    path: str | None = None  # the idx, image or latents folder (not used by synthetic)
    image_size: int = 32  # not used by latents (their manifest says)
    channels: int | None = None  # default: 1 for synthetic and idx, 3 for folder; not used by latents
    num_samples: int = 10_000  # synthetic only
    split: str = "train"  # idx only: train | test
    random_flip: bool = True  # folder, and latents extracted with --flip
    num_workers: int = 0  # folder and latents: DataLoader worker processes
    # distill only (data-free: the teacher's own samples are the data, see ditq.train.distill)
    teacher: str | None = None  # a full-precision model: registry/embedded name or checkpoint
    pool_size: int = 1024  # teacher samples kept at a time
    pool_steps: int = 25  # DDIM steps per teacher sample
    pool_refresh: int = 500  # training steps between new pools (0: one pool for the whole run)
    pool_cfg_scale: float = 1.0  # guidance while the teacher samples (1: none, its plain p(x|y))

    @property
    def num_channels(self) -> int:
        if self.channels is not None:
            return self.channels
        return 3 if self.kind == "folder" else 1


EXPORT_WEIGHTS = ("auto", "ema", "model")


@dataclass
class CheckpointSpec:
    """How often training states are written, how many kept, which weights ``model.safetensors`` holds.

    ``export``: ``"ema"`` (the EMA), ``"model"`` (the raw, online weights) or ``"auto"``: the EMA for
    full-precision runs, the raw weights for ternary QAT. The EMA of *latent* weights is not an average
    of ternary models: ternarizing it flips the weights that hover near a threshold, and on the
    embedded benchmark that cost more than averaging gains in 7 of 8 ternary runs (5,000 x 128:
    FID-FMNIST 25.8 from the EMA, 10.3 from the raw weights; docs/results/ternary_ablation.json).
    """

    every: int = 1000  # steps; 0 = only at the end
    keep_last: int = 3  # 0 = keep all
    export: str = "auto"  # auto | ema | model: the weights model.safetensors holds

    def weights_to_export(self, quantized: bool) -> str:
        """``"ema"`` or ``"model"``: what ``export`` means for a run that is (or is not) ternary QAT."""
        if self.export == "auto":
            return "model" if quantized else "ema"
        return self.export


@dataclass
class DistributedSpec:
    """How a ``torchrun`` launch spreads the model (a single process ignores it)."""

    strategy: str = "ddp"  # ddp | fsdp (FSDP2)
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    timeout_s: int = 1800  # how long a process waits for the others at a collective


@dataclass
class InitSpec:
    """Full-precision weights to start from (fine-tuning), loaded before ``quant`` prepares the model.

    ``from`` (YAML key; ``from_`` here) is anything :func:`ditq.load`
    takes. Its config must be the run's model config but for ``adaln_norm``
    and ``class_dropout_prob``. TerDiT's adaLN RMSNorm gains, absent from a
    float model, start at ``adaln_gain``: ``rms`` (default), each block's mean
    RMS of its adaLN outputs over a grid of timesteps and labels, so the
    normalized block starts close to the float one; or ``one``.
    """

    from_: str | None = None
    adaln_gain: str = "rms"


@dataclass
class QuantSpec:
    """Quantization-aware training: ``method: ternary`` (TerDiT; :class:`ditq.quant.TernaryQATConfig`).

    The model is prepared (its selected linears become ternary QAT layers)
    before the optimizer is built, so latent weights and the per-layer α
    train; EMA and training states hold that QAT state; the final
    ``model.safetensors`` is the converted, packed 2-bit checkpoint.
    ``adaln_norm`` sets the model's ``adaln_norm`` (TerDiT's RMSNorm over each
    block's adaLN outputs; null: leave the model's own setting).
    """

    method: str = "ternary"
    scale: str = "alpha"  # alpha (TerDiT) | gamma (BitNet b1.58)
    alpha_init: str = "lsq"  # lsq | gamma | normal
    act_bits: int | None = None  # None (weights only) | 8 (per-token int8 inputs)
    adaln_norm: bool | None = True
    quantize_adaln: bool = True  # the blocks' adaLN linears are ternary too (as TerDiT)
    include: list | None = None  # layer-name patterns; None: the model family's preset
    exclude: list = field(default_factory=list)
    preset: str | None = "auto"

    def ternary_config(self, step: str = "prepare"):
        """The :class:`~ditq.quant.TernaryQATConfig` of this spec at ``step``."""
        from ditq.quant.ternary import TernaryQATConfig

        return TernaryQATConfig(
            step=step,
            scale=self.scale,
            alpha_init=self.alpha_init,
            act_bits=self.act_bits,
            quantize_adaln=self.quantize_adaln,
            include=self.include,
            exclude=list(self.exclude),
            preset=self.preset,
        )


@dataclass
class TrainRun:
    """Everything a ``ditq train`` run needs; stored in its checkpoints and output folder."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    optim: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    distributed: DistributedSpec = field(default_factory=DistributedSpec)
    init: InitSpec | None = None
    quant: QuantSpec | None = None
    out: str = "out/train"
    seed: int = 0
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:N

    def train_config(self) -> TrainConfig:
        """The loop's settings, with the run's seed."""
        return replace(self.optim, seed=self.seed)

    # -- dict / file round trip ------------------------------------------------

    def to_dict(self) -> dict:
        d = asdict(self)
        d["optim"].pop("seed")  # the run's seed is the one seed
        if d["init"] is not None:
            d["init"] = {"from": d["init"]["from_"], "adaln_gain": d["init"]["adaln_gain"]}
        return d

    @classmethod
    def from_dict(cls, d: Any) -> TrainRun:
        """Build and validate a run from a nested dict; unknown keys and bad values raise ConfigError."""
        d = _expect_mapping(d, "the config")
        sections = {
            "model": ModelSpec,
            "data": DataSpec,
            "optim": TrainConfig,
            "checkpoint": CheckpointSpec,
            "distributed": DistributedSpec,
        }
        _check_keys(d, [f.name for f in fields(cls)], "the config")
        kwargs: dict[str, Any] = {}
        for name, value in d.items():
            if name in ("init", "quant") and value is None:
                kwargs[name] = None  # "quant: null": float training
            elif name == "init":
                sub = dict(_expect_mapping(value, name))
                _check_keys(sub, ["from", "adaln_gain"], name)
                kwargs[name] = InitSpec(
                    _coerce(sub.get("from"), "str | None", "init.from"),
                    _coerce(sub.get("adaln_gain", "rms"), "str", "init.adaln_gain"),
                )
            elif name == "quant":
                kwargs[name] = _build(QuantSpec, _expect_mapping(value, name), name)
            elif name in sections:
                sub = _expect_mapping(value, name)
                if name == "optim" and "seed" in sub:
                    raise ConfigError("optim.seed: set the seed at the top level ('seed: N'), not in optim")
                kwargs[name] = _build(sections[name], sub, name)
            else:
                kwargs[name] = _coerce(value, _field_type(cls, name), name)
        run = cls(**kwargs)
        run.validate()
        return run

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write as YAML (or JSON for a ``.json`` path), atomically."""
        from ditq.checkpoint import atomic_write

        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) if path.suffix == ".json" else self.to_yaml()
        with atomic_write(path, "run config") as tmp:
            tmp.write_text(text)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainRun:
        """Read a YAML or JSON run config."""
        return cls.from_dict(read_config_file(path))

    # -- checks ----------------------------------------------------------------

    def validate(self) -> None:
        """Raise a one-line ConfigError for a value that cannot work (paths are checked at run time)."""
        try:
            self.optim.validate()
        except InvalidArgumentError as e:
            raise ConfigError(f"optim.{e}") from None
        m, dt, ck, ds = self.model, self.data, self.checkpoint, self.distributed
        if m.config is not None and (m.name is not None or m.overrides):
            raise ConfigError("model: give either name (with overrides) or config, not both")
        if m.config is None and m.name is None:
            raise ConfigError("model: give a registry name (e.g. name: DiT-S/4) or a full config")
        _check_model_fields(m.overrides, "model.overrides", _model_arch(m))
        if m.config is not None:
            _check_model_fields(m.config, "model.config", _model_arch(m))
        if dt.kind not in DATA_KINDS:
            raise ConfigError(f"data.kind must be one of {', '.join(DATA_KINDS)}, got {dt.kind!r}")
        self._validate_distill()
        self._validate_init_and_quant()
        if dt.kind not in ("synthetic", "distill") and not dt.path:
            raise ConfigError(f"data.path is required for data.kind {dt.kind}")
        if dt.image_size < 4:
            raise ConfigError(f"data.image_size must be at least 4, got {dt.image_size}")
        if dt.kind == "latents" and dt.channels is not None:
            raise ConfigError("data.channels does not apply to latents (their manifest gives them); drop it")
        if dt.channels is not None and dt.channels not in (1, 3):
            raise ConfigError(f"data.channels must be 1 or 3, got {dt.channels}")
        if dt.kind == "idx" and dt.num_channels != 1:
            raise ConfigError("data.channels must be 1 for idx data (MNIST-style images are grey)")
        if dt.num_samples < 1:
            raise ConfigError(f"data.num_samples must be at least 1, got {dt.num_samples}")
        if dt.split not in ("train", "test"):
            raise ConfigError(f"data.split must be train or test, got {dt.split!r}")
        if dt.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {dt.num_workers}")
        if ck.every < 0:
            raise ConfigError(f"checkpoint.every must be >= 0 (0: only at the end), got {ck.every}")
        if ck.keep_last < 0:
            raise ConfigError(f"checkpoint.keep_last must be >= 0 (0: keep all), got {ck.keep_last}")
        if ck.export not in EXPORT_WEIGHTS:
            raise ConfigError(
                f"checkpoint.export must be one of {', '.join(EXPORT_WEIGHTS)}, got {ck.export!r}"
            )
        if ds.strategy not in STRATEGIES:
            raise ConfigError(
                f"distributed.strategy must be one of {', '.join(STRATEGIES)}, got {ds.strategy!r}"
            )
        if ds.backend not in BACKENDS:
            raise ConfigError(f"distributed.backend must be one of {', '.join(BACKENDS)}, got {ds.backend!r}")
        if ds.timeout_s < 1:
            raise ConfigError(f"distributed.timeout_s must be at least 1, got {ds.timeout_s}")
        if not self.out:
            raise ConfigError("out must name an output folder")

    def _validate_distill(self) -> None:
        dt = self.data
        if dt.kind != "distill":
            if dt.teacher is not None:
                raise ConfigError(f"data.teacher applies to data.kind distill only, not {dt.kind}; drop it")
            return
        if not dt.teacher:
            raise ConfigError(
                "data.kind distill needs data.teacher: a full-precision model (ditq-fmnist, a checkpoint...)"
            )
        if dt.path is not None:
            raise ConfigError(
                "data.path does not apply to data.kind distill (the teacher makes the data); drop it"
            )
        if dt.channels is not None:
            raise ConfigError(
                "data.channels does not apply to data.kind distill (they follow the teacher); drop it"
            )
        for name, low in (("pool_size", 1), ("pool_steps", 1), ("pool_refresh", 0)):
            if getattr(dt, name) < low:
                raise ConfigError(f"data.{name} must be at least {low}, got {getattr(dt, name)}")
        if not dt.pool_cfg_scale >= 1.0:
            raise ConfigError(f"data.pool_cfg_scale must be >= 1 (1: no guidance), got {dt.pool_cfg_scale}")

    def _validate_init_and_quant(self) -> None:
        if self.init is not None and not self.init.from_:
            raise ConfigError("init.from must name full-precision weights (a model name or a checkpoint)")
        if self.init is not None and self.init.adaln_gain not in ADALN_GAINS:
            raise ConfigError(
                f"init.adaln_gain must be one of {', '.join(ADALN_GAINS)}, got {self.init.adaln_gain!r}"
            )
        q = self.quant
        if q is None:
            return
        if q.method not in QUANT_METHODS:
            raise ConfigError(
                f"quant.method must be one of {', '.join(QUANT_METHODS)}, got {q.method!r} "
                "(Q-DiT is post-training quantization: use ditq ptq)"
            )
        try:
            q.ternary_config()
        except InvalidArgumentError as e:
            raise ConfigError(f"quant: {e}") from None
        given = {**(self.model.config or {}), **self.model.overrides}
        if q.adaln_norm is not None and "adaln_norm" in given and given["adaln_norm"] != q.adaln_norm:
            raise ConfigError(
                f"model adaln_norm is {given['adaln_norm']} but quant.adaln_norm is {q.adaln_norm}; "
                "set one of them (quant.adaln_norm: null leaves the model's)"
            )


def read_config_file(path: str | os.PathLike) -> dict:
    """The dict in a YAML or JSON file, with one-line errors for missing or malformed files."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}" if where is not None else ""
            raise ConfigError(f"{path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (model, data, optim, ...)")
    return data


def set_dotted(d: dict, key: str, value: Any) -> None:
    """``set_dotted(d, "optim.lr", 1e-3)``: set a nested key, creating sections as needed."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"bad config key {key!r}; use dotted names such as optim.lr")
    node = d
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {key}: {part} is not a section")
        node = nxt
    node[parts[-1]] = value


#################################################################################
#                             Strict dict -> dataclass                          #
#################################################################################


def _expect_mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {type(value).__name__}")
    return value


def _check_keys(d: dict, valid: list[str], where: str) -> None:
    unknown = [k for k in d if k not in valid]
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(str, unknown))} in {where}; "
            f"valid keys: {', '.join(valid)}"
        )


def _field_type(cls, name: str) -> str:
    return next(f.type for f in fields(cls) if f.name == name)


def _model_arch(m: ModelSpec) -> str:
    """The architecture a model spec names: its config's ``arch``, or its registry name's."""
    if m.config is not None:
        return str(m.config.get("arch", "dit"))
    from ditq.models import MODEL_CONFIGS

    config = MODEL_CONFIGS.get(m.name)
    return config.arch if config is not None else "dit"  # an unknown name fails when the model is built


def _check_model_fields(d: dict, where: str, arch: str = "dit") -> None:
    from ditq.models import DiTConfig, LargeDiTConfig

    cls = {"dit": DiTConfig, "large-dit": LargeDiTConfig}.get(arch)
    if cls is None:
        raise ConfigError(f"{where}.arch must be dit or large-dit, got {arch!r}")
    _check_keys({k: v for k, v in d.items() if k != "arch"}, [f.name for f in fields(cls)], where)
    for k, v in d.items():
        if k != "arch":
            d[k] = _coerce(v, _field_type(cls, k), f"{where}.{k}")


def _build(cls, d: dict, where: str):
    valid = [f.name for f in fields(cls) if not (cls is TrainConfig and f.name == "seed")]
    _check_keys(d, valid, where)
    return cls(**{k: _coerce(v, _field_type(cls, k), f"{where}.{k}") for k, v in d.items()})


def _coerce(value: Any, type_name: str, where: str) -> Any:
    """``value`` as the annotated type (a string under postponed annotations), or ConfigError."""
    options = [t.strip() for t in str(type_name).split("|")]
    if value is None:
        if "None" in options:
            return None
        raise ConfigError(f"{where} must not be null")
    for t in options:
        if t == "bool" and isinstance(value, bool):
            return value
        if t == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t == "float" and not isinstance(value, bool):
            # YAML 1.1 reads 1e-3 (no dot) as a string: accept numeric strings for floats.
            try:
                number = float(value) if isinstance(value, (int, float, str)) else None
            except ValueError:
                number = None
            if number is not None and not math.isnan(number):
                return number
        if t == "str" and isinstance(value, str):
            return value
        if t == "dict" and isinstance(value, dict):
            return value
        if t == "list" and isinstance(value, list):
            return value
    wanted = " or ".join("null" if t == "None" else _TYPE_WORDS.get(t, t) for t in options)
    raise ConfigError(f"{where} must be {wanted}, got {value!r}")


_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true/false",
    "dict": "a mapping",
    "list": "a list",
}

__all__ = [
    "DATA_KINDS",
    "CheckpointSpec",
    "ConfigError",
    "DataSpec",
    "DistributedSpec",
    "InitSpec",
    "ModelSpec",
    "QUANT_METHODS",
    "QuantSpec",
    "TrainRun",
    "read_config_file",
    "set_dotted",
]
