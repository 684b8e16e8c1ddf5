// Fused CPU residual vector quantizer: encode (all layers), decode, EMA codebook update, k-means.
//
// Layouts are audiocraft's: x (B, D, T) float32, codes (B, K, T) int64, codebooks (K, bins, D),
// code_norms (K, bins) = |e|^2. Rows n = b*T + t are processed in panels of RB = 16*NR rows stored as
// [D][RB] (one row per SIMD lane), so the nearest-code search is a lane-wise running minimum over codes
// and needs no horizontal reduction. Codebooks are packed once per call as [bins/MR][D][MR] so that
// the MR codes of a chunk are broadcast from consecutive floats. On CPUs with AVX512_BF16, encode finds
// candidates with a bf16 pass and re-ranks them in float32 (search_panel_bf16): the same codes, ~1.5x faster.
//
// Every entry point checks shapes, dtypes, devices, contiguity and index ranges with TORCH_CHECK
// before touching memory; the argmin starts at code 0 and uses a strict `<` that NaN never passes,
// so a code written here is always in [0, bins).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "vf16.h"

namespace {

using namespace fc_vf;       // VF and its operations; L = 16 floats per vector
constexpr int MR = 8;        // codes per micro-kernel chunk
constexpr int NR = 3;        // row vectors per panel: 24 accumulators; 8x3, 6x4, 12x2 all ran at oneDNN's rate,
                             // 14x2 spills registers (measured: bench/results/design-measurements.md)
constexpr int RB = L * NR;   // rows per panel
constexpr int64_t kTileBytes = 128 * 1024;  // residual tile per thread: stays in the 2 MiB L2 next to a codebook

// 16-lane int32 vectors beside vf16.h's floats, and the strict-< best update of the searches.
#if FC_AVX512
struct VI { __m512i v; };
inline VI iset1(int32_t x) { return {_mm512_set1_epi32(x)}; }
inline void istore(int32_t* p, VI a) { _mm512_storeu_si512(p, a.v); }
// best/idx take dist/c where dist < best (ordered compare: NaN never wins)
inline void min_update(VF& best, VI& idx, VF dist, VI c) {
  __mmask16 m = _mm512_cmp_ps_mask(dist.v, best.v, _CMP_LT_OQ);
  best.v = _mm512_mask_blend_ps(m, best.v, dist.v);
  idx.v = _mm512_mask_blend_epi32(m, idx.v, c.v);
}
#elif FC_AVX2
struct VI { __m256i lo, hi; };
inline VI iset1(int32_t x) { const __m256i v = _mm256_set1_epi32(x); return {v, v}; }
inline void istore(int32_t* p, VI a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), a.lo);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 8), a.hi);
}
inline void min_update8(__m256& best, __m256i& idx, __m256 dist, __m256i c) {
  const __m256 m = _mm256_cmp_ps(dist, best, _CMP_LT_OQ);
  best = _mm256_blendv_ps(best, dist, m);
  idx = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(idx), _mm256_castsi256_ps(c), m));
}
inline void min_update(VF& best, VI& idx, VF dist, VI c) {
  min_update8(best.lo, idx.lo, dist.lo, c.lo);
  min_update8(best.hi, idx.hi, dist.hi, c.hi);
}
#else
struct VI { int32_t v[L]; };
inline VI iset1(int32_t x) { VI r; for (int l = 0; l < L; ++l) r.v[l] = x; return r; }
inline void istore(int32_t* p, VI a) { for (int l = 0; l < L; ++l) p[l] = a.v[l]; }
inline void min_update(VF& best, VI& idx, VF dist, VI c) {
  for (int l = 0; l < L; ++l) {
    if (dist.v[l] < best.v[l]) {
      best.v[l] = dist.v[l];
      idx.v[l] = c.v[l];
    }
  }
}
#endif

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
template <class T>
using Buffer = std::unique_ptr<T[], AlignedFree>;

template <class T>
Buffer<T> alloc(int64_t n) {
  size_t bytes = ((static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64) * 64;
  void* p = std::aligned_alloc(64, bytes);
  TORCH_CHECK(p != nullptr, "fastcodec rvq_cpu: out of memory allocating ", bytes, " bytes");
  return Buffer<T>(static_cast<T*>(p));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs worker(next) on every thread; next() hands out task indices 0, 1, ... until it returns
// >= ntasks. Tasks go to whichever thread is free: on a shared 2-core machine a static split waits
// for the thread whose core is taken by another process.
template <class W>
void parallel_tasks(int64_t ntasks, W&& worker) {
  std::atomic<int64_t> counter{0};
  auto next = [&counter]() { return counter.fetch_add(1, std::memory_order_relaxed); };
  const int64_t nw = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
  at::parallel_for(0, nw, 1, [&](int64_t, int64_t) { worker(next); });
}

// Calls f(b, t, offset, len) for each run of consecutive rows n = b*T + t in [r0, r1) within one b.
template <class F>
void for_segments(int64_t r0, int64_t r1, int64_t T, F&& f) {
  for (int64_t r = r0; r < r1;) {
    int64_t b = r / T, t = r % T;
    int64_t len = std::min(r1 - r, T - t);
    f(b, t, r - r0, len);
    r += len;
  }
}

#if FC_AVX2
// dst[c * ldd + r] = src[r * lds + c] for an 8 x 8 block
inline void transpose8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 4; ++i) {  // 32-bit interleave of row pairs
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {  // 64-bit interleave: rows 4i..4i+3 of columns j, j+4 per 128-bit lane
    r[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {  // low 128-bit lanes give column j, high ones column j + 4
    _mm256_storeu_ps(dst + j * ldd, _mm256_permute2f128_ps(r[j], r[4 + j], 0x20));
    _mm256_storeu_ps(dst + (j + 4) * ldd, _mm256_permute2f128_ps(r[j], r[4 + j], 0x31));
  }
}
#endif

// dst[c * ldd + r] = src[r * lds + c] for a 16 x 16 block
inline void transpose16(const float* src, int64_t lds, float* dst, int64_t ldd) {
#if FC_AVX512
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; ++i) {  // 32-bit interleave of row pairs
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // 64-bit interleave: r[4i+j] lane m = rows 4i..4i+3 of column 4m+j
    __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int j = 0; j < 4; ++j) {  // gather 128-bit lane m of the four row groups into column 4m+j
    __m512 u = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x44), v = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xEE);
    __m512 u2 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x44), v2 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xEE);
    _mm512_storeu_ps(dst + j * ldd, _mm512_shuffle_f32x4(u, u2, 0x88));
    _mm512_storeu_ps(dst + (j + 4) * ldd, _mm512_shuffle_f32x4(u, u2, 0xDD));
    _mm512_storeu_ps(dst + (j + 8) * ldd, _mm512_shuffle_f32x4(v, v2, 0x88));
    _mm512_storeu_ps(dst + (j + 12) * ldd, _mm512_shuffle_f32x4(v, v2, 0xDD));
  }
#elif FC_AVX2
  for (int bi = 0; bi < 16; bi += 8)
    for (int bj = 0; bj < 16; bj += 8) transpose8(src + bi * lds + bj, lds, dst + bj * ldd + bi, ldd);
