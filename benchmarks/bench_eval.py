"""How long does ADM-style evaluation take: the metrics on 50k x 10k features, and the Inception?

With random data (the cost does not depend on values):

* FID: statistics of ``--num-samples`` and ``--num-ref`` random 2048-d
  features (float64 mean and covariance) and the Fréchet distance (matrix
  square root of the 2048x2048 covariance product). sFID (2023-d) costs the same.
  When scipy is importable, ADM's ``scipy.linalg.sqrtm`` of the same product is
  timed beside ours, with the difference of the traces.
* Precision/Recall: ADM's manifold estimator with k=3 in blocks of 10,000 (radii
  of both sets, then the cross distances). Beside it, one 10,000 x 10,000 block of
  distances in emulated float16 (ours) and in plain float32, to show what the
  emulation costs.
* Inception Score of ``--num-samples`` x 1008 probabilities.
* Inception feature throughput (images/s) of the FID Inception with random
  weights on uint8 ``--image-size`` images at ``--inception-batch``, median of
  ``--repeats`` after one warm-up call.

    python benchmarks/bench_eval.py --json out/bench_eval_cpu.json
    python benchmarks/bench_eval.py --num-samples 5000 --num-ref 1000 --skip-inception   # quick
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from _common import format_table, load_average, machine_info, median, synchronizer, time_call, write_json

from ditq.eval import metrics as M
from ditq.eval.inception import FIDInceptionV3


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pool_like(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    # Inception pool_3 features are averages of ReLUs: non-negative, mean ~0.4.
    return rng.exponential(0.4, size=(n, d)).astype(np.float32)


def bench_fid(args, rng) -> dict:
    fake, real = pool_like(rng, args.num_samples, args.dim), pool_like(rng, args.num_ref, args.dim)
    t0 = time.perf_counter()
    mu1, s1 = M.feature_statistics(fake)
    mu2, s2 = M.feature_statistics(real)
    t1 = time.perf_counter()
    fid = M.frechet_distance(mu1, s1, mu2, s2)
    t2 = time.perf_counter()
    out = {"statistics_s": t1 - t0, "frechet_s": t2 - t1, "fid": fid}
    try:
        from scipy import linalg
    except ImportError:
        log("scipy not importable: no side-by-side sqrtm timing")
        return out
    t3 = time.perf_counter()
    covmean = linalg.sqrtm(s1 @ s2)
    t4 = time.perf_counter()
    adm = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))
    out.update({"scipy_sqrtm_s": t4 - t3, "fid_scipy": adm, "fid_abs_diff": abs(fid - adm)})
    return out


def bench_pr(args, rng, device) -> dict:
    fake, real = pool_like(rng, args.num_samples, args.dim), pool_like(rng, args.num_ref, args.dim)
    sync = synchronizer(device)
    n = min(10000, args.num_ref, args.num_samples)
    u = torch.from_numpy(real[:n]).to(device)
    v = torch.from_numpy(fake[:n]).to(device)
    emulated = median([time_call(lambda: M.pairwise_distances(u, v), sync) for _ in range(args.repeats)])
    plain = median([time_call(lambda: M._distances32(u, v), sync) for _ in range(args.repeats)])
    t0 = time.perf_counter()
    precision, recall = M.precision_recall(real, fake, device=device)
    sync()
    return {
        "precision_recall_s": time.perf_counter() - t0,
        "precision": precision,
        "recall": recall,
        "block": n,
        "block_fp16_emulated_s": emulated,
        "block_fp32_s": plain,
    }


def bench_is(args, rng) -> dict:
    logits = rng.normal(size=(args.num_samples, 1008)).astype(np.float32) * 3
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    t0 = time.perf_counter()
    score = M.inception_score(probs)
    return {"inception_score_s": time.perf_counter() - t0, "is": score}


def bench_inception(args, device) -> dict:
    torch.manual_seed(0)
    model = FIDInceptionV3().to(device)
    images = torch.randint(
        0, 256, (args.inception_batch, args.image_size, args.image_size, 3), dtype=torch.uint8
    )
    sync = synchronizer(device)
    with torch.inference_mode():
        model(images)  # warm-up
        times = [time_call(lambda: model(images), sync) for _ in range(args.repeats)]
    per_call = median(times)
    return {
        "batch": args.inception_batch,
        "image_size": args.image_size,
        "call_s": per_call,
        "images_per_s": args.inception_batch / per_call,
        "call_s_all": times,
    }


def render(results: dict) -> str:
    rows = []
    n, r, d = results["num_samples"], results["num_ref"], results["dim"]
    fid = results.get("fid")
    if fid:
        rows.append([f"FID statistics ({n} + {r} x {d}, float64)", f"{fid['statistics_s']:.2f} s", ""])
        rows.append([f"FID sqrtm + distance ({d}x{d})", f"{fid['frechet_s']:.2f} s", ""])
        if "scipy_sqrtm_s" in fid:
            rows.append(
                [
                    "  scipy.linalg.sqrtm (ADM) of the same product",
                    f"{fid['scipy_sqrtm_s']:.2f} s",
                    f"|FID diff| {fid['fid_abs_diff']:.1e}",
                ]
            )
    pr = results.get("pr")
    if pr:
        rows.append(
            [f"Precision/Recall ({r} ref x {n} samples, k=3)", f"{pr['precision_recall_s']:.1f} s", ""]
        )
        ratio = pr["block_fp16_emulated_s"] / pr["block_fp32_s"]
        rows.append(
            [
                f"  one {pr['block']}x{pr['block']} block: fp16-emulated / fp32",
                f"{pr['block_fp16_emulated_s']:.2f} / {pr['block_fp32_s']:.2f} s",
                f"x{ratio:.2f}",
            ]
        )
    is_ = results.get("is")
    if is_:
        rows.append([f"Inception Score ({n} x 1008)", f"{is_['inception_score_s']:.2f} s", ""])
    inc = results.get("inception")
    if inc:
        rows.append(
            [
                f"Inception features (batch {inc['batch']}, {inc['image_size']}px -> 299)",
                f"{inc['call_s']:.2f} s/call",
                f"{inc['images_per_s']:.2f} img/s",
            ]
        )
    m = results["machine"]
    head = (
        f"{m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} threads), torch {m['torch']}, {m['date']}"
    )
    return head + "\n\n" + format_table(["what", "time", "note"], rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, default=50000, help="sample features (default 50000)")
    p.add_argument("--num-ref", type=int, default=10000, help="reference features (default 10000)")
    p.add_argument("--dim", type=int, default=2048, help="feature size (default 2048, pool_3)")
    p.add_argument(
        "--device", default="cpu", help="device for precision/recall and the Inception (default cpu)"
    )
    p.add_argument("--inception-batch", type=int, default=2, help="images per Inception call (default 2)")
    p.add_argument("--image-size", type=int, default=256, help="input image side (default 256)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, median reported (default 3)")
    p.add_argument("--skip-fid", action="store_true")
    p.add_argument("--skip-pr", action="store_true")
    p.add_argument("--skip-inception", action="store_true")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    results = {
        "machine": machine_info(device),
        "command": " ".join(sys.argv),
        "num_samples": args.num_samples,
        "num_ref": args.num_ref,
        "dim": args.dim,
    }
    if not args.skip_fid:
        log("FID ...")
        results["fid"] = bench_fid(args, rng)
    log("Inception Score ...")
    results["is"] = bench_is(args, rng)
    if not args.skip_pr:
        log("precision/recall ...")
        results["pr"] = bench_pr(args, rng, device)
    if not args.skip_inception:
        log("Inception features ...")
        results["inception"] = bench_inception(args, device)
    results["load_average_end"] = load_average()
    results["wall_s"] = time.perf_counter() - started
    print(render(results))
    print(
        f"\ntotal wall time {results['wall_s']:.0f} s, load average at the end {results['load_average_end']}"
    )
    if args.json:
        write_json(args.json, results)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
