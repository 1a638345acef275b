// ditq CPU kernels: per-token int8 activation quantization, W8A8, W1.58A8 and W4A8 integer GEMMs,
// and weight-only ternary and int4 GEMMs (float activations).
//
// Built on first use by ditq/kernels/cpu.py (torch.utils.cpp_extension.load, no Python module:
// a plain C interface called through ctypes, so only <ATen/Parallel.h> is compiled and the build
// takes seconds) and checked against the plain-PyTorch references in ditq/kernels/ops.py. No
// -march flag: every SIMD path is a function with its own target attribute and the best one the
// CPU has is chosen at run time, so a cached build stays valid on another x86 machine.
//
// Every GEMM computes, exactly in int32,
//     acc[m, n] = sum_k x[m, k] * w[n, k]            (x: int8 activations, w: int8 or ternary)
// then the float epilogue of the reference, in the same order (no FMA contraction):
//     out[m, n] = float(acc) * xs[m] * ws[n or 0] + bias[n]
//
// The AVX-512 VNNI instruction vpdpbusd multiplies *unsigned* by *signed* bytes, so the weight
// is made unsigned: u = w + offset (offset 128 for int8 weights, 1 for ternary codes, which are
// stored as w + 1 already), and sum_k u*x = acc + offset * sum_k x[m, k] is corrected with the
// per-token sum of the activations (bitnet.cpp's I2_S trick).
//
// AVX-512 VNNI path: weights are prepacked once (cached by the caller) into panels of 64 output
// columns, 4 inputs of 16 columns per 64-byte vector, which is what vpdpbusd consumes against a
// broadcast dword of x; a micro-tile keeps 6 tokens x 64 columns in 24 accumulator registers, so
// no horizontal sums are needed. Ternary weights stay at 2 bits each in the prepacked layout too
// (4 codes per byte, one byte per 4 inputs of a column, in 4 bit planes) and are unpacked in
// registers with one shift and one AND per 4 inputs: no lookup table, no int8 copy.
//
// AVX2 path: the same prepacked panels, read 8 columns (32 bytes of a step) at a time by micro-tiles
// of 6 tokens x 8 columns, with the product instruction that cannot saturate on each weight kind
// (see "AVX2" below): vpmaddwd on int16 for int8 weights, vpmaddubsw with int16 accumulation for
// ternary and int4 codes.

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

namespace {

// kAvxVnni: AVX2 plus 256-bit vpdpbusd, as AVX-VNNI (VEX: Alder Lake, Sierra Forest, Zen 5) or
// AVX-512 VNNI's EVEX form (a CPU with AVX-512 VNNI capped at this level). Only the integer GEMMs
// differ from kAvx2; everything else runs its AVX2 code there (see vector_level).
enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvxVnni = 2, kAvx512Vnni = 3 };

bool has_avx512_vnni() {
#if DITQ_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// AVX-VNNI (the VEX encoding), read with cpuid once: leaf 7, subleaf 1, EAX bit 4. (Every kernel
// call asks, through detect_isa and vex_dot, and cpuid traps to the hypervisor in a VM.)
bool has_avx_vnni() {
#if DITQ_X86
  static const bool has = [] {
    unsigned a, b, c, d;
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 4) & 1);
  }();
  return has;
#else
  return false;
#endif
}

int64_t detect_isa() {
  static const int64_t level = [] {
#if DITQ_X86
    __builtin_cpu_init();
    if (has_avx512_vnni()) return kAvx512Vnni;
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx2 && has_avx_vnni()) return kAvxVnni;
    if (avx2) return kAvx2;
#endif
    return kScalar;
  }();
  return level;
}

// The level of the vector code that is not an integer GEMM (quantizers, producers, weight-only).
inline int64_t vector_level(int64_t isa) { return isa == kAvxVnni ? kAvx2 : isa; }

// AVX-512 lane mask of the first min(left, 16) lanes (none for left <= 0): a row's tail.
inline uint16_t lanes16(int64_t left) {
  return left >= 16 ? 0xFFFF : left <= 0 ? 0 : static_cast<uint16_t>((1u << left) - 1);
}

constexpr int kPanel = 64;     // AVX-512: output columns per prepacked panel (4 vectors of 16)
constexpr int kMR512 = 6;      // AVX-512: tokens per micro-tile (24 accumulators of 32 registers)
constexpr int kMR256 = 6;      // AVX2: tokens per micro-tile (of 8 columns)
constexpr int kNB256 = 8;      // AVX2: output columns per micro-tile (a column block of a panel)
constexpr int64_t kMB = 96;    // tokens per parallel work item (a multiple of both MRs)

// Everything a micro-tile needs. x: int8 activations, natural [M, K] (int8 weights) or in the
// phase layout [M, Kp] (ternary); w: weight bytes, int8 [N, K] or packed k4 [N, K/4].
struct Gemm {
  const int8_t* x;
  int64_t ldx;
  const uint8_t* w;
  int64_t ldw;
  int64_t M, N, K;
  const int32_t* xsum;  // sum_k x[m, k], for the offset correction (offset != 0 only)
  int32_t offset;       // the SIMD path's weight offset (see the top of this file)
  const float* xs;
  const float* ws;
  bool ws_per_row;
  const float* bias;  // nullptr: no bias
  float* out;
  int64_t ldo;
};

// Everything a W4A8 micro-tile needs (AVX-512 VNNI path only). The weight codes 0..15 fit both
// operand types of vpdpbusd, so no offset is needed: int8 activations are the signed operand and
// the codes the unsigned one; uint8 activations are the unsigned operand and the codes the signed
// one. Both scales are constant over segments of L = gcd(ga, gw) inputs (ga: activation group,
// gw: weight group); per segment s and token m, the exact integer sum is
//     Σ (q_w − z_w)(q_x − z_x) = raw − z_x Σq_w − z_w (Σq_x − L z_x)
// with Σq_w per (column, segment) from the prepacked weight and Σq_x per (token, segment) per call.
struct W4Gemm {
  const uint8_t* x;      // activation bytes [M, K] (int8 codes, or uint8 codes when x_unsigned)
  int64_t ldx;
  const uint8_t* w;      // prepacked panels (see prepack_w4)
  int64_t ldw;           // bytes per panel
  const int32_t* wsum;   // Σq_w [S, ldsum] (columns padded to whole panels, zeros)
  int64_t ldsum;
  int64_t M, N, K;
  int64_t L, S;          // segment length (a multiple of 8), segments per row (K / L)
  int64_t ra, rw;        // segments per activation group (ga / L) and per weight group (gw / L)
  int64_t GA;            // activation groups per token (K / ga)
  const int32_t* xsum;   // Σq_x [M, S]
  const int32_t* xzero;  // z_x [M, GA], or nullptr (symmetric)
  const float* xs;       // [M, GA]
  const float* ws;       // w_scale transposed, [K / gw, N]
  const int32_t* wz;     // w_zero transposed, [K / gw, N]
  const float* bias;     // [N] or nullptr
  float* out;
  int64_t ldo;
};

inline void store(const Gemm& g, int64_t m, int64_t n, int32_t raw) {
  const int32_t acc = g.offset ? raw - g.offset * g.xsum[m] : raw;
  float v = static_cast<float>(acc) * g.xs[m] * g.ws[g.ws_per_row ? n : 0];
  if (g.bias) v += g.bias[n];
  g.out[m * g.ldo + n] = v;
}

#if DITQ_X86
// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI
// ---------------------------------------------------------------------------------------------
#define DITQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

// acc += u8 x s8 dot products of 4 bytes (vpdpbusd). Inline asm: GCC 12 compiles the intrinsic
// with a register copy and a stack spill around every use, at a third of the speed.
#define DITQ_DPBUSD(acc, u, s) asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s))

// Epilogue of 16 outputs (columns n..n+15 of token m, the ones < N).
DITQ_AVX512 inline void store16(const Gemm& g, int64_t m, int64_t n, __m512i acc) {
  const int64_t left = g.N - n;
  if (left <= 0) return;
  const __mmask16 mask = lanes16(left);
  if (g.offset) acc = _mm512_sub_epi32(acc, _mm512_set1_epi32(g.offset * g.xsum[m]));
  __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(g.xs[m]));
  v = _mm512_mul_ps(v, g.ws_per_row ? _mm512_maskz_loadu_ps(mask, g.ws + n) : _mm512_set1_ps(g.ws[0]));
  if (g.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, g.bias + n));
  _mm512_mask_storeu_ps(g.out + m * g.ldo + n, mask, v);
}

// int8 weights, prepacked (see prepack_w8): one micro-tile is MR tokens x one panel of 64 columns,
// 24 accumulators holding the outputs themselves (no horizontal sums). Per 4 inputs: 4 weight
// vectors, one broadcast dword of x per token, 4*MR vpdpbusd.
template <int MR>
DITQ_AVX512 void tile_w8_vnni(const Gemm& g, int64_t m0, int64_t n0) {
  const uint8_t* panel = g.w + (n0 / kPanel) * g.ldw;
  const int8_t* xp[MR];
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) xp[i] = g.x + (m0 + i) * g.ldx;
  __m512i acc[MR][4];
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) {
    DITQ_UNROLL
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_si512();
  }
  const int64_t steps = (g.K + 3) / 4;
  for (int64_t t = 0; t < steps; ++t) {
    const uint8_t* pw = panel + t * 256;
    __m512i wv[4];
    DITQ_UNROLL
    for (int j = 0; j < 4; ++j) wv[j] = _mm512_loadu_si512(pw + j * 64);
    DITQ_UNROLL
    for (int i = 0; i < MR; ++i) {
      int32_t x4;
      std::memcpy(&x4, xp[i] + 4 * t, 4);
      const __m512i xb = _mm512_set1_epi32(x4);
      DITQ_UNROLL
      for (int j = 0; j < 4; ++j) DITQ_DPBUSD(acc[i][j], wv[j], xb);
    }
  }
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) {
    DITQ_UNROLL
    for (int j = 0; j < 4; ++j) store16(g, m0 + i, n0 + 16 * j, acc[i][j]);
  }
}

// Ternary weights, prepacked 2-bit (see prepack_w2): per 16 inputs, 4 vectors of packed codes;
// shifting them right by 2s and masking with 3 gives, for each column, the codes of inputs
// 16g + 4s .. 16g + 4s + 3 as 4 bytes, which is what vpdpbusd multiplies with a broadcast dword
// of x. Codes are w + 1 (offset 1); padding codes are 0, so padded inputs add nothing.
template <int MR>
DITQ_AVX512 void tile_w2_vnni(const Gemm& g, int64_t m0, int64_t n0) {
  const uint8_t* panel = g.w + (n0 / kPanel) * g.ldw;
  const int8_t* xp[MR];
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) xp[i] = g.x + (m0 + i) * g.ldx;
  __m512i acc[MR][4];
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) {
    DITQ_UNROLL
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_si512();
  }
  const __m512i three = _mm512_set1_epi8(3);
  const int64_t groups = (g.K + 15) / 16;
  for (int64_t t = 0; t < groups; ++t) {
    const uint8_t* pw = panel + t * 256;
    DITQ_UNROLL
    for (int s = 0; s < 4; ++s) {
      const __m128i count = _mm_cvtsi32_si128(2 * s);
      __m512i wv[4];
      DITQ_UNROLL
      for (int j = 0; j < 4; ++j) wv[j] = _mm512_and_si512(_mm512_srl_epi16(_mm512_loadu_si512(pw + j * 64), count), three);
      DITQ_UNROLL
      for (int i = 0; i < MR; ++i) {
        int32_t x4;
        std::memcpy(&x4, xp[i] + 16 * t + 4 * s, 4);
        const __m512i xb = _mm512_set1_epi32(x4);
        DITQ_UNROLL
        for (int j = 0; j < 4; ++j) DITQ_DPBUSD(acc[i][j], wv[j], xb);
      }
    }
  }
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) {
    DITQ_UNROLL
    for (int j = 0; j < 4; ++j) store16(g, m0 + i, n0 + 16 * j, acc[i][j]);
  }
}

// ---------------------------------------------------------------------------------------------
// W4A8 (Q-DiT): int4 weight codes with group-wise scales and zero points, per-token activations
// ---------------------------------------------------------------------------------------------


