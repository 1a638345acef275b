"""What surviving preemption costs a training step: the stop check (StopSignals.should_stop) and the run lock.

    python benchmarks/bench_long_runs.py [--steps 200] [--repeats 5] [--json out.json]
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_long_runs.py   # the collective check

Trains the same tiny DiT (the tests' synthetic recipe: depth 1, 8x8 images, batch 32; the smallest step,
so the largest relative cost) with ``fit(stop=StopSignals())`` and with ``fit(stop=None)``, alternating,
``--repeats`` times each, one thread per process. Reports the time the stop checks take inside the run
per step (their direct cost, against the step), and the median step of each arm end to end (whose
difference is dominated by run-to-run noise of a few percent on a shared CPU). The lock is taken once
per run: its cost per step is its acquire + release time divided by the steps of a run. Prints one
line; ``--json`` writes it with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
from _common import cpu_flags, cpu_model, load_average

from ditq.data.synthetic import load_synthetic_dataset
from ditq.models import build_model, get_config
from ditq.preemption import StopSignals
from ditq.runlock import RunLock
from ditq.train.loop import TrainConfig, fit


class _TimedStop(StopSignals):
    """StopSignals that adds up the time its checks take inside the run (the direct cost per step)."""

    spent = 0.0

    def should_stop(self, group=None) -> bool:
        t0 = time.perf_counter()
        try:
            return super().should_stop(group)
        finally:
            _TimedStop.spent += time.perf_counter() - t0


def _steps_time(stop: bool, steps: int) -> float:
    torch.manual_seed(0)
    model = build_model(
        get_config("DiT-S/4", depth=1, hidden_size=64, num_heads=2, input_size=8, in_channels=1)
    )
    images, labels = load_synthetic_dataset(64, image_size=8, channels=1, seed=0)
    cfg = TrainConfig(steps=steps, batch_size=32, lr=1e-3, log_every=steps, seed=0)
    t0 = time.perf_counter()
    if stop:
        with _TimedStop() as s:
            fit(model, (images, labels), cfg, stop=s)
    else:
        fit(model, (images, labels), cfg)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    main_rank = int(os.environ.get("RANK", "0")) == 0
    _steps_time(True, 20)  # warm up both paths
    _steps_time(False, 20)
    with_stop, without = [], []
    _TimedStop.spent = 0.0
    for i in range(args.repeats):  # alternate which goes first: the first of a pair runs colder
        for stop in (True, False) if i % 2 == 0 else (False, True):
            (with_stop if stop else without).append(_steps_time(stop, args.steps))
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        for _ in range(50):
            RunLock(d).acquire().release()
        lock_s = (time.perf_counter() - t0) / 50
    a, b = statistics.median(with_stop), statistics.median(without)
    check_s = _TimedStop.spent / (args.repeats * args.steps)  # in-run time of the checks, per step
    row = {
        "processes": world,
        "step_ms_with_stop_check": a * 1e3,
        "step_ms_without": b * 1e3,
        "stop_check_s_per_step": check_s,
        "stop_check_cost_pct": 100 * check_s / b,
        "end_to_end_difference_pct": 100 * (a - b) / b,
        "lock_ms_per_run": lock_s * 1e3,
        "lock_cost_pct_per_step_over_the_run": 100 * lock_s / (b * args.steps),
        "steps": args.steps,
        "repeats": args.repeats,
    }
    if main_rank:
        print(
            f"{world} process(es), {args.steps} steps x {args.repeats}: step {b * 1e3:.3f} ms; the stop "
            f"checks take {check_s * 1e6:.2f} us a step in the run ({row['stop_check_cost_pct']:.3f}%); "
            f"end to end {a * 1e3:.3f} vs {b * 1e3:.3f} ms ({row['end_to_end_difference_pct']:+.2f}%, "
            f"run-to-run noise included); the run lock {lock_s * 1e3:.3f} ms once a run "
            f"({row['lock_cost_pct_per_step_over_the_run']:.3f}% of {args.steps} steps)"
        )
        if args.json:
            machine = {
                "cpu": cpu_model(),
                "isa": cpu_flags(),
                "load": load_average(),
                "torch": torch.__version__,
            }
            with open(args.json, "w") as f:
                json.dump({"machine": machine, "result": row}, f, indent=2)
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
