// Weight-only GEMMs (float32 activations x ternary or int4 weights; see the comment below), and
// their C interface.

#include "common.h"

namespace ditq {
namespace {

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

}  // namespace
}  // namespace ditq

using namespace ditq;

extern "C" {

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

}  // extern "C"
