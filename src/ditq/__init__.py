"""ditq: Diffusion Transformers made small and fast.

The doors, one per job (imported on first use, so ``import ditq`` and
``ditq --version`` stay fast)::

    import ditq
    model = ditq.load("ditq-fmnist")                       # any checkpoint, name or folder
    ditq.quantize_(model, ditq.QDiTConfig(w_bits=4, a_bits=8))
    ditq.save(model, "w4a8.safetensors")
    images, labels = ditq.sample(model, num_samples=8, sampler="ddim", steps=50)
    ditq.evaluate("samples.npz", "reference.npz")          # ADM metrics

Subpackages:
    formats    every checkpoint format, and the loader/saver that dispatches among them
    models     the DiT family (state-dict names of the originals), registry, VAE: the math only
    quant      Q-DiT PTQ (RTN, GPTQ, search) and TerDiT ternary QAT as quantize_ configs
    kernels    integer ops: references, C++ CPU and Triton implementations
    diffusion  Gaussian diffusion as DiT uses it: schedules, respacing, samplers
    data       synthetic shapes, (Fashion-)MNIST idx files, image folders
    train      the training loop, EMA, resumable sampler and checkpoints
    distributed  torchrun process groups, DDP / FSDP2 (training and sampling use it)
    eval       ADM-compatible Inception features, FID, sFID, IS, Precision, Recall
    pipelines  whole workflows with reports (sample, ptq, train, demo), callable from Python
    cli        the ``ditq`` command line (a thin layer over ``pipelines`` and the doors)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from ditq.errors import DitqError  # noqa: E402

# name -> module it lives in; resolved on first access (PEP 562).
_DOORS = {
    "load": "ditq.formats",
    "save": "ditq.formats",
    "describe": "ditq.formats",
    "quantize_": "ditq.quant",
    "QDiTConfig": "ditq.quant",
    "GPTQConfig": "ditq.quant",
    "TernaryQATConfig": "ditq.quant",
    "sample": "ditq.pipelines.sample",
    "evaluate": "ditq.eval",
}

__all__ = ["DitqError", "__version__", *_DOORS]


def __getattr__(name: str) -> Any:
    module = _DOORS.get(name)
    if module is None:
        raise AttributeError(f"module 'ditq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_DOORS))