// One micro-tile: MR tokens x one panel of 64 columns. Per segment: int32 accumulators (24
// registers), then the segment's float epilogue added into a float tile kept in L1, in the
// reference's order: y += (float(acc) * xs[m, s / ra]) * ws[n, s / rw]; at the end out = y + bias.
template <int MR, bool XU8>
DITQ_AVX512 void tile_w4_vnni(const W4Gemm& g, int64_t m0, int64_t n0) {
  const uint8_t* panel = g.w + (n0 / kPanel) * g.ldw;
  const uint8_t* xp[MR];
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) xp[i] = g.x + (m0 + i) * g.ldx;
  alignas(64) float y[MR][kPanel];
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) {
    DITQ_UNROLL
    for (int j = 0; j < 4; ++j) _mm512_store_ps(&y[i][16 * j], _mm512_setzero_ps());
  }
  const int64_t left = g.N - n0;
  const int nv = static_cast<int>(std::min<int64_t>(4, (left + 15) / 16));
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const int64_t spg = g.L / 8;  // steps of 8 inputs per segment
  int64_t gai = 0, gwi = 0, ka = 0, kw = 0;  // activation / weight group of the segment, segments into it
  for (int64_t grp = 0; grp < g.S; ++grp) {
    __m512i acc[MR][4];
    DITQ_UNROLL
    for (int i = 0; i < MR; ++i) {
      DITQ_UNROLL
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_si512();
    }
    for (int64_t t = grp * spg, t_end = t + spg; t < t_end; ++t) {
      const uint8_t* pw = panel + t * 256;
      DITQ_UNROLL
      for (int half = 0; half < 2; ++half) {
        __m512i wv[4];
        DITQ_UNROLL
        for (int j = 0; j < 4; ++j) {
          const __m512i v = _mm512_loadu_si512(pw + j * 64);
          wv[j] = _mm512_and_si512(half ? _mm512_srli_epi16(v, 4) : v, low4);
        }
        DITQ_UNROLL
        for (int i = 0; i < MR; ++i) {
          int32_t x4;
          std::memcpy(&x4, xp[i] + 8 * t + 4 * half, 4);
          const __m512i xb = _mm512_set1_epi32(x4);
          DITQ_UNROLL
          for (int j = 0; j < 4; ++j) {
            if (XU8) {
              DITQ_DPBUSD(acc[i][j], xb, wv[j]);
            } else {
              DITQ_DPBUSD(acc[i][j], wv[j], xb);
            }
          }
        }
      }
    }
    // the segment's per-token numbers (z_x only for uint8 activations, which always have one)
    alignas(64) int32_t cx[MR], zx[MR];
    alignas(64) float sx[MR];
    DITQ_UNROLL
    for (int i = 0; i < MR; ++i) {
      const int64_t m = m0 + i;
      zx[i] = XU8 ? g.xzero[m * g.GA + gai] : 0;
      cx[i] = g.xsum[m * g.S + grp] - static_cast<int32_t>(g.L) * zx[i];
      sx[i] = g.xs[m * g.GA + gai];
    }
    const float* ws_row = g.ws + gwi * g.N;
    const int32_t* wz_row = g.wz + gwi * g.N;
    const int32_t* wsum_row = g.wsum + grp * g.ldsum;
    DITQ_UNROLL
    for (int j = 0; j < 4; ++j) {
      if (j >= nv) break;
      const int64_t n = n0 + 16 * j;
      const __mmask16 mask = lanes16(left - 16 * j);
      const __m512 wsv = _mm512_maskz_loadu_ps(mask, ws_row + n);
      const __m512i wzv = _mm512_maskz_loadu_epi32(mask, wz_row + n);
      DITQ_UNROLL
      for (int i = 0; i < MR; ++i) {
        __m512i a = _mm512_sub_epi32(acc[i][j], _mm512_mullo_epi32(wzv, _mm512_set1_epi32(cx[i])));
        if (XU8) a = _mm512_sub_epi32(a, _mm512_mullo_epi32(_mm512_loadu_si512(wsum_row + n), _mm512_set1_epi32(zx[i])));
        const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(sx[i])), wsv);
        _mm512_store_ps(&y[i][16 * j], _mm512_add_ps(_mm512_load_ps(&y[i][16 * j]), v));
      }
    }
    if (++ka == g.ra) ka = 0, ++gai;
    if (++kw == g.rw) kw = 0, ++gwi;
  }
  DITQ_UNROLL
  for (int j = 0; j < 4; ++j) {
    if (j >= nv) break;
    const int64_t n = n0 + 16 * j;
    const __mmask16 mask = lanes16(left - 16 * j);
    const __m512 b = g.bias ? _mm512_maskz_loadu_ps(mask, g.bias + n) : _mm512_setzero_ps();
    DITQ_UNROLL
    for (int i = 0; i < MR; ++i) {
      __m512 v = _mm512_load_ps(&y[i][16 * j]);
      if (g.bias) v = _mm512_add_ps(v, b);
      _mm512_mask_storeu_ps(g.out + (m0 + i) * g.ldo + n, mask, v);
    }
  }
}

// Per-token absmax int8 quantization of one row (see quantize_per_token below for the rule).
DITQ_AVX512 void quantize_row_512(const float* x, int64_t n, int8_t* q, float* s) {
  __m512 vmax = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  float amax = _mm512_reduce_max_ps(vmax);
  for (; k < n; ++k) amax = std::max(amax, std::fabs(x[k]));
  amax = std::max(amax, 1e-5f);
  const float inv = (1.0f / amax) * 127.0f;  // what `127.0 / a` computes in PyTorch
  *s = amax / 127.0f;
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512 lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
  for (k = 0; k + 16 <= n; k += 16) {
    __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + k), vinv);
    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // half to even
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
  }
  for (; k < n; ++k) q[k] = static_cast<int8_t>(std::min(127.0f, std::max(-128.0f, std::nearbyint(x[k] * inv))));
}

// ---------------------------------------------------------------------------------------------
// AVX2
// ---------------------------------------------------------------------------------------------
#define DITQ_AVX2 __attribute__((target("avx2,fma")))

// quantize_row_512 in 8 lanes (the same rule and roundings: bit-identical codes and scale).
DITQ_AVX2 void quantize_row_256(const float* x, int64_t n, int8_t* q, float* s) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 vmax = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  float amax = _mm_cvtss_f32(m4);
  for (; k < n; ++k) amax = std::max(amax, std::fabs(x[k]));
  amax = std::max(amax, 1e-5f);
  const float inv = (1.0f / amax) * 127.0f;  // what `127.0 / a` computes in PyTorch
  *s = amax / 127.0f;
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256 lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
  for (k = 0; k + 8 <= n; k += 8) {
    __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + k), vinv);
    v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // half to even
    const __m256i i = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(w, w));
  }
  for (; k < n; ++k) q[k] = static_cast<int8_t>(std::min(127.0f, std::max(-128.0f, std::nearbyint(x[k] * inv))));
}

// The AVX2 GEMMs read the AVX-512 path's prepacked panels (one prepacked copy serves both levels)
// a column block of 8 columns at a time: 32 bytes of each 256-byte step. A micro-tile is MR tokens
// x 8 columns. Unlike vpdpbusd, AVX2's vpmaddubsw adds its two u8 x s8 products into int16 with
// saturation, so each weight kind gets the product instruction that cannot saturate on it:
//   w8: vpmaddwd (int16 x int16 -> int32): weight bytes u = w + 128 zero-extended (vpmovzxbw),
//       activations sign-extended to int16 once per call. Exact for every code, -128 included.
//       Two multiply instructions per 32 MACs: the same count as the u8s8 vpmaddubsw + vpmaddwd
//       pair that MLAS and fbgemm use, without their saturation (or their 7-bit activations).
//   w2: vpmaddubsw(codes 0..2, x): a pair is at most 2 * 2 * 128 = 512 in magnitude, so the int16
//       results are also *accumulated* in int16 (vpaddw) for up to 60 steps, then widened with one
//       vpmaddwd: about one multiply instruction per 32 MACs.
//   w4: vpmaddubsw(codes 0..15, int8 x) (pairs <= 3840: 8 steps in int16) or, for uint8
//       activations, vpmaddubsw(x, codes) (pairs <= 7650: 4 steps).

// Epilogue of 8 outputs (columns n..n+7 of token m, the ones < N): the reference's order.
DITQ_AVX2 inline void store8(const Gemm& g, int64_t m, int64_t n, __m256i acc) {
  const int64_t left = g.N - n;
  if (left <= 0) return;
  if (left < 8) {
    alignas(32) int32_t t[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(t), acc);
    for (int64_t j = 0; j < left; ++j) store(g, m, n + j, t[j]);
    return;
  }
  if (g.offset) acc = _mm256_sub_epi32(acc, _mm256_set1_epi32(g.offset * g.xsum[m]));
  __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(g.xs[m]));
  v = _mm256_mul_ps(v, g.ws_per_row ? _mm256_loadu_ps(g.ws + n) : _mm256_set1_ps(g.ws[0]));
  if (g.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(g.bias + n));
  _mm256_storeu_ps(g.out + m * g.ldo + n, v);
}

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

// int8 weights (prepack_w8 layout) with vpdpbusd (kAvxVnni): per step of 4 inputs, one 32-byte
// load is the column block's 8 columns x 4 inputs, u = w + 128 against a broadcast dword of x.
template <int MR, int DOT>
DITQ_AVX2 void tile_w8_dot(const Gemm& g, int64_t m0, int64_t n0) {
  const uint8_t* pw = g.w + (n0 / kPanel) * g.ldw + (n0 % kPanel) * 4;
  const int8_t* xp[MR];
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) xp[i] = g.x + (m0 + i) * g.ldx;
  __m256i acc[MR];
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_si256();
  const int64_t steps = (g.K + 3) / 4;
  for (int64_t t = 0; t < steps; ++t, pw += 256) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pw));
    DITQ_UNROLL
    for (int i = 0; i < MR; ++i) {
      int32_t x4;
      std::memcpy(&x4, xp[i] + 4 * t, 4);
      acc[i] = dpbusd256<DOT>(acc[i], wv, _mm256_set1_epi32(x4));
    }
  }
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) store8(g, m0 + i, n0, acc[i]);
}

// int8 weights (prepack_w8 layout), x as int16 rows [M, ldx] (K padded to 4 with zeros). Per step
// of 4 inputs: two 16-byte halves of the column block (4 columns x 4 inputs each) zero-extended
// to int16, and a broadcast of the token's 4 inputs as int16; vpmaddwd leaves each column's sum
// in two int32 lanes, added pairwise at the end.
template <int MR>
DITQ_AVX2 void tile_w8_avx2(const Gemm& g, int64_t m0, int64_t n0) {
  const uint8_t* pw = g.w + (n0 / kPanel) * g.ldw + (n0 % kPanel) * 4;
  const int16_t* x16 = reinterpret_cast<const int16_t*>(g.x);
  const int16_t* xp[MR];
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) xp[i] = x16 + (m0 + i) * g.ldx;
  __m256i acc[MR][2];
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
  const int64_t steps = (g.K + 3) / 4;
  for (int64_t t = 0; t < steps; ++t, pw += 256) {
    const __m256i w0 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pw)));
    const __m256i w1 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pw + 16)));
    DITQ_UNROLL
    for (int i = 0; i < MR; ++i) {
      int64_t x4;
      std::memcpy(&x4, xp[i] + 4 * t, 8);
      const __m256i xb = _mm256_set1_epi64x(x4);
      acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(w0, xb));
      acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(w1, xb));
    }
  }
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) {
    // [c0 c0 c1 c1 c2 c2 c3 c3] and [c4 .. c7] -> hadd [c0 c1 c4 c5 | c2 c3 c6 c7] -> in order
    const __m256i s = _mm256_hadd_epi32(acc[i][0], acc[i][1]);
    store8(g, m0 + i, n0, _mm256_permute4x64_epi64(s, 0xD8));
  }
}

// Steps of 4 inputs between widenings of the int16 accumulators: |pair| <= 512, 60 * 512 < 2^15.
constexpr int64_t kW2Int16Steps = 60;

// Ternary weights (prepack_w2 layout: per 16 inputs, each column's dword holds 4 codes per byte),
// x int8 rows padded to 16. Codes are w + 1 (offset 1); padding codes are 0. DOT: vpdpbusd
// straight into int32 (kAvxVnni) instead of the int16 partial sums.
template <int MR, int DOT>
DITQ_AVX2 void tile_w2_avx2(const Gemm& g, int64_t m0, int64_t n0) {
  const uint8_t* pw = g.w + (n0 / kPanel) * g.ldw + (n0 % kPanel) * 4;
  const int8_t* xp[MR];
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) xp[i] = g.x + (m0 + i) * g.ldx;
  __m256i acc[MR], part[MR];
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_si256();
  const __m256i three = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
  const int64_t groups = (g.K + 15) / 16, per_flush = DOT ? groups : kW2Int16Steps / 4;
  for (int64_t t0 = 0; t0 < groups; t0 += per_flush) {
    DITQ_UNROLL
    for (int i = 0; i < MR; ++i) part[i] = _mm256_setzero_si256();
    const int64_t t1 = std::min(groups, t0 + per_flush);
    for (int64_t t = t0; t < t1; ++t) {
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pw + t * 256));
      DITQ_UNROLL
      for (int s = 0; s < 4; ++s) {
        const __m256i wv = _mm256_and_si256(_mm256_srli_epi16(packed, 2 * s), three);
        DITQ_UNROLL
        for (int i = 0; i < MR; ++i) {
          int32_t x4;
          std::memcpy(&x4, xp[i] + 16 * t + 4 * s, 4);
          if constexpr (DOT) {
            acc[i] = dpbusd256<DOT>(acc[i], wv, _mm256_set1_epi32(x4));
          } else {
            part[i] = _mm256_add_epi16(part[i], _mm256_maddubs_epi16(wv, _mm256_set1_epi32(x4)));
          }
        }
      }
    }
    if constexpr (!DOT) {
      DITQ_UNROLL
      for (int i = 0; i < MR; ++i) acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(part[i], ones));
    }
  }
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) store8(g, m0 + i, n0, acc[i]);
}

