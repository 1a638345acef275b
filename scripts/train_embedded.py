"""Train the embedded default model ``ditq-fmnist``: a small DiT on Fashion-MNIST (32x32, 1 channel).

Usage (GPU recommended; on 2 CPU cores expect hours):
    python scripts/train_embedded.py --data /usr/share/datasets/fashion-mnist --out out/fmnist \
        --time-budget 420 --device cuda

Writes the EMA weights (fp16) as a ditq safetensors checkpoint with the config, the
command and the training record in its metadata; a labelled sample grid; and a
quality report: the accuracy of a Fashion-MNIST classifier (trained here on the
real training set) on class-conditional samples, next to its accuracy on the real
test set.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ditq.checkpoint import save_checkpoint
from ditq.data import FASHION_MNIST_CLASSES, load_idx_dataset
from ditq.diffusion import ClassifierFreeGuidance, create_diffusion, sample_loop
from ditq.models import DiT, DiTConfig
from ditq.train.checkpoint import SingleFileState
from ditq.train.loop import TrainConfig, fit

MODEL = DiTConfig(
    depth=6, hidden_size=192, num_heads=6, patch_size=2, input_size=32, in_channels=1, num_classes=10
)


class SmallClassifier(nn.Module):
    """A 3-conv classifier (~92% on Fashion-MNIST test) used only to judge samples."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(128 * 8 * 8, 256),
            nn.ReLU(),
            nn.Linear(256, 10),
        )

    def forward(self, x):
        return self.net(x)