#else
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) dst[j * ldd + i] = src[i * lds + j];
#endif
}

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols: 16 x 16 blocks, scalar edges
void transpose(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols) {
  const int64_t r16 = rows - rows % 16, c16 = cols - cols % 16;
  for (int64_t r = 0; r < r16; r += 16) {
    for (int64_t c = 0; c < c16; c += 16) transpose16(src + r * lds + c, lds, dst + c * ldd + r, ldd);
    for (int64_t c = c16; c < cols; ++c)
      for (int64_t i = r; i < r + 16; ++i) dst[c * ldd + i] = src[i * lds + c];
  }
  for (int64_t r = r16; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

// panel [D][RB] <- rows [row0, row0 + n) of a (B, D, T) tensor; lanes >= n are zeroed
void panel_load_bdt(float* panel, const float* src, int64_t D, int64_t T, int64_t row0, int64_t n) {
  if (n < RB) std::memset(panel, 0, sizeof(float) * D * RB);
  for_segments(row0, row0 + n, T, [&](int64_t b, int64_t t, int64_t off, int64_t len) {
    for (int64_t d = 0; d < D; ++d)
      std::memcpy(panel + d * RB + off, src + (b * D + d) * T + t, sizeof(float) * len);
  });
}

// rows [row0, row0 + n) of a (B, D, T) tensor <- panel [D][RB]
void panel_store_bdt(float* dst, const float* panel, int64_t D, int64_t T, int64_t row0, int64_t n) {
  for_segments(row0, row0 + n, T, [&](int64_t b, int64_t t, int64_t off, int64_t len) {
    for (int64_t d = 0; d < D; ++d)
      std::memcpy(dst + (b * D + d) * T + t, panel + d * RB + off, sizeof(float) * len);
  });
}

// Packed codebooks: P[k][chunk][d][i] = codebook[k][chunk*MR + i][d] (0 past bins) and
// en[k][chunk*MR + i] = |e|^2 (+inf past bins, so padding never wins).
struct Packed {
  Buffer<float> P, en;
  int64_t nchunks = 0, D = 0;
  const float* codes(int64_t k) const { return P.get() + k * nchunks * D * MR; }
  const float* norms(int64_t k) const { return en.get() + k * nchunks * MR; }
};

// P[k] of the packed codebooks <- layer k's codes (serial: called per layer, possibly inside a parallel region)
void pack_layer(float* Pk, const float* cbk, int64_t bins, int64_t D, int64_t nchunks) {
  for (int64_t ch = 0; ch < nchunks; ++ch) {
    float* dst = Pk + ch * D * MR;
    for (int i = 0; i < MR; ++i) {
      const int64_t c = ch * MR + i;
      const float* e = cbk + c * D;
      for (int64_t d = 0; d < D; ++d) dst[d * MR + i] = c < bins ? e[d] : 0.0f;
    }
  }
}

// codes = false: P is allocated but left for pack_layer (the bf16 search needs it only as a fallback)
Packed pack_codebooks(const float* cb, const float* norms, int64_t K, int64_t bins, int64_t D, bool codes = true) {
  Packed p;
  p.nchunks = ceil_div(bins, MR);
  p.D = D;
  p.P = alloc<float>(K * p.nchunks * D * MR);
  p.en = alloc<float>(K * p.nchunks * MR);
  float* en = p.en.get();
  const int64_t nch = p.nchunks;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = 0; c < nch * MR; ++c)
      en[k * nch * MR + c] = c < bins ? norms[k * bins + c] : std::numeric_limits<float>::infinity();
  if (codes)
    at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) pack_layer(p.P.get() + k * nch * D * MR, cb + k * bins * D, bins, D, nch);
    });
  return p;
}

// One chunk of MR codes against one panel of RB rows: dots by fma over d in order, then
// dist = (|r|^2 - 2 dot) + |e|^2 in audiocraft's association, folded into the running minimum.
#if FC_AVX2
// 16 ymm registers hold 4 codes x 24 rows (12 accumulators + 3 row vectors + 1 broadcast code): the chunk
// goes in four such passes over d, each half of the rows taking its codes in order, so every lane sees the
// same fma chain and the same sequence of updates as the 8 x 48 kernel below (whose 48 accumulators would
// spill here). Faster than the portable loops and the reference (measured: bench/results/design-measurements.md).
inline __m256& half(VF& a, int h) { return h ? a.hi : a.lo; }
inline __m256i& half(VI& a, int h) { return h ? a.hi : a.lo; }
inline __m256 half(const VF& a, int h) { return h ? a.hi : a.lo; }

inline void search_chunk(const float* __restrict P, const float* __restrict R, int64_t D,
                         const float* __restrict en, int32_t c0, const VF* rn, VF* best, VI* idx) {
  constexpr int RQ = 3, CQ = 4;  // ymm rows, codes per pass
  static_assert(RB == 2 * RQ * 8 && MR % CQ == 0, "AVX2 search_chunk tiles 48 rows x 8 codes");
  for (int h = 0; h < 2; ++h) {
    for (int i0 = 0; i0 < MR; i0 += CQ) {
      __m256 acc[CQ][RQ];
#pragma GCC unroll 4
      for (int i = 0; i < CQ; ++i)
#pragma GCC unroll 3
        for (int j = 0; j < RQ; ++j) acc[i][j] = _mm256_setzero_ps();
      const float* rp = R + h * RQ * 8;
      const float* e = P + i0;
      for (int64_t d = 0; d < D; ++d, rp += RB, e += MR) {
        __m256 r[RQ];
#pragma GCC unroll 3
        for (int j = 0; j < RQ; ++j) r[j] = _mm256_loadu_ps(rp + j * 8);
#pragma GCC unroll 4
        for (int i = 0; i < CQ; ++i) {
          const __m256 ei = _mm256_broadcast_ss(e + i);
#pragma GCC unroll 3
          for (int j = 0; j < RQ; ++j) acc[i][j] = _mm256_fmadd_ps(ei, r[j], acc[i][j]);
        }
      }
#pragma GCC unroll 4
      for (int i = 0; i < CQ; ++i) {
        const __m256 ni = _mm256_set1_ps(en[i0 + i]);
        const __m256i ci = _mm256_set1_epi32(c0 + i0 + i);
#pragma GCC unroll 3
        for (int j = 0; j < RQ; ++j) {
          const int q = h * RQ + j;  // ymm q of the panel: half q % 2 of vector q / 2
          const __m256 dist =
              _mm256_add_ps(_mm256_sub_ps(half(rn[q / 2], q % 2), _mm256_add_ps(acc[i][j], acc[i][j])), ni);
          min_update8(half(best[q / 2], q % 2), half(idx[q / 2], q % 2), dist, ci);
        }
      }
    }
  }
}
#else
inline void search_chunk(const float* __restrict P, const float* __restrict R, int64_t D,
                         const float* __restrict en, int32_t c0, const VF* rn, VF* best, VI* idx) {
  VF acc[MR][NR];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NR; ++v) acc[i][v] = vzero();
  for (int64_t d = 0; d < D; ++d) {
    VF r[NR];
#pragma GCC unroll 4
    for (int v = 0; v < NR; ++v) r[v] = vload(R + d * RB + v * L);
    const float* e = P + d * MR;
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      VF ei = vset1(e[i]);
#pragma GCC unroll 4
      for (int v = 0; v < NR; ++v) acc[i][v] = vfma(ei, r[v], acc[i][v]);
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    VF ni = vset1(en[i]);
    VI ci = iset1(c0 + i);
#pragma GCC unroll 4
    for (int v = 0; v < NR; ++v) {
      VF dist = vadd(vsub(rn[v], vadd(acc[i][v], acc[i][v])), ni);
      min_update(best[v], idx[v], dist, ci);
    }
  }
}
#endif

// idx[lane] = nearest code (first index on ties) of each of the RB rows of panel R [D][RB].
void search_panel(const float* P, const float* en, int64_t nchunks, int64_t D, const float* R, int32_t* idx) {
  VF rn[NR], best[NR];
  VI bi[NR];
  for (int v = 0; v < NR; ++v) {
    rn[v] = vzero();
    best[v] = vset1(std::numeric_limits<float>::infinity());
    bi[v] = iset1(0);
  }
  for (int64_t d = 0; d < D; ++d)
    for (int v = 0; v < NR; ++v) {
      VF r = vload(R + d * RB + v * L);
      rn[v] = vfma(r, r, rn[v]);
    }
  for (int64_t ch = 0; ch < nchunks; ++ch)
    search_chunk(P + ch * D * MR, R, D, en + ch * MR, static_cast<int32_t>(ch * MR), rn, best, bi);
  for (int v = 0; v < NR; ++v) istore(idx + v * L, bi[v]);
}

