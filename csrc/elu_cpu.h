// ELU for the CPU conv kernels (conv1d_cpu.cpp offline, stream_cpu.cpp streaming): one implementation, so
// a streamed sample goes through the same activation arithmetic as the offline pass. AVX-512, AVX2+FMA and
// the portable scalar loop evaluate the same formula with the same operations per lane (fma where the
// vector code has one, the same min/max operand order, exact 2^n), so all builds give bit-identical results.
#pragma once

#include <cmath>
#include <cstdint>

#include "vf16.h"

namespace fc_elu {

constexpr int64_t kLanes = 16;  // floats per 512-bit vector

// alpha * expm1(x) for x <= 0, x for x > 0 or NaN. expm1(x) = 2^n * expm1(r) + (2^n - 1) with
// x = n*ln2 + r, |r| <= ln2/2 and a degree-8 Taylor polynomial for expm1(r) (truncation < 1e-8
// relative); within 2 ulp of std::expm1 over [-88, 0] (checked against float64 in the tests).
// elu_scalar is the portable build's, elu16 / elu8 the same steps on 16 / 8 lanes.
inline float elu_scalar(float v, float alpha) {
  if (!(v <= 0.f)) return v;                 // x > 0 or NaN
  float xn = v < 0.f ? v : 0.f;              // min(x, 0) as vminps(x, 0)
  xn = xn > -88.f ? xn : -88.f;              // max(., -88) as vmaxps(., -88)
  const float n = std::nearbyint(xn * 1.44269504088896341f);
  float r = std::fma(-n, 0.693359375f, xn);  // Cody-Waite: ln2 = hi + lo
  r = std::fma(-n, -2.12194440e-4f, r);
  float p = 1.f / 40320.f;
  p = std::fma(p, r, 1.f / 5040.f);
  p = std::fma(p, r, 1.f / 720.f);
  p = std::fma(p, r, 1.f / 120.f);
  p = std::fma(p, r, 1.f / 24.f);
  p = std::fma(p, r, 1.f / 6.f);
  p = std::fma(p, r, 0.5f);
  p = (p * r) * r;
  p = p + r;  // expm1(r)
  const float two_n = std::ldexp(1.f, static_cast<int>(n));  // n in [-127, 0]: exact (2^-127 is subnormal)
  return alpha * std::fma(two_n, p, two_n - 1.f);
}

#if FC_AVX512
inline __m512 elu16(__m512 x, __m512 alpha) {
  const __m512 zero = _mm512_setzero_ps();
  const __mmask16 keep = _mm512_cmp_ps_mask(x, zero, _CMP_NLE_UQ);  // x > 0 or NaN
  __m512 xn = _mm512_max_ps(_mm512_min_ps(x, zero), _mm512_set1_ps(-88.f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xn, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xn);  // Cody-Waite: ln2 = hi + lo
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 40320.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 5040.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_mul_ps(_mm512_mul_ps(p, r), r);
  p = _mm512_add_ps(p, r);  // expm1(r)
  const __m512 two_n = _mm512_scalef_ps(_mm512_set1_ps(1.f), n);
  __m512 e = _mm512_fmadd_ps(two_n, p, _mm512_sub_ps(two_n, _mm512_set1_ps(1.f)));
  return _mm512_mask_blend_ps(keep, _mm512_mul_ps(alpha, e), x);
}
#elif FC_AVX2
inline __m256 elu8(__m256 x, __m256 alpha) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256 keep = _mm256_cmp_ps(x, zero, _CMP_NLE_UQ);  // x > 0 or NaN
  __m256 xn = _mm256_max_ps(_mm256_min_ps(x, zero), _mm256_set1_ps(-88.f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(xn, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xn);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 40320.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 5040.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_mul_ps(_mm256_mul_ps(p, r), r);
  p = _mm256_add_ps(p, r);
  const __m256 two_n = fc_vf::scalef8(_mm256_set1_ps(1.f), n);  // n in [-127, 0]: exact
  __m256 e = _mm256_fmadd_ps(two_n, p, _mm256_sub_ps(two_n, _mm256_set1_ps(1.f)));
  return _mm256_blendv_ps(_mm256_mul_ps(alpha, e), x, keep);
}
#endif

// ELU over p[0, n) in place; every element takes the same path, so results do not depend on where a tile or
// a row starts.
inline void elu_inplace(float* p, int64_t n, float alpha) {
  int64_t i = 0;
#if FC_AVX512
  const __m512 va = _mm512_set1_ps(alpha);
  for (; i + kLanes <= n; i += kLanes) _mm512_storeu_ps(p + i, elu16(_mm512_loadu_ps(p + i), va));
  if (i < n) {
    const __mmask16 k = (__mmask16)((1u << (n - i)) - 1u);
    _mm512_mask_storeu_ps(p + i, k, elu16(_mm512_maskz_loadu_ps(k, p + i), va));
  }
#elif FC_AVX2
  const __m256 va = _mm256_set1_ps(alpha);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(p + i, elu8(_mm256_loadu_ps(p + i), va));
  if (i < n) {
    const __m256i k = fc_vf::first_n8(static_cast<int>(n - i));
    _mm256_maskstore_ps(p + i, k, elu8(_mm256_maskload_ps(p + i, k), va));
  }
#else
  for (; i < n; ++i) p[i] = elu_scalar(p[i], alpha);
#endif
}

}  // namespace fc_elu
