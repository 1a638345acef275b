"""Feature extraction in batches: images through a feature extractor into numpy arrays.

A *feature extractor* is any callable taking a uint8 (B, H, W, 3) batch and
returning a dict of (B, D) tensors or arrays; :class:`FIDInceptionV3` is one
(keys ``pool``, ``spatial``, ``logits``, ``probs``). Tests pass tiny ones.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from ditq.errors import InvalidArgumentError

FeatureExtractor = Callable[[np.ndarray], Mapping[str, "torch.Tensor | np.ndarray"]]


@contextmanager
def no_tf32():
    """Turn TF32 off for CUDA matmuls and convolutions inside the block (restored after).

    cuDNN convolutions use TF32 by default on Ampere and later GPUs, which
    moves Inception features far more than the agreement ADM ports reach.
    """
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def extract_features(
    batches: Iterable[np.ndarray],
    extractor: FeatureExtractor,
    keys: Sequence[str],
    *,
    total: int | None = None,
    progress: bool | None = None,
    desc: str = "features",
) -> dict[str, np.ndarray]:
    """Run ``extractor`` on every batch and stack the features named ``keys``: float32 (N, D) arrays.

    ``total`` is the number of images (for the progress bar); ``progress``
    defaults to on when stderr is a terminal. Batches are processed in order,
    so row i of every array belongs to image i.
    """
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    out: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    with (
        tqdm(total=total, unit="img", desc=desc, disable=not show, dynamic_ncols=True) as bar,
        torch.inference_mode(),
        no_tf32(),
    ):
        for batch in batches:
            feats = extractor(batch)
            for k in keys:
                if k not in feats:
                    raise InvalidArgumentError(
                        f"the feature extractor gives no '{k}' features (it gives {sorted(feats)})"
                    )
                v = feats[k]
                v = (
                    v.detach().float().cpu().numpy()
                    if isinstance(v, torch.Tensor)
                    else np.asarray(v, np.float32)
                )
                if v.ndim != 2 or len(v) != len(batch):
                    raise InvalidArgumentError(
                        f"the feature extractor's '{k}' has shape {v.shape} for a batch of {len(batch)}; "
                        "expected (batch, D)"
                    )
                out[k].append(v)
            bar.update(len(batch))
    if not any(out.values()) and keys:
        raise InvalidArgumentError("no images to extract features from")
    return {k: np.concatenate(v, axis=0) for k, v in out.items()}
