"""Where weights come from: official DiT checkpoints (downloaded once), files on disk, ditq checkpoints.

:func:`load` accepts

- a registry name with official pretrained weights (``"DiT-XL/2"``, with
  ``image_size`` 256 or 512), fetched once from ``dl.fbaipublicfiles.com``
  into ``$DITQ_CACHE`` (default ``~/.cache/ditq``);
- an official bare state dict (``DiT-XL-2-256x256.pt``): the config is
  inferred from the tensor shapes;
- an original training checkpoint ``{"model", "ema", "opt", "args"}``: the EMA
  weights are the ones loaded (they are the ones to sample from);
- a ditq checkpoint (safetensors, config in its metadata), as :func:`save`
  writes it;
- an official TerDiT checkpoint: a folder with ``consolidated_ema_ternary.00-of-01.pth``
  and ``model_args.pth`` (or that ``.pth`` file), loaded by :mod:`ditq.models.terdit`
  as a Large-DiT with packed ternary layers.

Pickles are read with ``torch.load(weights_only=True)`` only; the one
non-tensor class allowed in is ``argparse.Namespace`` (the ``args`` of
training checkpoints), which holds plain values. Weights always load with
``strict=True``; a mismatch names the offending keys and shapes.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import pickle
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ditq import checkpoint as ckpt
from ditq.common import fetch_url
from ditq.errors import CheckpointError, DownloadError, UnknownModelError
from ditq.models import registry
from ditq.models.dit import DiTConfig

PathLike = str | os.PathLike

OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com/DiT/models/"

# The VAE DiT is trained with shrinks each image side by 8: 256 px <-> 32 latents.
LATENT_DOWNSAMPLE = 8

# Suffixes that mark an argument as a file path rather than a model name.
# Models trained by ditq and shipped in the package (ditq/assets), loadable by name.
EMBEDDED_MODELS = {"ditq-fmnist": "ditq-fmnist.safetensors"}

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


@dataclass(frozen=True)
class OfficialWeights:
    """One official pretrained checkpoint: its file name, the config it fits, its hash if published."""

    name: str
    image_size: int
    file: str
    config: DiTConfig
    sha256: str | None = None

    @property
    def url(self) -> str:
        return OFFICIAL_BASE_URL + self.file


# Integrity of downloads. facebookresearch/DiT publishes no checksums for these
# files, and none could be found pinned in other public code either, so
# ``sha256`` is None. A download is instead accepted only if it (1) loads with
# ``torch.load(weights_only=True)`` as a flat dict of tensors and (2) fits the
# config below exactly (every key, every shape). That catches truncated and
# garbage downloads (HTML error pages, partial files) but not a well-formed file
# with different values. Fill in ``sha256`` when a trusted hash is known; it is
# then checked too.
OFFICIAL_WEIGHTS: dict[tuple[str, int], OfficialWeights] = {
    ("DiT-XL/2", 256): OfficialWeights(
        "DiT-XL/2", 256, "DiT-XL-2-256x256.pt", registry.get_config("DiT-XL/2", input_size=32)
    ),
    ("DiT-XL/2", 512): OfficialWeights(
        "DiT-XL/2", 512, "DiT-XL-2-512x512.pt", registry.get_config("DiT-XL/2", input_size=64)
    ),
}


#################################################################################
#                                  Public API                                   #
#################################################################################


def load(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    image_size: int | None = None,
    cache_dir: PathLike | None = None,
    download: bool = True,
    num_heads: int | None = None,
    progress: bool | None = None,
) -> nn.Module:
    """A model with weights, in eval mode, on ``device``; ``model.config`` is its config.

    ``name_or_path`` is a registry name with official weights (``"DiT-XL/2"``;
    ``image_size`` 256, the default, or 512) or a checkpoint file: an official
    state dict, an original training checkpoint (its EMA weights), or a ditq
    checkpoint; or an official TerDiT checkpoint folder (see
    :func:`ditq.models.terdit.load_official`). ``cache_dir`` overrides
    ``$DITQ_CACHE``; with ``download=False`` a missing official file is an
    error instead of a download. ``num_heads`` is needed only for a state
    dict (or TerDiT checkpoint) whose size is not in the registry (heads
    cannot be read off tensor shapes). ``progress`` shows a download bar
    (default: when stderr is a terminal, on rank 0).
    """
    key = str(name_or_path)
    if key in EMBEDDED_MODELS and not Path(key).is_file():
        path = _embedded_file(key)
        loaded = _read(path)
    elif key in registry.MODEL_CONFIGS and not Path(key).is_file():
        entry = official_weights(key, image_size)
        path = _ensure_official(entry, cache_dir=cache_dir, download=download, progress=progress)
        try:
            loaded = _read(path, expected=entry.config)
            return _build(entry.config, loaded.state_dict, str(path)).to(device).eval()
        except CheckpointError as e:
            # Downloads are checked before they enter the cache, so this is a
            # file placed or damaged by hand: say how to get a good one.
            raise CheckpointError(f"{e}; or delete {path} to download {entry.url} again") from None
    else:
        from ditq.models import terdit  # imports ditq.quant; only needed for TerDiT folders

        if terdit.is_official_checkpoint(name_or_path):
            return terdit.load_official(
                name_or_path, device=device, num_heads=num_heads, image_size=image_size
            )
        path = _as_checkpoint_path(name_or_path)
        loaded = _read(path, num_heads=num_heads)
        if image_size is not None and image_size != _image_size(loaded.config):
            raise CheckpointError(
                f"{path} holds a model for {_image_size(loaded.config)} px images "
                f"(input_size {loaded.config.input_size}), not {image_size} px; "
                "drop image_size or use another file"
            )
    return _build(loaded.config, loaded.state_dict, str(path)).to(device).eval()


def embedded_model_path(name: str = "ditq-fmnist") -> Path | None:
    """The file of a model shipped inside the package (``"ditq-fmnist"``), or ``None`` if absent."""
    from importlib import resources

    if name not in EMBEDDED_MODELS:
        raise UnknownModelError(f"unknown embedded model '{name}'; known: {', '.join(EMBEDDED_MODELS)}")
    asset = resources.files("ditq").joinpath("assets", EMBEDDED_MODELS[name])
    return Path(str(asset)) if asset.is_file() else None


def _embedded_file(name: str) -> Path:
    path = embedded_model_path(name)
    if path is None:
        raise CheckpointError(
            f"the embedded model '{name}' is not in this install "
            f"(expected ditq/assets/{EMBEDDED_MODELS[name]}); "
            "reinstall ditq, or train one with: ditq train --config configs/fmnist_tiny.yaml"
        )
    return path


def save(
    model: nn.Module,
    path: PathLike,
    *,
    command: str | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write ``model`` (its ``config`` and state dict) as a ditq checkpoint, atomically.

    ``command`` records what made the file (the CLI passes its command line);
    ``extra_metadata`` adds JSON-serializable entries (``quant_config``, ...);
    ``state_dict`` replaces ``model.state_dict()`` (e.g. with packed codes).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError(f"{type(model).__name__} has no .config with to_dict(); build it with ditq.models")
    from ditq import __version__

    metadata: dict[str, Any] = {"model_config": config.to_dict(), "ditq_version": __version__}
    if command is not None:
        metadata["command"] = command
    for k, v in (extra_metadata or {}).items():
        if k in ("format_version", "model_config"):
            raise ValueError(f"extra_metadata cannot set '{k}'; ditq writes it")
        metadata[k] = v
    ckpt.save_checkpoint(path, model.state_dict() if state_dict is None else state_dict, metadata)


def describe(path: PathLike, *, num_heads: int | None = None) -> dict[str, Any]:
    """What a checkpoint file holds, without building a model.

    Returns ``path``, ``format`` (``"ditq-safetensors"``, ``"safetensors"``
    for one without ditq metadata, ``"dit-official"``, ``"dit-training"``,
    ``"terdit-official"`` for a TerDiT folder, see :mod:`ditq.models.terdit`),
    ``file_size`` (bytes), ``config`` (a dict; None with ``config_error`` when
    it cannot be worked out), ``metadata`` (ditq metadata, or the training
    ``args`` and other plain entries), ``num_tensors``, ``num_parameters``
    (elements of all tensors, ``pos_embed`` included as in the paper's counts)
    and ``dtypes`` (tensor count per dtype). ditq checkpoints are described from
    their header alone; pickles must be read whole.
    """
    from ditq.models import terdit  # imports ditq.quant; only needed for TerDiT folders

    if terdit.is_official_checkpoint(path):
        return terdit.describe_official(path, num_heads=num_heads)
    key = str(path)
    path = (
        _embedded_file(key)
        if key in EMBEDDED_MODELS and not Path(key).is_file()
        else _as_checkpoint_path(path)
    )
    out: dict[str, Any] = {"path": str(path), "file_size": path.stat().st_size}
    if ckpt.is_safetensors(path):
        info, raw_meta = ckpt.read_safetensors_header(path)
        shapes = {k: tuple(v["shape"]) for k, v in info.items()}
        dtypes = [_SAFETENSORS_DTYPES.get(v["dtype"], v["dtype"]) for v in info.values()]
        if ckpt.METADATA_KEY in raw_meta:
            meta = ckpt.read_metadata(path)
            out["format"] = "ditq-safetensors"
            config: dict | None = meta.get("model_config")
            out["config"] = config
            out["metadata"] = meta
        else:
            out["format"] = "safetensors"
            out["metadata"] = dict(raw_meta)
            _describe_config(out, shapes, num_heads, None)
    else:
        loaded = _read_pickle(path)
        state_dict = loaded.state_dict
        shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
        dtypes = [str(v.dtype).removeprefix("torch.") for v in state_dict.values()]
        out["format"] = loaded.format
        out["metadata"] = loaded.metadata
        if loaded.format == "dit-training":
            out["state_dict"] = loaded.source_key
        _describe_config(out, shapes, num_heads, loaded.args_model)
    out["num_tensors"] = len(shapes)
    out["num_parameters"] = sum(_numel(s) for s in shapes.values())
    out["dtypes"] = {d: dtypes.count(d) for d in sorted(set(dtypes))}
    order = ["path", "format", "file_size", "config", "config_error", "state_dict", "num_tensors"]
    return {k: out[k] for k in sorted(out, key=lambda k: order.index(k) if k in order else len(order))}


def official_weights(name: str, image_size: int | None = None) -> OfficialWeights:
    """The official checkpoint entry for a registry name and image size (default 256)."""
    size = 256 if image_size is None else int(image_size)
    entry = OFFICIAL_WEIGHTS.get((name, size))
    if entry is not None:
        return entry
    sizes = sorted(s for n, s in OFFICIAL_WEIGHTS if n == name)
    if sizes:
        raise CheckpointError(
            f"no official {name} weights for {size} px images; official sizes: {', '.join(map(str, sizes))}"
        )
    have = ", ".join(sorted({n for n, _ in OFFICIAL_WEIGHTS}))
    raise CheckpointError(
        f"{name} has no official pretrained weights (only {have}); use "
        f"ditq.models.create_model('{name}') for a random init, or give a checkpoint path"
    )


def resolve_cache_dir(override: PathLike | None = None) -> Path:
    """Where official weights are cached: ``override``, else ``$DITQ_CACHE``, else ``~/.cache/ditq``."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get("DITQ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ditq"


def infer_config(
    state_dict: Mapping[str, torch.Tensor],
    *,
    num_heads: int | None = None,
    model_name: str | None = None,
    source: str = "state dict",
) -> DiTConfig:
    """The DiT config a state dict with the original key names was made from.

    Everything but ``num_heads`` is read off shapes: depth (number of blocks),
    hidden size and tokens (``pos_embed``), patch size and input channels
    (``x_embedder.proj.weight``), ``num_classes`` (label-table rows minus the
    null row), ``learn_sigma`` (final-layer width vs ``in_channels * p * p``)
    and ``mlp_ratio``. Heads come from ``num_heads``, else from the registry
    model ``model_name`` (e.g. a training checkpoint's ``args.model``), else
    from the registry size with this depth and hidden size.

    The label table has ``num_classes + 1`` rows exactly when the model was
    built with ``class_dropout_prob > 0`` (all DiTs with guidance); the shapes
    cannot tell the other case apart, so ``class_dropout_prob`` is the default 0.1.
    """
    required = (
        "pos_embed",
        "x_embedder.proj.weight",
        "y_embedder.embedding_table.weight",
        "final_layer.linear.weight",
    )
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise CheckpointError(
            f"{source} is not a DiT state dict with the original key names (no {', '.join(missing)}); "
            "ditq reads facebookresearch/DiT checkpoints and its own"
        )
    pos = state_dict["pos_embed"].shape
    proj = state_dict["x_embedder.proj.weight"].shape
    hidden, in_channels, patch = proj[0], proj[1], proj[-1]
    tokens = pos[1]
    grid = int(round(tokens**0.5))
    if len(pos) != 3 or grid * grid != tokens or pos[-1] != hidden:
        raise CheckpointError(
            f"{source}: pos_embed of shape {tuple(pos)} is not a square token grid of width {hidden}"
        )
    block_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = len(block_ids)
    rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
    out_features = state_dict["final_layer.linear.weight"].shape[0]
    per_channel = patch * patch
    if out_features == 2 * in_channels * per_channel:
        learn_sigma = True
    elif out_features == in_channels * per_channel:
        learn_sigma = False
    else:
        raise CheckpointError(
            f"{source}: final_layer.linear has {out_features} outputs, neither 1x nor 2x "
            f"in_channels*patch^2 = {in_channels * per_channel}; the file is not a DiT"
        )
    mlp_ratio = 4.0
    adaln_norm = "blocks.0.adaLN_modulation.2.weight" in state_dict
    if "blocks.0.mlp.fc1.weight" in state_dict:
        mlp_ratio = state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    heads = num_heads or _registry_heads(depth, hidden, model_name)
    if heads is None:
        raise CheckpointError(
            f"{source}: cannot tell the number of attention heads of a depth-{depth}, hidden-{hidden} DiT "
            "(no registry size matches and shapes do not show it); pass num_heads= (--num-heads in the CLI)"
        )
    return DiTConfig(
        depth=depth,
        hidden_size=hidden,
        num_heads=heads,
        patch_size=patch,
        input_size=grid * patch,
        in_channels=in_channels,
        num_classes=rows - 1,
        class_dropout_prob=0.1,
        learn_sigma=learn_sigma,
        mlp_ratio=mlp_ratio,
        adaln_norm=adaln_norm,
    )


#################################################################################
#                              Official downloads                               #
#################################################################################


def _ensure_official(
    entry: OfficialWeights, *, cache_dir: PathLike | None, download: bool, progress: bool | None
) -> Path:
    """The cached file of ``entry``, downloaded and checked first if absent."""
    dest = resolve_cache_dir(cache_dir).absolute() / entry.file
    if dest.is_file():
        return dest
    label = f"{entry.name} ({entry.image_size} px)"
    if not download:
        raise DownloadError(
            f"{label} weights are not cached and download=False; fetch {entry.url} and put it at {dest}"
        )
    try:
        with ckpt.atomic_write(dest) as tmp:
            try:
                fetch_url(entry.url, tmp, progress=progress)
            except (OSError, http.client.HTTPException, ValueError) as e:
                # URLError wraps the real cause (DNS failure, refused connection) in .reason.
                plain_url_error = isinstance(e, urllib.error.URLError) and not isinstance(
                    e, urllib.error.HTTPError
                )
                reason = str(e.reason) if plain_url_error else (str(e) or type(e).__name__)
                raise DownloadError(
                    f"could not download {label} weights ({reason}); "
                    f"fetch {entry.url} yourself and put it at {dest}"
                ) from e
            _verify_download(entry, tmp, dest)
    except OSError as e:  # the cache folder itself is not writable
        raise DownloadError(
            f"cannot write to the cache {dest.parent} ({e.strerror or e}); "
            "set DITQ_CACHE to a writable folder"
        ) from e
    return dest


def _verify_download(entry: OfficialWeights, tmp: Path, dest: Path) -> None:
    def fail(why: str) -> DownloadError:
        return DownloadError(
            f"the download of {entry.url} failed its integrity check ({why}); "
            f"try again, or fetch it yourself and put it at {dest}"
        )

    if entry.sha256 is not None:
        digest = _sha256(tmp)
        if digest != entry.sha256:
            raise fail(f"sha256 {digest}, expected {entry.sha256}")
    try:
        loaded = _read_pickle(tmp)
        _check_fits(_expected_shapes(entry.config), loaded.state_dict, entry.url, entry.config)
    except CheckpointError as e:
        raise fail(str(e)) from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


#################################################################################
#                                Reading files                                  #
#################################################################################


@dataclass
class _Loaded:
    format: str
    config: DiTConfig | None
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    source_key: str | None = None  # "ema" or "model" for training checkpoints
    args_model: str | None = None  # the registry name in a training checkpoint's args


def _read(path: Path, *, num_heads: int | None = None, expected: DiTConfig | None = None) -> _Loaded:
    """Config and state dict of any supported file; ``expected`` is the config it must fit."""
    if ckpt.is_safetensors(path):
        info, raw_meta = ckpt.read_safetensors_header(path)
        if ckpt.METADATA_KEY in raw_meta:
            meta = ckpt.read_metadata(path)
            if "quant_config" in meta:
                raise CheckpointError(
                    f"{path} holds a quantized model (quant_config in its metadata); "
                    "ditq.models.load reads full-precision checkpoints only; load it with "
                    "ditq.pipelines.ptq.load_model (ditq sample does)"
                )
            if "model_config" not in meta:
                raise CheckpointError(
                    f"{path} has no model_config in its ditq metadata; re-save it with ditq.models.save"
                )
            config = registry.config_from_dict(meta["model_config"])
            loaded = _Loaded("ditq-safetensors", config, ckpt.load_tensors(path), meta)
        else:
            loaded = _Loaded("safetensors", None, ckpt.load_tensors(path), dict(raw_meta))
    else:
        loaded = _read_pickle(path)
    if loaded.config is None:
        loaded.config = expected or infer_config(
            loaded.state_dict, num_heads=num_heads, model_name=loaded.args_model, source=str(path)
        )
    return loaded


def _read_pickle(path: Path) -> _Loaded:
    """An official state dict or training checkpoint, read with weights_only=True."""
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict or a DiT training checkpoint"
        )
    if _is_state_dict(obj):
        return _Loaded("dit-official", None, dict(obj), {})
    for key in ("ema", "model"):  # the EMA weights are the ones to sample from
        if isinstance(obj.get(key), Mapping) and _is_state_dict(obj[key]):
            metadata: dict[str, Any] = {}
            args = obj.get("args")
            if isinstance(args, argparse.Namespace):
                args = vars(args)
            if isinstance(args, Mapping):
                metadata["args"] = {k: v for k, v in args.items() if _is_plain(v)}
            # Plain top-level entries (step counters and the like) are worth showing.
            metadata.update(
                {k: v for k, v in obj.items() if k not in ("ema", "model", "opt", "args") and _is_plain(v)}
            )
            model_name = metadata.get("args", {}).get("model")
            return _Loaded("dit-training", None, dict(obj[key]), metadata, key, model_name)
    keys = ", ".join(list(map(str, obj))[:5])
    raise CheckpointError(
        f"{path} is neither a state dict nor a training checkpoint with 'ema'/'model' "
        f"(top-level keys: {keys})"
    )


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, letting ``argparse.Namespace`` in and nothing else."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = _blocked_global(e)
        if blocked != "argparse.Namespace":
            raise _unpickle_error(path, blocked) from None
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}; check the path") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise _unreadable(path, e) from None
    # Original DiT training checkpoints keep their argparse Namespace in "args".
    # A Namespace only holds attributes; unpickling it runs no code of the file,
    # so it is the single class allowed in beyond what weights_only accepts.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unpickle_error(path, _blocked_global(e)) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise _unreadable(path, e) from None


