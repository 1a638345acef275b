"""Quick class accuracy of ditq-fmnist samples (final weights vs the run's EMA) by a small classifier.

Run from the repository root after scripts/train_embedded.py has written out/fmnist/train_state.pt:
    .venv/bin/python scripts/eval_embedded_quick.py [--out result.json]
A stop-gap until the small-domain evaluator (FID-FMNIST) lands in ditq.eval.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_embedded import accuracy, generate, train_classifier  # noqa: E402

import ditq
from ditq.data import load_idx_dataset  # noqa: E402
from ditq.models import DiT  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--state", default="out/fmnist/train_state.pt")
    p.add_argument("--per-class", type=int, default=30)
    p.add_argument("--out", default="out/fmnist/quick_eval.json")
    args = p.parse_args()
    torch.manual_seed(0)
    x, y = load_idx_dataset(split="train")
    xt, yt = load_idx_dataset(split="test")
    clf = train_classifier(x, y, "cpu", epochs=1)
    real_acc, _ = accuracy(clf, xt, yt, "cpu")
    shipped = ditq.load("ditq-fmnist")
    ema = DiT(shipped.config)
    ema.load_state_dict(torch.load(args.state, weights_only=True)["ema"])
    ema.eval()
    labels = torch.arange(10).repeat_interleave(args.per_class)
    out = {
        "classifier": "SmallClassifier from scripts/train_embedded.py, 1 epoch",
        "classifier_test_accuracy": real_acc,
        "samples_per_class": args.per_class,
        "sampler": "DDIM-25",
        "rows": [],
    }
    for name, model in (("final weights (shipped)", shipped), ("EMA 0.9995", ema)):
        for scale in (1.0, 3.0):
            s = generate(model, labels, scale, 25, "cpu", seed=1)
            acc, per_class = accuracy(clf, s, labels, "cpu")
            out["rows"].append(
                {"weights": name, "cfg_scale": scale, "class_accuracy": acc, "per_class": per_class}
            )
            print(name, scale, acc, flush=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
