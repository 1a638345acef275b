// The W8A8 and W1.58A8 integer GEMMs (int8 activations x int8 or ternary weights), and the
// prepacked weights they read.
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

#include "common.h"

namespace ditq {
namespace {

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
// AVX2
// ---------------------------------------------------------------------------------------------

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
#endif  // DITQ_X86

// ---------------------------------------------------------------------------------------------
// Drivers
// ---------------------------------------------------------------------------------------------

using PanelFn = void (*)(const Gemm&, int64_t, int64_t);

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

}  // namespace
}  // namespace ditq

using namespace ditq;

extern "C" {

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

}  // extern "C"