def _blocked_global(e: Exception) -> str | None:
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
    return m.group(1) if m else None


def _unpickle_error(path: Path, blocked: str | None) -> CheckpointError:
    if blocked is None:  # not a pickle at all, or a damaged one
        return CheckpointError(
            f"checkpoint {path} is corrupt or not a PyTorch file (it does not unpickle); "
            "re-create or re-download it"
        )
    return CheckpointError(
        f"{path} contains a pickled {blocked}, which ditq does not load (it could run code); "
        "save only the tensors, e.g. torch.save(ckpt['ema'], path), and load that"
    )


def _unreadable(path: Path, e: Exception) -> CheckpointError:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    first = first.split(". This is an internal")[0]  # drop torch's multi-sentence advice
    return CheckpointError(
        f"checkpoint {path} is truncated or corrupt ({first}); re-create or re-download it"
    )


#################################################################################
#                              Building the model                               #
#################################################################################


def _build(config: DiTConfig, state_dict: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """The model of ``config`` holding exactly ``state_dict`` (strict)."""
    # Build on the meta device: no memory and no time spent initializing 675M
    # parameters that are overwritten at once; assign=True then adopts the
    # loaded tensors as the parameters.
    with torch.device("meta"):
        model = registry.build_model(config)
    reference = model.state_dict()
    _check_fits({k: tuple(v.shape) for k, v in reference.items()}, state_dict, source, config)
    # Weights stored in a narrower dtype (a float16 checkpoint) come back in the
    # dtype the model is built in, as a copying load_state_dict would give them.
    state_dict = {k: v.to(reference[k].dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    if any(t.is_meta for t in chain(model.parameters(), model.buffers())):
        # A non-persistent buffer (absent from any state dict) is still on meta:
        # build for real, so the constructor computes it.
        model = registry.build_model(config)
        model.load_state_dict(state_dict, strict=True)
    return model


def _expected_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = registry.build_model(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_fits(
    expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, Any], source: str, config: DiTConfig
) -> None:
    """Raise one line naming missing/unexpected keys and shape mismatches, if any."""
    bad_values = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad_values:
        raise CheckpointError(
            f"{source}: entries {_few(bad_values)} are not tensors; the file is not a state dict"
        )
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: expected {tuple(shape)}, found {tuple(state_dict[k].shape)}"
        for k, shape in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch {_few(mismatched)}")
    if problems:
        raise CheckpointError(
            f"{source} does not fit {_summary(config)}: {'; '.join(problems)}; "
            "check the model name, image_size and num_heads"
        )


#################################################################################
#                                    Helpers                                    #
#################################################################################


def _as_checkpoint_path(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder, not a checkpoint file (nor a TerDiT folder with model_args.pth); "
            "give the file's path"
        )
    text = str(name_or_path)
    # "DiT-Q/2" is a mistyped model name rather than a missing file.
    if not text.endswith(_CHECKPOINT_SUFFIXES) and re.fullmatch(r"[A-Za-z][\w.-]*/\d+", text):
        raise UnknownModelError(
            f"unknown model '{text}' and no such file; registered: {', '.join(registry.MODEL_CONFIGS)} "
            f"(official weights: {', '.join(sorted({n for n, _ in OFFICIAL_WEIGHTS}))})"
        )
    raise CheckpointError(f"checkpoint not found: {path}; check the path")


def _registry_heads(depth: int, hidden: int, model_name: str | None) -> int | None:
    named = registry.MODEL_CONFIGS.get(model_name) if model_name else None
    if named is not None and named.arch == "dit" and (named.depth, named.hidden_size) == (depth, hidden):
        return named.num_heads
    for config in registry.MODEL_CONFIGS.values():
        if config.arch == "dit" and (config.depth, config.hidden_size) == (depth, hidden):
            return config.num_heads
    return None


def _describe_config(out: dict, shapes: dict, num_heads: int | None, model_name: str | None) -> None:
    # Only shapes are needed to infer a config; meta tensors stand in for the data.
    fake = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    try:
        out["config"] = infer_config(
            fake, num_heads=num_heads, model_name=model_name, source=out["path"]
        ).to_dict()
    except CheckpointError as e:
        out["config"] = None
        out["config_error"] = str(e)


def _image_size(config: DiTConfig) -> int:
    # Latent models see the image shrunk by the VAE; pixel-space ones (1 or 3
    # channels, see ditq.models.vae) see it as is.
    return config.input_size * (1 if config.in_channels in (1, 3) else LATENT_DOWNSAMPLE)


def _summary(config) -> str:
    if config.arch == "large-dit":
        return (
            f"Large-DiT(dim={config.dim}, n_layers={config.n_layers}, n_heads={config.n_heads}, "
            f"patch_size={config.patch_size}, input_size={config.input_size}, qk_norm={config.qk_norm}, "
            f"adaln_norm={config.adaln_norm})"
        )
    return (
        f"DiT(depth={config.depth}, hidden_size={config.hidden_size}, num_heads={config.num_heads}, "
        f"patch_size={config.patch_size}, input_size={config.input_size})"
    )


def _few(items: list[str], n: int = 3) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _is_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _is_plain(v: Any) -> bool:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return True
    if isinstance(v, (list, tuple)):
        return all(_is_plain(x) for x in v)
    if isinstance(v, Mapping):
        return all(isinstance(k, str) and _is_plain(x) for k, x in v.items())
    return False


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip

__all__ = [
    "OFFICIAL_WEIGHTS",
    "OfficialWeights",
    "describe",
    "fetch_url",
    "infer_config",
    "load",
    "official_weights",
    "resolve_cache_dir",
    "save",
]
