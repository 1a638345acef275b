"""Whole workflows, callable from Python; the CLI is a thin layer over these.

- :mod:`ditq.pipelines.sample`: class-conditional sampling to uint8 images; sharded,
  resumable, multi-rank ``.npz`` batches (``sample_to_npz``).
- :mod:`ditq.pipelines.ptq`: ``ditq ptq``, Q-DiT post-training quantization: calibration
  recording, RTN/GPTQ, the granularity search, and its report.
- :mod:`ditq.pipelines.ladder`: the Q-DiT ablation ladder on identical samples.
- :mod:`ditq.pipelines.qat`: ``ditq export``, TerDiT ternary runs to packed 2-bit checkpoints
  (``export_ternary``).
- :mod:`ditq.pipelines.deploy`: deployed checkpoints side by side (size, memory, step latency).
- :mod:`ditq.pipelines.train`: ``ditq train`` (from scratch, fine-tuning, data-free distillation,
  ternary QAT).
- :mod:`ditq.pipelines.demo`: ``ditq demo``, the embedded first-contact run.
"""

from ditq.pipelines.demo import find_embedded_model, run_demo
from ditq.pipelines.ptq import run_ptq
from ditq.pipelines.qat import export_ternary
from ditq.pipelines.sample import sample, sample_to_npz

__all__ = [
    "export_ternary",
    "find_embedded_model",
    "run_demo",
    "run_ptq",
    "sample",
    "sample_to_npz",
]
