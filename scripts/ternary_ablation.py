"""TerDiT ternary ablation on the embedded benchmark: train each variant, score it, write the table.

Every variant is the embedded model's architecture (DiT depth 6, hidden 128,
patch 4: ``ditq-fmnist``) trained by ``ditq train`` on Fashion-MNIST with the
same budget (``--steps`` x ``--batch-size``; the full-precision row is trained
from scratch with that budget too, so the ratio to it is like for like):

    fp                 full precision, from scratch (configs/fmnist_tiny.yaml)
    fp_shipped         the shipped ditq-fmnist itself (evaluated only: 5,000 steps x 128 of training)
    ternary            TerDiT recipe (configs/fmnist_ternary.yaml): learnable α with ditq's least-squares
                       init, adaLN RMSNorm, weight-only ternary, from scratch
    no_adaln_norm      ternary without the adaLN RMSNorm
    alpha_normal_init  ternary with the original's α ~ N(0, 1) init
    bitnet_gamma       ternary with BitNet's γ = mean|W| as the scale (no learned α)
    w158a8             ternary weights and int8 per-token activations (W1.58A8)
    finetune           ternary fine-tuned from the shipped full-precision model (lower LR)
    distill            data-free: the shipped model teaches a ternary copy of itself
                       (configs/fmnist_ternary_distill.yaml; no dataset read)

``finetune`` and ``distill`` start from ``ditq-fmnist`` (5,000 steps x 128 of its own training).

Scores per variant: FID-FMNIST and class accuracy of ``--samples`` balanced DDIM-``--sample-steps``
samples (no guidance, seed 0, the same labels and noise for all), ``final_loss`` (the training
objective, mean of the last 100 logged steps; for ``distill`` that is the distillation MSE, not a
diffusion loss), ``test_loss`` (the hybrid diffusion loss on 2,000 Fashion-MNIST *test* images with
fixed timesteps and noise: comparable across all rows), ``checkpoint_bytes`` (``model.safetensors``).

Runs resume (``ditq train --resume``) and finished phases are skipped, so the script can be stopped and
started again; two processes with disjoint ``--variants`` share the machine's cores::

    python scripts/ternary_ablation.py --variants fp,no_adaln_norm,alpha_normal_init,bitnet_gamma,fp_shipped &
    python scripts/ternary_ablation.py --variants ternary,distill,finetune,w158a8 &
    wait; python scripts/ternary_ablation.py --report   # docs/results/ternary_ablation.json, PNG, table

``ternary_full`` (the acceptance run: the TerDiT recipe at the shipped float model's budget, 5,000 x 128)
has its own budget; on this 2-core CPU it takes about an hour with both cores::

    python scripts/ternary_ablation.py --variants ternary_full --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from _machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]

VARIANTS: dict[str, dict] = {
    "fp": {"config": "configs/fmnist_tiny.yaml", "label": "full precision, from scratch"},
    "fp_shipped": {
        "model": "ditq-fmnist",
        "reference": "fp_shipped",
        "label": "full precision, the shipped ditq-fmnist (5,000 x 128; teacher of finetune/distill)",
    },
    "ternary": {
        "config": "configs/fmnist_ternary.yaml",
        "label": "ternary, TerDiT recipe (α lsq init, adaLN RMSNorm, weight-only), from scratch",
    },
    "no_adaln_norm": {
        "config": "configs/fmnist_ternary.yaml",
        "set": ["quant.adaln_norm=false"],
        "label": "ternary without adaLN RMSNorm",
    },
    "alpha_normal_init": {
        "config": "configs/fmnist_ternary.yaml",
        "set": ["quant.alpha_init=normal"],
        "label": "ternary, α ~ N(0, 1) init (original)",
    },
    "bitnet_gamma": {
        "config": "configs/fmnist_ternary.yaml",
        "set": ["quant.scale=gamma"],
        "label": "ternary, BitNet γ = mean|W| scale",
    },
    "w158a8": {
        "config": "configs/fmnist_ternary.yaml",
        "set": ["quant.act_bits=8"],
        "label": "ternary W1.58A8 (int8 per-token activations)",
    },
    "finetune": {
        "config": "configs/fmnist_ternary.yaml",
        "flags": ["--init", "ditq-fmnist", "--lr", "5e-4"],
        "reference": "fp_shipped",
        "set": ["optim.warmup_steps=100"],
        "label": "ternary, fine-tuned from ditq-fmnist",
    },
    "distill": {
        "config": "configs/fmnist_ternary_distill.yaml",
        "set": ["data.pool_size=512"],
        "reference": "fp_shipped",
        "label": "ternary, data-free distillation from ditq-fmnist",
    },
    "ternary_full": {
        "config": "configs/fmnist_ternary.yaml",
        "budget": {"steps": 5000, "batch_size": 128, "ema_decay": 0.999, "log_every": 50},
        "reference": "fp_shipped",
        "label": "ternary, TerDiT recipe from scratch at the float model's budget (5,000 x 128, EMA 0.999)",
    },
}
"""Variants with a ``budget`` train with it instead of the shared ``--steps``/``--batch-size``/...:
``ternary_full`` is the acceptance run, compared with the shipped float model trained on that budget."""

TEST_IMAGES = 2000


def _run_dir(out: Path, name: str) -> Path:
    return out / name


def _budget(name: str, args) -> dict:
    """steps, batch_size, ema_decay, log_every of a variant: its own ``budget`` or the shared one."""
    shared = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "ema_decay": args.ema_decay,
        "log_every": args.log_every,
    }
    return {**shared, **VARIANTS[name].get("budget", {})}


def train_command(name: str, args) -> list[str]:
    """The ``ditq train`` argv of one variant under its budget."""
    v, budget = VARIANTS[name], _budget(name, args)
    cmd = [sys.executable, "-m", "ditq.cli.main", "train", "--config", v["config"]]
    cmd += [
        "--out",
        str(_run_dir(args.out, name)),
        "--steps",
        str(budget["steps"]),
        "--batch-size",
        str(budget["batch_size"]),
    ]
    cmd += ["--seed", "0", *v.get("flags", [])]
    common = [
        f"optim.ema_decay={budget['ema_decay']}",
        f"optim.log_every={budget['log_every']}",
        f"checkpoint.every={args.checkpoint_every}",
        "checkpoint.keep_last=1",
        "device=cpu",
    ]
    for item in common + v.get("set", []):
        cmd += ["--set", item]
    return cmd


def train(name: str, args) -> None:
    run = _run_dir(args.out, name)
    if "model" in VARIANTS[name]:
        return  # evaluated only
    if (run / "model.safetensors").exists() and (run / "train_done.json").exists():
        print(f"[{name}] trained already", flush=True)
        return
    cmd = train_command(name, args)
    if (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()):
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    print(f"[{name}] {shlex.join(cmd)}", flush=True)
    run.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(run / "stdout.log", "a") as log:
        rc = subprocess.call([*cmd, "--quiet"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"[{name}] ditq train failed (exit {rc}); see {run / 'stdout.log'}")
    seconds = time.perf_counter() - t0
    shown = shlex.join(["ditq", *(c for c in cmd[3:] if c != "--resume")]).replace(str(ROOT) + "/", "")
    (run / "train_done.json").write_text(
        json.dumps({"command": shown, "seconds_this_call": round(seconds, 1)})
    )


def _log_rows(run: Path) -> list[dict]:
    rows = []
    for line in (run / "log.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in row and "step" in row:
            rows.append(row)
    return rows


def _test_batch(device):
    import torch

    from ditq.data.idx import load_idx_dataset

    x, y = load_idx_dataset(args_data_root(), split="test", image_size=32)
    x, y = torch.as_tensor(x[:TEST_IMAGES]), torch.as_tensor(y[:TEST_IMAGES])
    g = torch.Generator().manual_seed(1234)
    t = torch.randint(0, 1000, (len(x),), generator=g)
    noise = torch.randn(x.shape, generator=g)
    return x.to(device), y.to(device), t.to(device), noise.to(device)


def args_data_root() -> str:
    return os.environ.get("DITQ_FMNIST", "/usr/share/datasets/fashion-mnist")


def test_loss(model, device) -> float:
    """Mean hybrid diffusion loss on the fixed test images, timesteps and noise."""
    import torch

    from ditq.diffusion import create_diffusion

    diffusion = create_diffusion("")
    x, y, t, noise = _test_batch(device)
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), 250):
            sl = slice(i, i + 250)
            out = diffusion.training_losses(model, x[sl], t[sl], model_kwargs={"y": y[sl]}, noise=noise[sl])
            total += float(out["loss"].sum())
    return total / len(x)


def _score(model, args, device) -> dict:
    """FID-FMNIST and class accuracy of ``--samples`` balanced DDIM samples (no guidance, seed 0), and
    the test loss: the scores of every row (``eval_seconds``: sampling and scoring, test loss apart)."""
    from ditq.eval.fmnist import load_fmnist_evaluator
    from ditq.pipelines.ptq import EvalSpec, draw_samples

    spec = EvalSpec(num_samples=args.samples, steps=args.sample_steps, cfg_scale=1.0, batch_size=250, seed=0)
    t0 = time.perf_counter()
    images, labels = draw_samples(model, spec)
    scores = load_fmnist_evaluator(device=device).evaluate(images, labels)
    seconds = time.perf_counter() - t0
    return {
        "fid": round(float(scores["fid_fmnist"]), 4),
        "class_acc": round(float(scores["class_acc"]), 4),
        "test_loss": round(test_loss(model, device), 5),
        "eval_seconds": round(seconds, 1),
    }


def evaluate(name: str, args) -> dict:
    import torch

    import ditq

    run = _run_dir(args.out, name)
    result_path = run / "ablation_eval.json"
    if result_path.exists():
        print(f"[{name}] evaluated already", flush=True)
        return json.loads(result_path.read_text())
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    if "model" in VARIANTS[name]:
        from ditq.formats import embedded_model_path

        path = embedded_model_path(VARIANTS[name]["model"])
        run.mkdir(parents=True, exist_ok=True)
    else:
        path = run / "model.safetensors"
    model = ditq.load(path, device=device).eval()
    scores = _score(model, args, device)
    rows = _log_rows(run) if (run / "log.jsonl").exists() else []
    tail = [r["loss"] for r in rows if r["step"] > rows[-1]["step"] - 100] if rows else []
    done_file = run / "train_done.json"
    done = json.loads(done_file.read_text()) if done_file.exists() else {"command": None}
    result = {
        "variant": name,
        "label": VARIANTS[name]["label"],
        "fid": scores["fid"],
        "class_acc": scores["class_acc"],
        "final_loss": round(sum(tail) / len(tail), 5) if tail else None,
        "test_loss": scores["test_loss"],
        "train_steps": rows[-1]["step"] if rows else (5000 if name == "fp_shipped" else None),
        "batch_size": _budget(name, args)["batch_size"] if rows else 128,
        "checkpoint_bytes": path.stat().st_size,
        "train_seconds": round(rows[-1].get("elapsed_s", 0.0), 1) if rows else None,
        "command": (done["command"] or "").replace(" --resume", "") or None,
        "samples": args.samples,
        "sample_steps": args.sample_steps,
        "eval_seconds": scores["eval_seconds"],
    }
    result_path.write_text(json.dumps(result, indent=2))
    print(
        f"[{name}] FID-FMNIST {result['fid']:.3f}, class acc {result['class_acc']:.3f}, "
        f"test loss {result['test_loss']:.4f}, {result['checkpoint_bytes']:,} bytes",
        flush=True,
    )
    return result


def evaluate_online(name: str, args, result: dict) -> dict:
    """Add ``fid_online``, ``class_acc_online``, ``test_loss_online``: the same scores for the raw
    (non-EMA) weights of the last training state, ternarized as the export would (ternary rows only).

    Why: the EMA of *latent* weights is not an average of ternary models; ternarizing it flips weights
    that hover near a threshold, and at this budget that costs more than the averaging gains.
    """
    import torch

    from ditq.pipelines.qat import qat_model_from_state
    from ditq.train.checkpoint import load_state

    run = _run_dir(args.out, name)
    states = sorted((run / "checkpoints").glob("step_*.pt")) if (run / "checkpoints").is_dir() else []
    if "fid_online" in result or not states:
        return result
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    state = load_state(states[-1])
    if not isinstance(state.get("config", {}).get("quant_config"), dict):
        return result  # a full-precision run: its EMA is what it ships
    model = qat_model_from_state(state, weights="model").eval()
    scores = _score(model, args, device)
    result.update({f"{key}_online": scores[key] for key in ("fid", "class_acc", "test_loss")})
    result["online_state"] = states[-1].name
    (run / "ablation_eval.json").write_text(json.dumps(result, indent=2))
    fid, acc, loss = result["fid_online"], result["class_acc_online"], result["test_loss_online"]
    print(
        f"[{name}] online weights: FID-FMNIST {fid:.3f}, class acc {acc:.3f}, test loss {loss:.4f}",
        flush=True,
    )
    return result


def plot_curves(names: list[str], args, path: Path) -> None:
    """Training loss vs step per variant (running mean of 4 log points); distillation on its own axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(values):
        return [
            sum(values[max(0, i - 3) : i + 1]) / len(values[max(0, i - 3) : i + 1])
            for i in range(len(values))
        ]

    full = [n for n in names if "budget" in VARIANTS[n]]
    fig, axes = plt.subplots(
        1,
        3 if full else 2,
        figsize=(17 if full else 12, 4.5),
        gridspec_kw={"width_ratios": [2, 1, 2][: 3 if full else 2]},
    )
    for name in names:
        if "model" in VARIANTS[name]:
            continue
        rows = _log_rows(_run_dir(args.out, name))
        steps, loss = [r["step"] for r in rows], [r["loss"] for r in rows]
        ax = axes[2] if name in full else axes[1] if name == "distill" else axes[0]
        ax.plot(steps, smooth(loss), label=name, linewidth=1.4, linestyle="--" if name == "fp" else "-")
    axes[0].set_title(f"from-data variants, {args.steps} x {args.batch_size} (hybrid diffusion loss)")
    axes[1].set_title("data-free distillation loss (MSE to the teacher)")
    if full:
        axes[2].set_title("the float model's budget, 5,000 x 128 (hybrid diffusion loss)")
        if args.fp_log and args.fp_log.exists():  # the shipped float model's own training log
            rows = [json.loads(line) for line in args.fp_log.read_text().splitlines() if '"loss"' in line]
            steps, loss = [r["step"] for r in rows], [r["loss"] for r in rows]
            axes[2].plot(steps, smooth(loss), label="fp_shipped", linewidth=1.4, linestyle="--")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        "TerDiT ablation on Fashion-MNIST (training loss, running mean of 4 log points)", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def _torch_version() -> str:
    import torch

    return torch.__version__


