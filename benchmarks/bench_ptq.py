"""How long does Q-DiT PTQ take: calibration, GPTQ, one search generation (embedded model, DiT-XL/2 shapes)?

* Embedded model (ditq-fmnist, 1.9M parameters): recording ``--calib-samples``
  calibration inputs (DDIM-50, cfg 1.5), whole-model GPTQ (W4, group 128) on
  them, round-to-nearest for comparison, and one search generation: applying a
  candidate (swap in, restore) plus its fitness, ``--fitness-samples`` DDIM-50
  samples through the quantized model (and the FP model for the ratio). A
  generation of population P costs about P (or the prescreen k) such fitness calls.
* DiT-XL/2 shapes (hidden 1152, 256 tokens): GPTQ of one block's four layers
  (qkv 1152->3456, proj 1152->1152, fc1 1152->4608, fc2 4608->1152) with
  Hessians from random inputs, W4 group 128, and the Hessian accumulation of
  ``--xl-inputs`` inputs of 256 tokens; one forward of DiT-XL/2 (random weights)
  at batch ``--xl-batch`` FP and W4A8-dynamic-quantized, from which the time of a
  full calibration and a fitness call (800 DDIM-50 samples) are projected.

    python benchmarks/bench_ptq.py --json out/bench_ptq_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from _common import format_table, load_average, machine_info, write_json

import ditq
from ditq import models, quant
from ditq.pipelines import ptq
from ditq.quant.gptq import GPTQ, gptq_model
from ditq.quant.granularity import PerGroup
from ditq.quant.search import applied


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_embedded(args) -> dict:
    model = ditq.load("ditq-fmnist")
    spec = ptq.CalibSpec(num_samples=args.calib_samples)
    calib, t_calib = timed(lambda: ptq.record_calibration(model, spec, cache=False))
    config = quant.QDiTConfig(w_bits=4, a_bits=8, w_group=128, a_group=128)
    _, t_gptq = timed(lambda: gptq_model(copy.deepcopy(model), config, calib))
    _, t_rtn = timed(lambda: quant.quantize_(copy.deepcopy(model), config))
    fit = ptq.EvalSpec(num_samples=args.fitness_samples, steps=50, batch_size=args.fitness_samples)
    _, t_fp = timed(lambda: ptq.draw_samples(model, fit))

    def candidate():
        with applied(model, config):
            ptq.draw_samples(model, fit)

    _, t_fit = timed(candidate)
    return {
        "calib_samples": args.calib_samples,
        "calib_inputs": len(calib),
        "calibration_s": t_calib,
        "gptq_s": t_gptq,
        "rtn_s": t_rtn,
        "fitness_samples": args.fitness_samples,
        "fitness_quantized_s": t_fit,
        "fitness_fp_s": t_fp,
    }


def bench_xl(args) -> dict:
    torch.manual_seed(0)
    shapes = {"qkv": (3456, 1152), "proj": (1152, 1152), "fc1": (4608, 1152), "fc2": (1152, 4608)}
    out = {"layers": {}}
    for name, (o, i) in shapes.items():
        w = torch.randn(o, i) * 0.02
        acc = GPTQ(i)
        _, t_h = timed(
            lambda acc=acc, i=i: [acc.add_batch(torch.randn(256, i)) for _ in range(args.xl_inputs)]
        )
        _, t_q = timed(lambda acc=acc, w=w: acc.quantize(w, 4, PerGroup(128)))
        out["layers"][name] = {"hessian_s": t_h, "gptq_s": t_q}
        log(f"  XL {name}: Hessian {t_h:.2f} s, GPTQ {t_q:.2f} s")
    model = models.create_model("DiT-XL/2", input_size=32).eval()
    x = torch.randn(args.xl_batch, 4, 32, 32)
    t = torch.randint(0, 1000, (args.xl_batch,))
    y = torch.randint(0, 1000, (args.xl_batch,))
    with torch.no_grad():
        _, t_fp = timed(lambda: model(x, t, y))
        quant.quantize_(model, quant.QDiTConfig(w_bits=4, a_bits=8, w_group=128, a_group=128))
        model(x, t, y)  # the first call fills the dequantized-weight cache
        _, t_q = timed(lambda: model(x, t, y))
    out.update(xl_batch=args.xl_batch, forward_fp_s=t_fp, forward_w4a8_s=t_q, xl_inputs=args.xl_inputs)
    per_img_fp, per_img_q = t_fp / args.xl_batch, t_q / args.xl_batch
    # calibration: 256 samples x 50 DDIM steps x 2 (guidance) forwards; fitness: 800 x 50, no guidance
    out["projected_calibration_s"] = 256 * 50 * 2 * per_img_fp
    out["projected_fitness_s"] = 800 * 50 * per_img_q
    return out


def render(r: dict) -> str:
    e = r["embedded"]
    rows = [
        [
            f"calibration ({e['calib_samples']} samples, {e['calib_inputs']} inputs)",
            f"{e['calibration_s']:.1f}",
        ],
        ["GPTQ W4 g128, whole model", f"{e['gptq_s']:.1f}"],
        ["round-to-nearest W4 g128, whole model", f"{e['rtn_s']:.2f}"],
        [f"fitness: {e['fitness_samples']} DDIM-50 samples, W4A8", f"{e['fitness_quantized_s']:.1f}"],
        [
            f"  same samples, FP (ratio {e['fitness_quantized_s'] / e['fitness_fp_s']:.2f})",
            f"{e['fitness_fp_s']:.1f}",
        ],
    ]
    out = "ditq-fmnist\n" + format_table(["step", "seconds"], rows)
    if "xl" in r:
        x = r["xl"]
        rows = [[k, f"{v['hessian_s']:.2f}", f"{v['gptq_s']:.2f}"] for k, v in x["layers"].items()]
        out += f"\n\nDiT-XL/2 layer shapes (Hessian of {x['xl_inputs']} inputs x 256 tokens)\n"
        out += format_table(["layer", "Hessian s", "GPTQ s"], rows)
        out += (
            f"\n\nDiT-XL/2 forward, batch {x['xl_batch']}: FP {x['forward_fp_s']:.2f} s, W4A8 "
            f"{x['forward_w4a8_s']:.2f} s (x{x['forward_w4a8_s'] / x['forward_fp_s']:.2f}); projected: "
            f"calibration {x['projected_calibration_s'] / 3600:.1f} h, one fitness call "
            f"{x['projected_fitness_s'] / 3600:.1f} h"
        )
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--fitness-samples", type=int, default=256)
    p.add_argument("--xl-inputs", type=int, default=32, help="inputs for the XL Hessians (default 32)")
    p.add_argument("--xl-batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--skip-xl", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = {"machine": machine_info(torch.device("cpu")), "command": " ".join(sys.argv)}
    log("embedded model ...")
    results["embedded"] = bench_embedded(args)
    if not args.skip_xl:
        log("DiT-XL/2 shapes ...")
        results["xl"] = bench_xl(args)
    results["load_average_end"] = load_average()
    results["wall_s"] = time.perf_counter() - started
    print(render(results))
    if args.json:
        write_json(args.json, results)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