// W4A8 (prepack_w4 layout), x bytes [M, K]: per segment, int16 partial sums widened every
// `flush` steps of 8 inputs (DOT: vpdpbusd straight into int32), then the segment's float
// epilogue added into y as tile_w4_vnni does.
template <int MR, bool XU8, int DOT>
DITQ_AVX2 void tile_w4_avx2(const W4Gemm& g, int64_t m0, int64_t n0) {
  const uint8_t* pw = g.w + (n0 / kPanel) * g.ldw + (n0 % kPanel) * 4;
  const uint8_t* xp[MR];
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) xp[i] = g.x + (m0 + i) * g.ldx;
  __m256 y[MR];
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) y[i] = _mm256_setzero_ps();
  const int64_t left = g.N - n0;
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  // |pair| <= 2 * 15 * 128 = 3840 (int8 x): 4 steps of 2 products in int16; uint8 x: 7650, 2 steps
  const int64_t spg = g.L / 8;
  const int64_t flush = DOT ? spg : XU8 ? 2 : 4;
  // columns of this block that exist (the others read zeros from the padded tables)
  alignas(32) int32_t lane_ok[8];
  for (int j = 0; j < 8; ++j) lane_ok[j] = j < left ? -1 : 0;
  const __m256i valid = _mm256_load_si256(reinterpret_cast<const __m256i*>(lane_ok));
  int64_t gai = 0, gwi = 0, ka = 0, kw = 0;
  for (int64_t grp = 0; grp < g.S; ++grp) {
    __m256i acc[MR];
    DITQ_UNROLL
    for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_si256();
    for (int64_t t0 = grp * spg, t_end = t0 + spg; t0 < t_end; t0 += flush) {
      __m256i part[MR];
      DITQ_UNROLL
      for (int i = 0; i < MR; ++i) part[i] = _mm256_setzero_si256();
      const int64_t t1 = std::min(t_end, t0 + flush);
      for (int64_t t = t0; t < t1; ++t) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pw + t * 256));
        DITQ_UNROLL
        for (int half = 0; half < 2; ++half) {
          const __m256i wv = _mm256_and_si256(half ? _mm256_srli_epi16(v, 4) : v, low4);
          DITQ_UNROLL
          for (int i = 0; i < MR; ++i) {
            int32_t x4;
            std::memcpy(&x4, xp[i] + 8 * t + 4 * half, 4);
            const __m256i xb = _mm256_set1_epi32(x4);
            if constexpr (DOT) {
              acc[i] = XU8 ? dpbusd256<DOT>(acc[i], xb, wv) : dpbusd256<DOT>(acc[i], wv, xb);
            } else {
              part[i] = _mm256_add_epi16(part[i], XU8 ? _mm256_maddubs_epi16(xb, wv) : _mm256_maddubs_epi16(wv, xb));
            }
          }
        }
      }
      if constexpr (!DOT) {
        DITQ_UNROLL
        for (int i = 0; i < MR; ++i) acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(part[i], ones));
      }
    }
    const float* ws_row = g.ws + gwi * g.N + n0;
    const int32_t* wz_row = g.wz + gwi * g.N + n0;
    __m256 wsv;
    __m256i wzv;
    if (left >= 8) {
      wsv = _mm256_loadu_ps(ws_row);
      wzv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wz_row));
    } else {
      wsv = _mm256_maskload_ps(ws_row, valid);
      wzv = _mm256_maskload_epi32(wz_row, valid);
    }
    const __m256i wsum = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.wsum + grp * g.ldsum + n0));
    DITQ_UNROLL
    for (int i = 0; i < MR; ++i) {
      const int64_t m = m0 + i;
      const int32_t zx = XU8 ? g.xzero[m * g.GA + gai] : 0;
      const int32_t cx = g.xsum[m * g.S + grp] - static_cast<int32_t>(g.L) * zx;
      __m256i a = _mm256_sub_epi32(acc[i], _mm256_mullo_epi32(wzv, _mm256_set1_epi32(cx)));
      if (XU8) a = _mm256_sub_epi32(a, _mm256_mullo_epi32(wsum, _mm256_set1_epi32(zx)));
      const __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(a), _mm256_set1_ps(g.xs[m * g.GA + gai])), wsv);
      y[i] = _mm256_add_ps(y[i], v);
    }
    if (++ka == g.ra) ka = 0, ++gai;
    if (++kw == g.rw) kw = 0, ++gwi;
  }
  __m256 b = _mm256_setzero_ps();
  if (g.bias) b = left >= 8 ? _mm256_loadu_ps(g.bias + n0) : _mm256_maskload_ps(g.bias + n0, valid);
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) {
    const __m256 v = g.bias ? _mm256_add_ps(y[i], b) : y[i];
    float* o = g.out + (m0 + i) * g.ldo + n0;
    if (left >= 8) {
      _mm256_storeu_ps(o, v);
    } else {
      _mm256_maskstore_ps(o, valid, v);
    }
  }
}
#endif  // DITQ_X86

// ---------------------------------------------------------------------------------------------
// Drivers
// ---------------------------------------------------------------------------------------------

using PanelFn = void (*)(const Gemm&, int64_t, int64_t);

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

std::vector<int32_t> row_sums(const int8_t* x, int64_t M, int64_t K) {
  std::vector<int32_t> s(M);
  at::parallel_for(0, M, 64, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      int32_t t = 0;
      for (int64_t k = 0; k < K; ++k) t += x[m * K + k];
      s[m] = t;
    }
  });
  return s;
}

// int8 [M, K] -> int16 [M, Kp], Kp = K rounded up to a multiple of 4 (zeros): the AVX2 W8A8 tile's
// activations, widened once per call instead of once per column block.
std::vector<int16_t> widen_rows(const int8_t* x, int64_t M, int64_t K, int64_t* Kp_out) {
  const int64_t Kp = (K + 3) / 4 * 4;
  std::vector<int16_t> w(M * Kp, 0);
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m)
      for (int64_t k = 0; k < K; ++k) w[m * Kp + k] = x[m * K + k];
  });
  *Kp_out = Kp;
  return w;
}

// ---------------------------------------------------------------------------------------------
// Prepacked weights (both SIMD levels: AVX-512 reads whole panels, AVX2 8 columns of one). Both layouts are panels of 64 output columns, one after the
// other, each a sequence of 256-byte steps; inside a step, byte 4c + p belongs to column c of the
// panel (so 16 consecutive dwords are 16 columns: one vector of vpdpbusd's unsigned operand).
//   w8: step t covers inputs 4t..4t+3; byte p = w[n, 4t + p] ^ 0x80 (= w + 128), padding 0.
//   w2: step t covers inputs 16t..16t+15; byte p = sum_s code[n, 16t + 4s + p] << 2s (2 bits per
//       weight, codes w + 1, padding code 0).
// ---------------------------------------------------------------------------------------------

int64_t prepacked_bytes(int64_t N, int64_t K, int64_t inputs_per_step) {
  return (N + kPanel - 1) / kPanel * ((K + inputs_per_step - 1) / inputs_per_step) * 256;
}

void prepack_w8(const int8_t* w, int64_t N, int64_t K, uint8_t* out) {
  const int64_t steps = (K + 3) / 4, np = (N + kPanel - 1) / kPanel;
  at::parallel_for(0, np, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      uint8_t* dst = out + p * steps * 256;
      std::memset(dst, 0, steps * 256);
      for (int64_t c = 0; c < kPanel && p * kPanel + c < N; ++c) {
        const int8_t* row = w + (p * kPanel + c) * K;
        int64_t k = 0;
        for (; k + 4 <= K; k += 4) {  // four inputs = one dword, flipped to unsigned at once
          uint32_t d;
          std::memcpy(&d, row + k, 4);
          d ^= 0x80808080u;
          std::memcpy(dst + (k / 4) * 256 + c * 4, &d, 4);
        }
        for (; k < K; ++k) dst[(k / 4) * 256 + c * 4 + (k % 4)] = static_cast<uint8_t>(row[k]) ^ 0x80;
      }
    }
  });
}

void prepack_w2(const uint8_t* wk4, int64_t N, int64_t K, uint8_t* out) {
  const int64_t steps = (K + 15) / 16, np = (N + kPanel - 1) / kPanel, row_bytes = K / 4;
  at::parallel_for(0, np, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      uint8_t* dst = out + p * steps * 256;
      std::memset(dst, 0, steps * 256);
      for (int64_t c = 0; c < kPanel && p * kPanel + c < N; ++c) {
        const uint8_t* row = wk4 + (p * kPanel + c) * row_bytes;
        // k4 byte j holds the codes of inputs 4j..4j+3: they go to bytes 0..3 of the column's
        // dword in step j/4, at bit 2*(j%4). spread[b] puts b's four 2-bit fields in four bytes.
        for (int64_t j = 0; j < row_bytes; ++j) {
          const uint32_t b = row[j];
          const uint32_t spread = (b & 3) | ((b >> 2) & 3) << 8 | ((b >> 4) & 3) << 16 | ((b >> 6) & 3) << 24;
          uint32_t d;
          uint8_t* at = dst + (j / 4) * 256 + c * 4;
          std::memcpy(&d, at, 4);
          d |= spread << (2 * (j % 4));
          std::memcpy(at, &d, 4);
        }
      }
    }
  });
}

// Activations with rows padded to a multiple of `multiple` (zeros), when K is not one already:
// the AVX-512 tiles read whole dwords (w8) or whole 16-input groups (w2).
const int8_t* padded_rows(const int8_t* x, int64_t M, int64_t K, int64_t multiple, std::vector<int8_t>& buf,
                          int64_t* ld) {
  const int64_t Kp = (K + multiple - 1) / multiple * multiple;
  *ld = Kp;
  if (Kp == K) return x;
  buf.assign(M * Kp, 0);
  for (int64_t m = 0; m < M; ++m) std::memcpy(buf.data() + m * Kp, x + m * K, K);
  return buf.data();
}

Gemm make_gemm(const int8_t* x, const float* xs, const void* w, int64_t ldw, const float* ws, int64_t ws_per_row,
               const float* bias, float* out, int64_t M, int64_t N, int64_t K) {
  Gemm g;
  g.x = x;
  g.ldx = K;
  g.w = static_cast<const uint8_t*>(w);
  g.ldw = ldw;
  g.M = M;
  g.N = N;
  g.K = K;
  g.xsum = nullptr;
  g.offset = 0;
  g.xs = xs;
  g.ws = ws;
  g.ws_per_row = ws_per_row != 0;
  g.bias = bias;
  g.out = out;
  g.ldo = N;
  return g;
}

// Tables of one micro-tile function per token count 1..6 (index 0 unused).
#define DITQ_TILES(f, ...) {nullptr, f<1, ##__VA_ARGS__>, f<2, ##__VA_ARGS__>, f<3, ##__VA_ARGS__>, \
                            f<4, ##__VA_ARGS__>, f<5, ##__VA_ARGS__>, f<6, ##__VA_ARGS__>}

// kAvxVnni's encoding of vpdpbusd: VEX where the CPU has AVX-VNNI, else (a CPU with AVX-512 VNNI
// capped at kAvxVnni) EVEX.
inline bool vex_dot() { return has_avx_vnni(); }

// `wpre`: the prepacked weight (prepack_w8), read by every SIMD level.
void w8a8_gemm(Gemm g, const uint8_t* wpre, int64_t isa) {
#if DITQ_X86
  if (isa >= kAvx2) {
    const std::vector<int32_t> xsum = row_sums(g.x, g.M, g.K);
    g.xsum = xsum.data();
    g.offset = 128;
    g.w = wpre;
    g.ldw = prepacked_bytes(kPanel, g.K, 4);  // bytes per panel
    std::vector<int8_t> buf;
    if (isa == kAvx512Vnni) {
      g.x = padded_rows(g.x, g.M, g.K, 4, buf, &g.ldx);
      static const PanelFn fns[] = DITQ_TILES(tile_w8_vnni);
      run_panels<kMR512>(g, fns, kPanel);
    } else if (isa == kAvxVnni) {
      g.x = padded_rows(g.x, g.M, g.K, 4, buf, &g.ldx);
      static const PanelFn vex[] = DITQ_TILES(tile_w8_dot, kVexDot), evex[] = DITQ_TILES(tile_w8_dot, kEvexDot);
      run_panels<kMR256>(g, vex_dot() ? vex : evex, kNB256);
    } else {
      const std::vector<int16_t> x16 = widen_rows(g.x, g.M, g.K, &g.ldx);
      g.x = reinterpret_cast<const int8_t*>(x16.data());
      static const PanelFn fns[] = DITQ_TILES(tile_w8_avx2);
      run_panels<kMR256>(g, fns, kNB256);
    }
    return;
  }
#endif
  throw std::runtime_error("the int8 GEMM needs AVX2");
}

