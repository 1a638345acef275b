"""FID-FMNIST: FID and class accuracy for 28-32 px grayscale models, where Inception means nothing.

The Inception-v3 of FID sees 299x299 colour photographs; a Fashion-MNIST
sample upscaled tenfold tells it little. FID-FMNIST swaps in a small CNN
trained by ditq on Fashion-MNIST (:class:`FMNISTClassifier`; its test accuracy
is in the shipped file's metadata and in docs/benchmarks.md): the Fréchet
distance is taken between its 128-d penultimate features of the samples and
of the Fashion-MNIST **test set**, whose statistics ship with the classifier;
its predictions give the **class accuracy** of class-conditional samples::

    from ditq.eval.fmnist import evaluate_fmnist
    evaluate_fmnist(images, labels)   # {"fid_fmnist": ..., "class_acc": ..., "num_images": ...}

Modules:

- :mod:`~ditq.eval.fmnist.classifier`: the CNN and its config.
- :mod:`~ditq.eval.fmnist.images`: the images and labels it takes (uint8, 32x32 or 28x28 padded).
- :mod:`~ditq.eval.fmnist.train`: training it, deterministically.
- :mod:`~ditq.eval.fmnist.evaluator`: the classifier with the reference statistics, its file,
  and the metric (:func:`evaluate_fmnist`).
- :mod:`~ditq.eval.fmnist.build`: making the shipped file (``ditq train-evaluator``).

FID-FMNIST numbers compare only with FID-FMNIST numbers made with the same
classifier file; they are not Inception FIDs.
"""

from ditq.eval.fmnist.build import (
    FLOOR_COUNTS,
    FMNISTBuildResult,
    build_fmnist_evaluator,
    classifier_accuracy,
)
from ditq.eval.fmnist.classifier import NUM_CLASSES, FMNISTClassifier, FMNISTClassifierConfig
from ditq.eval.fmnist.evaluator import (
    ASSET_NAME,
    FEATURE_KEY,
    FMNISTEvaluator,
    default_evaluator_path,
    evaluate_fmnist,
    load_fmnist_evaluator,
    save_fmnist_evaluator,
)
from ditq.eval.fmnist.images import IMAGE_SIZE, check_images, check_labels, to_model_input
from ditq.eval.fmnist.train import FMNISTTrainConfig, train_fmnist_classifier

__all__ = [
    "ASSET_NAME",
    "FEATURE_KEY",
    "FLOOR_COUNTS",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "FMNISTBuildResult",
    "FMNISTClassifier",
    "FMNISTClassifierConfig",
    "FMNISTEvaluator",
    "FMNISTTrainConfig",
    "build_fmnist_evaluator",
    "check_images",
    "check_labels",
    "classifier_accuracy",
    "default_evaluator_path",
    "evaluate_fmnist",
    "load_fmnist_evaluator",
    "save_fmnist_evaluator",
    "to_model_input",
    "train_fmnist_classifier",
]
