"""The FID Inception-v3: TensorFlow's 2015-12-05 graph as the ADM evaluator runs it, in PyTorch.

The ADM evaluator (openai/guided-diffusion ``evaluations/evaluator.py``) runs
TensorFlow's ``classify_image_graph_def.pb`` from ``inception-2015-12-05.tgz``.
This module is that graph as plain ``nn.Module``\\ s, with exactly the
state-dict names of pytorch-fid's converted weights,
``pt_inception-2015-12-05-6726825d.pth``: 94 conv + batch-norm units
(``<unit>.conv.weight``, ``<unit>.bn.{weight,bias,running_mean,running_var}``)
and the 2048->1008 ``fc``, 472 tensors in all. torch-fidelity's converter
(``utils/util_convert_inception_weights.py``) documents the same mapping.

How it differs from torchvision's Inception-v3 (the "FID" patches of
pytorch-fid and torch-fidelity):

- the pool branches of ``Mixed_5b-d``, ``Mixed_6b-e`` and ``Mixed_7b`` average
  without the padded zeros (``count_include_pad=False``), as TF's avg-pool does;
- ``Mixed_7c`` takes a **max**-pool in its pool branch (a quirk of this graph);
- batch norm has eps 0.001; the classifier has 1008 classes;
- input: float 0-255, resized to 299x299 with TF1's bilinear resize
  (``align_corners=False`` *without* half-pixel centres, see
  :func:`resize_bilinear_tf1`), then ``(x - 128) / 128``.

TF tensor <-> module (TF scope ``mixed_k`` is the k-th Inception block):

=====================================  ===========================================
TF graph                               this module
=====================================  ===========================================
``ExpandDims:0`` (N, H, W, 3) 0-255    input of :meth:`FIDInceptionV3.forward`
``ResizeBilinear``, ``Sub``, ``Mul``   :func:`resize_bilinear_tf1`, ``(x-128)/128``
``conv``, ``conv_1`` ... ``conv_4``    ``Conv2d_1a_3x3``, ``Conv2d_2a_3x3``,
                                       ``Conv2d_2b_3x3``, ``Conv2d_3b_1x1``,
                                       ``Conv2d_4a_3x3``
``mixed``, ``mixed_1``, ``mixed_2``    ``Mixed_5b``, ``Mixed_5c``, ``Mixed_5d``
``mixed_3``                            ``Mixed_6a``
``mixed_4`` ... ``mixed_7``            ``Mixed_6b``, ``Mixed_6c``, ``Mixed_6d``,
                                       ``Mixed_6e``
``mixed_8``, ``mixed_9``, ``mixed_10`` ``Mixed_7a``, ``Mixed_7b``, ``Mixed_7c``
``mixed_6/conv:0`` (N, 17, 17, 192)    ``Mixed_6d.branch1x1`` output (conv, BN, ReLU)
``pool_3:0`` (N, 1, 1, 2048)           output ``pool``
``softmax/logits/MatMul``              output ``logits`` = ``pool @ fc.weight.T``
``softmax/weights``, ``softmax/biases``  ``fc.weight`` (1008, 2048), ``fc.bias``
=====================================  ===========================================

Inside a block, ``<scope>/conv`` is ``branch1x1`` (``Mixed_6a``: ``branch3x3``),
``tower`` / ``tower_1`` the multi-conv branches (``conv``, ``conv_1``, ... in
order; ``mixed/conv``, ``mixed/conv_1`` the split 1x3 / 3x1 pair of
``Mixed_7b/c``) and ``tower_2`` the pool branch; each TF ``conv2d_params``
(H, W, in, out) is a ``conv.weight`` (out, in, H, W), each ``batchnorm``
``gamma, beta, moving_mean, moving_variance`` is ``bn.weight, bias,
running_mean, running_var``.

One forward returns all the ADM evaluator needs (:meth:`FIDInceptionV3.forward`):
``pool`` (N, 2048) for FID, Precision and Recall; ``spatial`` (N, 2023), the
first 7 channels of ``mixed_6/conv`` flattened channels-last (h, w, c) for
sFID; ``logits`` (N, 1008) without the bias, and their softmax ``probs`` for
the Inception Score.
"""

from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ditq.checkpoint import atomic_write
from ditq.common import fetch_url
from ditq.errors import CheckpointError, DownloadError, InvalidArgumentError

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
"""File name of pytorch-fid's converted weights, also their name in the cache."""

FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}"
"""pytorch-fid's public release of the converted TF 2015-12-05 Inception weights."""

INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
NUM_CLASSES = 1008


#################################################################################
#                         TF1 bilinear resize and input                         #
#################################################################################


def _tf1_source_index(in_size: int, out_size: int, device: torch.device):
    # TF1 ResizeBilinear, align_corners=False, half_pixel_centers=False:
    # scale = in / (float) out and src = dst * scale, both in float32; the
    # lower neighbour is floor(src), the upper min(ceil(src), in - 1).
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32) * scale
    lo = torch.floor(src)
    hi = torch.clamp(torch.ceil(src), max=in_size - 1)
    frac = src - lo
    return lo.long().to(device), hi.long().to(device), frac.to(device)


def resize_bilinear_tf1(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (N, C, H, W) float images to ``size`` exactly as TF1's ``ResizeBilinear`` does.

    That is ``align_corners=False`` without half-pixel centres: output pixel
    ``i`` samples input coordinate ``i * in / out`` (so the top-left pixels
    coincide and there is no anti-aliasing). ``F.interpolate(...,
    align_corners=False)`` uses half-pixel centres instead and gives other
    numbers. Arithmetic is float32 in TF's order: left-right interpolation
    of the two rows, then top-bottom.
    """
    if x.ndim != 4 or not x.is_floating_point():
        raise InvalidArgumentError(f"resize needs float (N, C, H, W) images, got {x.dtype} {tuple(x.shape)}")
    out_h, out_w = size
    in_h, in_w = x.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return x
    y_lo, y_hi, y_frac = _tf1_source_index(in_h, out_h, x.device)
    x_lo, x_hi, x_frac = _tf1_source_index(in_w, out_w, x.device)
    top = x.index_select(2, y_lo)  # N, C, out_h, in_w
    bottom = x.index_select(2, y_hi)
    top_left, top_right = top.index_select(3, x_lo), top.index_select(3, x_hi)  # N, C, out_h, out_w
    bottom_left, bottom_right = bottom.index_select(3, x_lo), bottom.index_select(3, x_hi)
    x_frac = x_frac.to(x.dtype).view(1, 1, 1, out_w)
    y_frac = y_frac.to(x.dtype).view(1, 1, out_h, 1)
    top = top_left + (top_right - top_left) * x_frac
    bottom = bottom_left + (bottom_right - bottom_left) * x_frac
    return top + (bottom - top) * y_frac


def to_inception_input(images, device: torch.device | str | None = None) -> torch.Tensor:
    """Images as the network takes them: float32 (N, 3, H, W) with values 0-255, on ``device``.

    Accepts a numpy array or a tensor, uint8 or float with values in [0, 255],
    NHWC (the ADM layout, checked first) or NCHW, RGB. Nothing is rescaled:
    images in [0, 1] or [-1, 1] must be converted by the caller (for DiT
    outputs, :func:`ditq.images.to_uint8`). Grayscale is refused rather than
    silently repeated, since the reference statistics are of RGB images.
    """
    if isinstance(images, np.ndarray):
        if images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating):
            images = torch.from_numpy(np.ascontiguousarray(images))
        else:
            raise InvalidArgumentError(f"images must be uint8 or float 0-255, got numpy {images.dtype}")
    elif not isinstance(images, torch.Tensor):
        raise InvalidArgumentError(f"images must be a numpy array or a tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise InvalidArgumentError(f"images must be uint8 or float 0-255, got {images.dtype}")
    shape = tuple(images.shape)
    if images.ndim != 4:
        raise InvalidArgumentError(
            f"images must be a 4-d batch (N, H, W, 3) or (N, 3, H, W), got shape {shape}"
        )
    if shape[-1] == 3:
        images = images.permute(0, 3, 1, 2)  # NHWC -> NCHW
    elif shape[1] != 3:
        if 1 in (shape[1], shape[-1]):
            raise InvalidArgumentError(
                f"images of shape {shape} are grayscale; Inception takes RGB: repeat the channel "
                "3 times first (save_npz does this when writing a batch)"
            )
        raise InvalidArgumentError(
            f"images must have 3 channels (N, H, W, 3) or (N, 3, H, W), got shape {shape}"
        )
    if shape[0] == 0:
        raise InvalidArgumentError("no images: the batch is empty")
    x = images.to(device=device, dtype=torch.float32)
    if images.dtype != torch.uint8:
        lo, hi = torch.aminmax(x)
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise InvalidArgumentError("images contain NaN or infinite values")
        if lo < 0 or hi > 255:
            raise InvalidArgumentError(
                f"float images must hold values in [0, 255], got [{lo.item():.4g}, {hi.item():.4g}]; "
                "convert [-1, 1] model outputs with ditq.images.to_uint8"
            )
    return x.contiguous()


#################################################################################
#                                 Building blocks                               #
#################################################################################


class BatchNorm(nn.Module):
    """Inference-only batch norm with TF's eps 0.001 and exactly the weight file's four tensors.

    ``nn.BatchNorm2d`` would add a ``num_batches_tracked`` buffer that the
    converted file does not have.
    """

    def __init__(self, channels: int, eps: float = 0.001):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(channels), requires_grad=False)
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class BasicConv2d(nn.Module):
    """Conv (no bias) -> batch norm -> ReLU: one TF ``conv`` scope."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False
        )
        self.bn = BatchNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    # TF's SAME avg-pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (``Mixed_5b-d``): 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)  # N, 64, 35, 35
        b5 = self.branch5x5_2(self.branch5x5_1(x))  # N, 64, 35, 35
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))  # N, 96, 35, 35
        bp = self.branch_pool(_avg_pool_tf(x))  # N, pool_features, 35, 35
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (``Mixed_6a``)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)  # N, 384, 17, 17
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))  # N, 96, 17, 17
        bp = F.max_pool2d(x, kernel_size=3, stride=2)  # N, 288, 17, 17
        return torch.cat([b3, bd, bp], 1)