void w2a8_gemm(Gemm g, const uint8_t* wpre, int64_t isa) {
#if DITQ_X86
  if (isa >= kAvx2) {
    const std::vector<int32_t> xsum = row_sums(g.x, g.M, g.K);
    g.xsum = xsum.data();
    g.offset = 1;  // codes are w + 1
    std::vector<int8_t> buf;
    g.x = padded_rows(g.x, g.M, g.K, 16, buf, &g.ldx);
    g.w = wpre;
    g.ldw = prepacked_bytes(kPanel, g.K, 16);
    if (isa == kAvx512Vnni) {
      static const PanelFn fns[] = DITQ_TILES(tile_w2_vnni);
      run_panels<kMR512>(g, fns, kPanel);
    } else {
      static const PanelFn avx2[] = DITQ_TILES(tile_w2_avx2, kMaddubs), vex[] = DITQ_TILES(tile_w2_avx2, kVexDot),
                           evex[] = DITQ_TILES(tile_w2_avx2, kEvexDot);
      run_panels<kMR256>(g, isa == kAvx2 ? avx2 : vex_dot() ? vex : evex, kNB256);
    }
    return;
  }
#endif
  throw std::runtime_error("the ternary GEMM needs AVX2");
}

// int4 codes packed two per byte along K (pack_int4: byte j of a row holds input 2j in the low
// nibble, 2j + 1 in the high one) -> panels of 64 columns of 256-byte steps of 8 inputs: byte
// 4c + p of step t holds code[n, 8t + p] | code[n, 8t + 4 + p] << 4 (padding codes 0), followed by
// Σq_w per segment of L inputs, int32 [K/L, panels * 64]. K is a multiple of L, L of 8.
int64_t prepacked_bytes_w4(int64_t N, int64_t K, int64_t L) {
  const int64_t np = (N + kPanel - 1) / kPanel;
  return np * (K / 8) * 256 + (K / L) * np * kPanel * 4;
}

void prepack_w4(const uint8_t* wp, int64_t N, int64_t K, int64_t L, uint8_t* out) {
  if (L <= 0 || K % L || L % 8) throw std::runtime_error("prepack_w4: K must be a multiple of L, L of 8");
  const int64_t steps = K / 8, np = (N + kPanel - 1) / kPanel, G = K / L, ld = np * kPanel;
  int32_t* sums = reinterpret_cast<int32_t*>(out + np * steps * 256);
  at::parallel_for(0, np, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      uint8_t* dst = out + p * steps * 256;
      std::memset(dst, 0, steps * 256);
      for (int64_t grp = 0; grp < G; ++grp)
        for (int64_t c = 0; c < kPanel; ++c) sums[grp * ld + p * kPanel + c] = 0;
      for (int64_t c = 0; c < kPanel && p * kPanel + c < N; ++c) {
        const int64_t n = p * kPanel + c;
        const uint8_t* row = wp + n * (K / 2);
        for (int64_t k = 0; k < K; ++k) {
          const uint8_t code = (row[k / 2] >> (4 * (k & 1))) & 0x0F;
          const int64_t r = k % 8;
          dst[(k / 8) * 256 + 4 * c + (r & 3)] |= static_cast<uint8_t>(code << (4 * (r >> 2)));
          sums[(k / L) * ld + n] += code;
        }
      }
    }
  });
}

void w4a8_gemm(W4Gemm g, bool x_unsigned, int64_t isa) {
#if DITQ_X86
  if (isa >= kAvx2) {
    std::vector<int32_t> xsum(g.M * g.S);
    at::parallel_for(0, g.M, 16, [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m)
        for (int64_t grp = 0; grp < g.S; ++grp) {
          int32_t t = 0;
          const uint8_t* r = g.x + m * g.ldx + grp * g.L;
          if (x_unsigned) {
            for (int64_t k = 0; k < g.L; ++k) t += r[k];
          } else {
            for (int64_t k = 0; k < g.L; ++k) t += static_cast<int8_t>(r[k]);
          }
          xsum[m * g.S + grp] = t;
        }
    });
    g.xsum = xsum.data();
    using Fn = void (*)(const W4Gemm&, int64_t, int64_t);
    if (isa == kAvx512Vnni) {
      static const Fn fu[] = DITQ_TILES(tile_w4_vnni, true), fs[] = DITQ_TILES(tile_w4_vnni, false);
      run_panels<kMR512>(g, x_unsigned ? fu : fs, kPanel);
    } else {
      const int dot = isa == kAvx2 ? kMaddubs : vex_dot() ? kVexDot : kEvexDot;
      static const Fn fu[3][kMR256 + 1] = {DITQ_TILES(tile_w4_avx2, true, kMaddubs),
                                           DITQ_TILES(tile_w4_avx2, true, kVexDot),
                                           DITQ_TILES(tile_w4_avx2, true, kEvexDot)};
      static const Fn fs[3][kMR256 + 1] = {DITQ_TILES(tile_w4_avx2, false, kMaddubs),
                                           DITQ_TILES(tile_w4_avx2, false, kVexDot),
                                           DITQ_TILES(tile_w4_avx2, false, kEvexDot)};
      run_panels<kMR256>(g, (x_unsigned ? fu : fs)[dot], kNB256);
    }
    return;
  }
#endif
  throw std::runtime_error("the W4A8 GEMM needs AVX2");
}

// Per-token (per row of `group` values) absmax int8 quantization, BitNet b1.58's rule in float32:
// a = max(max|x|, 1e-5), q = clamp(round_half_even(x * ((1 / a) * 127)), -128, 127), s = a / 127.
void quantize_row_scalar(const float* xr, int64_t n, int8_t* q, float* s) {
  float amax = 0.0f;
  for (int64_t k = 0; k < n; ++k) amax = std::max(amax, std::fabs(xr[k]));
  amax = std::max(amax, 1e-5f);
  const float inv = (1.0f / amax) * 127.0f;  // what `127.0 / a` computes in PyTorch
  *s = amax / 127.0f;
  for (int64_t k = 0; k < n; ++k)
    q[k] = static_cast<int8_t>(std::min(127.0f, std::max(-128.0f, std::nearbyint(xr[k] * inv))));
}

void quantize_row(const float* x, int64_t n, int8_t* q, float* s, int64_t isa) {
#if DITQ_X86
  if (isa == kAvx512Vnni) return quantize_row_512(x, n, q, s);
  if (isa == kAvx2) return quantize_row_256(x, n, q, s);
#endif
  quantize_row_scalar(x, n, q, s);
}

void quantize_per_token(const float* xp, int8_t* qp, float* sp, int64_t rows, int64_t group, int64_t isa) {
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) quantize_row(xp + r * group, group, qp + r * group, sp + r, isa);
  });
}

// ---------------------------------------------------------------------------------------------
// Producers fused with per-token int8 quantization: LayerNorm + adaLN modulation, GELU (tanh),
// RMSNorm + adaLN modulation, SwiGLU
// ---------------------------------------------------------------------------------------------
// A row's producer values go to a thread-local buffer (a few KB, cache-resident) and are quantized
// there by quantize_row: the float activation is never written to memory and read back, once per
// elementwise op, as the unfused PyTorch ops do. Same steps and roundings as the references
// (ops.ref_layernorm_modulate_quantize_int8, ref_gelu_quantize_int8) in float32; only a sum's order
// and exp's last bits differ, which can move a code by one at a rounding boundary.

constexpr float kGeluBeta = static_cast<float>(M_SQRT2 * M_2_SQRTPI * 0.5);  // sqrt(2 / pi), as PyTorch
constexpr float kGeluKappa = 0.044715f;

// GELU (tanh) as x * sigmoid(2u) = x / (1 + exp(-2u)), u = beta (x + kappa x^3): equal to
// 0.5 x (1 + tanh(u)) without its cancellation for negative x.
inline float gelu_scalar(float x) {
  const float u = kGeluBeta * (x + kGeluKappa * (x * x * x));
  return x / (1.0f + std::exp(-2.0f * u));
}

void layernorm_modulate_row_scalar(const float* x, const float* shift, const float* scale, int64_t n, float eps,
                                   float* out) {
  double sum = 0.0;
  for (int64_t k = 0; k < n; ++k) sum += x[k];
  const float mean = static_cast<float>(sum / n);
  double ss = 0.0;
  for (int64_t k = 0; k < n; ++k) ss += static_cast<double>(x[k] - mean) * (x[k] - mean);
  const float rstd = 1.0f / std::sqrt(static_cast<float>(ss / n) + eps);
  for (int64_t k = 0; k < n; ++k) {
    const float y = (x[k] - mean) * rstd;
    const float t = 1.0f + scale[k];
    const float m = y * t;
    out[k] = m + shift[k];
  }
}

#if DITQ_X86
// exp(v) for |v| <= 88: Cephes' expf (range reduction by ln 2, degree-6 polynomial), about 1 ulp.
DITQ_AVX512 inline __m512 exp_512(__m512 v) {
  v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), v);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

DITQ_AVX512 void gelu_row_512(const float* x, int64_t n, float* out) {
  const __m512 beta = _mm512_set1_ps(kGeluBeta), kappa = _mm512_set1_ps(kGeluKappa);
  const __m512 one = _mm512_set1_ps(1.0f), m2 = _mm512_set1_ps(-2.0f);
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 mask = lanes16(n - k);
    const __m512 v = _mm512_maskz_loadu_ps(mask, x + k);
    const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
    const __m512 u = _mm512_mul_ps(beta, _mm512_add_ps(v, _mm512_mul_ps(kappa, cube)));
    const __m512 e = exp_512(_mm512_mul_ps(m2, u));
    _mm512_mask_storeu_ps(out + k, mask, _mm512_div_ps(v, _mm512_add_ps(one, e)));
  }
}

DITQ_AVX512 void layernorm_modulate_row_512(const float* x, const float* shift, const float* scale, int64_t n,
                                            float eps, float* out) {
  __m512d sum = _mm512_setzero_pd();  // float64 sums: the mean and variance to float32 accuracy
  for (int64_t k = 0; k < n; k += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(lanes16(n - k), x + k);
    sum = _mm512_add_pd(sum, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    sum = _mm512_add_pd(sum, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
  }
  const float mean = static_cast<float>(_mm512_reduce_add_pd(sum) / n);
  const __m512 vmean = _mm512_set1_ps(mean);
  __m512d ss = _mm512_setzero_pd();
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 mask = lanes16(n - k);
    const __m512 d = _mm512_maskz_sub_ps(mask, _mm512_maskz_loadu_ps(mask, x + k), vmean);
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(d));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(d), 1)));
    ss = _mm512_fmadd_pd(lo, lo, _mm512_fmadd_pd(hi, hi, ss));
  }
  const __m512 rstd = _mm512_set1_ps(1.0f / std::sqrt(static_cast<float>(_mm512_reduce_add_pd(ss) / n) + eps));
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 mask = lanes16(n - k);
    const __m512 y = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, x + k), vmean), rstd);
    const __m512 t = _mm512_add_ps(one, _mm512_maskz_loadu_ps(mask, scale + k));
    _mm512_mask_storeu_ps(out + k, mask, _mm512_add_ps(_mm512_mul_ps(y, t), _mm512_maskz_loadu_ps(mask, shift + k)));
  }
}

// exp_512 in 8 lanes; 2^n built in the exponent field (n in [-126, 127] after the clamp).
DITQ_AVX2 inline __m256 exp_256(__m256 v) {
  v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), v);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

DITQ_AVX2 void gelu_row_256(const float* x, int64_t n, float* out) {
  const __m256 beta = _mm256_set1_ps(kGeluBeta), kappa = _mm256_set1_ps(kGeluKappa);
  const __m256 one = _mm256_set1_ps(1.0f), m2 = _mm256_set1_ps(-2.0f);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    const __m256 cube = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
    const __m256 u = _mm256_mul_ps(beta, _mm256_add_ps(v, _mm256_mul_ps(kappa, cube)));
    _mm256_storeu_ps(out + k, _mm256_div_ps(v, _mm256_add_ps(one, exp_256(_mm256_mul_ps(m2, u)))));
  }
  for (; k < n; ++k) out[k] = gelu_scalar(x[k]);
}

