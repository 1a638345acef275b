// Per-token activation quantization: symmetric absmax int8 (BitNet b1.58's rule; the last step of
// every fused producer too) and asymmetric min/max (Q-DiT's dynamic activation quantizer). Codes
// and scales equal the references' bit for bit (reference.ref_quantize_per_token_int8,
// ref_quantize_per_token_asym).

#include "common.h"

namespace ditq {
namespace {

#if DITQ_X86
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
#endif

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

}  // namespace

void quantize_row(const float* x, int64_t n, int8_t* q, float* s, int64_t isa) {
#if DITQ_X86
  if (isa == kAvx512Vnni) return quantize_row_512(x, n, q, s);
  if (isa == kAvx2) return quantize_row_256(x, n, q, s);
#endif
  quantize_row_scalar(x, n, q, s);
}

namespace {

void quantize_per_token(const float* xp, int8_t* qp, float* sp, int64_t rows, int64_t group, int64_t isa) {
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) quantize_row(xp + r * group, group, qp + r * group, sp + r, isa);
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

}  // namespace
}  // namespace ditq

using namespace ditq;

extern "C" {

// x f32 [rows * group] -> q int8 [rows * group], s f32 [rows]: one absmax scale per `group` values
int ditq_quantize_per_token(const float* x, int8_t* q, float* s, int64_t rows, int64_t group, int64_t isa) {
  return guarded(isa, [&] { quantize_per_token(x, q, s, rows, group, vector_level(isa)); });
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
