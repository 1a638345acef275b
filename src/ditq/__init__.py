"""ditq: Diffusion Transformers made small and fast.

Subpackages:
    models     the DiT family (state-dict names of the originals), loading, VAE
    diffusion  Gaussian diffusion as DiT uses it: schedules, respacing, samplers
    cli        the ``ditq`` command line (a thin layer over ``pipelines``)
"""

__version__ = "0.1.0"

from ditq.errors import DitqError  # noqa: E402

__all__ = ["DitqError", "__version__"]