DITQ_AVX2 void layernorm_modulate_row_256(const float* x, const float* shift, const float* scale, int64_t n,
                                          float eps, float* out) {
  __m256d sum = _mm256_setzero_pd();  // float64 sums, as in the AVX-512 path
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    sum = _mm256_add_pd(sum, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    sum = _mm256_add_pd(sum, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
  alignas(32) double part[4];
  _mm256_store_pd(part, sum);
  double total = (part[0] + part[1]) + (part[2] + part[3]);
  for (; k < n; ++k) total += x[k];
  const float mean = static_cast<float>(total / n);
  const __m256 vmean = _mm256_set1_ps(mean);
  __m256d ss = _mm256_setzero_pd();
  for (k = 0; k + 8 <= n; k += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + k), vmean);
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(d)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(d, 1));
    ss = _mm256_fmadd_pd(lo, lo, _mm256_fmadd_pd(hi, hi, ss));
  }
  _mm256_store_pd(part, ss);
  double sq = (part[0] + part[1]) + (part[2] + part[3]);
  for (; k < n; ++k) sq += static_cast<double>(x[k] - mean) * (x[k] - mean);
  const float rstd = 1.0f / std::sqrt(static_cast<float>(sq / n) + eps);
  const __m256 vrstd = _mm256_set1_ps(rstd), one = _mm256_set1_ps(1.0f);
  for (k = 0; k + 8 <= n; k += 8) {
    const __m256 y = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + k), vmean), vrstd);
    const __m256 t = _mm256_add_ps(one, _mm256_loadu_ps(scale + k));
    _mm256_storeu_ps(out + k, _mm256_add_ps(_mm256_mul_ps(y, t), _mm256_loadu_ps(shift + k)));
  }
  for (; k < n; ++k) {
    const float y = (x[k] - mean) * rstd;
    const float t = 1.0f + scale[k];
    const float m = y * t;
    out[k] = m + shift[k];
  }
}
#endif

// Runs producer(r, buf) for rows [0, rows) (it writes row r's K float values into buf, a per-thread
// buffer) and quantizes each row with quantize_row: the shared loop of the fused producers below.
template <class Producer>
void quantize_produced_rows(int64_t rows, int64_t K, int8_t* q, float* s, int64_t isa, const Producer& producer) {
  at::parallel_for(0, rows, 4, [&](int64_t b, int64_t e) {
    std::vector<float> buf(K);
    for (int64_t r = b; r < e; ++r) {
      producer(r, buf.data());
      quantize_row(buf.data(), K, q + r * K, s + r, isa);
    }
  });
}

// x [rows, K] -> GELU(x) quantized per row.
void gelu_quantize(const float* x, int8_t* q, float* s, int64_t rows, int64_t K, int64_t isa) {
  quantize_produced_rows(rows, K, q, s, isa, [&](int64_t r, float* buf) {
    const float* xr = x + r * K;
#if DITQ_X86
    if (isa == kAvx512Vnni) return gelu_row_512(xr, K, buf);
    if (isa == kAvx2) return gelu_row_256(xr, K, buf);
#endif
    for (int64_t k = 0; k < K; ++k) buf[k] = gelu_scalar(xr[k]);
  });
}

// x [B, T, K], shift and scale [B, K] -> (LayerNorm(x) * (1 + scale) + shift) quantized per row.
void layernorm_modulate_quantize(const float* x, const float* shift, const float* scale, int8_t* q, float* s,
                                 int64_t B, int64_t T, int64_t K, float eps, int64_t isa) {
  quantize_produced_rows(B * T, K, q, s, isa, [&](int64_t r, float* buf) {
    const float* sh = shift + (r / T) * K;
    const float* sc = scale + (r / T) * K;
#if DITQ_X86
    if (isa == kAvx512Vnni) return layernorm_modulate_row_512(x + r * K, sh, sc, K, eps, buf);
    if (isa == kAvx2) return layernorm_modulate_row_256(x + r * K, sh, sc, K, eps, buf);
#endif
    layernorm_modulate_row_scalar(x + r * K, sh, sc, K, eps, buf);
  });
}

// RMSNorm (with its weight) + adaLN modulation, and SwiGLU, fused the same way (references
// ops.ref_rmsnorm_modulate_quantize_int8, ref_swiglu_quantize_int8). RMSNorm: the sum of squares
// in float64 (PyTorch sums float32 squares: ours is the closer mean), r = 1.0f / sqrtf(mean + eps)
// (torch.rsqrt, MKL's, equals that for 99% of inputs, the correctly rounded 1/sqrt for 72%), then
// per element w * (x * r), * (1 + scale), + shift, each step rounded to float32 as in eager.
// SiLU as PyTorch's kernel: g / (1 + exp(-g)), then * up.

inline float rmsnorm_modulate_scalar(float x, float r, float w, float shift, float scale) {
  const float y = w * (x * r);
  const float t = 1.0f + scale;
  const float m = y * t;
  return m + shift;
}

inline float rms_inv(double sum_sq, int64_t n, float eps) {
  return 1.0f / std::sqrt(static_cast<float>(sum_sq / n) + eps);
}

void rmsnorm_modulate_row_scalar(const float* x, const float* w, const float* shift, const float* scale, int64_t n,
                                 float eps, float* out) {
  double ss = 0.0;
  for (int64_t k = 0; k < n; ++k) ss += static_cast<double>(x[k]) * x[k];
  const float r = rms_inv(ss, n, eps);
  for (int64_t k = 0; k < n; ++k) out[k] = rmsnorm_modulate_scalar(x[k], r, w[k], shift[k], scale[k]);
}

// std::exp overflows to inf for g < -88.7: g / inf = -0, as PyTorch.
inline float swiglu_scalar(float g, float u) { return (g / (1.0f + std::exp(-g))) * u; }

#if DITQ_X86
// exp_512 / exp_256 clamp their argument at 88.3 (no inf), so below this gate g / (1 + exp(-g))
// would be g / 2e38; PyTorch gets g / inf = -0 there (|silu| < 1e-36 down to -88.7): we store 0.
constexpr float kSiluZeroBelow = -88.3f;

DITQ_AVX512 void rmsnorm_modulate_row_512(const float* x, const float* w, const float* shift, const float* scale,
                                          int64_t n, float eps, float* out) {
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();  // two chains: FMA latency
  for (int64_t k = 0; k < n; k += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(lanes16(n - k), x + k);
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    s0 = _mm512_fmadd_pd(lo, lo, s0);  // float products are exact in float64
    s1 = _mm512_fmadd_pd(hi, hi, s1);
  }
  const __m512 r = _mm512_set1_ps(rms_inv(_mm512_reduce_add_pd(_mm512_add_pd(s0, s1)), n, eps));
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 mask = lanes16(n - k);
    const __m512 xr = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + k), r);
    const __m512 y = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, w + k), xr);
    const __m512 t = _mm512_add_ps(one, _mm512_maskz_loadu_ps(mask, scale + k));
    _mm512_mask_storeu_ps(out + k, mask, _mm512_add_ps(_mm512_mul_ps(y, t), _mm512_maskz_loadu_ps(mask, shift + k)));
  }
}

DITQ_AVX512 void swiglu_row_512(const float* gate, const float* up, int64_t n, float* out) {
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f), low = _mm512_set1_ps(kSiluZeroBelow);
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 mask = lanes16(n - k);
    const __m512 g = _mm512_maskz_loadu_ps(mask, gate + k);
    const __m512 e = exp_512(_mm512_sub_ps(zero, g));
    __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, e));
    silu = _mm512_mask_mov_ps(silu, _mm512_cmp_ps_mask(g, low, _CMP_LT_OQ), zero);
    _mm512_mask_storeu_ps(out + k, mask, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(mask, up + k)));
  }
}

DITQ_AVX2 void rmsnorm_modulate_row_256(const float* x, const float* w, const float* shift, const float* scale,
                                        int64_t n, float eps, float* out) {
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    s0 = _mm256_fmadd_pd(lo, lo, s0);
    s1 = _mm256_fmadd_pd(hi, hi, s1);
  }
  alignas(32) double part[4];
  _mm256_store_pd(part, _mm256_add_pd(s0, s1));
  double ss = (part[0] + part[1]) + (part[2] + part[3]);
  for (; k < n; ++k) ss += static_cast<double>(x[k]) * x[k];
  const float r = rms_inv(ss, n, eps);
  const __m256 vr = _mm256_set1_ps(r), one = _mm256_set1_ps(1.0f);
  for (k = 0; k + 8 <= n; k += 8) {
    const __m256 y = _mm256_mul_ps(_mm256_loadu_ps(w + k), _mm256_mul_ps(_mm256_loadu_ps(x + k), vr));
    const __m256 t = _mm256_add_ps(one, _mm256_loadu_ps(scale + k));
    _mm256_storeu_ps(out + k, _mm256_add_ps(_mm256_mul_ps(y, t), _mm256_loadu_ps(shift + k)));
  }
  for (; k < n; ++k) out[k] = rmsnorm_modulate_scalar(x[k], r, w[k], shift[k], scale[k]);
}

DITQ_AVX2 void swiglu_row_256(const float* gate, const float* up, int64_t n, float* out) {
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f), low = _mm256_set1_ps(kSiluZeroBelow);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 g = _mm256_loadu_ps(gate + k);
    const __m256 e = exp_256(_mm256_sub_ps(zero, g));
    __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, e));
    silu = _mm256_blendv_ps(silu, zero, _mm256_cmp_ps(g, low, _CMP_LT_OQ));
    _mm256_storeu_ps(out + k, _mm256_mul_ps(silu, _mm256_loadu_ps(up + k)));
  }
  for (; k < n; ++k) out[k] = swiglu_scalar(gate[k], up[k]);
}
#endif

// x [B, T, K], weight [K], shift and scale [B, K] -> (RMSNorm(x) * weight * (1 + scale) + shift)
// quantized per row.
void rmsnorm_modulate_quantize(const float* x, const float* w, const float* shift, const float* scale, int8_t* q,
                               float* s, int64_t B, int64_t T, int64_t K, float eps, int64_t isa) {
  quantize_produced_rows(B * T, K, q, s, isa, [&](int64_t r, float* buf) {
    const float* sh = shift + (r / T) * K;
    const float* sc = scale + (r / T) * K;
#if DITQ_X86
    if (isa == kAvx512Vnni) return rmsnorm_modulate_row_512(x + r * K, w, sh, sc, K, eps, buf);
    if (isa == kAvx2) return rmsnorm_modulate_row_256(x + r * K, w, sh, sc, K, eps, buf);
#endif
    rmsnorm_modulate_row_scalar(x + r * K, w, sh, sc, K, eps, buf);
  });
}

// gate, up [rows, K] -> silu(gate) * up quantized per row.
void swiglu_quantize(const float* gate, const float* up, int8_t* q, float* s, int64_t rows, int64_t K, int64_t isa) {
  quantize_produced_rows(rows, K, q, s, isa, [&](int64_t r, float* buf) {
    const float* g = gate + r * K;
    const float* u = up + r * K;
#if DITQ_X86
    if (isa == kAvx512Vnni) return swiglu_row_512(g, u, K, buf);
    if (isa == kAvx2) return swiglu_row_256(g, u, K, buf);
#endif
    for (int64_t k = 0; k < K; ++k) buf[k] = swiglu_scalar(g[k], u[k]);
  });
}

// ---------------------------------------------------------------------------------------------
// Weight-only GEMMs: float32 activations x ternary (k4) or int4 group-wise weights
// ---------------------------------------------------------------------------------------------
//
// out[m, n] = sum_k x[m, k] * w[n, k] + bias[n], with w dequantized exactly as the references do
// in float32: ternary s * (code - 1), int4 (q - z) * s per group. A work item (a block of kWoM
// tokens x kWoN columns) first dequantizes its kWoN weight rows into a thread-local float buffer,
// each weight value through a 16-entry table lookup (vpermps: the table holds the row's (or
// group's) dequantized values, indexed by the code; the lane shifts bring each lane's code to the
// low bits), so the buffer holds the reference's weights bit for bit; the tokens then run an fp32
// micro-kernel of MR tokens x 4 columns (dot products along K, horizontal sums at the end) over
// it. Only the summation order differs from the reference (F.linear on the dequantized weight).
// The weights stay packed in memory: 2 or 4 bits each, plus one buffer of kWoN x K floats per
// thread. Small batches are what these ops are for: reading packed weights costs 1/16 (ternary)
// or 1/8 (int4) of the fp32 weight traffic.

constexpr int64_t kWoN = 16;  // columns per work item (rows of the dequantized buffer)
constexpr int64_t kWoM = 64;  // tokens per work item
constexpr int kWoNR = 4;      // columns per micro-tile

struct WoGemm {
  const float* x;        // [M, K]
  const uint8_t* w;      // ternary k4 [N, K/4] or int4 [N, K/2]
  bool int4;
  const float* scale;    // ternary: [1] or [N]; int4: [N, G]
  bool scale_per_row;    // ternary only
  const float* zero;     // int4: [N, G]
  int64_t group;         // int4: inputs per group (K / G)
  const float* bias;     // [N] or nullptr
  float* out;            // [M, N]
  int64_t M, N, K, Kp;   // Kp: K rounded up to the vector width (buffer row length)
};