// ---------------------------------------------------------------------------------------------------------
// bfloat16 candidate search with exact float32 re-ranking (AVX512_BF16 CPUs: Zen 4, Cooper Lake, Sapphire
// Rapids). The distances of every code are first computed from bf16-rounded residuals and codes with
// vdpbf16ps (twice the fp32 FMA rate); every code whose approximate distance lies within 2E of the smallest
// one is a candidate, E being a rigorous bound on |approximate - float32-kernel distance|; the candidates are
// then re-ranked with exactly the float32 arithmetic of search_chunk (same fma order over d, same
// association), first index winning. The float32 kernel's answer is always a candidate, so the codes are
// bitwise those of search_panel; only the work differs.
#if FC_AVX512 && defined(__AVX512BF16__)
#define FC_BF16 1

std::atomic<bool> g_bf16_search{true};

inline uint16_t bf16_round(float f) {  // round to nearest even, bf16 subnormals flushed like vdpbf16ps reads them
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  uint16_t h = static_cast<uint16_t>(u >> 16);
  if ((h & 0x7f80u) == 0) h &= 0x8000u;
  return h;
}

inline float bf16_value(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Pb[k][chunk][p][i] = (bf16(e[2p]), bf16(e[2p+1])) of code chunk*MR + i, low half first (vdpbf16ps pairs);
// per layer the bounds' constants: max |e|, max |bf16(e)|, max |e - bf16(e)| (real codes) and max |e|^2 given.
struct PackedBF16 {
  Buffer<uint32_t> P;
  std::vector<float> cmax, ctmax, dcmax, enmax;
  int64_t nchunks = 0, D2 = 0;
  const uint32_t* codes(int64_t k) const { return P.get() + k * nchunks * D2 * MR; }
};

PackedBF16 pack_codebooks_bf16(const float* cb, const float* norms, int64_t K, int64_t bins, int64_t D) {
  PackedBF16 p;
  p.nchunks = ceil_div(bins, MR);
  p.D2 = ceil_div(D, 2);
  p.P = alloc<uint32_t>(K * p.nchunks * p.D2 * MR);
  const int64_t nch = p.nchunks, D2 = p.D2;
  std::vector<double> cm(K * nch, 0.0), ctm(K * nch, 0.0), dcm(K * nch, 0.0), enm(K * nch, 0.0);
  uint32_t* P = p.P.get();
  at::parallel_for(0, K * nch, 16, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t k = j / nch, ch = j % nch;
      uint32_t* dst = P + j * D2 * MR;
      for (int i = 0; i < MR; ++i) {
        const int64_t c = ch * MR + i;
        if (c >= bins) {
          for (int64_t q = 0; q < D2; ++q) dst[q * MR + i] = 0;
          continue;
        }
        const float* e = cb + (k * bins + c) * D;
        double n2 = 0.0, nt2 = 0.0, d2 = 0.0;
        for (int64_t q = 0; q < D2; ++q) {
          uint16_t h[2] = {0, 0};
          for (int s = 0; s < 2 && 2 * q + s < D; ++s) {
            const float v = e[2 * q + s];
            h[s] = bf16_round(v);
            const double t = bf16_value(h[s]);
            n2 += static_cast<double>(v) * v;
            nt2 += t * t;
            d2 += (v - t) * (v - t);
          }
          dst[q * MR + i] = static_cast<uint32_t>(h[0]) | (static_cast<uint32_t>(h[1]) << 16);
        }
        cm[j] = std::max(cm[j], n2);
        ctm[j] = std::max(ctm[j], nt2);
        dcm[j] = std::max(dcm[j], d2);
        enm[j] = std::max(enm[j], std::fabs(static_cast<double>(norms[k * bins + c])));
      }
    }
  });
  for (auto* v : {&p.cmax, &p.ctmax, &p.dcmax, &p.enmax}) v->assign(K, 0.0f);
  for (int64_t k = 0; k < K; ++k) {
    double a = 0, b = 0, c = 0, e = 0;
    for (int64_t ch = 0; ch < nch; ++ch) {
      a = std::max(a, cm[k * nch + ch]);
      b = std::max(b, ctm[k * nch + ch]);
      c = std::max(c, dcm[k * nch + ch]);
      e = std::max(e, enm[k * nch + ch]);
    }
    // rounded up to float (inf stays inf; NaN poisons the bound and the panel falls back to an exact scan)
    p.cmax[k] = static_cast<float>(std::sqrt(a) * (1 + 1e-6));
    p.ctmax[k] = static_cast<float>(std::sqrt(b) * (1 + 1e-6));
    p.dcmax[k] = static_cast<float>(std::sqrt(c) * (1 + 1e-6));
    p.enmax[k] = static_cast<float>(e * (1 + 1e-6));
  }
  return p;
}

// Rb [D2][RB] dword pairs <- panel R [D][RB]; rn = |r|^2 by the float32 kernel's fma chain; ex = |r - bf16(r)|^2
void panel_to_bf16(const float* R, int64_t D, uint32_t* Rb, VF* rn, VF* ex) {
  for (int v = 0; v < NR; ++v) rn[v] = ex[v] = vzero();
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t q = 0; q < ceil_div(D, 2); ++q) {
    for (int v = 0; v < NR; ++v) {
      const __m512 a = _mm512_loadu_ps(R + 2 * q * RB + v * L);
      const __m512 b = 2 * q + 1 < D ? _mm512_loadu_ps(R + (2 * q + 1) * RB + v * L) : zero;
      rn[v].v = _mm512_fmadd_ps(a, a, rn[v].v);
      if (2 * q + 1 < D) rn[v].v = _mm512_fmadd_ps(b, b, rn[v].v);
      const __m512i ha = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(a)));
      const __m512i hb = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(b)));
      const __m512 da = _mm512_sub_ps(a, _mm512_castsi512_ps(_mm512_slli_epi32(ha, 16)));
      const __m512 db = _mm512_sub_ps(b, _mm512_castsi512_ps(_mm512_slli_epi32(hb, 16)));
      ex[v].v = _mm512_fmadd_ps(da, da, _mm512_fmadd_ps(db, db, ex[v].v));
      _mm512_storeu_si512(Rb + q * RB + v * L, _mm512_or_si512(ha, _mm512_slli_epi32(hb, 16)));
    }
  }
}

// approximate distances en - 2 <bf16(r), bf16(e)> of MR codes x RB rows into dist [MR][RB]; running minimum
inline void search_chunk_bf16(const uint32_t* __restrict P, const uint32_t* __restrict Rb, int64_t D2,
                              const float* __restrict en, float* __restrict dist, __m512* bmin) {
  __m512 acc[MR][NR];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NR; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t q = 0; q < D2; ++q) {
    __m512i r[NR];
#pragma GCC unroll 4
    for (int v = 0; v < NR; ++v) r[v] = _mm512_loadu_si512(Rb + q * RB + v * L);
    const uint32_t* e = P + q * MR;
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m512i ei = _mm512_set1_epi32(static_cast<int>(e[i]));
#pragma GCC unroll 4
      for (int v = 0; v < NR; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], (__m512bh)r[v], (__m512bh)ei);
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    const __m512 ni = _mm512_set1_ps(en[i]);
#pragma GCC unroll 4
    for (int v = 0; v < NR; ++v) {
      const __m512 d = _mm512_sub_ps(ni, _mm512_add_ps(acc[i][v], acc[i][v]));
      _mm512_storeu_ps(dist + i * RB + v * L, d);
      bmin[v] = _mm512_min_ps(bmin[v], d);
    }
  }
}

