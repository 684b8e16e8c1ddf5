// 16-lane float vectors shared by the CPU kernels (rvq_cpu.cpp, lstm_cpu.cpp): AVX-512 or a portable
// array with the same arithmetic (fma, min/max operand order, round-to-nearest-even, exact scaling), so both
// builds give bit-identical results.
#pragma once

#include <cmath>

#if defined(__AVX512F__)
#include <immintrin.h>
#define FC_AVX512 1
#else
#define FC_AVX512 0
#endif

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