// Scalar dequantization of weight row n, inputs [k0, K), into buf (zeros in [K, Kp)): the
// references' numbers.
void wo_dequant_row_scalar(const WoGemm& g, int64_t n, float* buf, int64_t k0) {
  if (!g.int4) {
    const float s = g.scale[g.scale_per_row ? n : 0];
    const uint8_t* r = g.w + n * (g.K / 4);
    for (int64_t k = k0; k < g.K; ++k) buf[k] = s * static_cast<float>(static_cast<int>((r[k >> 2] >> (2 * (k & 3))) & 3) - 1);
  } else {
    const int64_t G = g.K / g.group;
    const uint8_t* r = g.w + n * (g.K / 2);
    for (int64_t k = k0; k < g.K; ++k) {
      const int q = (r[k >> 1] >> (4 * (k & 1))) & 15;
      const int64_t gi = n * G + k / g.group;
      buf[k] = (static_cast<float>(q) - g.zero[gi]) * g.scale[gi];
    }
  }
  for (int64_t k = g.K; k < g.Kp; ++k) buf[k] = 0.0f;
}

#if DITQ_X86
// AVX-512: 16 weights per step. Ternary: one dword of k4 bytes = inputs k..k+15; lane i shifted
// right by 2i has its code in bits 1-0 and the table repeats every 4 entries. int4: 8 bytes =
// inputs k..k+15; lanes 0-7 take the low dword, lanes 8-15 the high one, lane i shifted right by
// 4 (i mod 8) has its code in bits 3-0.
// AVX-512 decoding, shared by the buffered and the fused paths. A table holds a row's (ternary)
// or a group's (int4) 16 dequantized values; vpermps picks each lane's by its code.
__attribute__((target("avx512f"))) inline __m512 wo_ternary_table_512(const WoGemm& g, int64_t n) {
  const float s = g.scale[g.scale_per_row ? n : 0];
  return _mm512_set_ps(0.0f, s * 1.0f, s * 0.0f, s * -1.0f, 0.0f, s * 1.0f, s * 0.0f, s * -1.0f, 0.0f, s * 1.0f,
                       s * 0.0f, s * -1.0f, 0.0f, s * 1.0f, s * 0.0f, s * -1.0f);
}

__attribute__((target("avx512f"))) inline __m512 wo_int4_table_512(const WoGemm& g, int64_t n, int64_t gi) {
  const int64_t G = g.K / g.group;
  const __m512 codes = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  // (q - z) * s for q = 0..15, in the reference's order
  return _mm512_mul_ps(_mm512_sub_ps(codes, _mm512_set1_ps(g.zero[n * G + gi])), _mm512_set1_ps(g.scale[n * G + gi]));
}

// 16 ternary weights from one dword of k4 bytes.
__attribute__((target("avx512f"))) inline __m512 wo_ternary_decode_512(uint32_t d, __m512 table) {
  const __m512i shifts = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  return _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(d)), shifts), table);
}

// 16 int4 weights from the 8 bytes at p.
__attribute__((target("avx512f"))) inline __m512 wo_int4_decode_512(const uint8_t* p, __m512 table) {
  const __m512i shifts = _mm512_set_epi32(28, 24, 20, 16, 12, 8, 4, 0, 28, 24, 20, 16, 12, 8, 4, 0);
  const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i b = _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_permutexvar_epi32(halves, b), shifts), table);
}

__attribute__((target("avx512f"))) void wo_dequant_row_512(const WoGemm& g, int64_t n, float* buf) {
  const int64_t K16 = g.K / 16 * 16;
  if (!g.int4) {
    const __m512 table = wo_ternary_table_512(g, n);
    const uint8_t* r = g.w + n * (g.K / 4);
    for (int64_t k = 0; k < K16; k += 16) {
      uint32_t d;
      std::memcpy(&d, r + k / 4, 4);
      _mm512_storeu_ps(buf + k, wo_ternary_decode_512(d, table));
    }
  } else if (g.group % 16 == 0) {
    const int64_t G = g.K / g.group;
    const uint8_t* r = g.w + n * (g.K / 2);
    for (int64_t gi = 0; gi < G; ++gi) {
      const __m512 table = wo_int4_table_512(g, n, gi);  // one table per group
      const int64_t k_end = (gi + 1) * g.group;
      for (int64_t k = gi * g.group; k < k_end; k += 16) _mm512_storeu_ps(buf + k, wo_int4_decode_512(r + k / 2, table));
    }
  } else {
    wo_dequant_row_scalar(g, n, buf, 0);  // groups that do not align with the vectors
    return;
  }
  wo_dequant_row_scalar(g, n, buf, K16);  // the last K mod 16 inputs (K is a multiple of 4), padding
}

// MR tokens x 4 columns of the buffer (rows of Kp floats, zero past K); x rows read with a mask
// past K. Columns past N are zero rows in the buffer and are not stored.
template <int MR>
__attribute__((target("avx512f"))) void wo_tile_512(const WoGemm& g, int64_t m0, int64_t n0, const float* wb) {
  __m512 acc[MR][kWoNR];
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) {
    DITQ_UNROLL
    for (int j = 0; j < kWoNR; ++j) acc[i][j] = _mm512_setzero_ps();
  }
  const float* xr = g.x + m0 * g.K;
  for (int64_t k = 0; k < g.Kp; k += 16) {
    const __mmask16 mask = lanes16(g.K - k);
    __m512 w[kWoNR];
    DITQ_UNROLL
    for (int j = 0; j < kWoNR; ++j) w[j] = _mm512_loadu_ps(wb + j * g.Kp + k);
    DITQ_UNROLL
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, xr + i * g.K + k);
      DITQ_UNROLL
      for (int j = 0; j < kWoNR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, w[j], acc[i][j]);
    }
  }
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) {
    DITQ_UNROLL
    for (int j = 0; j < kWoNR; ++j) {
      const int64_t n = n0 + j;
      if (n >= g.N) break;
      float v = _mm512_reduce_add_ps(acc[i][j]);
      if (g.bias) v += g.bias[n];
      g.out[(m0 + i) * g.N + n] = v;
    }
  }
}

// A few tokens (M <= kWoFusedM), AVX-512: no buffer. Each column's 16 weights are decoded in
// registers exactly as wo_dequant_row_512 does and multiplied into MR accumulators at once, so
// the weight bytes are read once and the dequantized values never go to memory. NC columns are
// done side by side so that MR * NC independent FMA chains hide the FMA latency (one token and
// one column would be one chain). Each (token, column) sum is still one accumulator over k in
// order, reduced at the end: the numbers of wo_tile_512, whatever M. Ternary any K (a multiple of
// 4); int4 needs groups of 16k inputs (the caller checks).
template <int MR, int NC>
__attribute__((target("avx512f"))) void wo_fused_cols_512(const WoGemm& g, int64_t n) {
  const float* xr = g.x;
  __m512 acc[MR][NC];
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) {
    DITQ_UNROLL
    for (int c = 0; c < NC; ++c) acc[i][c] = _mm512_setzero_ps();
  }
  if (!g.int4) {
    const int64_t K16 = g.K / 16 * 16;
    const __mmask16 tail = lanes16(g.K - K16);
    __m512 table[NC];
    const uint8_t* r[NC];
    DITQ_UNROLL
    for (int c = 0; c < NC; ++c) {
      table[c] = wo_ternary_table_512(g, n + c);
      r[c] = g.w + (n + c) * (g.K / 4);
    }
    for (int64_t k = 0; k < K16; k += 16) {
      DITQ_UNROLL
      for (int c = 0; c < NC; ++c) {
        uint32_t d;
        std::memcpy(&d, r[c] + k / 4, 4);
        const __m512 w = wo_ternary_decode_512(d, table[c]);
        DITQ_UNROLL
        for (int i = 0; i < MR; ++i) acc[i][c] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + i * g.K + k), w, acc[i][c]);
      }
    }
    if (tail) {  // the last K mod 16 inputs: their bytes only (never past the row), x masked to zero
      DITQ_UNROLL
      for (int c = 0; c < NC; ++c) {
        uint32_t d = 0;
        std::memcpy(&d, r[c] + K16 / 4, static_cast<size_t>((g.K - K16) / 4));
        const __m512 w = wo_ternary_decode_512(d, table[c]);
        DITQ_UNROLL
        for (int i = 0; i < MR; ++i)
          acc[i][c] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, xr + i * g.K + K16), w, acc[i][c]);
      }
    }
  } else {
    const int64_t G = g.K / g.group;
    for (int64_t gi = 0; gi < G; ++gi) {
      __m512 table[NC];
      DITQ_UNROLL
      for (int c = 0; c < NC; ++c) table[c] = wo_int4_table_512(g, n + c, gi);
      const int64_t k_end = (gi + 1) * g.group;
      for (int64_t k = gi * g.group; k < k_end; k += 16) {
        DITQ_UNROLL
        for (int c = 0; c < NC; ++c) {
          const __m512 w = wo_int4_decode_512(g.w + (n + c) * (g.K / 2) + k / 2, table[c]);
          DITQ_UNROLL
          for (int i = 0; i < MR; ++i) acc[i][c] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + i * g.K + k), w, acc[i][c]);
        }
      }
    }
  }
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) {
    DITQ_UNROLL
    for (int c = 0; c < NC; ++c) {
      float v = _mm512_reduce_add_ps(acc[i][c]);
      if (g.bias) v += g.bias[n + c];
      g.out[i * g.N + n + c] = v;
    }
  }
}

// Columns [n0, n1) for MR tokens: NC = 4 / MR columns at a time (4 FMA chains), then one by one.
template <int MR>
__attribute__((target("avx512f"))) void wo_fused_512(const WoGemm& g, int64_t n0, int64_t n1) {
  constexpr int NC = MR >= 4 ? 1 : 4 / MR;
  int64_t n = n0;
  for (; n + NC <= n1; n += NC) wo_fused_cols_512<MR, NC>(g, n);
  for (; n < n1; ++n) wo_fused_cols_512<MR, 1>(g, n);
}

// AVX2: 8 weights per step. Ternary: two k4 bytes, lane i shifted right by 2i, an 8-entry table
// (vpermps reads 3 index bits; the table repeats every 4). int4: one dword, lane i shifted right
// by 4i; vpermps reads only 3 bits, so two tables (codes 0-7, 8-15) are blended on bit 3.
// AVX2 decoding, shared by the buffered and the fused paths.
__attribute__((target("avx2,fma"))) inline __m256 wo_ternary_table_256(const WoGemm& g, int64_t n) {
  const float s = g.scale[g.scale_per_row ? n : 0];
  return _mm256_set_ps(0.0f, s * 1.0f, s * 0.0f, s * -1.0f, 0.0f, s * 1.0f, s * 0.0f, s * -1.0f);
}

// The two tables of an int4 group: codes 0-7 and 8-15, each (q - z) * s in the reference's order.
struct WoInt4Tables256 {
  __m256 lo, hi;
};

__attribute__((target("avx2,fma"))) inline WoInt4Tables256 wo_int4_tables_256(const WoGemm& g, int64_t n, int64_t gi) {
  const int64_t G = g.K / g.group;
  const __m256 z = _mm256_set1_ps(g.zero[n * G + gi]), s = _mm256_set1_ps(g.scale[n * G + gi]);
  return {_mm256_mul_ps(_mm256_sub_ps(_mm256_set_ps(7, 6, 5, 4, 3, 2, 1, 0), z), s),
          _mm256_mul_ps(_mm256_sub_ps(_mm256_set_ps(15, 14, 13, 12, 11, 10, 9, 8), z), s)};
}

// 8 ternary weights from two k4 bytes.
__attribute__((target("avx2,fma"))) inline __m256 wo_ternary_decode_256(uint16_t d, __m256 table) {
  const __m256i shifts = _mm256_set_epi32(14, 12, 10, 8, 6, 4, 2, 0);
  return _mm256_permutevar8x32_ps(table, _mm256_srlv_epi32(_mm256_set1_epi32(d), shifts));
}

// 8 int4 weights from the 4 bytes at p.
__attribute__((target("avx2,fma"))) inline __m256 wo_int4_decode_256(const uint8_t* p, const WoInt4Tables256& t) {
  const __m256i shifts = _mm256_set_epi32(28, 24, 20, 16, 12, 8, 4, 0);
  uint32_t d;
  std::memcpy(&d, p, 4);
  const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(d)), shifts);
  const __m256 high = _mm256_castsi256_ps(_mm256_slli_epi32(v, 28));  // bit 3 -> sign bit
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.lo, v), _mm256_permutevar8x32_ps(t.hi, v), high);
}

