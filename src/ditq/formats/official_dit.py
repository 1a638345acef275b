"""Official DiT weights: registry names fetched once, bare state dicts, original training checkpoints.

* A registry name with official weights (``"DiT-XL/2"``, ``image_size`` 256 or
  512) is fetched once from the facebookresearch/DiT release into
  ``$DITQ_CACHE`` (default ``~/.cache/ditq``); ``download=False`` or a file put
  there by hand is the local-path alternative.
* A bare state dict (``DiT-XL-2-256x256.pt``): the config is inferred from the
  tensor shapes (:func:`infer_config`).
* An original training checkpoint ``{"model", "ema", "opt", "args"}``: the EMA
  weights are the ones loaded (they are the ones to sample from).

Pickles are read by :mod:`ditq.formats.pickles` (``weights_only=True``).
Weights always load with ``strict=True``; a mismatch names the offending keys
and shapes.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import urllib.error
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ditq import checkpoint as ckpt
from ditq.common import fetch_url
from ditq.errors import CheckpointError, DownloadError
from ditq.formats import build, pickles
from ditq.models import registry
from ditq.models.dit import DiTConfig

PathLike = str | os.PathLike

OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com/DiT/models/"

FORMATS = ("dit-official", "dit-training")
"""``describe()["format"]`` of a bare state dict and of an original training checkpoint."""


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


def load_official(
    name: str,
    *,
    image_size: int | None = None,
    cache_dir: PathLike | None = None,
    download: bool = True,
    progress: bool | None = None,
) -> nn.Module:
    """The model of registry name ``name`` with its official weights (cached, downloaded once), on the CPU."""
    entry = official_weights(name, image_size)
    path = ensure_official(entry, cache_dir=cache_dir, download=download, progress=progress)
    try:
        loaded = read_pickle(path)
        return build.build_model(entry.config, loaded.state_dict, str(path))
    except CheckpointError as e:
        # Downloads are checked before they enter the cache, so this is a
        # file placed or damaged by hand: say how to get a good one.
        raise CheckpointError(f"{e}; or delete {path} to download {entry.url} again") from None


def load_file(path: Path, *, num_heads: int | None = None, image_size: int | None = None) -> nn.Module:
    """A bare DiT state dict or an original training checkpoint (its EMA) as a model, on the CPU."""
    loaded = read_pickle(path)
    config = infer_config(
        loaded.state_dict, num_heads=num_heads, model_name=loaded.args_model, source=str(path)
    )
    build.check_image_size(config, image_size, str(path))
    return build.build_model(config, loaded.state_dict, str(path))


def describe_file(
    path: Path, *, num_heads: int | None = None
) -> tuple[dict[str, Any], dict[str, tuple], list[str]]:
    """What a pickle holds: ``(description, tensor shapes, tensor dtypes)``; the config is inferred."""
    loaded = read_pickle(path)
    out: dict[str, Any] = {"path": str(path), "format": loaded.format, "file_size": path.stat().st_size}
    out["metadata"] = loaded.metadata
    if loaded.format == "dit-training":
        out["state_dict"] = loaded.source_key
    shapes = {k: tuple(v.shape) for k, v in loaded.state_dict.items()}
    describe_config(out, shapes, num_heads, loaded.args_model)
    return out, shapes, [str(v.dtype).removeprefix("torch.") for v in loaded.state_dict.values()]


@dataclass
class Loaded:
    """A pickle's state dict and what else it says: its format, metadata and the registry name in its args."""

    format: str
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    source_key: str | None = None  # "ema" or "model" for training checkpoints
    args_model: str | None = None  # the registry name in a training checkpoint's args


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
    heads = num_heads or registry_heads(depth, hidden, model_name)
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


def ensure_official(
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
        with ckpt.atomic_write(dest, f"{label} weights") as tmp:
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
            verify_download(entry, tmp, dest)
    except OSError as e:  # the cache folder itself is not writable
        raise DownloadError(
            f"cannot write to the cache {dest.parent} ({e.strerror or e}); "
            "set DITQ_CACHE to a writable folder"
        ) from e
    return dest


def verify_download(entry: OfficialWeights, tmp: Path, dest: Path) -> None:
    """Accept a download only if it loads as a flat state dict fitting ``entry.config`` (and its hash)."""

    def fail(why: str) -> DownloadError:
        return DownloadError(
            f"the download of {entry.url} failed its integrity check ({why}); "
            f"try again, or fetch it yourself and put it at {dest}"
        )

    if entry.sha256 is not None:
        digest = sha256_of(tmp)
        if digest != entry.sha256:
            raise fail(f"sha256 {digest}, expected {entry.sha256}")
    try:
        loaded = read_pickle(tmp)
        build.check_fits(build.expected_shapes(entry.config), loaded.state_dict, entry.url, entry.config)
    except CheckpointError as e:
        raise fail(str(e)) from None


def sha256_of(path: Path) -> str:
    """The hex SHA-256 of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def read_pickle(path: Path) -> Loaded:
    """An official state dict or training checkpoint, read with weights_only=True."""
    obj = pickles.torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict or a DiT training checkpoint"
        )
    if pickles.is_state_dict(obj):
        return Loaded("dit-official", dict(obj), {})
    for key in ("ema", "model"):  # the EMA weights are the ones to sample from
        if isinstance(obj.get(key), Mapping) and pickles.is_state_dict(obj[key]):
            metadata: dict[str, Any] = {}
            args = obj.get("args")
            if isinstance(args, argparse.Namespace):
                args = vars(args)
            if isinstance(args, Mapping):
                metadata["args"] = {k: v for k, v in args.items() if pickles.is_plain(v)}
            # Plain top-level entries (step counters and the like) are worth showing.
            metadata.update(
                {
                    k: v
                    for k, v in obj.items()
                    if k not in ("ema", "model", "opt", "args") and pickles.is_plain(v)
                }
            )
            model_name = metadata.get("args", {}).get("model")
            return Loaded("dit-training", dict(obj[key]), metadata, key, model_name)
    keys = ", ".join(list(map(str, obj))[:5])
    raise CheckpointError(
        f"{path} is neither a state dict nor a training checkpoint with 'ema'/'model' "
        f"(top-level keys: {keys})"
    )


def registry_heads(depth: int, hidden: int, model_name: str | None) -> int | None:
    """Attention heads of the registry DiT with this depth and width (``model_name``'s first)."""
    named = registry.MODEL_CONFIGS.get(model_name) if model_name else None
    if named is not None and named.arch == "dit" and (named.depth, named.hidden_size) == (depth, hidden):
        return named.num_heads
    for config in registry.MODEL_CONFIGS.values():
        if config.arch == "dit" and (config.depth, config.hidden_size) == (depth, hidden):
            return config.num_heads
    return None


def describe_config(out: dict, shapes: dict, num_heads: int | None, model_name: str | None) -> None:
    """Set ``out["config"]`` to the config inferred from ``shapes``, or ``config_error`` to why not."""
    # Only shapes are needed to infer a config; meta tensors stand in for the data.
    fake = build.meta_tensors(shapes)
    try:
        out["config"] = infer_config(
            fake, num_heads=num_heads, model_name=model_name, source=out["path"]
        ).to_dict()
    except CheckpointError as e:
        out["config"] = None
        out["config_error"] = str(e)