// search_chunk's float32 distance of row `lane` of panel R to code e, computed the same way
inline float exact_dist(const float* R, int64_t D, int lane, float rn, const float* e, float en) {
  float acc = 0.0f;
  for (int64_t d = 0; d < D; ++d) acc = std::fma(e[d], R[d * RB + lane], acc);
  return (rn - (acc + acc)) + en;
}

// search_panel's result by the bf16 candidate search; dist, cand: scratch of nchunks * MR * RB floats / ints
// Returns false, idx untouched, when the rows have more than kMaxCandidates candidates on average (codebooks
// with many equal or nearly equal codes, e.g. not yet initialised zeros): the float32 search is then faster.
constexpr int64_t kMaxCandidates = 16;
bool search_panel_bf16(const PackedBF16& pb, int64_t k, const float* cbk, const float* en, int64_t bins,
                       int64_t D, const float* R, uint32_t* Rb, float* dist, int32_t* cand, int32_t* idx) {
  VF rn[NR], ex[NR];
  panel_to_bf16(R, D, Rb, rn, ex);
  __m512 bmin[NR];
  for (int v = 0; v < NR; ++v) bmin[v] = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  const int64_t nch = pb.nchunks, D2 = pb.D2;
  const uint32_t* P = pb.codes(k);
  for (int64_t ch = 0; ch < nch; ++ch)
    search_chunk_bf16(P + ch * D2 * MR, Rb, D2, en + ch * MR, dist + ch * MR * RB, bmin);

  // E >= |approx - (float32 kernel - |r|^2)| for every code: bf16 rounding of r and e (measured per row and per
  // codebook), D roundings in each dot, the roundings of the final adds, flushed products; thr = min + 2E
  const float u = 0x1p-24f, gD = 1.01f * static_cast<float>(D) * u;
  const float cm = pb.cmax[k], ctm = pb.ctmax[k], dcm = pb.dcmax[k], enm = pb.enmax[k];
  const float tiny = 4.0f * static_cast<float>(D) * 0x1p-126f;
  __m512 thr[NR];
  for (int v = 0; v < NR; ++v) {
    const __m512 xn = _mm512_mul_ps(_mm512_sqrt_ps(rn[v].v), _mm512_set1_ps(1.0f + 1e-6f));
    const __m512 xe = _mm512_mul_ps(_mm512_sqrt_ps(ex[v].v), _mm512_set1_ps(1.0f + 1e-6f));
    const __m512 xt = _mm512_add_ps(xn, xe);
    __m512 dot = _mm512_fmadd_ps(xn, _mm512_set1_ps(dcm), _mm512_mul_ps(xe, _mm512_set1_ps(ctm)));
    dot = _mm512_fmadd_ps(_mm512_set1_ps(gD), _mm512_fmadd_ps(xt, _mm512_set1_ps(ctm), _mm512_mul_ps(xn, _mm512_set1_ps(cm))), dot);
    __m512 mag = _mm512_add_ps(_mm512_add_ps(rn[v].v, _mm512_set1_ps(enm)),
                               _mm512_mul_ps(_mm512_set1_ps(2.0f), _mm512_fmadd_ps(xn, _mm512_set1_ps(cm), _mm512_mul_ps(xt, _mm512_set1_ps(ctm)))));
    __m512 E = _mm512_fmadd_ps(_mm512_set1_ps(2.0f), dot, _mm512_fmadd_ps(_mm512_set1_ps(4.0f * u), mag, _mm512_set1_ps(tiny)));
    E = _mm512_mul_ps(E, _mm512_set1_ps(1.05f));
    thr[v] = _mm512_fmadd_ps(_mm512_set1_ps(2.0f), E, bmin[v]);
    thr[v] = _mm512_add_ps(thr[v], _mm512_mul_ps(_mm512_abs_ps(thr[v]), _mm512_set1_ps(0x1p-20f)));
  }
  // candidates (code, row) in ascending code order: about 1.4 per row on random and data-drawn codebooks
  int32_t cn[RB] = {};
  int64_t np = 0;
  for (int64_t c = 0; c < bins; ++c) {
    for (int v = 0; v < NR; ++v) {
      uint32_t m = _mm512_cmp_ps_mask(_mm512_loadu_ps(dist + c * RB + v * L), thr[v], _CMP_LE_OQ);
      while (m) {
        const int l = v * L + __builtin_ctz(m);
        m &= m - 1;
        cand[np++] = static_cast<int32_t>(c * RB + l);
        ++cn[l];
      }
    }
  }
  if (np > kMaxCandidates * RB) return false;
  for (int l = 0; l < RB; ++l) idx[l] = 0;
  alignas(64) float rnl[RB];
  for (int v = 0; v < NR; ++v) _mm512_store_ps(rnl + v * L, rn[v].v);
  // rows with several candidates: their exact distances, 8 independent fma chains at a time
  int64_t nx = 0;
  for (int64_t j = 0; j < np; ++j) {
    const int l = cand[j] % RB;
    if (cn[l] == 1) idx[l] = cand[j] / RB;
    else cand[nx++] = cand[j];
  }
  float best[RB];
  for (int l = 0; l < RB; ++l) best[l] = std::numeric_limits<float>::infinity();
  constexpr int G = 8;
  for (int64_t j0 = 0; j0 < nx; j0 += G) {
    const int g = static_cast<int>(std::min<int64_t>(G, nx - j0));
    const float* e[G];
    int lane[G];
    float acc[G];
    for (int j = 0; j < G; ++j) {
      const int32_t p = cand[j0 + std::min(j, g - 1)];
      lane[j] = p % RB;
      e[j] = cbk + static_cast<int64_t>(p / RB) * D;
      acc[j] = 0.0f;
    }
    for (int64_t d = 0; d < D; ++d)
#pragma GCC unroll 8
      for (int j = 0; j < G; ++j) acc[j] = std::fma(e[j][d], R[d * RB + lane[j]], acc[j]);
    for (int j = 0; j < g; ++j) {
      const int32_t p = cand[j0 + j];
      const int l = lane[j];
      const float s = (rnl[l] - (acc[j] + acc[j])) + en[p / RB];
      if (s < best[l]) {
        best[l] = s;
        idx[l] = p / RB;
      }
    }
  }
  // no candidate (a non-finite row or bound): the float32 kernel's rule over every code
  for (int l = 0; l < RB; ++l) {
    if (cn[l] != 0) continue;
    float b = std::numeric_limits<float>::infinity();
    int32_t bi = 0;
    for (int64_t c = 0; c < bins; ++c) {
      const float s = exact_dist(R, D, l, rnl[l], cbk + c * D, en[c]);
      if (s < b) {
        b = s;
        bi = static_cast<int32_t>(c);
      }
    }
    idx[l] = bi;
  }
  return true;
}
#else
#define FC_BF16 0
#endif