__attribute__((target("avx2,fma"))) void wo_dequant_row_256(const WoGemm& g, int64_t n, float* buf) {
  const int64_t K8 = g.K / 8 * 8;
  if (!g.int4) {
    const __m256 table = wo_ternary_table_256(g, n);
    const uint8_t* r = g.w + n * (g.K / 4);
    for (int64_t k = 0; k < K8; k += 8) {
      uint16_t d;
      std::memcpy(&d, r + k / 4, 2);
      _mm256_storeu_ps(buf + k, wo_ternary_decode_256(d, table));
    }
  } else if (g.group % 8 == 0) {
    const int64_t G = g.K / g.group;
    const uint8_t* r = g.w + n * (g.K / 2);
    for (int64_t gi = 0; gi < G; ++gi) {
      const WoInt4Tables256 t = wo_int4_tables_256(g, n, gi);
      const int64_t k_end = (gi + 1) * g.group;
      for (int64_t k = gi * g.group; k < k_end; k += 8) _mm256_storeu_ps(buf + k, wo_int4_decode_256(r + k / 2, t));
    }
  } else {
    wo_dequant_row_scalar(g, n, buf, 0);  // groups that do not align with the vectors
    return;
  }
  wo_dequant_row_scalar(g, n, buf, K8);  // the last K mod 8 inputs (K is a multiple of 4), padding
}

// 8-lane horizontal sum, in wo_tile_256's order.
__attribute__((target("avx2,fma"))) inline float wo_hsum_256(__m256 a) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

template <int MR>
__attribute__((target("avx2,fma"))) void wo_tile_256(const WoGemm& g, int64_t m0, int64_t n0, const float* wb) {
  __m256 acc[MR][kWoNR];
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) {
    DITQ_UNROLL
    for (int j = 0; j < kWoNR; ++j) acc[i][j] = _mm256_setzero_ps();
  }
  const float* xr = g.x + m0 * g.K;
  const __m256i lane = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t k = 0; k < g.Kp; k += 8) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(8, g.K - k))), lane);
    DITQ_UNROLL
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_maskload_ps(xr + i * g.K + k, mask);
      DITQ_UNROLL
      for (int j = 0; j < kWoNR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(wb + j * g.Kp + k), acc[i][j]);
    }
  }
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) {
    DITQ_UNROLL
    for (int j = 0; j < kWoNR; ++j) {
      const int64_t n = n0 + j;
      if (n >= g.N) break;
      float v = wo_hsum_256(acc[i][j]);
      if (g.bias) v += g.bias[n];
      g.out[(m0 + i) * g.N + n] = v;
    }
  }
}

// A few tokens, AVX2: as wo_fused_cols_512 with 8 lanes (the numbers of wo_tile_256).
template <int MR, int NC>
__attribute__((target("avx2,fma"))) void wo_fused_cols_256(const WoGemm& g, int64_t n) {
  const float* xr = g.x;
  __m256 acc[MR][NC];
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) {
    DITQ_UNROLL
    for (int c = 0; c < NC; ++c) acc[i][c] = _mm256_setzero_ps();
  }
  if (!g.int4) {
    const int64_t K8 = g.K / 8 * 8;
    __m256 table[NC];
    const uint8_t* r[NC];
    DITQ_UNROLL
    for (int c = 0; c < NC; ++c) {
      table[c] = wo_ternary_table_256(g, n + c);
      r[c] = g.w + (n + c) * (g.K / 4);
    }
    for (int64_t k = 0; k < K8; k += 8) {
      DITQ_UNROLL
      for (int c = 0; c < NC; ++c) {
        uint16_t d;
        std::memcpy(&d, r[c] + k / 4, 2);
        const __m256 w = wo_ternary_decode_256(d, table[c]);
        DITQ_UNROLL
        for (int i = 0; i < MR; ++i) acc[i][c] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + i * g.K + k), w, acc[i][c]);
      }
    }
    if (K8 < g.K) {  // the last 4 inputs (K is a multiple of 4): one byte, x masked to zero past K
      const __m256i mask = _mm256_set_epi32(0, 0, 0, 0, -1, -1, -1, -1);
      DITQ_UNROLL
      for (int c = 0; c < NC; ++c) {
        const __m256 w = wo_ternary_decode_256(r[c][K8 / 4], table[c]);
        DITQ_UNROLL
        for (int i = 0; i < MR; ++i)
          acc[i][c] = _mm256_fmadd_ps(_mm256_maskload_ps(xr + i * g.K + K8, mask), w, acc[i][c]);
      }
    }
  } else {
    const int64_t G = g.K / g.group;
    for (int64_t gi = 0; gi < G; ++gi) {
      WoInt4Tables256 t[NC];
      DITQ_UNROLL
      for (int c = 0; c < NC; ++c) t[c] = wo_int4_tables_256(g, n + c, gi);
      const int64_t k_end = (gi + 1) * g.group;
      for (int64_t k = gi * g.group; k < k_end; k += 8) {
        DITQ_UNROLL
        for (int c = 0; c < NC; ++c) {
          const __m256 w = wo_int4_decode_256(g.w + (n + c) * (g.K / 2) + k / 2, t[c]);
          DITQ_UNROLL
          for (int i = 0; i < MR; ++i) acc[i][c] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + i * g.K + k), w, acc[i][c]);
        }
      }
    }
  }
  DITQ_UNROLL
  for (int i = 0; i < MR; ++i) {
    DITQ_UNROLL
    for (int c = 0; c < NC; ++c) {
      float v = wo_hsum_256(acc[i][c]);
      if (g.bias) v += g.bias[n + c];
      g.out[i * g.N + n + c] = v;
    }
  }
}

template <int MR>
__attribute__((target("avx2,fma"))) void wo_fused_256(const WoGemm& g, int64_t n0, int64_t n1) {
  constexpr int NC = MR >= 4 ? 1 : 4 / MR;
  int64_t n = n0;
  for (; n + NC <= n1; n += NC) wo_fused_cols_256<MR, NC>(g, n);
  for (; n < n1; ++n) wo_fused_cols_256<MR, 1>(g, n);
}
#endif

constexpr int kWoMR512 = 4;  // AVX-512: 16 accumulators + 4 weight vectors + 1 activation
constexpr int kWoMR256 = 2;  // AVX2: 8 accumulators of 16 registers
constexpr int kWoFusedM = 4;  // the most tokens wo_fused_512 / wo_fused_256 are instantiated for

// fused_max_m: up to this many tokens (at most kWoFusedM) the weights are decoded in registers
// (wo_fused_512, wo_fused_256); 0 keeps the buffered path for every M.
void wo_gemm(WoGemm g, int64_t isa, int64_t fused_max_m) {
#if DITQ_X86
  const int64_t fused_m = std::min<int64_t>(fused_max_m, kWoFusedM);
  const int64_t vec = isa == kAvx512Vnni ? 16 : 8;  // int4 groups must hold whole vectors
  if ((isa == kAvx512Vnni || isa == kAvx2) && g.M >= 1 && g.M <= fused_m && (!g.int4 || g.group % vec == 0)) {
    using FusedFn = void (*)(const WoGemm&, int64_t, int64_t);
    static const FusedFn f512[kWoFusedM + 1] = {nullptr, wo_fused_512<1>, wo_fused_512<2>, wo_fused_512<3>,
                                                wo_fused_512<4>};
    static const FusedFn f256[kWoFusedM + 1] = {nullptr, wo_fused_256<1>, wo_fused_256<2>, wo_fused_256<3>,
                                                wo_fused_256<4>};
    const FusedFn fn = (isa == kAvx512Vnni ? f512 : f256)[g.M];
    at::parallel_for(0, g.N, kWoN, [&](int64_t b, int64_t e) { fn(g, b, e); });
    return;
  }
  if (isa == kAvx512Vnni || isa == kAvx2) {
    const bool wide = isa == kAvx512Vnni;
    g.Kp = (g.K + vec - 1) / vec * vec;
    using TileFn = void (*)(const WoGemm&, int64_t, int64_t, const float*);
    static const TileFn t512[kWoMR512 + 1] = {nullptr, wo_tile_512<1>, wo_tile_512<2>, wo_tile_512<3>, wo_tile_512<4>};
    static const TileFn t256[kWoMR256 + 1] = {nullptr, wo_tile_256<1>, wo_tile_256<2>};
    const TileFn* tiles = wide ? t512 : t256;
    const int64_t mr_max = wide ? kWoMR512 : kWoMR256;
    const int64_t mb = (g.M + kWoM - 1) / kWoM, nb = (g.N + kWoN - 1) / kWoN;
    at::parallel_for(0, mb * nb, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(kWoN * g.Kp);
      int64_t have = -1;  // the column block now in the buffer
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bn = item / mb, bm = item % mb;  // token blocks inner: the buffer is reused
        const int64_t n0 = bn * kWoN;
        if (bn != have) {
          for (int64_t j = 0; j < kWoN; ++j) {
            float* row = buf.data() + j * g.Kp;
            if (n0 + j >= g.N)
              std::fill(row, row + g.Kp, 0.0f);
            else if (wide)
              wo_dequant_row_512(g, n0 + j, row);
            else
              wo_dequant_row_256(g, n0 + j, row);
          }
          have = bn;
        }
        const int64_t m_end = std::min(g.M, (bm + 1) * kWoM);
        for (int64_t m0 = bm * kWoM; m0 < m_end; m0 += mr_max) {
          const int64_t mr = std::min<int64_t>(mr_max, m_end - m0);
          for (int64_t c = 0; c < kWoN && n0 + c < g.N; c += kWoNR) tiles[mr](g, m0, n0 + c, buf.data() + c * g.Kp);
        }
      }
    });
    return;
  }
#endif
  throw std::runtime_error("the weight-only GEMMs need AVX2 or AVX-512");
}

// Rows [n0, n1) of the dequantized weight into out [n1 - n0, K] (for many tokens: the caller
// multiplies block by block with BLAS; the full float weight never exists).
void wo_dequant_rows(WoGemm g, int64_t n0, int64_t n1, float* out, int64_t isa) {
  g.Kp = g.K;
  at::parallel_for(n0, n1, 16, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      float* row = out + (n - n0) * g.K;
#if DITQ_X86
      if (isa == kAvx512Vnni) {
        wo_dequant_row_512(g, n, row);
        continue;
      }
      if (isa == kAvx2) {
        wo_dequant_row_256(g, n, row);
        continue;
      }
#endif
      wo_dequant_row_scalar(g, n, row, 0);
    }
  });
}

// Asymmetric min/max quantization per row of `group` values to codes 0..qmax (Q-DiT's dynamic
// activation quantizer, ditq.quant.primitives with sym=False), in float32 with IEEE divisions and
// round-half-to-even, in the reference's order:
//     scale = max(hi - lo, 1e-5) / qmax,  zero = clamp(round(-lo / scale), 0, qmax),
//     q = clamp(round(x / scale) + zero, 0, qmax)
#if DITQ_X86
DITQ_AVX512 void quantize_asym_row_512(const float* x, int64_t n, uint8_t* q, float* s, float* z, float qmax) {
  __m512 vmin = _mm512_set1_ps(INFINITY), vmax = _mm512_set1_ps(-INFINITY);
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m512 v = _mm512_loadu_ps(x + k);
    vmin = _mm512_min_ps(vmin, v);
    vmax = _mm512_max_ps(vmax, v);
  }
  const __mmask16 tail = lanes16(n - k);
  if (tail) {
    vmin = _mm512_mask_min_ps(vmin, tail, vmin, _mm512_maskz_loadu_ps(tail, x + k));
    vmax = _mm512_mask_max_ps(vmax, tail, vmax, _mm512_maskz_loadu_ps(tail, x + k));
  }
  const float lo = _mm512_reduce_min_ps(vmin), hi = _mm512_reduce_max_ps(vmax);
  const float scale = std::max(hi - lo, 1e-5f) / qmax;
  const float zero = std::min(qmax, std::max(0.0f, std::nearbyint(-lo / scale)));
  *s = scale;
  *z = zero;
  const __m512 vs = _mm512_set1_ps(scale), vz = _mm512_set1_ps(zero), vq = _mm512_set1_ps(qmax);
  const __m512 v0 = _mm512_setzero_ps();
  for (k = 0; k < n; k += 16) {
    const __mmask16 m = k + 16 <= n ? static_cast<__mmask16>(0xFFFF) : tail;
    const __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(m, x + k), vs);
    __m512 r = _mm512_add_ps(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vz);
    r = _mm512_min_ps(_mm512_max_ps(r, v0), vq);
    _mm_mask_storeu_epi8(q + k, m, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r)));
  }
}
#endif

