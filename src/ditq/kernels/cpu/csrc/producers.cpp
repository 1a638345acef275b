// Producers fused with per-token int8 quantization (see the comment below), and their C interface.

#include "common.h"

namespace ditq {
namespace {

// ---------------------------------------------------------------------------------------------
// Producers fused with per-token int8 quantization: LayerNorm + adaLN modulation, GELU (tanh),
// RMSNorm + adaLN modulation, SwiGLU
// ---------------------------------------------------------------------------------------------
// A row's producer values go to a thread-local buffer (a few KB, cache-resident) and are quantized
// there by quantize_row: the float activation is never written to memory and read back, once per
// elementwise op, as the unfused PyTorch ops do. Same steps and roundings as the references
// (reference.ref_layernorm_modulate_quantize_int8, ref_gelu_quantize_int8) in float32; only a sum's order
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
// reference.ref_rmsnorm_modulate_quantize_int8, ref_swiglu_quantize_int8). RMSNorm: the sum of squares
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

}  // namespace
}  // namespace ditq

using namespace ditq;

extern "C" {

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

}  // extern "C"
