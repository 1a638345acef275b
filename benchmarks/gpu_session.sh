#!/usr/bin/env bash
# The GPU measurements of the kernels issue, in stages that each fit a 10-minute call on a lent
# machine (Triton compiles and autotunes every kernel cold there). Runs from the repository root
# with the machine's own python3 (PyTorch and Triton installed; ditq from src/, nothing to install).
#
#   bash benchmarks/gpu_session.sh tests          # the Triton kernels vs their references, compiled, and
#                                                 # a tiny DiT through the fused producer kernels
#   bash benchmarks/gpu_session.sh kernels-dit    # bench_kernels at DiT-XL/2 shapes, M 1..8192
#   bash benchmarks/gpu_session.sh kernels-terdit # bench_kernels at TerDiT-4.2B shapes
#   bash benchmarks/gpu_session.sh e2e            # fused producers vs unfused (bf16), then one DiT-XL/2
#                                                 # step, batch 32, cfg: bf16 vs W8A8/W4A8/ternary, fused and not
#   bash benchmarks/gpu_session.sh e2e-terdit     # one TerDiT-600M step (Large-DiT: RMSNorm, SwiGLU),
#                                                 # batch 16, cfg: bf16 vs W8A8/ternary, fused and not
#   bash benchmarks/gpu_session.sh all            # the five, in that order (needs several calls' time)
#
# Results go to $OUT (or out/gpu when OUT is unset): JSON and logs, to be copied into docs/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out/gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"

stage() {
  case "$1" in
    tests)
      nvidia-smi > "$out/nvidia-smi.txt" 2>&1
      "$py" -m pytest -q tests/kernels/test_triton*.py tests/quant/test_fuse.py 2>&1 | tee "$out/tests_gpu.log"
      ;;
    kernels-dit | kernels-terdit)
      "$py" benchmarks/bench_kernels.py --device cuda --shapes "${1#kernels-}" \
        --json "$out/bench_kernels_cuda_${1#kernels-}.json" 2>&1 | tee "$out/bench_kernels_${1#kernels-}.log"
      ;;
    e2e)
      "$py" benchmarks/bench_fused_quant.py --device cuda --dtype bfloat16 \
        --json "$out/bench_fused_quant_cuda.json" 2>&1 | tee "$out/bench_fused_quant.log"
      "$py" benchmarks/bench_e2e.py --model DiT-XL/2 --device cuda --batch-size 32 --cfg on \
        --variants w8a8,w4a8,w1.58a8,w1.58a16 --json "$out/bench_e2e_cuda_dit_xl2.json" 2>&1 | tee "$out/bench_e2e.log"
      ;;
    e2e-terdit)
      "$py" benchmarks/bench_e2e.py --model TerDiT-600M --device cuda --batch-size 16 --cfg on \
        --variants w8a8,w1.58a8,w1.58a16 --json "$out/bench_e2e_cuda_terdit600m.json" 2>&1 \
        | tee "$out/bench_e2e_terdit.log"
      ;;
    *)
      echo "unknown stage '$1'; one of: tests, kernels-dit, kernels-terdit, e2e, e2e-terdit, all" >&2
      return 2
      ;;
  esac
}

if [ "${1:-}" = "all" ]; then
  for s in tests kernels-dit kernels-terdit e2e e2e-terdit; do stage "$s" || exit $?; done
else
  stage "${1:-}"
fi
