"""ditq: Diffusion Transformers made small and fast.

Subpackages:
    models     the DiT family (state-dict names of the originals), loading, VAE
    diffusion  Gaussian diffusion as DiT uses it: schedules, respacing, samplers
    data       synthetic shapes, (Fashion-)MNIST idx files, image folders
    train      the training loop, EMA, resumable sampler and checkpoints
    distributed  torchrun process groups, DDP / FSDP2 (training and sampling use it)
    eval       ADM-compatible Inception features, FID, sFID, IS, Precision, Recall
    pipelines  whole workflows (sample, train, demo), callable from Python
    cli        the ``ditq`` command line (a thin layer over ``pipelines``)
"""

__version__ = "0.1.0"

from ditq.errors import DitqError  # noqa: E402

__all__ = ["DitqError", "__version__"]