void check_f32(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must have ", dim, " dims, got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

void check_codes_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 3, name, " must be (batch, n_q, time), got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

void check_range(const int64_t* c, int64_t n, int64_t bins, const char* name) {
  int64_t lo = 0, hi = 0;
  if (n > 0) {
    lo = *std::min_element(c, c + n);
    hi = *std::max_element(c, c + n);
  }
  TORCH_CHECK_VALUE(lo >= 0 && hi < bins, name, " out of range: found values in [", lo, ", ", hi,
                    "], allowed [0, ", bins, ")");
}

void check_codebooks(const at::Tensor& cb) {
  check_f32(cb, "codebooks", 3);
  TORCH_CHECK_VALUE(cb.size(0) > 0 && cb.size(1) > 0 && cb.size(2) > 0,
                    "codebooks must be non-empty (n_q, bins, dim), got ", cb.sizes());
  TORCH_CHECK_VALUE(cb.size(1) <= std::numeric_limits<int32_t>::max() - MR,
                    "codebooks have ", cb.size(1), " bins; at most ",
                    std::numeric_limits<int32_t>::max() - MR, " are supported");
}

// Few rows (a streamed frame): packing the codebooks per call costs more than searching them (slower than the
// reference for one frame), so encode_few reads the codes 16 at a time, either in place through an in-register
// 16x16 transpose or, faster still, when the caller keeps one, from pack_few's layout with 4 chunks in flight
// (measured: bench/results/design-measurements.md), with search_chunk's arithmetic: fma over d in order,
// (|r|^2 - 2 dot) + |e|^2, strict <, first index on ties. Serial: a few rows do not pay for waking threads.
constexpr int64_t kFewRows = 8;

// The 16 codes from c0 against `rows` rows whose dot products with them are acc[n]: distance
// (|r|^2 - 2 dot) + |e|^2 (codes past bins at +inf, never taken) and a strict-< update of each row's best.
inline void few_update(int64_t c0, int64_t bins, const float* nk, const float* rn, const VF* acc, int64_t rows,
                       VF* best, VI* idx) {
  alignas(64) float en[L];
  alignas(64) int32_t ci[L];
  for (int l = 0; l < L; ++l) {
    en[l] = c0 + l < bins ? nk[c0 + l] : std::numeric_limits<float>::infinity();
    ci[l] = static_cast<int32_t>(c0 + l);
  }
  const VF env = vload(en);
  VI civ;
#if FC_AVX512
  civ.v = _mm512_load_si512(ci);
#elif FC_AVX2
  civ.lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(ci));
  civ.hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(ci + 8));
#else
  for (int l = 0; l < L; ++l) civ.v[l] = ci[l];
#endif
  for (int64_t n = 0; n < rows; ++n)
    min_update(best[n], idx[n], vadd(vsub(vset1(rn[n]), vadd(acc[n], acc[n])), env), civ);
}

// Chunks [ch0, ch0 + G) of 16 codes of one layer in pack_few's layout against NR rows r[n][d]: each code's dot
// product is one fma chain over d in order (as search_chunk's); G independent chains per row hide the fma
// latency (one chain ran at ~1/4 of the fma rate). Then few_update per chunk, in code order.
template <int NR, int G>
inline void few_chunks(const float* fewk, int64_t ch0, int64_t D, int64_t bins, const float* nk, const float* r,
                       const float* rn, VF* best, VI* idx) {
  VF acc[G][NR];
  for (int g = 0; g < G; ++g)
    for (int n = 0; n < NR; ++n) acc[g][n] = vzero();
  const float* e0 = fewk + ch0 * D * L;
  for (int64_t d = 0; d < D; ++d) {
    VF e[G];
    for (int g = 0; g < G; ++g) e[g] = vload(e0 + (g * D + d) * L);
    for (int n = 0; n < NR; ++n) {
      const VF rv = vset1(r[n * D + d]);
      for (int g = 0; g < G; ++g) acc[g][n] = vfma(e[g], rv, acc[g][n]);
    }
  }
  for (int g = 0; g < G; ++g) few_update((ch0 + g) * L, bins, nk, rn, acc[g], NR, best, idx);
}

template <int NR>
void few_layer(const float* fewk, int64_t D, int64_t bins, const float* nk, const float* r, const float* rn, VF* best,
               VI* idx) {
  // G * NR accumulators + G codes + 1 broadcast within the registers: 32 zmm, or 16 ymm holding 2 per vector
  constexpr int G = FC_AVX2 ? (NR == 1 ? 3 : NR == 2 ? 2 : 1) : NR <= 6 ? 4 : 2;
  const int64_t nch = ceil_div(bins, L);
  int64_t ch = 0;
  for (; ch + G <= nch; ch += G) few_chunks<NR, G>(fewk, ch, D, bins, nk, r, rn, best, idx);
  for (; ch < nch; ++ch) few_chunks<NR, 1>(fewk, ch, D, bins, nk, r, rn, best, idx);
}

using FewLayerFn = void (*)(const float*, int64_t, int64_t, const float*, const float*, const float*, VF*, VI*);
constexpr FewLayerFn kFewLayer[kFewRows] = {few_layer<1>, few_layer<2>, few_layer<3>, few_layer<4>,
                                            few_layer<5>, few_layer<6>, few_layer<7>, few_layer<8>};

// few (K, ceil(bins / 16), D, 16): few[k][c / 16][d][c % 16] = codebooks[k][c][d], zeros past bins.
void encode_few(const float* xp, const float* cb, const float* few, const float* norms, int64_t B, int64_t D,
                int64_t T, int64_t K, int64_t bins, int64_t* cp, float* qp, float* rp) {
  const int64_t N = B * T;
  std::vector<float> r(N * D), q(qp ? N * D : 0, 0.0f);  // [n][d]
  for (int64_t n = 0; n < N; ++n)
    for (int64_t d = 0; d < D; ++d) r[n * D + d] = xp[((n / T) * D + d) * T + n % T];
  alignas(64) float tile[16 * 16];  // [d][code]
  alignas(64) float bv[L];
  alignas(64) int32_t bi[L];
  for (int64_t k = 0; k < K; ++k) {
    const float* cbk = cb + k * bins * D;
    const float* nk = norms + k * bins;
    float rn[kFewRows];
    VF best[kFewRows];
    VI idx[kFewRows];
    for (int64_t n = 0; n < N; ++n) {
      if (rp)
        for (int64_t d = 0; d < D; ++d) rp[((k * B + n / T) * D + d) * T + n % T] = r[n * D + d];
      rn[n] = 0.0f;
      for (int64_t d = 0; d < D; ++d) rn[n] = std::fma(r[n * D + d], r[n * D + d], rn[n]);
      best[n] = vset1(std::numeric_limits<float>::infinity());
      idx[n] = iset1(0);
    }
    if (few) kFewLayer[N - 1](few + k * ceil_div(bins, L) * D * L, D, bins, nk, r.data(), rn, best, idx);
    for (int64_t c0 = 0; !few && c0 < bins; c0 += L) {
      const int64_t nc = std::min<int64_t>(L, bins - c0);
      VF acc[kFewRows];
      for (int64_t n = 0; n < N; ++n) acc[n] = vzero();
      for (int64_t d0 = 0; d0 < D; d0 += L) {
        const int64_t nd = std::min<int64_t>(L, D - d0);
        if (nc == L && nd == L) {
          transpose16(cbk + c0 * D + d0, D, tile, L);
        } else {
          std::memset(tile, 0, sizeof(tile));
          transpose(cbk + c0 * D + d0, D, tile, L, nc, nd);
        }
        for (int64_t dd = 0; dd < nd; ++dd) {
          const VF e = vload(tile + dd * L);
          for (int64_t n = 0; n < N; ++n) acc[n] = vfma(e, vset1(r[n * D + d0 + dd]), acc[n]);
        }
      }
      few_update(c0, bins, nk, rn, acc, N, best, idx);
    }
    for (int64_t n = 0; n < N; ++n) {
      // lane l holds the first minimum of codes l, l+16, ...: the overall first minimum is the smallest
      // index among the lanes holding the smallest value (none below +inf: code 0, as search_chunk)
      vstore(bv, best[n]);
      istore(bi, idx[n]);
      float m = std::numeric_limits<float>::infinity();
      int32_t c = 0;
      for (int l = 0; l < L; ++l) {
        if (bv[l] < m || (bv[l] == m && m < std::numeric_limits<float>::infinity() && bi[l] < c)) {
          m = bv[l];
          c = bi[l];
        }
      }
      const float* e = cbk + static_cast<int64_t>(c) * D;
      for (int64_t d = 0; d < D; ++d) r[n * D + d] -= e[d];
      if (qp)
        for (int64_t d = 0; d < D; ++d) q[n * D + d] += e[d];
      cp[((n / T) * K + k) * T + n % T] = c;
    }
  }
  if (qp)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t d = 0; d < D; ++d) qp[((n / T) * D + d) * T + n % T] = q[n * D + d];
}

