"""ADM-compatible evaluation in PyTorch: FID, sFID, Inception Score, Precision, Recall.

The numbers follow openai/guided-diffusion's ``evaluations/evaluator.py``
(TensorFlow) step by step, with the same Inception graph ported to PyTorch:

    from ditq.eval import evaluate
    result = evaluate("samples.npz", "VIRTUAL_imagenet256_labeled.npz")
    result["metrics"]   # {"fid": ..., "sfid": ..., "is": ..., "precision": ..., "recall": ...}

Modules:
    inception  the FID Inception-v3 (TF 2015-12-05 graph, pytorch-fid's weights)
    metrics    Fréchet distance, Inception Score, Precision/Recall on features
    npz        ADM sample and reference batches
    features   batched feature extraction
    evaluator  the whole workflow, :func:`evaluate` (``ditq eval``)
    fmnist     FID-FMNIST and class accuracy for 28-32 px grayscale models
               (:func:`evaluate_fmnist`, ``ditq eval --evaluator fmnist``)

``eval`` takes images, arrays and callables; it imports neither
``ditq.models`` nor ``ditq.quant``.
"""

from ditq.eval.evaluator import METRICS, evaluate, parse_metrics
from ditq.eval.fmnist import FMNISTClassifier, FMNISTEvaluator, evaluate_fmnist, load_fmnist_evaluator
from ditq.eval.inception import FIDInceptionV3, load_inception, resize_bilinear_tf1
from ditq.eval.metrics import feature_statistics, frechet_distance, inception_score, precision_recall
from ditq.eval.npz import read_reference, read_samples, write_reference

__all__ = [
    "METRICS",
    "FIDInceptionV3",
    "FMNISTClassifier",
    "FMNISTEvaluator",
    "evaluate",
    "evaluate_fmnist",
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "load_fmnist_evaluator",
    "load_inception",
    "parse_metrics",
    "precision_recall",
    "read_reference",
    "read_samples",
    "resize_bilinear_tf1",
    "write_reference",
]
