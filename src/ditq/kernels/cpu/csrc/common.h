// ditq's CPU kernels: what their translation units share.
//
// The library is one .cpp file per op family (below), built on first use by
// ditq/kernels/cpu/extension.py (torch.utils.cpp_extension.load, no Python module: a plain C
// interface called through ctypes, so only <ATen/Parallel.h> is compiled and the build takes
// seconds) and checked against the plain-PyTorch references in ditq/kernels/reference.py. No
// -march flag: every SIMD path is a function with its own target attribute and the best one the
// CPU has is chosen at run time, so a cached build stays valid on another x86 machine.
//
//   common.cpp       instruction-set detection, the last error, the threads the kernels run on
//   quantize.cpp     per-token activation quantization: absmax int8, asymmetric min/max
//   producers.cpp    LayerNorm / RMSNorm + adaLN modulation, GELU, SwiGLU fused with int8 quantization
//   gemm_int8.cpp    the W8A8 and W1.58A8 integer GEMMs and their prepacked weights
//   gemm_w4a8.cpp    Q-DiT's W4A8 GEMM (int4 group-wise weights) and its prepacked weights
//   weight_only.cpp  float activations x ternary or int4 weights
//
// Each .cpp ends with its part of the C interface (extern "C"), called through ctypes:
// ditq/kernels/cpu/ops.py validates shapes, dtypes and layout (contiguous rows) and allocates every
// output. Every function returns 0 on success, 1 for an instruction set this CPU lacks, 2 for an
// exception (message in ditq_last_error()). Names shared between files live in namespace ditq;
// each file keeps the rest in an anonymous namespace.

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <numeric>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <immintrin.h>
#define DITQ_X86 1
#else
#define DITQ_X86 0
#endif

// Full unrolling of the small tile loops lets GCC keep the accumulator arrays in registers.
#define DITQ_UNROLL _Pragma("GCC unroll 16")

#if DITQ_X86
#define DITQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define DITQ_AVX2 __attribute__((target("avx2,fma")))

// acc += u8 x s8 dot products of 4 bytes (vpdpbusd). Inline asm: GCC 12 compiles the intrinsic
// with a register copy and a stack spill around every use, at a third of the speed.
#define DITQ_DPBUSD(acc, u, s) asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s))
#endif

namespace ditq {

// kAvxVnni: AVX2 plus 256-bit vpdpbusd, as AVX-VNNI (VEX: Alder Lake, Sierra Forest, Zen 5) or
// AVX-512 VNNI's EVEX form (a CPU with AVX-512 VNNI capped at this level). Only the integer GEMMs
// differ from kAvx2; everything else runs its AVX2 code there (see vector_level).
enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvxVnni = 2, kAvx512Vnni = 3 };

// The best level this CPU runs (detected once), and whether it has AVX-512 VNNI / AVX-VNNI.
int64_t detect_isa();
bool has_avx512_vnni();
bool has_avx_vnni();

// Whether `isa` is a level this CPU runs.
bool isa_ok(int64_t isa);

// The level of the vector code that is not an integer GEMM (quantizers, producers, weight-only).
inline int64_t vector_level(int64_t isa) { return isa == kAvxVnni ? kAvx2 : isa; }

// AVX-512 lane mask of the first min(left, 16) lanes (none for left <= 0): a row's tail.
inline uint16_t lanes16(int64_t left) {
  return left >= 16 ? 0xFFFF : left <= 0 ? 0 : static_cast<uint16_t>((1u << left) - 1);
}

// Absmax int8 quantization of one row of n values (quantize.cpp; the rule: quantize_row_scalar).
// The fused producers quantize their output with it.
void quantize_row(const float* x, int64_t n, int8_t* q, float* s, int64_t isa);

// ---------------------------------------------------------------------------------------------
// What the integer GEMMs share (gemm_int8.cpp, gemm_w4a8.cpp)
// ---------------------------------------------------------------------------------------------

constexpr int kPanel = 64;     // AVX-512: output columns per prepacked panel (4 vectors of 16)
constexpr int kMR512 = 6;      // AVX-512: tokens per micro-tile (24 accumulators of 32 registers)
constexpr int kMR256 = 6;      // AVX2: tokens per micro-tile (of 8 columns)
constexpr int kNB256 = 8;      // AVX2: output columns per micro-tile (a column block of a panel)
constexpr int64_t kMB = 96;    // tokens per parallel work item (a multiple of both MRs)

// Work items of kMB tokens x one prepacked panel of 64 columns, split over threads (token blocks
// inner, so a thread keeps its panel in L2 while the activations stream past). Inside an item,
// micro-tiles of MR tokens (fns[mr] for the last, shorter one) x `cols` columns (64: AVX-512;
// 8, one column block at a time so that its weights stay in L1 while the tokens pass: AVX2).
template <int MR, typename G, typename Fn>
void run_panels(const G& g, const Fn (&fns)[MR + 1], int64_t cols) {
  const int64_t mb = (g.M + kMB - 1) / kMB, np = (g.N + kPanel - 1) / kPanel;
  at::parallel_for(0, mb * np, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bm = item % mb, p0 = item / mb * kPanel;
      const int64_t m_end = std::min(g.M, (bm + 1) * kMB), n_end = std::min(g.N, p0 + kPanel);
      for (int64_t n0 = p0; n0 < n_end; n0 += cols)
        for (int64_t m0 = bm * kMB; m0 < m_end; m0 += MR) fns[std::min<int64_t>(MR, m_end - m0)](g, m0, n0);
    }
  });
}

// Tables of one micro-tile function per token count 1..6 (index 0 unused).
#define DITQ_TILES(f, ...) {nullptr, f<1, ##__VA_ARGS__>, f<2, ##__VA_ARGS__>, f<3, ##__VA_ARGS__>, \
                            f<4, ##__VA_ARGS__>, f<5, ##__VA_ARGS__>, f<6, ##__VA_ARGS__>}

// kAvxVnni's encoding of vpdpbusd: VEX where the CPU has AVX-VNNI, else (a CPU with AVX-512 VNNI
// capped at kAvxVnni) EVEX.
inline bool vex_dot() { return has_avx_vnni(); }

#if DITQ_X86
// 256-bit vpdpbusd for the kAvxVnni level, by encoding: AVX-VNNI's VEX form ({vex}) or AVX-512
// VNNI's EVEX one (ymm registers, AVX512VL). Inline asm, so that one AVX2-target function serves
// both (GCC would not let an AVX2 function call either intrinsic) and the registers stay in
// ymm0-15, which both encodings reach. kMaddubs: the AVX2 code without vpdpbusd.
enum Dot : int { kMaddubs = 0, kVexDot = 1, kEvexDot = 2 };

template <int DOT>
DITQ_AVX2 inline __m256i dpbusd256(__m256i acc, __m256i u, __m256i s) {
  if constexpr (DOT == kVexDot) {
    asm("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(u), "x"(s));
  } else {
    asm("vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(u), "x"(s));
  }
  return acc;
}
#endif

// ---------------------------------------------------------------------------------------------
// Errors of the C interface
// ---------------------------------------------------------------------------------------------

// The message of the last call that failed on this thread (ditq_last_error()).
extern thread_local std::string last_error;

// f() for a C entry point: 0, or 1 when `isa` is a level this CPU lacks, or 2 when f throws (its
// message in last_error).
template <typename F>
int guarded(int64_t isa, F&& f) {
  if (!isa_ok(isa)) {
    last_error = "instruction set " + std::to_string(isa) + " is not available on this CPU";
    return 1;
  }
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return 2;
  }
}

}  // namespace ditq