def train_classifier(x, y, device, epochs=4, seed=0):
    torch.manual_seed(seed)
    clf = SmallClassifier().to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    x, y = x.to(device), y.to(device)
    for _ in range(epochs):
        perm = torch.randperm(len(x), device=device)
        for i in range(0, len(x), 256):
            idx = perm[i : i + 256]
            loss = F.cross_entropy(clf(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return clf.eval()


@torch.no_grad()
def accuracy(clf, x, y, device):
    preds = torch.cat([clf(x[i : i + 1000].to(device)).argmax(1).cpu() for i in range(0, len(x), 1000)])
    per_class = [(preds[y == c] == c).float().mean().item() for c in range(10)]
    return (preds == y).float().mean().item(), per_class


@torch.no_grad()
def generate(model, labels, cfg_scale, steps, device, seed):
    diffusion = create_diffusion(f"ddim{steps}")
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for i in range(0, len(labels), 500):
        y = labels[i : i + 500].to(device)
        n = len(y)
        if cfg_scale > 1:
            fn = ClassifierFreeGuidance(model, cfg_scale, guided_channels=None)
            noise = torch.randn(n, 1, 32, 32, device=device, generator=gen)
            s = sample_loop(
                diffusion,
                fn,
                (2 * n, 1, 32, 32),
                sampler="ddim",
                noise=torch.cat([noise, noise]),
                model_kwargs={"y": torch.cat([y, torch.full_like(y, 10)])},
                generator=gen,
            )[:n]
        else:
            s = sample_loop(
                diffusion,
                model,
                (n, 1, 32, 32),
                sampler="ddim",
                model_kwargs={"y": y},
                generator=gen,
                device=device,
            )
        out.append(s.clamp(-1, 1).cpu())
    return torch.cat(out)


def save_grid(images, path, nrow):
    from PIL import Image

    imgs = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)[:, 0]  # (N, 32, 32)
    n = len(imgs)
    rows = (n + nrow - 1) // nrow
    canvas = torch.zeros(rows * 34, nrow * 34, dtype=torch.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, nrow)
        canvas[r * 34 + 1 : r * 34 + 33, c * 34 + 1 : c * 34 + 33] = im
    Image.fromarray(canvas.numpy()).resize((nrow * 34 * 3, rows * 34 * 3), Image.NEAREST).save(path)


def _train(model_config, x, y, cfg, device, out, save_every):
    """Train (resuming from OUT/train_state.pt if present); return the EMA model and wall seconds."""
    t0 = time.time()
    result = fit(
        DiT(model_config),
        (x, y),
        cfg,
        device=device,
        store=SingleFileState(out / "train_state.pt"),
        save_every=save_every,
        resume=True,
        log_path=out / "train_log.jsonl",
        on_log=lambda r: print(json.dumps(r), flush=True),
    )
    return result.ema, time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--out", default="out/fmnist")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=0, help="0 = as many as fit in --time-budget")
    p.add_argument("--time-budget", type=float, default=420.0, help="seconds of training when --steps is 0")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--ema-decay", type=float, default=0.9995)
    p.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--save-every", type=int, default=500, help="training-state checkpoint period (resumable)")
    p.add_argument("--eval-per-class", type=int, default=100)
    p.add_argument("--classifier-epochs", type=int, default=4)
    p.add_argument(
        "--export-from-state",
        action="store_true",
        help="skip training: export and evaluate the EMA of OUT/train_state.pt (a stopped run)",
    )
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    MODEL = DiTConfig(
        depth=args.depth,
        hidden_size=args.hidden,
        num_heads=args.heads,
        patch_size=args.patch,
        input_size=32,
        in_channels=1,
        num_classes=10,
    )
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    x, y = load_idx_dataset(args.data, "train")
    xt, yt = load_idx_dataset(args.data, "test")
    print(f"data: {len(x)} train, {len(xt)} test", flush=True)

    base = dict(
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup,
        decay_at=0.8,
        decay_factor=0.1,
        ema_decay=args.ema_decay,
        grad_clip=1.0,
        precision=args.precision,
        compile=args.compile,
        log_every=250,
        seed=args.seed,
    )
    steps = args.steps
    if args.export_from_state:
        state = torch.load(out / "train_state.pt", map_location="cpu", weights_only=True)
        ema = DiT(MODEL)
        ema.load_state_dict(state["ema"])
        ema.eval()
        steps = int(state["step"])
        logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        wall = max(r["elapsed_s"] for r in logged if r["step"] <= steps)
        print(f"exporting the EMA of {out / 'train_state.pt'} at step {steps}", flush=True)
    elif steps <= 0:  # time a short probe run (compile included), then size the real run to the budget
        probe = TrainConfig(steps=300, **{**base, "log_every": 100})
        rec = fit(DiT(MODEL), (x, y), probe, device=device).records
        per_step = (rec[-1]["elapsed_s"] - rec[0]["elapsed_s"]) / (rec[-1]["step"] - rec[0]["step"])
        steps = int(args.time_budget / per_step) // 500 * 500
        print(
            f"probe: {per_step * 1000:.1f} ms/step -> {steps} steps in {args.time_budget:.0f} s", flush=True
        )
    if not args.export_from_state:
        ema, wall = _train(MODEL, x, y, TrainConfig(steps=steps, **base), device, out, args.save_every)

    command = "python scripts/train_embedded.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    tensors = {k: v.detach().to(torch.float16).cpu() for k, v in ema.state_dict().items()}

    def save(report):
        save_checkpoint(
            out / "ditq-fmnist.safetensors",
            tensors,
            {
                "model_config": MODEL.to_dict(),
                "command": command,
                "name": "ditq-fmnist",
                "data": "Fashion-MNIST train (60k), 28x28 padded to 32x32, pixels in [-1, 1]",
                "class_names": list(FASHION_MNIST_CLASSES),
                "train_config": {**base, "steps": steps},
                "weights": "EMA, stored as float16",
                "report": report,
            },
        )

    report = {
        "train_steps": steps,
        "planned_steps": args.steps,
        "train_wall_s": wall,
        "train_images_seen": steps * args.batch_size,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    save(report)  # keep the weights even if evaluation fails
    clf = train_classifier(x, y, device, epochs=args.classifier_epochs)
    real_acc, _ = accuracy(clf, xt, yt, device)
    labels = torch.arange(10).repeat_interleave(args.eval_per_class)
    report.update(classifier_test_accuracy=real_acc, samples={})
    for scale in (1.0, 2.0, 4.0):
        s = generate(ema, labels, scale, 50, device, seed=1)
        acc, per_class = accuracy(clf, s, labels, device)
        report["samples"][f"ddim50_cfg{scale:g}"] = {"accuracy": acc, "per_class": per_class}
        print(f"cfg {scale}: sample class accuracy {acc:.3f}", flush=True)
        if scale == 4.0:
            grid_labels = torch.arange(10).repeat(8)
            save_grid(generate(ema, grid_labels, scale, 50, device, seed=2), out / "grid_cfg4.png", nrow=10)
        if scale == 1.0:
            save_grid(
                s.view(10, args.eval_per_class, 1, 32, 32)[:, :8].transpose(0, 1).reshape(-1, 1, 32, 32),
                out / "grid_cfg1.png",
                nrow=10,
            )

    save(report)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
