// 16-lane float vectors shared by the CPU kernels (rvq_cpu.cpp, lstm_cpu.cpp): AVX-512 (one __m512), AVX2+FMA
// (two __m256) or a portable array, all with the same arithmetic per lane (fma, min/max operand order,
// round-to-nearest-even, exact scaling), so every build gives bit-identical results.
#pragma once

#include <cmath>

#if defined(__AVX512F__)
#include <immintrin.h>
#define FC_AVX512 1
#define FC_AVX2 0
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FC_AVX512 0
#define FC_AVX2 1
#else
#define FC_AVX512 0
#define FC_AVX2 0
#endif

// the vector path this translation unit compiles (reported by each extension's simd())
#define FC_SIMD_NAME (FC_AVX512 ? "avx512" : FC_AVX2 ? "avx2" : "portable")

namespace fc_vf {

constexpr int L = 16;  // floats per vector

#if FC_AVX512
struct VF { __m512 v; };
inline VF vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void vstore(float* p, VF a) { _mm512_storeu_ps(p, a.v); }
inline __mmask16 first_n(int n) { return n >= L ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }
inline VF vload_n(const float* p, int n) { return {_mm512_maskz_loadu_ps(first_n(n), p)}; }
inline void vstore_n(float* p, VF a, int n) { _mm512_mask_storeu_ps(p, first_n(n), a.v); }
inline VF vset1(float x) { return {_mm512_set1_ps(x)}; }
inline VF vzero() { return {_mm512_setzero_ps()}; }
inline VF vfma(VF a, VF b, VF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline VF vadd(VF a, VF b) { return {_mm512_add_ps(a.v, b.v)}; }
inline VF vsub(VF a, VF b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline VF vmul(VF a, VF b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline VF vdiv(VF a, VF b) { return {_mm512_div_ps(a.v, b.v)}; }
// a < b ? a : b and a > b ? a : b: a NaN in b comes through
inline VF vmin(VF a, VF b) { return {_mm512_min_ps(a.v, b.v)}; }
inline VF vmax(VF a, VF b) { return {_mm512_max_ps(a.v, b.v)}; }
inline VF vabs(VF a) { return {_mm512_abs_ps(a.v)}; }
inline VF vround(VF a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline VF vscalef(VF a, VF n) { return {_mm512_scalef_ps(a.v, n.v)}; }  // a * 2^n, n integral
inline VF vcopysign(VF mag, VF sgn) {
  const __m512i s = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  return {_mm512_castsi512_ps(_mm512_or_si512(_mm512_andnot_si512(s, _mm512_castps_si512(mag.v)),
                                              _mm512_and_si512(s, _mm512_castps_si512(sgn.v))))};
}
// a < t ? x : y per lane (ordered: NaN takes y)
inline VF vselect_lt(VF a, VF t, VF x, VF y) {
  return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, t.v, _CMP_LT_OQ), y.v, x.v)};
}
#elif FC_AVX2
// lanes 0-7 in lo, 8-15 in hi
struct VF { __m256 lo, hi; };
// integer mask of the first n of 8 lanes (n may be <= 0 or >= 8)
inline __m256i first_n8(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline VF vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void vstore(float* p, VF a) { _mm256_storeu_ps(p, a.lo); _mm256_storeu_ps(p + 8, a.hi); }
inline VF vload_n(const float* p, int n) {
  return {_mm256_maskload_ps(p, first_n8(n)), _mm256_maskload_ps(p + 8, first_n8(n - 8))};
}
inline void vstore_n(float* p, VF a, int n) {
  _mm256_maskstore_ps(p, first_n8(n), a.lo);
  _mm256_maskstore_ps(p + 8, first_n8(n - 8), a.hi);
}
inline VF vset1(float x) { const __m256 v = _mm256_set1_ps(x); return {v, v}; }
inline VF vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
#define FC_HALVES(f) return {f(a.lo, b.lo), f(a.hi, b.hi)}
inline VF vfma(VF a, VF b, VF c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline VF vadd(VF a, VF b) { FC_HALVES(_mm256_add_ps); }
inline VF vsub(VF a, VF b) { FC_HALVES(_mm256_sub_ps); }
inline VF vmul(VF a, VF b) { FC_HALVES(_mm256_mul_ps); }
inline VF vdiv(VF a, VF b) { FC_HALVES(_mm256_div_ps); }
// vminps/vmaxps return the second operand unless the first is strictly smaller/larger: a NaN in b comes through
inline VF vmin(VF a, VF b) { FC_HALVES(_mm256_min_ps); }
inline VF vmax(VF a, VF b) { FC_HALVES(_mm256_max_ps); }
#undef FC_HALVES
inline __m256 abs8(__m256 a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
inline VF vabs(VF a) { return {abs8(a.lo), abs8(a.hi)}; }
inline __m256 round8(__m256 a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline VF vround(VF a) { return {round8(a.lo), round8(a.hi)}; }
// 2^k for integral k in [-126, 127], from the exponent bits
inline __m256 pow2i8(__m256i k) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23)); }
// a * 2^n rounded once, as vscalefps: n = n1 + n2 (n1 = floor(n / 2)), and a * 2^n1 is exact while it stays
// normal (|n| <= 150 and |a| in [2^-50, 2^50]: vexp passes n in [-150, 129] and a in [0.7, 1.5]), so only the
// second product rounds, subnormal and overflowing results included. n is clamped to [-252, 254] (a * 2^n is
// 0 or inf beyond for such a); a NaN n gives NaN.
inline __m256 scalef8(__m256 a, __m256 n) {
  const __m256 nc = _mm256_max_ps(_mm256_set1_ps(-252.0f), _mm256_min_ps(_mm256_set1_ps(254.0f), n));
  const __m256i k = _mm256_cvtps_epi32(nc);
  const __m256i k1 = _mm256_srai_epi32(k, 1), k2 = _mm256_sub_epi32(k, k1);
  const __m256 r = _mm256_mul_ps(_mm256_mul_ps(a, pow2i8(k1)), pow2i8(k2));
  return _mm256_blendv_ps(r, n, _mm256_cmp_ps(n, n, _CMP_UNORD_Q));
}
inline VF vscalef(VF a, VF n) { return {scalef8(a.lo, n.lo), scalef8(a.hi, n.hi)}; }
inline __m256 copysign8(__m256 mag, __m256 sgn) {
  const __m256 s = _mm256_set1_ps(-0.0f);
  return _mm256_or_ps(_mm256_andnot_ps(s, mag), _mm256_and_ps(s, sgn));
}
inline VF vcopysign(VF mag, VF sgn) { return {copysign8(mag.lo, sgn.lo), copysign8(mag.hi, sgn.hi)}; }
// a < t ? x : y per lane (ordered: NaN takes y)
inline VF vselect_lt(VF a, VF t, VF x, VF y) {
  return {_mm256_blendv_ps(y.lo, x.lo, _mm256_cmp_ps(a.lo, t.lo, _CMP_LT_OQ)),
          _mm256_blendv_ps(y.hi, x.hi, _mm256_cmp_ps(a.hi, t.hi, _CMP_LT_OQ))};
}
#else
struct VF { float v[L]; };
inline VF vload(const float* p) { VF r; for (int l = 0; l < L; ++l) r.v[l] = p[l]; return r; }
inline void vstore(float* p, VF a) { for (int l = 0; l < L; ++l) p[l] = a.v[l]; }
inline VF vload_n(const float* p, int n) { VF r; for (int l = 0; l < L; ++l) r.v[l] = l < n ? p[l] : 0.0f; return r; }
inline void vstore_n(float* p, VF a, int n) { for (int l = 0; l < L && l < n; ++l) p[l] = a.v[l]; }
inline VF vset1(float x) { VF r; for (int l = 0; l < L; ++l) r.v[l] = x; return r; }
inline VF vzero() { return vset1(0.0f); }
#define FC_LANES(expr) VF r; for (int l = 0; l < L; ++l) r.v[l] = (expr); return r
inline VF vfma(VF a, VF b, VF c) { FC_LANES(std::fma(a.v[l], b.v[l], c.v[l])); }
inline VF vadd(VF a, VF b) { FC_LANES(a.v[l] + b.v[l]); }
inline VF vsub(VF a, VF b) { FC_LANES(a.v[l] - b.v[l]); }
inline VF vmul(VF a, VF b) { FC_LANES(a.v[l] * b.v[l]); }
inline VF vdiv(VF a, VF b) { FC_LANES(a.v[l] / b.v[l]); }
inline VF vmin(VF a, VF b) { FC_LANES(a.v[l] < b.v[l] ? a.v[l] : b.v[l]); }
inline VF vmax(VF a, VF b) { FC_LANES(a.v[l] > b.v[l] ? a.v[l] : b.v[l]); }
inline VF vabs(VF a) { FC_LANES(std::fabs(a.v[l])); }
inline VF vround(VF a) { FC_LANES(std::nearbyint(a.v[l])); }
inline VF vscalef(VF a, VF n) {
  FC_LANES(std::isnan(n.v[l]) ? n.v[l] : std::ldexp(a.v[l], static_cast<int>(n.v[l])));
}
inline VF vcopysign(VF mag, VF sgn) { FC_LANES(std::copysign(mag.v[l], sgn.v[l])); }
inline VF vselect_lt(VF a, VF t, VF x, VF y) { FC_LANES(a.v[l] < t.v[l] ? x.v[l] : y.v[l]); }
#undef FC_LANES
#endif

}  // namespace fc_vf
