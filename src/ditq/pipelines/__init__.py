"""Whole workflows, callable from Python; the CLI is a thin layer over these.

- :mod:`ditq.pipelines.sample`: class-conditional sampling to uint8 images.
- :mod:`ditq.pipelines.demo`: ``ditq demo``, the embedded first-contact run.
"""

from ditq.pipelines.demo import find_embedded_model, run_demo
from ditq.pipelines.sample import sample

__all__ = ["find_embedded_model", "run_demo", "sample"]