class InceptionC(nn.Module):
    """17x17 block (``Mixed_6b-e``) with factorized 7x7 convolutions."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # branch1x1 comes first in the concatenation, so channels 0-191 of the
        # output are TF's mixed_k/conv: FIDInceptionV3 reads sFID's features there.
        b1 = self.branch1x1(x)  # N, 192, 17, 17
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))  # N, 192, 17, 17
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(bd))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))  # N, 192, 17, 17
        bp = self.branch_pool(_avg_pool_tf(x))  # N, 192, 17, 17
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (``Mixed_7a``)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))  # N, 320, 8, 8
        b7 = self.branch7x7x3_1(x)
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(b7)))  # N, 192, 8, 8
        bp = F.max_pool2d(x, kernel_size=3, stride=2)  # N, 768, 8, 8
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """8x8 block (``Mixed_7b``: avg-pool branch, ``Mixed_7c``: max-pool branch, as in the TF graph)."""

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)  # N, 320, 8, 8
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)  # N, 768, 8, 8
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)  # N, 768, 8, 8
        if self.pool == "avg":
            pooled = _avg_pool_tf(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)  # N, 192, 8, 8
        return torch.cat([b1, b3, bd, bp], 1)


#################################################################################
#                                 The network                                   #
#################################################################################


class FIDInceptionV3(nn.Module):
    """Inception-v3 of TF's 2015-12-05 graph: images in, ADM's pool/spatial/logits/probs features out."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(POOL_DIM, NUM_CLASSES)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images) -> dict[str, torch.Tensor]:
        """Features of a batch of images (uint8 or float 0-255, NHWC or NCHW, RGB; any size).

        Returns float32 tensors: ``pool`` (N, 2048), ``spatial`` (N, 2023),
        ``logits`` (N, 1008, no bias) and ``probs`` (their softmax).
        """
        x = to_inception_input(images, self.fc.weight.device)  # N, 3, H, W in 0-255
        x = resize_bilinear_tf1(x, (INPUT_SIZE, INPUT_SIZE))  # N, 3, 299, 299
        x = (x - 128) / 128  # the graph's Sub and Mul(1/128), exact in float32
        x = self.Conv2d_1a_3x3(x)  # N, 32, 149, 149
        x = self.Conv2d_2a_3x3(x)  # N, 32, 147, 147
        x = self.Conv2d_2b_3x3(x)  # N, 64, 147, 147
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # N, 64, 73, 73
        x = self.Conv2d_3b_1x1(x)  # N, 80, 73, 73
        x = self.Conv2d_4a_3x3(x)  # N, 192, 71, 71
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # N, 192, 35, 35
        x = self.Mixed_5b(x)  # N, 256, 35, 35
        x = self.Mixed_5c(x)  # N, 288, 35, 35
        x = self.Mixed_5d(x)  # N, 288, 35, 35
        x = self.Mixed_6a(x)  # N, 768, 17, 17
        x = self.Mixed_6b(x)  # N, 768, 17, 17
        x = self.Mixed_6c(x)  # N, 768, 17, 17
        x = self.Mixed_6d(x)  # N, 768, 17, 17
        # mixed_6/conv[..., :7] in TF's NHWC layout: channels last, then flatten.
        spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(x), -1)  # N, 2023
        x = self.Mixed_6e(x)  # N, 768, 17, 17
        x = self.Mixed_7a(x)  # N, 1280, 8, 8
        x = self.Mixed_7b(x)  # N, 2048, 8, 8
        x = self.Mixed_7c(x)  # N, 2048, 8, 8
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)  # N, 2048 (pool_3)
        logits = pool @ self.fc.weight.T  # N, 1008: ADM's softmax graph takes the MatMul, not the bias
        return {"pool": pool, "spatial": spatial, "logits": logits, "probs": torch.softmax(logits, dim=1)}


