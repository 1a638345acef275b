"""The Q-DiT ablation ladder on the embedded model, into docs/results/ptq_ladder.json.

Run from the repository root (each call single-threaded; split bit widths across processes and merge):
    .venv/bin/python scripts/ptq_ladder.py --bits 4 --fp-seeds 0,1 --out out/ladder/w4.json
    .venv/bin/python scripts/ptq_ladder.py --bits 8,6 --fp-seeds 2 --out out/ladder/w86.json
    .venv/bin/python scripts/ptq_ladder.py --merge out/ladder/w4.json out/ladder/w86.json \
        --out docs/results/ptq_ladder.json --md out/ladder/ladder.md

Every row draws the same samples: DDIM-50, no guidance, 1000 balanced labels, seed 0 (FP rows
also at other seeds, for the noise). The search's fitness is FID-FMNIST of 256 DDIM-25 samples at
another seed (1000), so the search does not fit the samples it is judged on. Calibration: 256
samples, DDIM-50, cfg 1.5 (Q-DiT's), cached in $DITQ_CACHE.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
from _machine import cpu_name

import ditq
from ditq.checkpoint import atomic_write
from ditq.pipelines import ladder, ptq


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _machine() -> str:
    return (
        f"{cpu_name()}, 1 thread per process, torch {torch.__version__}, Python {platform.python_version()}"
    )


def _write(path: Path, payload: dict) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")


def merge(paths: list[str], out: Path, md: Path | None) -> None:
    parts = [json.loads(Path(p).read_text()) for p in paths]
    rows, seen = [], set()
    for r in (r for p in parts for r in p["rows"]):  # FP rows of one seed may come from several parts
        key = (r["method"], r["w_bits"], r.get("seed"))
        if key not in seen:
            seen.add(key)
            rows.append(r)
    order = {"fp": -1, **{r: i for i, r in enumerate(ladder.RUNGS)}}
    rows.sort(
        key=lambda r: (r["w_bits"] is not None, -(r["w_bits"] or 0), order[r["method"]], r.get("seed", 0))
    )
    payload = {**parts[0], "rows": rows, "command": " ".join(["scripts/ptq_ladder.py", *sys.argv[1:]])}
    payload["parts"] = [p["command"] for p in parts]
    payload.pop("searches", None)
    payload["searches"] = {k: v for p in parts for k, v in p.get("searches", {}).items()}
    _write(out, payload)
    table = ladder.markdown_table(rows)
    if md:
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(table)
    print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", default="4,6,8", help="weight bit widths (activations 8-bit)")
    p.add_argument("--fp-seeds", default="0", help="seeds of the full-precision rows")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=1.0)
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--search-samples", type=int, default=256)
    p.add_argument("--search-steps", type=int, default=25)
    p.add_argument("--search-population", type=int, default=16)
    p.add_argument("--search-generations", type=int, default=5)
    p.add_argument("--search-prescreen", type=int, default=5)
    p.add_argument("--search-groups", default="16,32,64,128,256")
    p.add_argument("--rungs", default=",".join(ladder.RUNGS), help="rungs to measure (default all)")
    p.add_argument("--state-dir", default="out/ladder", help="search states (resumable) and row samples")
    p.add_argument(
        "--sample-only",
        action="store_true",
        help="draw and keep the samples of the rows that need no search (no evaluator needed); a later "
        "run evaluates them",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--md", default=None)
    p.add_argument("--merge", nargs="+", default=None, metavar="PART")
    args = p.parse_args()
    if args.merge:
        merge(args.merge, Path(args.out), Path(args.md) if args.md else None)
        return

    torch.set_num_threads(1)
    started = time.perf_counter()
    model = ditq.load("ditq-fmnist")
    if args.sample_only:
        quality = lambda images, labels: {"fid": float("nan"), "class_acc": None}  # noqa: E731
    else:
        quality = ptq.quality_function(model)
    samples_dir = Path(args.state_dir) / "samples"
    spec = ptq.EvalSpec(
        num_samples=args.samples, steps=args.steps, cfg_scale=args.cfg, batch_size=250, seed=0
    )
    search_spec = ptq.EvalSpec(args.search_samples, args.search_steps, args.cfg, batch_size=256, seed=1000)
    calib = ptq.record_calibration(model, ptq.CalibSpec(num_samples=args.calib_samples), log=print)
    out = Path(args.out) if not args.sample_only else Path(args.state_dir) / "sample-only.json"
    payload = {
        "model": "ditq-fmnist",
        "metric": "FID-FMNIST (ditq.eval.fmnist, vs the Fashion-MNIST test set) and class accuracy",
        "sampler": f"DDIM-{args.steps}, cfg {args.cfg}, {args.samples} balanced labels, seed 0",
        "calibration": f"{args.calib_samples} samples, DDIM-50, cfg 1.5 ({len(calib)} model inputs)",
        "search": {
            "fitness": f"FID-FMNIST of {args.search_samples} DDIM-{args.search_steps} samples, seed 1000",
            "groups": _ints(args.search_groups),
            "population": args.search_population,
            "generations": args.search_generations,
            "prescreen": args.search_prescreen,
            "constraint": "weight bytes and activation (scale, zero) pairs per token <= uniform group 128",
        },
        "date": datetime.date.today().isoformat(),
        "machine": _machine(),
        "command": " ".join(["scripts/ptq_ladder.py", *sys.argv[1:]]),
        "rows": [],
        "searches": {},
    }
    rows = ladder.fp_rows(model, spec, quality, seeds=_ints(args.fp_seeds), log=print, cache_dir=samples_dir)
    payload["rows"] += [r.to_dict() for r in rows]
    _write(out, payload)

    for w_bits in _ints(args.bits):

        def search_fn(m, base, w_bits=w_bits):
            result = ptq.granularity_search(
                m, base, quality, search_spec, calib=calib, groups=tuple(_ints(args.search_groups)),
                population=args.search_population, generations=args.search_generations,
                prescreen=args.search_prescreen, state_path=Path(args.state_dir) / f"search-w{w_bits}a8.json",
                log=print,
            )  # fmt: skip
            payload["searches"][f"W{w_bits}A8"] = {**result.summary(), "layers": result.layers}
            return result.layers

        wanted = [r.strip() for r in args.rungs.split(",") if r.strip()]
        rungs = [r for r in wanted if not (args.sample_only and r in ("+search", "+gptq"))]
        rows = ladder.ladder_rows(
            model,
            w_bits,
            spec,
            quality,
            calib,
            rungs=rungs,
            search_fn=search_fn,
            log=print,
            cache_dir=samples_dir,
        )
        payload["rows"] += [r.to_dict() for r in rows]
        payload["wall_s"] = round(time.perf_counter() - started, 1)
        _write(out, payload)
    print(ladder.markdown_table(payload["rows"]))


if __name__ == "__main__":
    main()
