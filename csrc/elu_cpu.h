// ELU for the CPU conv kernels (conv1d_cpu.cpp offline, stream_cpu.cpp streaming): one implementation, so
// a streamed sample goes through the same activation arithmetic as the offline pass.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fc_elu {

constexpr int64_t kLanes = 16;  // floats per 512-bit vector

inline float elu_scalar(float v, float alpha) {
  return v > 0.f || std::isnan(v) ? v : alpha * std::expm1(v);
}

#if defined(__AVX512F__)
// alpha * expm1(x) for x <= 0, x for x > 0 or NaN. expm1(x) = 2^n * expm1(r) + (2^n - 1) with
// x = n*ln2 + r, |r| <= ln2/2 and a degree-8 Taylor polynomial for expm1(r) (truncation < 1e-8
// relative); within 2 ulp of std::expm1 over [-88, 0] (checked against float64 in the tests).
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
#endif

// ELU over p[0, n) in place; every element takes the same (vector) path, so results do not depend
// on where a tile or a row starts.
void elu_inplace(float* p, int64_t n, float alpha) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 va = _mm512_set1_ps(alpha);
  for (; i + kLanes <= n; i += kLanes) _mm512_storeu_ps(p + i, elu16(_mm512_loadu_ps(p + i), va));
  if (i < n) {
    const __mmask16 k = (__mmask16)((1u << (n - i)) - 1u);
    _mm512_mask_storeu_ps(p + i, k, elu16(_mm512_maskz_loadu_ps(k, p + i), va));
  }
#else
  for (; i < n; ++i) p[i] = elu_scalar(p[i], alpha);
#endif
}

}  // namespace fc_elu