#################################################################################
#                                    Weights                                    #
#################################################################################


def default_cache_dir(override: str | os.PathLike | None = None) -> Path:
    """``override``, else ``$DITQ_CACHE``, else ``~/.cache/ditq`` (the same rule as model weights)."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get("DITQ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ditq"


def _read_state_dict(path: Path, source: str | None = None) -> dict[str, torch.Tensor]:
    source = source or str(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"Inception weights not found: {path}; check --inception-weights") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder; --inception-weights takes the .pth file") from None
    except Exception as e:  # unpickling errors have many types; none is a bug of ours
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot read Inception weights {source} ({first}); it must be pytorch-fid's {FID_WEIGHTS_FILE}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{source} is not a state dict of tensors; expected pytorch-fid's {FID_WEIGHTS_FILE}"
        )
    # Files saved from a torchvision BatchNorm2d carry a step counter that
    # inference never reads; ours has no such buffer.
    return {k: v for k, v in state.items() if not k.endswith(".num_batches_tracked")}


def _check_fits(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]

    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({some(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({some(unexpected)})")
    if wrong:
        problems.append(f"{len(wrong)} of the wrong shape ({some(wrong)})")
    if problems:
        raise CheckpointError(
            f"{source} does not fit the FID Inception: keys {'; '.join(problems)}; "
            f"use pytorch-fid's {FID_WEIGHTS_FILE} ({FID_WEIGHTS_URL})"
        )


def _ensure_weights(cache_dir, download: bool, progress: bool | None) -> Path:
    dest = default_cache_dir(cache_dir).absolute() / FID_WEIGHTS_FILE
    if dest.is_file():
        return dest
    if not download:
        raise DownloadError(
            f"the FID Inception weights are not cached and download is off; fetch {FID_WEIGHTS_URL} "
            f"and put it at {dest}, or pass --inception-weights PATH"
        )
    try:
        with atomic_write(dest) as tmp:
            try:
                fetch_url(FID_WEIGHTS_URL, tmp, progress=progress)
            except (OSError, http.client.HTTPException, ValueError) as e:
                plain = isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError)
                reason = str(e.reason) if plain else (str(e) or type(e).__name__)
                raise DownloadError(
                    f"could not download the FID Inception weights ({reason}); fetch {FID_WEIGHTS_URL} "
                    f"yourself and put it at {dest}, or pass --inception-weights PATH"
                ) from e
            # Check before the file enters the cache: an HTML error page or a
            # cut-off download must not be found there next time.
            try:
                source = f"the download of {FID_WEIGHTS_URL}"
                _check_fits(FIDInceptionV3(), _read_state_dict(tmp, source), source)
            except CheckpointError as e:
                raise DownloadError(f"{e}; try again, or fetch it yourself and put it at {dest}") from None
    except OSError as e:  # the cache folder is not writable
        raise DownloadError(
            f"cannot write to the cache {dest.parent} ({e.strerror or e}); "
            "set DITQ_CACHE to a writable folder"
        ) from e
    return dest


def load_inception(
    path: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
) -> FIDInceptionV3:
    """The FID Inception with pytorch-fid's weights, in eval mode on ``device``.

    ``path`` is a local ``pt_inception-2015-12-05-6726825d.pth``; without it
    the file is read from the cache (``cache_dir``, else ``$DITQ_CACHE``, else
    ``~/.cache/ditq``), downloaded there from :data:`FID_WEIGHTS_URL` the
    first time unless ``download=False``. The file is read with
    ``torch.load(weights_only=True)`` and must fit exactly (every key and
    shape), else :class:`~ditq.errors.CheckpointError` names the keys.
    """
    if path is None:
        path = _ensure_weights(cache_dir, download, progress)
    path = Path(path)
    state = _read_state_dict(path)
    model = FIDInceptionV3()
    _check_fits(model, state, str(path))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
