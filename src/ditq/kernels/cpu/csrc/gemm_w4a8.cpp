// Q-DiT's group-wise W4A8 GEMM: int4 weight codes with group-wise scales and zero points, int8 or
// uint8 (with zero points) per-token activations, exact in int32 per constant-scale segment; and
// its prepacked weights. The panels and micro-tiles are those of gemm_int8.cpp (see its comment).

#include "common.h"

namespace ditq {
namespace {

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

#if DITQ_X86
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

}  // namespace
}  // namespace ditq

using namespace ditq;

extern "C" {

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

}  // extern "C"