def report(args) -> None:
    names = [n for n in VARIANTS if (_run_dir(args.out, n) / "ablation_eval.json").exists()]
    rows = [json.loads((_run_dir(args.out, n) / "ablation_eval.json").read_text()) for n in names]
    for r in rows:  # runs resumed by an interrupted queue recorded their --resume
        r["command"] = r["command"].replace(" --resume", "") if r.get("command") else None
    by_name = {r["variant"]: r for r in rows}
    for r in rows:  # rows that start from ditq-fmnist compare with it, the others with fp (same budget)
        ref = by_name.get(VARIANTS[r["variant"]].get("reference", "fp"))
        r["reference"] = ref["variant"] if ref else None
        r["fid_vs_reference"] = round(r["fid"] / ref["fid"], 3) if ref else None
        if "fid_online" in r:
            r["fid_online_vs_reference"] = round(r["fid_online"] / ref["fid"], 3) if ref else None
    meta = {
        "description": "TerDiT ternary ablation on the embedded Fashion-MNIST benchmark",
        "budget": f"{args.steps} steps x {args.batch_size} images, EMA {args.ema_decay}, 1 thread per run "
        "(ternary_full: 5,000 x 128, EMA 0.999, 2 threads)",
        "eval": f"{args.samples} balanced samples, DDIM-{args.sample_steps}, no guidance, seed 0; "
        f"FID-FMNIST vs the Fashion-MNIST test set; test_loss on {TEST_IMAGES} test images",
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, torch {_torch_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "commands": [  # how the rows were made: two queues side by side, then the report
            "python scripts/ternary_ablation.py"
            " --variants fp,no_adaln_norm,alpha_normal_init,bitnet_gamma,fp_shipped",
            "python scripts/ternary_ablation.py --variants ternary,distill,finetune,w158a8",
            "python scripts/ternary_ablation.py --variants ternary_full --threads 2",
            "python scripts/ternary_ablation.py --report",
        ],
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.json}")
    if args.plot:
        plot_curves(names, args, args.plot)
    print(
        "\n| variant | FID-FMNIST (EMA) | x reference | class acc | FID online weights | x reference "
        "| class acc | final loss | test loss EMA / online | checkpoint bytes |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        ratio = "-" if r["fid_vs_reference"] is None else f"{r['fid_vs_reference']:.2f} ({r['reference']})"
        final = "-" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
        online = ("-", "-", "-")
        if "fid_online" in r:
            online = (
                f"{r['fid_online']:.2f}",
                f"{r['fid_online_vs_reference']:.2f}",
                f"{r['class_acc_online']:.3f}",
            )
        tests = f"{r['test_loss']:.4f}" + (
            f" / {r['test_loss_online']:.4f}" if "test_loss_online" in r else ""
        )
        print(f"| {r['variant']} | {r['fid']:.2f} | {ratio} | {r['class_acc']:.3f} | {' | '.join(online)} | "
              f"{final} | {tests} | {r['checkpoint_bytes']:,} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated (default: all)")
    p.add_argument("--out", type=Path, default=ROOT / "out/ternary_ablation")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--report", action="store_true", help="only gather finished variants into the JSON/PNG/table"
    )
    p.add_argument("--json", type=Path, default=ROOT / "docs/results/ternary_ablation.json")
    p.add_argument("--plot", type=Path, default=ROOT / "docs/ternary_ablation_loss.png")
    p.add_argument(
        "--fp-log",
        type=Path,
        default=ROOT / "out/fmnist/train_log.jsonl",
        help="the shipped float model's training log, plotted beside ternary_full when present",
    )
    args = p.parse_args(argv)
    if not args.report:
        names = [n.strip() for n in args.variants.split(",") if n.strip()]
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
        for name in names:
            train(name, args)
            evaluate_online(name, args, evaluate(name, args))
    report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