// codebooks (K, bins, D) -> (K, ceil(bins / 16), D, 16), the layout encode_few reads without transposing.
at::Tensor pack_few(const at::Tensor& codebooks) {
  check_codebooks(codebooks);  // contiguous
  const at::Tensor& cb = codebooks;
  const int64_t K = cb.size(0), bins = cb.size(1), D = cb.size(2), nch = ceil_div(bins, L);
  at::Tensor out = at::zeros({K, nch, D, L}, cb.options());
  const float* src = cb.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = 0; c < bins; ++c)
      for (int64_t d = 0; d < D; ++d) dst[((k * nch + c / L) * D + d) * L + c % L] = src[(k * bins + c) * D + d];
  return out;
}

// x: (B, D, T); codebooks: (K, bins, D); code_norms: (K, bins).
// Returns codes (B, K, T) int64, quantized (B, D, T) (empty unless need_quantized) and the input
// residual of every layer (K, B, D, T) (empty unless need_residuals).
std::vector<at::Tensor> encode(const at::Tensor& x, const at::Tensor& codebooks, const at::Tensor& code_norms,
                               bool need_quantized, bool need_residuals, const c10::optional<at::Tensor>& few) {
  check_f32(x, "x", 3);
  check_codebooks(codebooks);
  check_f32(code_norms, "code_norms", 2);
  const int64_t B = x.size(0), D = x.size(1), T = x.size(2);
  const int64_t K = codebooks.size(0), bins = codebooks.size(1);
  TORCH_CHECK_VALUE(codebooks.size(2) == D, "x has ", D, " channels but the codebooks have dim ", codebooks.size(2));
  TORCH_CHECK_VALUE(code_norms.size(0) == K && code_norms.size(1) == bins, "code_norms must be (", K, ", ", bins,
                    "), got ", code_norms.sizes());
  auto codes = at::empty({B, K, T}, x.options().dtype(at::kLong));
  auto quantized = need_quantized ? at::empty({B, D, T}, x.options()) : at::empty({0}, x.options());
  auto residuals = need_residuals ? at::empty({K, B, D, T}, x.options()) : at::empty({0}, x.options());
  const int64_t N = B * T;
  if (N == 0) return {codes, quantized, residuals};

  const float* cb = codebooks.data_ptr<float>();
  if (N <= kFewRows) {
    const float* fp = nullptr;
    if (few.has_value()) {
      check_f32(*few, "few", 4);
      TORCH_CHECK_VALUE(few->size(0) == K && few->size(1) == ceil_div(bins, L) && few->size(2) == D &&
                            few->size(3) == L && few->is_contiguous(),
                        "few must be pack_few(codebooks), a contiguous (", K, ", ", ceil_div(bins, L), ", ", D, ", ",
                        L, "), got ", few->sizes());
      fp = few->data_ptr<float>();
    }
    encode_few(x.data_ptr<float>(), cb, fp, code_norms.data_ptr<float>(), B, D, T, K, bins, codes.data_ptr<int64_t>(),
               need_quantized ? quantized.data_ptr<float>() : nullptr,
               need_residuals ? residuals.data_ptr<float>() : nullptr);
    return {codes, quantized, residuals};
  }
#if FC_BF16
  const bool bf16 = g_bf16_search.load();
#else
  constexpr bool bf16 = false;
#endif
  Packed pk = pack_codebooks(cb, code_norms.data_ptr<float>(), K, bins, D, !bf16);
#if FC_BF16
  PackedBF16 pb;
  if (bf16) pb = pack_codebooks_bf16(cb, code_norms.data_ptr<float>(), K, bins, D);
  // layers whose panels overflowed the candidate limit: the float32 search, packed on first use
  std::unique_ptr<std::once_flag[]> packed(new std::once_flag[K]);
  std::unique_ptr<std::atomic<bool>[]> fp32_layer(new std::atomic<bool>[K]);
  for (int64_t k = 0; k < K; ++k) fp32_layer[k] = false;
  auto fp32_codes = [&](int64_t k) {
    float* Pk = pk.P.get() + k * pk.nchunks * D * MR;
    if (bf16) std::call_once(packed[k], [&] { pack_layer(Pk, cb + k * bins * D, bins, D, pk.nchunks); });
    return static_cast<const float*>(Pk);
  };
#else
  auto fp32_codes = [&](int64_t k) { return pk.codes(k); };
#endif
  const float* xp = x.data_ptr<float>();
  int64_t* cp = codes.data_ptr<int64_t>();
  float* qp = need_quantized ? quantized.data_ptr<float>() : nullptr;
  float* rp = need_residuals ? residuals.data_ptr<float>() : nullptr;

  const int64_t npanels = ceil_div(N, RB);
  // panels per tile: the residual tile fits kTileBytes, and there are >= 4 tiles per thread to balance
  const int64_t tile = std::max<int64_t>(
      1, std::min({int64_t{16}, kTileBytes / (RB * D * 4), ceil_div(npanels, 4 * at::get_num_threads())}));
  const int64_t ntiles = ceil_div(npanels, tile);
  parallel_tasks(ntiles, [&](auto next) {
    Buffer<float> R = alloc<float>(tile * D * RB);
    Buffer<float> Q = alloc<float>(need_quantized ? tile * D * RB : 1);
    Buffer<int32_t> idx = alloc<int32_t>(tile * RB);
#if FC_BF16
    Buffer<uint32_t> Rb = alloc<uint32_t>(bf16 ? ceil_div(D, 2) * RB : 1);
    Buffer<float> dist = alloc<float>(bf16 ? pk.nchunks * MR * RB : 1);
    Buffer<int32_t> cand = alloc<int32_t>(bf16 ? pk.nchunks * MR * RB : 1);
#endif
    for (int64_t ti = next(); ti < ntiles; ti = next()) {
      const int64_t t0 = ti * tile, np = std::min(tile, npanels - t0);
      for (int64_t p = 0; p < np; ++p) {
        const int64_t row0 = (t0 + p) * RB, n = std::min<int64_t>(RB, N - row0);
        panel_load_bdt(R.get() + p * D * RB, xp, D, T, row0, n);
      }
      if (need_quantized) std::memset(Q.get(), 0, sizeof(float) * np * D * RB);
      for (int64_t k = 0; k < K; ++k) {
        const float* cbk = cb + k * bins * D;
        for (int64_t p = 0; p < np; ++p) {
          const int64_t row0 = (t0 + p) * RB, n = std::min<int64_t>(RB, N - row0);
          float* Rp = R.get() + p * D * RB;
          int32_t* ip = idx.get() + p * RB;
          if (need_residuals) panel_store_bdt(rp + k * B * D * T, Rp, D, T, row0, n);
          bool done = false;
#if FC_BF16
          if (bf16 && !fp32_layer[k].load(std::memory_order_relaxed)) {
            done = search_panel_bf16(pb, k, cbk, pk.norms(k), bins, D, Rp, Rb.get(), dist.get(), cand.get(), ip);
            if (!done) fp32_layer[k].store(true, std::memory_order_relaxed);
          }
#endif
          if (!done) search_panel(fp32_codes(k), pk.norms(k), pk.nchunks, D, Rp, ip);
          // residual -= chosen codeword, quantized += chosen codeword, in layer order
          for (int l = 0; l < RB; ++l) {
            const float* e = cbk + static_cast<int64_t>(ip[l]) * D;
            for (int64_t d = 0; d < D; ++d) Rp[d * RB + l] -= e[d];
          }
          if (need_quantized) {
            float* Qp = Q.get() + p * D * RB;
            for (int l = 0; l < RB; ++l) {
              const float* e = cbk + static_cast<int64_t>(ip[l]) * D;
              for (int64_t d = 0; d < D; ++d) Qp[d * RB + l] += e[d];
            }
          }
          for_segments(row0, row0 + n, T, [&](int64_t b, int64_t t, int64_t off, int64_t len) {
            int64_t* dst = cp + (b * K + k) * T + t;
            for (int64_t j = 0; j < len; ++j) dst[j] = ip[off + j];
          });
        }
      }
      if (need_quantized) {
        for (int64_t p = 0; p < np; ++p) {
          const int64_t row0 = (t0 + p) * RB, n = std::min<int64_t>(RB, N - row0);
          panel_store_bdt(qp, Q.get() + p * D * RB, D, T, row0, n);
        }
      }
    }
  });
  return {codes, quantized, residuals};
}

