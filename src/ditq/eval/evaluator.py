"""``evaluate(samples, ref)``: FID, sFID, IS, Precision and Recall of a sample batch, the ADM way.

The whole ``ditq eval`` workflow as one call. Everything that can be checked
without the network (metric names, both files' arrays and statistics) is
checked before the Inception weights are loaded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np
import torch

from ditq.common import resolve_device
from ditq.errors import InvalidArgumentError
from ditq.eval import metrics as M
from ditq.eval.features import FeatureExtractor, extract_features
from ditq.eval.inception import load_inception
from ditq.eval.npz import open_images, read_reference

METRICS = ("fid", "sfid", "is", "precision", "recall")
"""Metric names in the order ADM prints them (``is`` is the Inception Score)."""


def parse_metrics(metrics: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"fid,is"`` or ``["fid", "is"]`` -> ``("fid", "is")`` in :data:`METRICS` order; None -> all."""
    if metrics is None:
        return METRICS
    names = [m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str) else metrics)]
    names = [m for m in names if m]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise InvalidArgumentError(
            f"unknown metric(s) {', '.join(unknown) or '(none given)'}; choose among {','.join(METRICS)}"
        )
    return tuple(m for m in METRICS if m in names)


def evaluate(
    samples_path: str | os.PathLike,
    ref_path: str | os.PathLike,
    *,
    metrics: str | Sequence[str] | None = None,
    batch_size: int = 64,
    device: torch.device | str | None = "auto",
    inception_weights: str | os.PathLike | None = None,
    compute_ref_stats: bool = False,
    extractor: FeatureExtractor | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    progress: bool | None = None,
) -> dict:
    """Evaluate the ADM sample batch ``samples_path`` against the reference batch ``ref_path``.

    ``metrics``: any of ``fid, sfid, is, precision, recall`` (default all).
    FID and sFID compare the samples' statistics with the reference's ``mu,
    sigma`` / ``mu_s, sigma_s``, read from the file; when they are absent,
    ``compute_ref_stats=True`` computes them from its images (else it is an
    error). Precision and Recall need the reference images. ``extractor``
    replaces the FID Inception (any callable from a uint8 NHWC batch to a dict
    with ``pool``, ``spatial``, ``probs``); otherwise the Inception is loaded
    with :func:`~ditq.eval.inception.load_inception` from
    ``inception_weights`` or the cache.

    Returns ``{"metrics": {name: value}, "samples": {...}, "reference":
    {...}, "settings": {...}, "seconds": {...}}``, JSON-serializable.
    """
    started = time.perf_counter()
    names = parse_metrics(metrics)
    if batch_size < 1:
        raise InvalidArgumentError(f"batch size must be positive, got {batch_size}")
    device = resolve_device(device)
    samples = open_images(samples_path)
    ref = read_reference(ref_path)

    # What the reference must give, decided before any heavy work.
    need_pr = "precision" in names or "recall" in names
    compute_pool = "fid" in names and not ref.has_pool_stats
    compute_spatial = "sfid" in names and not ref.has_spatial_stats
    if (compute_pool or compute_spatial) and not compute_ref_stats:
        lacking = [
            what
            for what, lack in (
                ("'mu'/'sigma' (fid)", compute_pool),
                ("'mu_s'/'sigma_s' (sfid)", compute_spatial),
            )
            if lack
        ]
        raise InvalidArgumentError(
            f"the reference {ref.path} has no {' and no '.join(lacking)}; pass --compute-ref-stats to "
            "compute them from its images (the numbers then differ from published ones), or use a "
            "reference batch that has them"
        )
    if (compute_pool or compute_spatial or need_pr) and ref.images is None:
        why = "precision/recall need" if need_pr else "computing its statistics needs"
        raise InvalidArgumentError(f"the reference {ref.path} has no images ('arr_0'); {why} them")
    ref_keys = (["pool"] if need_pr or compute_pool else []) + (["spatial"] if compute_spatial else [])
    sample_keys = []
    if {"fid", "precision", "recall"} & set(names):
        sample_keys.append("pool")
    if "sfid" in names:
        sample_keys.append("spatial")
    if "is" in names:
        sample_keys.append("probs")

    if extractor is None:
        extractor = load_inception(
            inception_weights, cache_dir=cache_dir, download=download, device=device, progress=progress
        )
    t_model = time.perf_counter()

    sample_feats = extract_features(
        samples.batches(batch_size),
        extractor,
        sample_keys,
        total=len(samples),
        progress=progress,
        desc="sample features",
    )
    t_samples = time.perf_counter()
    ref_feats = {}
    if ref_keys:
        ref_feats = extract_features(
            ref.images.batches(batch_size),
            extractor,
            ref_keys,
            total=len(ref.images),
            progress=progress,
            desc="reference features",
        )
    t_ref = time.perf_counter()

    results: dict[str, float] = {}
    ref_stats_source = {}
    for name, key, mu_key, sigma_key in (
        ("fid", "pool", "mu", "sigma"),
        ("sfid", "spatial", "mu_s", "sigma_s"),
    ):
        if name not in names:
            continue
        if mu_key in ref.stats:
            mu_r, sigma_r = ref.stats[mu_key], ref.stats[sigma_key]
            ref_stats_source[name] = "read"
        else:
            mu_r, sigma_r = M.feature_statistics(ref_feats[key])
            ref_stats_source[name] = "computed"
        mu_s, sigma_s = M.feature_statistics(sample_feats[key])
        if mu_s.shape != np.shape(mu_r):
            raise InvalidArgumentError(
                f"{name}: sample features have {mu_s.shape[0]} dimensions but the reference statistics "
                f"{np.shape(mu_r)[0]}; the reference was made with another feature extractor"
            )
        results[name] = M.frechet_distance(mu_s, sigma_s, mu_r, sigma_r)
    if "is" in names:
        results["is"] = M.inception_score(sample_feats["probs"])
    if need_pr:
        precision, recall = M.precision_recall(ref_feats["pool"], sample_feats["pool"], device=device)
        if "precision" in names:
            results["precision"] = precision
        if "recall" in names:
            results["recall"] = recall
    done = time.perf_counter()

    return {
        "metrics": {m: results[m] for m in names},
        "samples": {
            "path": str(samples.path),
            "num_images": len(samples),
            "image_shape": list(samples.shape[1:]),
        },
        "reference": {
            "path": str(ref.path),
            "num_images": len(ref.images) if ref.images is not None else None,
            "statistics": ref_stats_source,
        },
        "settings": {"batch_size": batch_size, "device": str(device), "extractor": type(extractor).__name__},
        "seconds": {
            "load_model": round(t_model - started, 3),
            "sample_features": round(t_samples - t_model, 3),
            "reference_features": round(t_ref - t_samples, 3),
            "metrics": round(done - t_ref, 3),
            "total": round(done - started, 3),
        },
    }
