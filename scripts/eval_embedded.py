"""Evaluate the embedded model ``ditq-fmnist`` with FID-FMNIST; write ``docs/results/embedded_eval.json``.

Run from the repository root (20 minutes on 2 busy CPU cores, the JSON's ``command``):
    .venv/bin/python scripts/eval_embedded.py --threads 1 --batch-size 200

Draws ``--samples`` images (classes in turn, so balanced) with DDIM-``--steps``
at each ``--cfg-scales`` (the first is the headline row: 3.0, the demo's
default; then 1.0, no guidance), all from ``--seed``, and scores each set with
the shipped FID-FMNIST classifier (``ditq.eval.fmnist``): FID-FMNIST against
the Fashion-MNIST test statistics, and the class accuracy of the samples.
The floor is the FID-FMNIST of real training images against the same
statistics (from the classifier file). The JSON's top level is the headline
row; ``rows`` holds every row. It is rewritten after each row.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch
from _machine import cpu_name

import ditq
from ditq.checkpoint import atomic_write
from ditq.eval.fmnist import load_fmnist_evaluator
from ditq.pipelines.sample import sample


def machine(device: torch.device) -> str:
    """The hardware the numbers were measured on, in words."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads"


def _write(path: Path, result: dict) -> None:
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ditq-fmnist", help="embedded name or checkpoint (default ditq-fmnist)")
    p.add_argument("--classifier", default=None, help="FID-FMNIST classifier file (default: the shipped one)")
    p.add_argument("--samples", type=int, default=1000, help="images per row, classes in turn (default 1000)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--cfg-scales", default="3.0,1.0", help="guidance scales, one row each (default 3.0,1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=100, help="images per sampling batch (default 100)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--out", default="docs/results/embedded_eval.json", help="the JSON to write")
    p.add_argument("--save-samples", default=None, metavar="DIR", help="also write each row's .npz into DIR")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scales = [float(s) for s in args.cfg_scales.split(",") if s.strip()]
    device = torch.device(args.device)
    command = "python scripts/eval_embedded.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()

    model = ditq.load(args.model, device=device)
    evaluator = load_fmnist_evaluator(args.classifier, device=device)
    meta = evaluator.metadata
    num_classes = model.config.num_classes
    result: dict = {}
    rows: list[dict] = []
    for scale in scales:
        t0 = time.perf_counter()
        images, labels = sample(
            model,
            num_samples=args.samples,
            batch_size=args.batch_size,
            sampler="ddim",
            steps=args.steps,
            cfg_scale=scale,
            class_labels=list(range(num_classes)),
            seed=args.seed,
            device=device,
            progress=sys.stderr.isatty(),
        )
        t1 = time.perf_counter()
        scores = evaluator.evaluate(images, labels)
        t2 = time.perf_counter()
        if args.save_samples:
            from ditq.images import save_npz

            save_npz(Path(args.save_samples) / f"ddim{args.steps}_cfg{scale:g}.npz", images, labels)
        row = {
            "fid_fmnist": scores["fid_fmnist"],
            "class_acc": scores["class_acc"],
            "floor_fid_fmnist": scores["floor_fid_fmnist"],
            "floor_num_images": scores["floor_num_images"],
            "floor_fid_fmnist_at_n": scores["floor_fid_fmnist_at_n"],
            "samples": len(images),
            "steps": args.steps,
            "sampler": "ddim",
            "cfg_scale": scale,
            "seed": args.seed,
            "class_acc_per_class": scores["class_acc_per_class"],
            "sample_seconds": round(t1 - t0, 1),
            "sample_images_per_second": round(len(images) / (t1 - t0), 3),
            "eval_seconds": round(t2 - t1, 2),
        }
        rows.append(row)
        print(
            f"cfg {scale:g}: FID-FMNIST {row['fid_fmnist']:.3f}, class accuracy {row['class_acc']:.4f} "
            f"on {len(images)} samples (DDIM-{args.steps}); sampled in {t1 - t0:.0f} s, scored in "
            f"{t2 - t1:.1f} s",
            flush=True,
        )
        result = {
            **rows[0],
            "model": str(args.model),
            "classifier": {
                "file": str(evaluator.path.name if evaluator.path else None),
                "test_accuracy": meta.get("test_accuracy"),
                "command": meta.get("command"),
            },
            "metric": "FID-FMNIST: Frechet distance of the classifier's 128-d penultimate features "
            "(samples vs the Fashion-MNIST test set); class_acc: share of samples classified as their label",
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine(device),
            "torch": torch.__version__,
            "command": command,
            "wall_seconds": round(time.perf_counter() - started, 1),
            "rows": rows,
        }
        _write(Path(args.out), result)
    print(f"wrote {args.out} in {result['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