// codes: (B, K, T) int64 in [0, bins); codebooks: (K, bins, D) -> (B, D, T) = 0 + e_0 + e_1 + ...
at::Tensor decode(const at::Tensor& codes, const at::Tensor& codebooks) {
  check_codes_tensor(codes, "codes");
  check_codebooks(codebooks);
  const int64_t B = codes.size(0), K = codes.size(1), T = codes.size(2);
  const int64_t bins = codebooks.size(1), D = codebooks.size(2);
  TORCH_CHECK_VALUE(K == codebooks.size(0), "codes have ", K, " codebooks but ", codebooks.size(0), " were given");
  const int64_t* c = codes.data_ptr<int64_t>();
  check_range(c, codes.numel(), bins, "codes");
  auto out = at::empty({B, D, T}, codebooks.options());
  if (B * T == 0) return out;
  const float* cb = codebooks.data_ptr<float>();
  float* o = out.data_ptr<float>();
  constexpr int64_t TT = 32;  // rows per tile: a [TT][D] accumulator of 16 KiB at D = 128 stays in L1
  const int64_t tiles_per_b = ceil_div(T, TT);
  at::parallel_for(0, B * tiles_per_b, 1, [&](int64_t j0, int64_t j1) {
    Buffer<float> acc = alloc<float>(TT * D);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t b = j / tiles_per_b, t0 = (j % tiles_per_b) * TT, n = std::min(TT, T - t0);
      // layer-outer: the n codeword fetches of a layer are independent, so their cache misses overlap
      for (int64_t k = 0; k < K; ++k) {
        const int64_t* ck = c + (b * K + k) * T + t0;
        const float* cbk = cb + k * bins * D;
        for (int64_t tt = 0; tt < n; ++tt) {
          const float* e = cbk + ck[tt] * D;
          float* a = acc.get() + tt * D;
          if (k + 1 < K) {
            const float* nx = cbk + bins * D + ck[T + tt] * D;
            for (int64_t d = 0; d < D; d += 16) __builtin_prefetch(nx + d);
          }
          if (k == 0) {
            for (int64_t d = 0; d < D; ++d) a[d] = 0.0f + e[d];
          } else {
            for (int64_t d = 0; d < D; ++d) a[d] += e[d];
          }
        }
      }
      transpose(acc.get(), D, o + b * D * T + t0, T, n, D);
    }
  });
  return out;
}

// Counting sort of rows by code: order lists the rows of code c, ascending, at [start[c], start[c+1]).
void group_by_code(const int32_t* code, int64_t N, int64_t bins, int64_t* start, int64_t* order) {
  std::fill(start, start + bins + 1, 0);
  for (int64_t n = 0; n < N; ++n) ++start[code[n] + 1];
  for (int64_t c = 0; c < bins; ++c) start[c + 1] += start[c];
  Buffer<int64_t> pos = alloc<int64_t>(bins);
  std::copy(start, start + bins, pos.get());
  for (int64_t n = 0; n < N; ++n) order[pos[code[n]]++] = n;
}

// sum[d] = 0 + x[order[0]][d] + x[order[1]][d] + ... in ascending row order (scatter_add's order)
inline void sum_rows(const float* x, int64_t D, const int64_t* rows, int64_t count, float* sum) {
  for (int64_t d = 0; d < D; ++d) sum[d] = 0.0f;
  for (int64_t j = 0; j < count; ++j) {
    const float* r = x + rows[j] * D;
    for (int64_t d = 0; d < D; ++d) sum[d] += r[d];
  }
}

// residuals: (K, B, D, T); codes: (B, K, T); cluster_size: (K, bins); embed_avg, embed: (K, bins, D).
// Per layer, with torch's float32 arithmetic (its add_(alpha=) is an fma): cs = fma(count, 1-decay, cs*decay),
// avg = fma(embed_sum, 1-decay, avg*decay), n = sum(cs) (in float64, rounded once),
// smoothed = (cs + eps) / (n + bins*eps) * n, embed = avg / smoothed. embed_sum[c] sums the rows of
// code c in ascending row order; every buffer is bitwise the same for any number of threads.
void ema_update(const at::Tensor& residuals, const at::Tensor& codes, at::Tensor& cluster_size,
                at::Tensor& embed_avg, at::Tensor& embed, double decay, double epsilon) {
  check_f32(residuals, "residuals", 4);
  check_codes_tensor(codes, "codes");
  check_f32(cluster_size, "cluster_size", 2);
  check_f32(embed_avg, "embed_avg", 3);
  check_f32(embed, "embed", 3);
  const int64_t K = embed_avg.size(0), bins = embed_avg.size(1), D = embed_avg.size(2);
  TORCH_CHECK_VALUE(K > 0 && bins > 0 && D > 0, "embed_avg must be non-empty, got ", embed_avg.sizes());
  TORCH_CHECK_VALUE(bins <= std::numeric_limits<int32_t>::max(), "too many bins: ", bins);
  TORCH_CHECK_VALUE(embed.sizes() == embed_avg.sizes(), "embed must be ", embed_avg.sizes(), ", got ", embed.sizes());
  TORCH_CHECK_VALUE(cluster_size.size(0) == K && cluster_size.size(1) == bins, "cluster_size must be (", K, ", ",
                    bins, "), got ", cluster_size.sizes());
  TORCH_CHECK_VALUE(residuals.size(0) == K && residuals.size(2) == D, "residuals must be (", K, ", batch, ", D,
                    ", time), got ", residuals.sizes());
  const int64_t B = residuals.size(1), T = residuals.size(3);
  TORCH_CHECK_VALUE(codes.size(0) == B && codes.size(1) == K && codes.size(2) == T, "codes must be (", B, ", ", K,
                    ", ", T, "), got ", codes.sizes());
  TORCH_CHECK_VALUE(decay >= 0.0 && decay <= 1.0, "decay must be in [0, 1], got ", decay);
  TORCH_CHECK_VALUE(epsilon > 0.0, "epsilon must be > 0, got ", epsilon);
  const int64_t* c = codes.data_ptr<int64_t>();
  check_range(c, codes.numel(), bins, "codes");

  const float fdecay = static_cast<float>(decay), falpha = static_cast<float>(1.0 - decay);
  const float feps = static_cast<float>(epsilon), fbeps = static_cast<float>(static_cast<double>(bins) * epsilon);
  const float* res = residuals.data_ptr<float>();
  float* cs_all = cluster_size.data_ptr<float>();
  float* avg_all = embed_avg.data_ptr<float>();
  float* emb_all = embed.data_ptr<float>();

  // embed_sum [K][bins][D]. Task (k, 16 channels) walks the rows in ascending n = b*T + t, transposes
  // 16 x 16 blocks of x[b][d0:d0+16][t0:t0+16] in registers and adds each row's 16 channels to its code's
  // sum with one vector add: the residuals are read once in their own layout, and each sum runs over
  // its rows in ascending order whatever the thread split (channel blocks are whole cache lines)
  Buffer<float> sums = alloc<float>(K * bins * D);
  const int64_t dblk = ceil_div(D, 16);
  at::parallel_for(0, K * dblk, 1, [&](int64_t j0, int64_t j1) {
    alignas(64) float tile[16 * 16];
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t k = j / dblk, d0 = (j % dblk) * 16, nd = std::min<int64_t>(16, D - d0);
      float* sk = sums.get() + k * bins * D + d0;
      for (int64_t code = 0; code < bins; ++code)
        for (int64_t d = 0; d < nd; ++d) sk[code * D + d] = 0.0f;
      for (int64_t b = 0; b < B; ++b) {
        const float* xb = res + ((k * B + b) * D + d0) * T;
        const int64_t* cr = c + (b * K + k) * T;
        for (int64_t t0 = 0; t0 < T; t0 += 16) {
          const int64_t nt = std::min<int64_t>(16, T - t0);
          if (nd == 16 && nt == 16) {
            transpose16(xb + t0, T, tile, 16);
          } else {
            transpose(xb + t0, T, tile, 16, nd, nt);
          }
          for (int64_t t = 0; t < nt; ++t) {
            float* dst = sk + cr[t0 + t] * D;
            if (nd == 16) {
              vstore(dst, vadd(vload(dst), vload(tile + t * 16)));
            } else {
              for (int64_t d = 0; d < nd; ++d) dst[d] += tile[t * 16 + d];
            }
          }
        }
      }
    }
  });
  std::vector<float> n_k(K);
  for (int64_t k = 0; k < K; ++k) {
    std::vector<int64_t> count(bins, 0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) ++count[c[(b * K + k) * T + t]];
    float* cs = cs_all + k * bins;
    double total = 0.0;
    for (int64_t j = 0; j < bins; ++j) {
      cs[j] = std::fma(static_cast<float>(count[j]), falpha, cs[j] * fdecay);
      total += cs[j];
    }
    n_k[k] = static_cast<float>(total);
  }
  at::parallel_for(0, K * bins, 64, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t k = j / bins;
      const float n = n_k[k];
      const float smoothed = (cs_all[j] + feps) / (n + fbeps) * n;
      const float* sm = sums.get() + j * D;
      float* a = avg_all + j * D;
      float* e = emb_all + j * D;
      for (int64_t d = 0; d < D; ++d) {
        a[d] = std::fma(sm[d], falpha, a[d] * fdecay);
        e[d] = a[d] / smoothed;
      }
    }
  });
}

