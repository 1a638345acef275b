"""Layer-config files: a per-layer group-size map (a search's result) as JSON, for ``ditq ptq``.

:func:`write_layer_config` stores a :class:`~ditq.quant.search.results.SearchResult`'s per-layer
map (or any ``QDiTConfig.layers`` dict) as::

    {"format": "ditq-layer-config", "version": 1,
     "layers": {"blocks.0.attn.qkv": {"w_group": 64, "a_group": 288}, ...}, "meta": {...}}

and :func:`read_layer_config` returns that dict, its ``layers`` checked as ``QDiTConfig.layers``
(what ``ditq ptq --layer-config`` reads).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from ditq.checkpoint import atomic_write
from ditq.errors import InvalidArgumentError
from ditq.quant.config import QDiTConfig
from ditq.quant.search.results import SearchResult

LAYER_CONFIG_FORMAT = "ditq-layer-config"
LAYER_CONFIG_VERSION = 1


def write_layer_config(
    path: str | Path, result_or_layers: SearchResult | Mapping[str, Mapping], meta: Mapping | None = None
) -> Path:
    """Write a per-layer map (a :class:`SearchResult` or a ``QDiTConfig.layers`` dict) as JSON, atomically.

    With a result, ``meta`` starts from its :meth:`SearchResult.summary`; entries given win.
    """
    if isinstance(result_or_layers, SearchResult):
        layers = result_or_layers.layers
        info = result_or_layers.summary()
    elif isinstance(result_or_layers, Mapping):
        layers, info = dict(result_or_layers), {}
    else:
        raise InvalidArgumentError(
            f"write_layer_config takes a SearchResult or a layers dict, got {type(result_or_layers).__name__}"
        )
    if meta is not None and not isinstance(meta, Mapping):
        raise InvalidArgumentError(f"meta must be a dict, got {type(meta).__name__}")
    layers = QDiTConfig(layers=dict(layers)).layers  # one-line errors for bad entries
    doc = {
        "format": LAYER_CONFIG_FORMAT,
        "version": LAYER_CONFIG_VERSION,
        "layers": layers,
        "meta": {**info, **dict(meta or {})},
    }
    try:
        text = json.dumps(doc, indent=1)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"layer-config meta must be JSON-able: {e}") from None
    path = Path(path)
    data = (text + "\n").encode()
    with atomic_write(path, "layer config", size_hint=len(data)) as tmp:
        tmp.write_bytes(data)
    return path


def read_layer_config(path: str | Path) -> dict:
    """Read a file written by :func:`write_layer_config`: ``{"format", "version", "layers", "meta"}``.

    ``layers`` is checked as ``QDiTConfig.layers`` and can be passed to it directly; whether the
    names exist in a model is checked when quantizing (:func:`~ditq.quant.api.quantize_`).
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidArgumentError(f"layer config {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgumentError(f"layer config {path} is not readable JSON: {e}") from None
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if fmt != LAYER_CONFIG_FORMAT:
        raise InvalidArgumentError(
            f"{path} is not a ditq layer config (format {fmt!r}, expected {LAYER_CONFIG_FORMAT!r}); "
            f"write one with ditq.quant.write_layer_config"
        )
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= LAYER_CONFIG_VERSION:
        raise InvalidArgumentError(
            f"layer config {path} has version {version!r}; this ditq reads version {LAYER_CONFIG_VERSION}"
        )
    meta = doc.get("meta", {})
    if not isinstance(meta, dict):
        raise InvalidArgumentError(f"layer config {path}: meta must be an object, got {type(meta).__name__}")
    try:
        layers = QDiTConfig(layers=doc.get("layers")).layers
    except InvalidArgumentError as e:
        raise InvalidArgumentError(f"layer config {path}: {e}") from None
    return {"format": fmt, "version": version, "layers": layers, "meta": meta}