void quantize_asym(const float* xp, uint8_t* qp, float* sp, float* zp, int64_t rows, int64_t group, int64_t bits,
                   int64_t isa) {
  const float qmax = static_cast<float>((1 << bits) - 1);
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* xr = xp + r * group;
      uint8_t* qr = qp + r * group;
#if DITQ_X86
      if (isa == kAvx512Vnni) {
        quantize_asym_row_512(xr, group, qr, sp + r, zp + r, qmax);
        continue;
      }
#endif
      float lo = xr[0], hi = xr[0];
      for (int64_t k = 1; k < group; ++k) {
        lo = std::min(lo, xr[k]);
        hi = std::max(hi, xr[k]);
      }
      const float scale = std::max(hi - lo, 1e-5f) / qmax;
      const float zero = std::min(qmax, std::max(0.0f, std::nearbyint(-lo / scale)));
      sp[r] = scale;
      zp[r] = zero;
      for (int64_t k = 0; k < group; ++k)
        qr[k] = static_cast<uint8_t>(std::min(qmax, std::max(0.0f, std::nearbyint(xr[k] / scale) + zero)));
    }
  });
}

bool isa_ok(int64_t isa) { return isa >= kScalar && isa <= detect_isa(); }

thread_local std::string last_error;

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

}  // namespace

// ---------------------------------------------------------------------------------------------
// C interface, called through ctypes. ditq/kernels/cpu.py validates shapes, dtypes and layout
// (contiguous rows) and allocates every output. Returns 0 on success, 1 for an instruction set
// this CPU lacks, 2 for an exception (message in ditq_last_error()).
// ---------------------------------------------------------------------------------------------

extern "C" {

int64_t ditq_best_isa() { return detect_isa(); }

// How many threads at::parallel_for gives `n` work items of grain 1 here: what every GEMM above
// gets. A check that this library was built with OpenMP (without it, the parallel region in
// ATen's header compiles to a plain loop on the caller's thread).
int64_t ditq_threads_used(int64_t n) {
  std::mutex lock;
  std::set<std::thread::id> ids;
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> guard(lock);
    ids.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(ids.size());
}

const char* ditq_last_error() { return last_error.c_str(); }

// Bytes of the prepacked weights (the SIMD paths) of an [N, K] weight: w8 (bits 8) or w2 (bits 2).
int64_t ditq_prepacked_bytes(int64_t N, int64_t K, int64_t bits) { return prepacked_bytes(N, K, bits == 8 ? 4 : 16); }

// int8 [N, K] -> prepacked (ditq_prepacked_bytes(N, K, 8) bytes)
int ditq_prepack_w8(const int8_t* w, int64_t N, int64_t K, uint8_t* out) {
  return guarded(kScalar, [&] { prepack_w8(w, N, K, out); });
}

// ternary k4-packed uint8 [N, K/4] -> prepacked (ditq_prepacked_bytes(N, K, 2) bytes)
int ditq_prepack_w2(const uint8_t* wk4, int64_t N, int64_t K, uint8_t* out) {
  return guarded(kScalar, [&] { prepack_w2(wk4, N, K, out); });
}

// xq int8 [M, K], xs f32 [M], wq int8 [N, K], ws f32 [N] (ws_per_row) or [1], bias f32 [N] or
// null -> out f32 [M, N]. The SIMD paths read `wpre` (ditq_prepack_w8 of wq).
int ditq_w8a8_gemm(const int8_t* xq, const float* xs, const int8_t* wq, const uint8_t* wpre, const float* ws,
                   int64_t ws_per_row, const float* bias, float* out, int64_t M, int64_t N, int64_t K, int64_t isa) {
  if (isa != kScalar && !wpre) {
    last_error = "the SIMD paths need the prepacked weight";
    return 2;
  }
  return guarded(isa, [&] { w8a8_gemm(make_gemm(xq, xs, wq, K, ws, ws_per_row, bias, out, M, N, K), wpre, isa); });
}

// as above with ternary weights packed k4, uint8 [N, K/4] (K divisible by 4); `wpre` from
// ditq_prepack_w2
int ditq_w2a8_gemm(const int8_t* xq, const float* xs, const uint8_t* wpk, const uint8_t* wpre, const float* ws,
                   int64_t ws_per_row, const float* bias, float* out, int64_t M, int64_t N, int64_t K, int64_t isa) {
  if (isa != kScalar && !wpre) {
    last_error = "the SIMD paths need the prepacked weight";
    return 2;
  }
  return guarded(isa, [&] { w2a8_gemm(make_gemm(xq, xs, wpk, K / 4, ws, ws_per_row, bias, out, M, N, K), wpre, isa); });
}

// Bytes of the W4A8 prepacked weight of an [N, K] int4 weight with segments of L inputs.
int64_t ditq_prepacked_bytes_w4(int64_t N, int64_t K, int64_t L) { return prepacked_bytes_w4(N, K, L); }

// int4 uint8 [N, K/2] (pack_int4) -> prepacked (ditq_prepacked_bytes_w4(N, K, L) bytes); L | K, 8 | L
int ditq_prepack_w4(const uint8_t* wp, int64_t N, int64_t K, int64_t L, uint8_t* out) {
  return guarded(kScalar, [&] { prepack_w4(wp, N, K, L, out); });
}

// xq [M, K] int8 (x_unsigned 0) or uint8 (1), xs f32 [M, K/ga], x_zero int32 [M, K/ga] or null;
// `wpre` from ditq_prepack_w4 with L = gcd(ga, gw); ws_t f32 and wz_t int32 [K/gw, N] (w_scale,
// w_zero transposed); bias f32 [N] or null -> out f32 [M, N]. AVX2 or AVX-512 VNNI.
int ditq_w4a8_gemm(const uint8_t* xq, int64_t x_unsigned, const float* xs, const int32_t* x_zero, const uint8_t* wpre,
                   const float* ws_t, const int32_t* wz_t, const float* bias, float* out, int64_t M, int64_t N,
                   int64_t K, int64_t gw, int64_t ga, int64_t isa) {
  const int64_t L = std::gcd(gw, ga);
  if (isa == kScalar || !wpre || gw <= 0 || ga <= 0 || K % gw || K % ga || L % 8) {
    last_error = "the W4A8 GEMM needs AVX2, the prepacked weight, groups dividing K and gcd(ga, gw) % 8 == 0";
    return 2;
  }
  return guarded(isa, [&] {
    W4Gemm g;
    const int64_t np = (N + kPanel - 1) / kPanel;
    g.x = xq;
    g.ldx = K;
    g.w = wpre;
    g.ldw = (K / 8) * 256;
    g.wsum = reinterpret_cast<const int32_t*>(wpre + np * g.ldw);
    g.ldsum = np * kPanel;
    g.M = M;
    g.N = N;
    g.K = K;
    g.L = L;
    g.S = K / L;
    g.ra = ga / L;
    g.rw = gw / L;
    g.GA = K / ga;
    g.xsum = nullptr;
    g.xzero = x_zero;
    g.xs = xs;
    g.ws = ws_t;
    g.wz = wz_t;
    g.bias = bias;
    g.out = out;
    g.ldo = N;
    w4a8_gemm(g, x_unsigned != 0, isa);
  });
}

// x f32 [rows * group] -> q int8 [rows * group], s f32 [rows]: one absmax scale per `group` values
int ditq_quantize_per_token(const float* x, int8_t* q, float* s, int64_t rows, int64_t group, int64_t isa) {
  return guarded(isa, [&] { quantize_per_token(x, q, s, rows, group, vector_level(isa)); });
}

// GELU (tanh) then per-token int8: x f32 [rows, K] -> q int8 [rows, K], s f32 [rows].
int ditq_gelu_quantize(const float* x, int8_t* q, float* s, int64_t rows, int64_t K, int64_t isa) {
  return guarded(isa, [&] { gelu_quantize(x, q, s, rows, K, vector_level(isa)); });
}

// LayerNorm (no affine, eps) + adaLN modulation then per-token int8: x f32 [B, T, K], shift and
// scale f32 [B, K] -> q int8 [B, T, K], s f32 [B * T].
int ditq_layernorm_modulate_quantize(const float* x, const float* shift, const float* scale, int8_t* q, float* s,
                                     int64_t B, int64_t T, int64_t K, double eps, int64_t isa) {
  return guarded(isa, [&] { layernorm_modulate_quantize(x, shift, scale, q, s, B, T, K, static_cast<float>(eps), vector_level(isa)); });
}

// RMSNorm (weight, eps) + adaLN modulation then per-token int8: x f32 [B, T, K], weight f32 [K],
// shift and scale f32 [B, K] -> q int8 [B, T, K], s f32 [B * T].
int ditq_rmsnorm_modulate_quantize(const float* x, const float* weight, const float* shift, const float* scale,
                                   int8_t* q, float* s, int64_t B, int64_t T, int64_t K, double eps, int64_t isa) {
  return guarded(isa, [&] {
    rmsnorm_modulate_quantize(x, weight, shift, scale, q, s, B, T, K, static_cast<float>(eps), vector_level(isa));
  });
}

// silu(gate) * up then per-token int8: gate, up f32 [rows, K] -> q int8 [rows, K], s f32 [rows].
int ditq_swiglu_quantize(const float* gate, const float* up, int8_t* q, float* s, int64_t rows, int64_t K,
                         int64_t isa) {
  return guarded(isa, [&] { swiglu_quantize(gate, up, q, s, rows, K, vector_level(isa)); });
}

// Weight-only ternary: x f32 [M, K], w k4 uint8 [N, K/4], scale f32 [N] (scale_per_row) or [1],
// bias f32 [N] or null -> out f32 [M, N]. AVX2 or AVX-512. fused_max_m: see wo_gemm.
int ditq_ternary_wo_gemm(const float* x, const uint8_t* w, const float* scale, int64_t scale_per_row,
                         const float* bias, float* out, int64_t M, int64_t N, int64_t K, int64_t isa,
                         int64_t fused_max_m) {
  if (K % 4) {
    last_error = "ternary weights packed k4 need K divisible by 4";
    return 2;
  }
  return guarded(isa, [&] {
    WoGemm g{x, w, false, scale, scale_per_row != 0, nullptr, 0, bias, out, M, N, K, K};
    wo_gemm(g, vector_level(isa), fused_max_m);
  });
}

// Weight-only int4: x f32 [M, K], w uint8 [N, K/2] (pack_int4), scale and zero f32 [N, K/group],
// bias f32 [N] or null -> out f32 [M, N]. AVX2 or AVX-512. fused_max_m: see wo_gemm.
int ditq_int4_wo_gemm(const float* x, const uint8_t* w, const float* scale, const float* zero, int64_t group,
                      const float* bias, float* out, int64_t M, int64_t N, int64_t K, int64_t isa,
                      int64_t fused_max_m) {
  if (K % 2 || group <= 0 || K % group) {
    last_error = "int4 weights need an even K and a group size dividing K";
    return 2;
  }
  return guarded(isa, [&] {
    WoGemm g{x, w, true, scale, true, zero, group, bias, out, M, N, K, K};
    wo_gemm(g, vector_level(isa), fused_max_m);
  });
}

// Rows [n0, n1) of the dequantized ternary (k4) or int4 weight -> out f32 [n1 - n0, K]; the
// arguments as in ditq_ternary_wo_gemm / ditq_int4_wo_gemm.
int ditq_ternary_dequant(const uint8_t* w, const float* scale, int64_t scale_per_row, int64_t N, int64_t K,
                         int64_t n0, int64_t n1, float* out, int64_t isa) {
  if (K % 4 || n0 < 0 || n1 > N || n0 > n1) {
    last_error = "ternary dequantization needs K divisible by 4 and 0 <= n0 <= n1 <= N";
    return 2;
  }
  return guarded(isa, [&] {
    WoGemm g{nullptr, w, false, scale, scale_per_row != 0, nullptr, 0, nullptr, nullptr, 0, N, K, K};
    wo_dequant_rows(g, n0, n1, out, vector_level(isa));
  });
}

int ditq_int4_dequant(const uint8_t* w, const float* scale, const float* zero, int64_t group, int64_t N, int64_t K,
                      int64_t n0, int64_t n1, float* out, int64_t isa) {
  if (K % 2 || group <= 0 || K % group || n0 < 0 || n1 > N || n0 > n1) {
    last_error = "int4 dequantization needs an even K, a group size dividing K and 0 <= n0 <= n1 <= N";
    return 2;
  }
  return guarded(isa, [&] {
    WoGemm g{nullptr, w, true, scale, true, zero, group, nullptr, nullptr, 0, N, K, K};
    wo_dequant_rows(g, n0, n1, out, vector_level(isa));
  });
}

// x f32 [rows * group] -> q uint8 [rows * group], s and z f32 [rows]: one (scale, zero point)
// per `group` values, codes 0..2^bits - 1 (2 <= bits <= 8)
int ditq_quantize_asym(const float* x, uint8_t* q, float* s, float* z, int64_t rows, int64_t group, int64_t bits,
                       int64_t isa) {
  if (bits < 2 || bits > 8 || group <= 0) {
    last_error = "asymmetric quantization needs 2 <= bits <= 8 and group >= 1";
    return 2;
  }
  return guarded(isa, [&] { quantize_asym(x, q, s, z, rows, group, bits, vector_level(isa)); });
}

}  // extern "C"