// samples: (N, D); means: (bins, D). audiocraft's Lloyd iterations: assign each sample to its nearest
// mean (here by the expanded distance and the encode micro-kernel), new mean = sum of its samples in
// ascending order / count, empty clusters keep their mean. Returns (means, counts of the last
// iteration (bins,) int64, assignment of the last iteration (N,) int64).
std::vector<at::Tensor> kmeans(const at::Tensor& samples, const at::Tensor& means_in, int64_t num_iters) {
  check_f32(samples, "samples", 2);
  check_f32(means_in, "means", 2);
  const int64_t N = samples.size(0), D = samples.size(1), bins = means_in.size(0);
  TORCH_CHECK_VALUE(means_in.size(1) == D, "samples have dim ", D, " but means have dim ", means_in.size(1));
  TORCH_CHECK_VALUE(N > 0 && D > 0 && bins > 0, "kmeans needs non-empty samples and means, got ", samples.sizes(),
                    " and ", means_in.sizes());
  TORCH_CHECK_VALUE(bins <= std::numeric_limits<int32_t>::max() - MR, "too many clusters: ", bins);
  TORCH_CHECK_VALUE(num_iters >= 0, "num_iters must be >= 0, got ", num_iters);
  auto means = means_in.clone();
  auto counts = at::zeros({bins}, samples.options().dtype(at::kLong));
  auto assign = at::zeros({N}, samples.options().dtype(at::kLong));
  if (num_iters == 0) return {means, counts, assign};

  const float* s = samples.data_ptr<float>();
  float* m = means.data_ptr<float>();
  const int64_t npanels = ceil_div(N, RB);
  Buffer<float> panels = alloc<float>(npanels * D * RB);
  at::parallel_for(0, npanels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* P = panels.get() + p * D * RB;
      const int64_t n = std::min<int64_t>(RB, N - p * RB);
      if (n < RB) std::memset(P, 0, sizeof(float) * D * RB);
      transpose(s + p * RB * D, D, P, RB, n, D);
    }
  });
  Buffer<int32_t> code = alloc<int32_t>(npanels * RB);
  Buffer<float> norms = alloc<float>(bins);
  Buffer<int64_t> start = alloc<int64_t>(bins + 1);
  Buffer<int64_t> order = alloc<int64_t>(N);
  for (int64_t it = 0; it < num_iters; ++it) {
    for (int64_t j = 0; j < bins; ++j) {
      float acc = 0.0f;
      for (int64_t d = 0; d < D; ++d) acc = std::fma(m[j * D + d], m[j * D + d], acc);
      norms[j] = acc;
    }
    Packed pk = pack_codebooks(m, norms.get(), 1, bins, D);
    parallel_tasks(npanels, [&](auto next) {
      for (int64_t p = next(); p < npanels; p = next())
        search_panel(pk.codes(0), pk.norms(0), pk.nchunks, D, panels.get() + p * D * RB, code.get() + p * RB);
    });
    group_by_code(code.get(), N, bins, start.get(), order.get());
    at::parallel_for(0, bins, 16, [&](int64_t c0, int64_t c1) {
      Buffer<float> sum = alloc<float>(D);
      for (int64_t j = c0; j < c1; ++j) {
        const int64_t count = start[j + 1] - start[j];
        if (count == 0) continue;
        sum_rows(s, D, order.get() + start[j], count, sum.get());
        const float fc = static_cast<float>(count);
        for (int64_t d = 0; d < D; ++d) m[j * D + d] = sum[d] / fc;
      }
    });
  }
  int64_t* cnt = counts.data_ptr<int64_t>();
  int64_t* as = assign.data_ptr<int64_t>();
  for (int64_t j = 0; j < bins; ++j) cnt[j] = start[j + 1] - start[j];
  for (int64_t n = 0; n < N; ++n) as[n] = code[n];
  return {means, counts, assign};
}

std::string simd() { return FC_SIMD_NAME; }

// whether encode searches with bf16 candidates + exact float32 re-ranking (same codes, about 2x the rate)
bool bf16_search_available() { return FC_BF16; }

// turns the bf16 candidate search on or off (tests compare both); returns the previous setting
bool set_bf16_search(bool on) {
#if FC_BF16
  return g_bf16_search.exchange(on);
#else
  TORCH_CHECK_VALUE(!on, "this build has no AVX512_BF16 search (CPU without avx512_bf16)");
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcodec fused CPU residual vector quantizer";
  m.def("encode", &encode,
        "codes, quantized, residuals = encode(x, codebooks, code_norms, need_quantized, need_residuals, few=None)",
        py::arg("x"), py::arg("codebooks"), py::arg("code_norms"), py::arg("need_quantized"), py::arg("need_residuals"),
        py::arg("few") = py::none());
  m.def("pack_few", &pack_few, "codebooks (K, bins, D) -> (K, ceil(bins / 16), D, 16) for encode's few-rows path",
        py::arg("codebooks"));
  m.def("few_rows", []() { return kFewRows; }, "encode uses the few-rows path up to this many rows (B * T)");
  m.def("decode", &decode, "(B, D, T) sum of codewords", py::arg("codes"), py::arg("codebooks"));
  m.def("ema_update", &ema_update, "in-place EMA codebook update of every layer", py::arg("residuals"),
        py::arg("codes"), py::arg("cluster_size"), py::arg("embed_avg"), py::arg("embed"), py::arg("decay"),
        py::arg("epsilon"));
  m.def("kmeans", &kmeans, "means, counts, assignment = kmeans(samples, means, num_iters)", py::arg("samples"),
        py::arg("means"), py::arg("num_iters"));
  m.def("simd", &simd, "which vector path was compiled: avx512, avx2 or portable");
  m.def("bf16_search_available", &bf16_search_available, "whether the bf16 candidate search was compiled");
  m.def("set_bf16_search", &set_bf16_search, "turn the bf16 candidate search on/off; returns the old setting",
        py::arg("on"));
}
