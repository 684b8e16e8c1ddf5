// Direct dilated conv1d for float32 CPU tensors with the padding, the input ELU, the bias and the
// residual add fused, so SEANet's pad -> ELU -> conv -> add chain reads its input once and writes its
// output once. See conv1d_params.h for the exact formula.
//
// Scheme (a GEMM with the im2col done on the fly): the output is cut into time tiles of `tt` frames;
// per tile the input span it needs is packed once, de-interleaved into `stride` phase rows so every
// tap reads consecutive floats, with the padding and the ELU applied while packing. A register
// micro-kernel then computes MR output channels x NR frames, summing r = ci*kernel + k in chunks of
// KC terms in a fixed order: every output sees the same sums whatever the tiling or the thread count.
//
// Why a second conv kernel exists (stream_cpu.cpp): this one vectorises along time, which needs tens of frames
// per call; a streamed chunk gives the deep layers 1-8 frames, where this tiling fills 1 of 16 lanes and
// broadcasts every weight as a scalar. stream_cpu.cpp tiles the other way (frames as GEMM rows, vectors along
// output channels). The two sum each output in different orders, so neither can replace the other without
// changing the bits of one path; bench/kernel_tilings.py times each kernel at the other's shapes
// (bench/results/kernel-tilings-cpu-*.json). What they share is in conv_common.h.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "conv1d_params.h"
#include "conv_common.h"
#include "elu_cpu.h"
#include "vf16.h"  // FC_AVX512 / FC_AVX2 and their intrinsics

namespace {

using fc_conv::ceil_div;
using fc_conv::KC;
using fc_conv::VL;
using fc_elu::elu_inplace;

constexpr int MR = 6;        // output channels per micro-tile: 6 x 4 zmm accumulators + 4 inputs + 1 weight <= 32 registers
constexpr int NV = 4;        // vectors along time per micro-tile
constexpr int NR = NV * VL;  // 64 frames per micro-tile
// Packed input per time tile: about 160 KiB keeps it in a 1-2 MiB L2 beside the weights it meets.
constexpr int64_t kPackBudgetFloats = 40 * 1024;
constexpr int64_t kMaxTile = 32 * NR;

// Shrink a tile of tt frames (a multiple of NR) by whole micro-tiles until the batch x t frames give at least
// ~4 tiles per thread, so both cores get even work (or tt is one micro-tile).
int64_t shrink_for_threads(int64_t tt, int64_t batch, int64_t t, int64_t nthreads) {
  while (tt > NR && batch * ceil_div(t, tt) < 4 * nthreads) tt -= NR;
  return tt;
}

// Everything about one call that does not depend on the tile.
struct Plan {
  FcConv1dParams p;
  int64_t nslot = 1;              // phase rows per input channel actually used by some tap
  std::vector<int64_t> slot_of;   // phase -> row slot, -1 when no tap reads that phase
  std::vector<int64_t> slot_phase;
  std::vector<int64_t> slot_need;  // per slot: frames read past the tile (max tap offset in that phase)
  int64_t max_off = 0;
  int64_t tt = NR;                // frames per time tile (multiple of NR)
  int64_t row_len = 0;            // floats per packed row
  int64_t n_tiles = 0;
  std::vector<int64_t> xoff;      // per r = ci*kernel + k: offset of its first float in the packed tile
  int64_t nblk = 0;               // MR-blocks of output channels
};

// fixed_tt > 0: tiles of exactly that many frames (a serial per-tile caller sizes its own buffers);
// 0: chosen from the pack budget and the thread count.
Plan make_plan(const FcConv1dParams& p, int64_t fixed_tt = 0) {
  Plan pl;
  pl.p = p;
  const int64_t s = p.stride, K = p.kernel, d = p.dilation;
  pl.slot_of.assign(s, -1);
  std::vector<int64_t> need(s, -1);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t ph = (k * d) % s, off = (k * d) / s;
    need[ph] = std::max(need[ph], off);
    pl.max_off = std::max(pl.max_off, off);
  }
  pl.nslot = 0;
  for (int64_t ph = 0; ph < s; ++ph) {
    if (need[ph] < 0) continue;
    pl.slot_of[ph] = pl.nslot++;
    pl.slot_phase.push_back(ph);
    pl.slot_need.push_back(need[ph]);
  }
  int64_t tt = fixed_tt;
  if (tt <= 0) {
    const int64_t per_frame = std::max<int64_t>(1, p.c_in * pl.nslot);
    tt = (kPackBudgetFloats / per_frame) / NR * NR;
    tt = std::min(std::max<int64_t>(tt, NR), kMaxTile);
    tt = shrink_for_threads(tt, p.batch, p.t_out, at::get_num_threads());
  }
  pl.tt = tt;
  // the micro-kernel loads whole vectors: a tile's last one reaches round_up(n, VL) + max_off
  pl.row_len = (ceil_div(tt, VL) * VL + pl.max_off + VL - 1) / VL * VL;
  pl.n_tiles = ceil_div(p.t_out, tt);
  pl.xoff.resize(p.c_in * K);
  for (int64_t ci = 0; ci < p.c_in; ++ci)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t ph = (k * d) % s, off = (k * d) / s;
      pl.xoff[ci * K + k] = (ci * pl.nslot + pl.slot_of[ph]) * pl.row_len + off;
    }
  pl.nblk = ceil_div(p.c_out, MR);
  return pl;
}

// dst[j] = src[j * step] for j < n (step >= 0).
void copy_strided(const float* src, int64_t step, int64_t n, float* dst) {
  int64_t j = 0;
#if FC_AVX512
  if (step == 1) {
    for (; j + VL <= n; j += VL) _mm512_storeu_ps(dst + j, _mm512_loadu_ps(src + j));
  } else if (step <= (int64_t)(INT32_MAX / VL)) {
    const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32((int32_t)step));
    for (; j + VL <= n; j += VL) _mm512_storeu_ps(dst + j, _mm512_i32gather_ps(idx, src + j * step, 4));
  }
#elif FC_AVX2
  // no gather: vgatherdps is microcoded on Zen 2, no faster than the scalar loop
  if (step == 1)
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(dst + j, _mm256_loadu_ps(src + j));
#endif
  for (; j < n; ++j) dst[j] = src[j * step];
}

// Fill the packed rows of time tile [t0, t0 + n): row (ci, slot)[j] = act(P[b, ci, (t0 + j)*s + phase]).
void pack_tile(const Plan& pl, int64_t b, int64_t t0, int64_t n, float* buf) {
  const FcConv1dParams& p = pl.p;
  const int64_t s = p.stride;
  const int64_t i_end = p.pad_left + p.t_in + p.pad_right;
  for (int64_t ci = 0; ci < p.c_in; ++ci) {
    const float* xc = p.x + b * p.x_stride_b + ci * p.x_stride_c;
    for (int64_t sl = 0; sl < pl.nslot; ++sl) {
      const int64_t ph = pl.slot_phase[sl];
      const int64_t m = std::min(n + pl.slot_need[sl], pl.row_len);
      float* row = buf + (ci * pl.nslot + sl) * pl.row_len;
      // frames whose sample is x[(t0 + j)*s + ph - pad_left] directly (no padding involved)
      int64_t j_lo = std::max<int64_t>(0, ceil_div(p.pad_left - ph, s) - t0);
      int64_t j_hi = std::min<int64_t>(m, ceil_div(p.pad_left + p.t_in - ph, s) - t0);
      if (j_hi < j_lo) j_hi = j_lo = std::min(j_lo, m);
      auto edge = [&](int64_t j) {
        const int64_t i = (t0 + j) * s + ph;
        float v = 0.f;
        if (i < i_end) {
          const int64_t src = fc_source_index(i, p.pad_left, p.t_in, p.reflect_len, p.pad_mode);
          if (src >= 0) v = xc[src * p.x_stride_t];
        }
        row[j] = v;
      };
      for (int64_t j = 0; j < j_lo; ++j) edge(j);
      for (int64_t j = j_hi; j < m; ++j) edge(j);
      if (j_hi > j_lo)
        copy_strided(xc + ((t0 + j_lo) * s + ph - p.pad_left) * p.x_stride_t, s * p.x_stride_t, j_hi - j_lo,
                     row + j_lo);
      if (p.has_elu) elu_inplace(row, m, p.elu_alpha);
    }
  }
}

// Software prefetch of the input span of the next work item, spread over the current item's
// micro-kernel calls: packing reads C_in rows of a few KiB each, too short for the hardware
// prefetcher to ramp up (perf: 83% of the packing time of a 32->32 k1 conv was that load).
struct Prefetch {
  const char* base = nullptr;  // first byte of the span in channel 0
  int64_t row_bytes = 0, c_stride_bytes = 0, lines_per_row = 0, total = 0, next = 0;

  void setup(const FcConv1dParams& p, int64_t b, int64_t t0, int64_t n) {
    next = total = 0;
    if (p.x_stride_t != 1) return;  // strided inputs: rare, left to the hardware
    const int64_t lo = std::max<int64_t>(0, t0 * p.stride - p.pad_left);
    const int64_t hi = std::min<int64_t>(p.t_in, (t0 + n - 1) * p.stride + (p.kernel - 1) * p.dilation + 1 - p.pad_left);
    if (hi <= lo) return;
    base = reinterpret_cast<const char*>(p.x + b * p.x_stride_b + lo);
    row_bytes = (hi - lo) * (int64_t)sizeof(float);
    c_stride_bytes = p.x_stride_c * (int64_t)sizeof(float);
    lines_per_row = (row_bytes + 63) / 64;
    total = lines_per_row * p.c_in;
  }
  void issue(int64_t count) {
#if FC_AVX512 || FC_AVX2
    for (; count > 0 && next < total; --count, ++next) {
      const int64_t ci = next / lines_per_row, l = next - ci * lines_per_row;
      _mm_prefetch(base + ci * c_stride_bytes + l * 64, _MM_HINT_T1);
    }
#else
    (void)count;
#endif
  }
};

// One reduction chunk [r0, r0 + nk) of an MR x (NVEC*16) output tile: the chunk's sum
// c[m, t] = sum_r w[r, m] * x[xoff[r] + t] starts from zero, then out = (first ? bias[m] : out) + c
// (+ skip on the last chunk). Only the first `last` lanes of the last vector are loaded or stored.
// w: packed [r][MR]; out/skip rows ocs/scs apart.
template <int R, int NVEC>
void micro(const float* __restrict x, const int64_t* __restrict xoff, const float* __restrict w, int64_t nk,
           bool first, bool final, const float* bias, const float* skip, int64_t scs, float* out, int64_t ocs,
           int last) {
#if FC_AVX512
  const __mmask16 tail = (__mmask16)((1u << last) - 1u);
  __m512 acc[R][NVEC];
  for (int m = 0; m < R; ++m)
    for (int v = 0; v < NVEC; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int64_t r = 0; r < nk; ++r) {
    const float* xr = x + xoff[r];
    __m512 xv[NVEC];
    for (int v = 0; v < NVEC; ++v) xv[v] = _mm512_loadu_ps(xr + v * VL);
    const float* wr = w + r * MR;
    for (int m = 0; m < R; ++m) {
      const __m512 wm = _mm512_set1_ps(wr[m]);
      for (int v = 0; v < NVEC; ++v) acc[m][v] = _mm512_fmadd_ps(wm, xv[v], acc[m][v]);
    }
  }
  // masked loads/stores only for a partial last vector: on Zen 4 a masked store costs several cycles
#pragma GCC unroll 8
  for (int m = 0; m < R; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NVEC; ++v) {
      float* o = out + m * ocs + v * VL;
      const float* sk = skip ? skip + m * scs + v * VL : nullptr;
      const bool full = v < NVEC - 1 || last == VL;
      __m512 a = acc[m][v];
      if (full) {
        a = _mm512_add_ps(first ? _mm512_set1_ps(bias ? bias[m] : 0.f) : _mm512_loadu_ps(o), a);
        if (final && skip) a = _mm512_add_ps(a, _mm512_loadu_ps(sk));
        _mm512_storeu_ps(o, a);
      } else {
        a = _mm512_add_ps(first ? _mm512_set1_ps(bias ? bias[m] : 0.f) : _mm512_maskz_loadu_ps(tail, o), a);
        if (final && skip) a = _mm512_add_ps(a, _mm512_maskz_loadu_ps(tail, sk));
        _mm512_mask_storeu_ps(o, tail, a);
      }
    }
#elif FC_AVX2
  // 16 ymm registers: R x 16 frames at a time (12 accumulators, 2 inputs, 1 weight), the NVEC vectors one after
  // the other over the same chunk of weights (KC x MR floats, in L1); every lane sums the same fma chain.
  // Faster than the portable loops and oneDNN on the shallow layers; the deep ones stay a little behind oneDNN,
  // where re-reading the packed tile for each 6-channel block is bound by the L2
  // (measured: bench/results/design-measurements.md).
  for (int v = 0; v < NVEC; ++v) {
    __m256 acc[R][2];
#pragma GCC unroll 8
    for (int m = 0; m < R; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t r = 0; r < nk; ++r) {
      const float* xr = x + xoff[r] + v * VL;
      const __m256 x0 = _mm256_loadu_ps(xr), x1 = _mm256_loadu_ps(xr + 8);
      const float* wr = w + r * MR;
#pragma GCC unroll 8
      for (int m = 0; m < R; ++m) {
        const __m256 wm = _mm256_broadcast_ss(wr + m);
        acc[m][0] = _mm256_fmadd_ps(wm, x0, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(wm, x1, acc[m][1]);
      }
    }
    const int valid = v < NVEC - 1 ? VL : last;
#pragma GCC unroll 8
    for (int m = 0; m < R; ++m)
      for (int hh = 0; hh < 2; ++hh) {
        const int lanes = std::min(8, valid - 8 * hh);
        if (lanes <= 0) break;
        float* o = out + m * ocs + v * VL + 8 * hh;
        const float* sk = skip ? skip + m * scs + v * VL + 8 * hh : nullptr;
        const __m256 b = _mm256_set1_ps(bias ? bias[m] : 0.f);
        __m256 a = acc[m][hh];
        if (lanes == 8) {
          a = _mm256_add_ps(first ? b : _mm256_loadu_ps(o), a);
          if (final && skip) a = _mm256_add_ps(a, _mm256_loadu_ps(sk));
          _mm256_storeu_ps(o, a);
        } else {
          const __m256i k = fc_vf::first_n8(lanes);
          a = _mm256_add_ps(first ? b : _mm256_maskload_ps(o, k), a);
          if (final && skip) a = _mm256_add_ps(a, _mm256_maskload_ps(sk, k));
          _mm256_maskstore_ps(o, k, a);
        }
      }
  }
#else
  const int n = (NVEC - 1) * VL + last;
  float acc[R][NVEC * VL] = {};
  for (int64_t r = 0; r < nk; ++r) {
    const float* xr = x + xoff[r];
    const float* wr = w + r * MR;
    for (int m = 0; m < R; ++m)
      for (int t = 0; t < NVEC * VL; ++t) acc[m][t] = std::fma(wr[m], xr[t], acc[m][t]);
  }
  for (int m = 0; m < R; ++m)
    for (int t = 0; t < n; ++t) {
      const float y = (first ? (bias ? bias[m] : 0.f) : out[m * ocs + t]) + acc[m][t];
      out[m * ocs + t] = final && skip ? y + skip[m * scs + t] : y;
    }
#endif
}

using MicroFn = void (*)(const float*, const int64_t*, const float*, int64_t, bool, bool, const float*,
                         const float*, int64_t, float*, int64_t, int);

template <int R>
constexpr MicroFn micro_row(int nvec) {
  return nvec == 1 ? micro<R, 1> : nvec == 2 ? micro<R, 2> : nvec == 3 ? micro<R, 3> : micro<R, 4>;
}

MicroFn pick_micro(int rows, int nvec) {
  switch (rows) {
    case 1: return micro_row<1>(nvec);
    case 2: return micro_row<2>(nvec);
    case 3: return micro_row<3>(nvec);
    case 4: return micro_row<4>(nvec);
    case 5: return micro_row<5>(nvec);
    default: return micro_row<6>(nvec);
  }
}

struct FreeDeleter {
  void operator()(float* q) const { std::free(q); }
};

// Transposed conv as `phases` interleaved convs: conv channel ch = co*phases + r, frame q holds output
// sample q*phases + r of channel co (before the trim). See conv_transpose1d below.
struct PhaseOut {
  int64_t phases, c_out, trim_left, out_len;
  const float* bias;
  float* out;
  int64_t out_stride_b, out_stride_c;
};

// y[b, co, q*phases + r - trim_left] = z[m, t] + bias[co] for the rows ch0 + m of a finished
// micro-tile z (rows NR apart, frames q0 + t, t < nn); samples trimmed away are skipped.
void scatter_phases(const PhaseOut& po, const float* z, int rows, int64_t ch0, int64_t b, int64_t q0, int64_t nn) {
  const int64_t s = po.phases;
  for (int m = 0; m < rows; ++m) {
    const int64_t ch = ch0 + m, co = ch / s, r = ch % s;
    const float bv = po.bias ? po.bias[co] : 0.f;
    float* o = po.out + b * po.out_stride_b + co * po.out_stride_c + r - po.trim_left;
    const float* zr = z + m * NR;
    const int64_t t_lo = std::max<int64_t>(0, ceil_div(po.trim_left - r, s) - q0);
    const int64_t t_hi = std::min<int64_t>(nn, ceil_div(po.out_len + po.trim_left - r, s) - q0);
    for (int64_t t = t_lo; t < t_hi; ++t) o[(q0 + t) * s] = zr[t] + bv;
  }
}

// Output frames [t0, t0 + n) (n <= pl.tt) of the MR-blocks [blk_lo, blk_hi) from a tile `buf` laid out as
// pack_tile's (row r of the reduction at buf + pl.xoff[r]). out / skip point at channel 0, frame t0 of
// batch row b (rows ocs / scs apart, unit time stride); with po the sums are scattered instead (out unused).
// pf spreads per_call prefetches over the micro-kernel calls.
void compute_tile(const Plan& pl, const float* wpack, const float* buf, int64_t b, int64_t t0, int64_t n,
                  int64_t blk_lo, int64_t blk_hi, float* out, int64_t ocs, const float* skip, int64_t scs,
                  const PhaseOut* po, float* ztile, Prefetch& pf, int64_t per_call) {
  const FcConv1dParams& p = pl.p;
  const int64_t nred = p.c_in * p.kernel;
  // one output block at a time over the whole tile: its rows are written in runs of tt frames
  // (A/B-measured 7% faster in total over SEANet's layers than sub-tile-major order)
  for (int64_t blk = blk_lo; blk < blk_hi; ++blk) {
    const int64_t co = blk * MR;
    const int rows = (int)std::min<int64_t>(MR, p.c_out - co);
    for (int64_t u = 0; u < n; u += NR) {
      const int64_t nn = std::min<int64_t>(NR, n - u);
      const int nvec = (int)ceil_div(nn, VL);
      const int last = (int)(nn - (nvec - 1) * VL);
      float* o = po ? ztile : out + co * ocs + u;
      const int64_t oc = po ? NR : ocs;
      const float* sk = skip ? skip + co * scs + u : nullptr;
      for (int64_t r0 = 0; r0 < nred; r0 += KC) {
        pf.issue(per_call);
        pick_micro(rows, nvec)(buf + u, pl.xoff.data() + r0, wpack + (blk * nred + r0) * MR,
                               std::min<int64_t>(KC, nred - r0), r0 == 0, r0 + KC >= nred,
                               p.bias ? p.bias + co : nullptr, sk, scs, o, oc, last);
      }
      if (po) scatter_phases(*po, o, rows, co, b, t0 + u, nn);
    }
  }
}

// Micro-kernel calls compute_tile makes for n frames of blocks [blk_lo, blk_hi).
int64_t tile_calls(const Plan& pl, int64_t n, int64_t blk_lo, int64_t blk_hi) {
  return (blk_hi - blk_lo) * ceil_div(n, NR) * ceil_div(pl.p.c_in * pl.p.kernel, KC);
}

// 64-byte aligned, zeroed floats: lanes past a tile's end are read (never stored), so keep them finite.
std::unique_ptr<float, FreeDeleter> zeroed_floats(int64_t n) {
  const size_t bytes = ((size_t)std::max<int64_t>(n, 1) * sizeof(float) + 63) / 64 * 64;
  std::unique_ptr<float, FreeDeleter> buf(static_cast<float*>(std::aligned_alloc(64, bytes)));
  TORCH_CHECK(buf, "fastcodec conv1d: out of memory for a ", bytes, "-byte work buffer");
  std::memset(buf.get(), 0, bytes);
  return buf;
}

void run_plan(const Plan& pl, const float* wpack, const PhaseOut* po = nullptr) {
  const FcConv1dParams& p = pl.p;
  const int64_t nthreads = at::get_num_threads();
  // split output channels too when there are fewer tiles than threads (short signals, B=1)
  int64_t n_co = 1;
  while (n_co < pl.nblk && p.batch * pl.n_tiles * n_co < 2 * nthreads) ++n_co;
  const int64_t blk_per = ceil_div(pl.nblk, n_co);
  const int64_t items = p.batch * pl.n_tiles * n_co;
  const int64_t buf_floats = p.c_in * pl.nslot * pl.row_len;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    auto buf = zeroed_floats(buf_floats);
    alignas(64) float ztile[MR * NR];  // transposed: one micro-tile's sums before their scatter
    Prefetch pf;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t co_part = it % n_co;
      const int64_t tile = (it / n_co) % pl.n_tiles;
      const int64_t b = it / (n_co * pl.n_tiles);
      const int64_t t0 = tile * pl.tt;
      const int64_t n = std::min(pl.tt, p.t_out - t0);
      const int64_t blk_lo = co_part * blk_per, blk_hi = std::min(pl.nblk, blk_lo + blk_per);
      if (blk_lo >= blk_hi) continue;
      pack_tile(pl, b, t0, n, buf.get());
      pf.total = 0;
      if (it + 1 < end && (it + 1) % n_co == 0) {  // the next item starts a new tile
        const int64_t tile2 = ((it + 1) / n_co) % pl.n_tiles, b2 = (it + 1) / (n_co * pl.n_tiles);
        pf.setup(p, b2, tile2 * pl.tt, std::min(pl.tt, p.t_out - tile2 * pl.tt));
      }
      const int64_t per_call = pf.total ? ceil_div(pf.total, tile_calls(pl, n, blk_lo, blk_hi)) : 0;
      float* out = po ? nullptr : p.out + b * p.out_stride_b + t0;
      const float* sk = p.skip ? p.skip + b * p.skip_stride_b + t0 : nullptr;
      compute_tile(pl, wpack, buf.get(), b, t0, n, blk_lo, blk_hi, out, p.out_stride_c, sk, p.skip_stride_c, po,
                   ztile, pf, per_call);
    }
  });
}

void check_f32_cpu(const at::Tensor& t, const char* name) { fc_conv::check_f32_cpu(t, "fastcodec conv1d", name); }

// The bias, checked, as a contiguous tensor (undefined when absent).
at::Tensor checked_bias(const c10::optional<at::Tensor>& bias, const char* op, const char* name, int64_t n) {
  if (!bias.has_value()) return at::Tensor();
  fc_conv::check_bias(*bias, op, name, n);
  return bias->contiguous();
}

}  // namespace

// weight (c_out, c_in, kernel) -> packed (ceil(c_out / MR), c_in * kernel, MR), zero rows past c_out.
at::Tensor pack_weight(const at::Tensor& weight) {
  check_f32_cpu(weight, "weight");
  TORCH_CHECK(weight.dim() == 3 && weight.numel() > 0, "fastcodec conv1d: weight must be a non-empty (c_out, c_in, kernel), got ",
              weight.sizes());
  const at::Tensor w = weight.contiguous();
  const int64_t c_out = w.size(0), nred = w.size(1) * w.size(2);
  const int64_t nblk = ceil_div(c_out, MR);
  at::Tensor packed = at::zeros({nblk, nred, MR}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  for (int64_t co = 0; co < c_out; ++co)
    for (int64_t r = 0; r < nred; ++r) dst[((co / MR) * nred + r) * MR + co % MR] = src[co * nred + r];
  return packed;
}

// x (B, c_in, t_in) any strides; wpack from pack_weight; bias (c_out,); skip (B, c_out, t_out);
// writes every element of out (B, c_out, t_out), contiguous, allocated by the caller.
void conv1d(const at::Tensor& x, const at::Tensor& wpack, const c10::optional<at::Tensor>& bias,
            const c10::optional<at::Tensor>& skip, const at::Tensor& out, int64_t c_out, int64_t kernel, int64_t stride,
                  int64_t dilation, int64_t pad_left, int64_t pad_right, int64_t pad_mode,
                  c10::optional<double> elu_alpha) {
  check_f32_cpu(x, "x");
  check_f32_cpu(wpack, "packed weight");
  TORCH_CHECK(x.dim() == 3, "fastcodec conv1d: x must be (batch, channels, time), got ", x.sizes());
  const int64_t B = x.size(0), c_in = x.size(1), t_in = x.size(2);
  TORCH_CHECK(B > 0 && c_in > 0 && t_in > 0, "fastcodec conv1d: x is empty: ", x.sizes());
  TORCH_CHECK(c_out > 0 && kernel > 0 && stride > 0 && dilation > 0,
              "fastcodec conv1d: c_out, kernel, stride, dilation must be >= 1");
  TORCH_CHECK(pad_left >= 0 && pad_right >= 0, "fastcodec conv1d: paddings must be >= 0");
  TORCH_CHECK(fc_pad_mode_valid(pad_mode), "fastcodec conv1d: bad pad_mode ", pad_mode);
  TORCH_CHECK(wpack.is_contiguous() && wpack.dim() == 3 && wpack.size(0) == ceil_div(c_out, MR) &&
                  wpack.size(1) == c_in * kernel && wpack.size(2) == MR,
              "fastcodec conv1d: packed weight has shape ", wpack.sizes(), ", expected (", ceil_div(c_out, MR), ", ",
              c_in * kernel, ", ", MR, ")");
  const int64_t span = (kernel - 1) * dilation + 1, padded = pad_left + t_in + pad_right;
  TORCH_CHECK(span <= padded, "fastcodec conv1d: kernel span ", span, " exceeds the padded input length ", padded);
  const int64_t t_out = (padded - span) / stride + 1;
  const at::Tensor b_t = checked_bias(bias, "fastcodec conv1d", "bias", c_out);
  at::Tensor s_t;
  if (skip.has_value()) {
    check_f32_cpu(*skip, "skip");
    TORCH_CHECK(skip->dim() == 3 && skip->size(0) == B && skip->size(1) == c_out && skip->size(2) == t_out,
                "fastcodec conv1d: skip must be (", B, ", ", c_out, ", ", t_out, "), got ", skip->sizes());
    s_t = skip->stride(2) == 1 ? *skip : skip->contiguous();
  }
  check_f32_cpu(out, "out");
  TORCH_CHECK(out.dim() == 3 && out.size(0) == B && out.size(1) == c_out && out.size(2) == t_out && out.stride(2) == 1,
              "fastcodec conv1d: out must be (", B, ", ", c_out, ", ", t_out, ") with unit time stride, got ",
              out.sizes(), " strides ", out.strides());
  FcConv1dParams p{};
  p.x = x.data_ptr<float>();
  p.weight = nullptr;
  p.bias = b_t.defined() ? b_t.data_ptr<float>() : nullptr;
  p.skip = s_t.defined() ? s_t.data_ptr<float>() : nullptr;
  p.out = out.data_ptr<float>();
  p.batch = B, p.c_in = c_in, p.c_out = c_out, p.t_in = t_in, p.t_out = t_out;
  p.kernel = kernel, p.stride = stride, p.dilation = dilation, p.pad_left = pad_left, p.pad_right = pad_right;
  p.reflect_len = pad_mode == FC_PAD_REFLECT ? fc_reflect_len(t_in, pad_left, pad_right) : t_in;
  p.x_stride_b = x.stride(0), p.x_stride_c = x.stride(1), p.x_stride_t = x.stride(2);
  if (s_t.defined()) p.skip_stride_b = s_t.stride(0), p.skip_stride_c = s_t.stride(1), p.skip_stride_t = s_t.stride(2);
  p.out_stride_b = out.stride(0), p.out_stride_c = out.stride(1);
  p.pad_mode = (int32_t)pad_mode;
  p.has_elu = elu_alpha.has_value() ? 1 : 0;
  p.elu_alpha = elu_alpha.has_value() ? (float)*elu_alpha : 0.f;
  run_plan(make_plan(p), wpack.data_ptr<float>());
}

namespace {

// Working set per thread of a residual-block tile (packed x, hidden, shortcut; x and out stream through):
// 128 Ki floats = 512 KiB, a quarter of a 2 MiB L2, leaving room for the weights (780 KiB at 256 channels).
constexpr int64_t kResBudgetFloats = 128 * 1024;

// Frames per residual-block tile: the L2 budget over the floats a frame needs, in whole micro-tiles,
// shrunk to keep >= 4 tiles per thread when the signal allows.
int64_t res_tile(int64_t per_frame, int64_t batch, int64_t t, int64_t nthreads) {
  const int64_t tt = std::max<int64_t>(NR, kResBudgetFloats / std::max<int64_t>(1, per_frame) / NR * NR);
  return shrink_for_threads(tt, batch, t, nthreads);
}

void check_packed(const at::Tensor& w, const char* name, int64_t c_out, int64_t nred) {
  check_f32_cpu(w, name);
  TORCH_CHECK(w.is_contiguous() && w.dim() == 3 && w.size(0) == ceil_div(c_out, MR) && w.size(1) == nred &&
                  w.size(2) == MR,
              "fastcodec resblock: packed ", name, " has shape ", w.sizes(), ", expected contiguous (",
              ceil_div(c_out, MR), ", ", nred, ", ", MR, ")");
}

}  // namespace

// One SEANet residual block over a whole signal, in ONE parallel region over (batch, time tile) items:
//   out = shortcut(x) + conv1(act1(conv0(act0(pad(x))))),  shortcut = identity or a k1 conv (c_in -> c_out),
// conv0: c_in -> c_hid, kernel0 taps dilation0 apart, pad_left + pad_right = (kernel0 - 1) * dilation0;
// conv1: k1, c_hid -> c_out. A thread runs its tile's convs serially with private buffers (packed x, hidden,
// shortcut) that stay in its L2; every output is the same sum, in the same order, as the separate conv1d calls.
// x (B, c_in, T) any strides; w0 / wsc / w1 from pack_weight; out (B, c_out, T) contiguous, not sharing x's
// storage; tile: frames per tile, 0 picks it from the channel counts and the thread count.
void resblock(const at::Tensor& x, const at::Tensor& w0, const c10::optional<at::Tensor>& b0, const at::Tensor& w1,
              const c10::optional<at::Tensor>& b1, const c10::optional<at::Tensor>& wsc,
              const c10::optional<at::Tensor>& bsc, const at::Tensor& out, int64_t c_hid, int64_t kernel0,
              int64_t dilation0, int64_t pad_left, int64_t pad_right, int64_t pad_mode,
              c10::optional<double> alpha0, c10::optional<double> alpha1, int64_t tile) {
  check_f32_cpu(x, "x");
  check_f32_cpu(out, "out");
  TORCH_CHECK(x.dim() == 3 && x.size(0) > 0 && x.size(1) > 0 && x.size(2) > 0,
              "fastcodec resblock: x must be a non-empty (batch, channels, time), got ", x.sizes());
  const int64_t B = x.size(0), c_in = x.size(1), T = x.size(2);
  TORCH_CHECK(out.dim() == 3 && out.size(0) == B && out.size(1) > 0 && out.size(2) == T && out.is_contiguous(),
              "fastcodec resblock: out must be a contiguous (", B, ", c_out, ", T, "), got ", out.sizes(),
              " strides ", out.strides());
  TORCH_CHECK(!out.is_alias_of(x), "fastcodec resblock: out must not share x's storage");
  const int64_t c_out = out.size(1);
  TORCH_CHECK(c_hid > 0 && kernel0 > 0 && dilation0 > 0 && tile >= 0,
              "fastcodec resblock: c_hid, kernel0, dilation0 must be >= 1 and tile >= 0");
  TORCH_CHECK(pad_left >= 0 && pad_right >= 0 && pad_left + pad_right == (kernel0 - 1) * dilation0,
              "fastcodec resblock: paddings (", pad_left, ", ", pad_right, ") must be >= 0 and sum to (kernel0 - 1) * "
              "dilation0 = ", (kernel0 - 1) * dilation0);
  TORCH_CHECK(fc_pad_mode_valid(pad_mode), "fastcodec resblock: bad pad_mode ", pad_mode);
  TORCH_CHECK(wsc.has_value() || c_out == c_in, "fastcodec resblock: an identity shortcut needs c_out == c_in, got ",
              c_out, " and ", c_in);
  TORCH_CHECK(wsc.has_value() || !bsc.has_value(), "fastcodec resblock: a shortcut bias without a shortcut weight");
  check_packed(w0, "weight 0", c_hid, c_in * kernel0);
  check_packed(w1, "weight 1", c_out, c_hid);
  if (wsc.has_value()) check_packed(*wsc, "shortcut weight", c_out, c_in);
  const at::Tensor b0_t = checked_bias(b0, "fastcodec resblock", "bias 0", c_hid);
  const at::Tensor b1_t = checked_bias(b1, "fastcodec resblock", "bias 1", c_out);
  const at::Tensor bsc_t = checked_bias(bsc, "fastcodec resblock", "shortcut bias", c_out);
  const at::Tensor xc = x.stride(2) == 1 ? x : x.contiguous();  // the identity shortcut is read by vectors

  FcConv1dParams p0{};
  p0.x = xc.data_ptr<float>();
  p0.bias = b0_t.defined() ? b0_t.data_ptr<float>() : nullptr;
  p0.batch = B, p0.c_in = c_in, p0.c_out = c_hid, p0.t_in = T, p0.t_out = T;
  p0.kernel = kernel0, p0.stride = 1, p0.dilation = dilation0, p0.pad_left = pad_left, p0.pad_right = pad_right;
  p0.reflect_len = pad_mode == FC_PAD_REFLECT ? fc_reflect_len(T, pad_left, pad_right) : T;
  p0.x_stride_b = xc.stride(0), p0.x_stride_c = xc.stride(1), p0.x_stride_t = 1;
  p0.pad_mode = (int32_t)pad_mode;
  p0.has_elu = 0;  // packed raw: the shortcut conv reads the same tile, the ELU follows in place
  FcConv1dParams p1{};
  p1.bias = b1_t.defined() ? b1_t.data_ptr<float>() : nullptr;
  p1.batch = B, p1.c_in = c_hid, p1.c_out = c_out, p1.t_in = T, p1.t_out = T;
  p1.kernel = 1, p1.stride = 1, p1.dilation = 1, p1.reflect_len = T;
  FcConv1dParams psc = p1;
  psc.c_in = c_in;
  psc.bias = bsc_t.defined() ? bsc_t.data_ptr<float>() : nullptr;

  const int64_t per_frame = c_in + c_hid + (wsc.has_value() ? c_out : 0);
  const int64_t tt = tile > 0 ? std::min(tile, T) : res_tile(per_frame, B, T, at::get_num_threads());
  const Plan pl0 = make_plan(p0, tt), pl1 = make_plan(p1, tt);
  Plan plsc = make_plan(psc, tt);
  // the shortcut reads x[t0 + j] where the packed conv0 tile holds it: row ci, position j + pad_left
  for (int64_t ci = 0; ci < c_in; ++ci) plsc.xoff[ci] = ci * pl0.nslot * pl0.row_len + pad_left;
  const int64_t n_tiles = ceil_div(T, tt), items = B * n_tiles;
  const float* wp0 = w0.data_ptr<float>();
  const float* wp1 = w1.data_ptr<float>();
  const float* wpsc = wsc.has_value() ? wsc->data_ptr<float>() : nullptr;
  const float a0 = alpha0.has_value() ? (float)*alpha0 : 0.f, a1 = alpha1.has_value() ? (float)*alpha1 : 0.f;
  float* o_base = out.data_ptr<float>();
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    auto xbuf = zeroed_floats(c_in * pl0.nslot * pl0.row_len);
    auto hid = zeroed_floats(c_hid * pl1.row_len);
    auto scb = zeroed_floats(wpsc ? c_out * pl1.row_len : 0);
    Prefetch pf;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / n_tiles, t0 = (it % n_tiles) * tt, n = std::min(tt, T - t0);
      pack_tile(pl0, b, t0, n, xbuf.get());
      pf.total = 0;
      if (it + 1 < end) {
        const int64_t t2 = ((it + 1) % n_tiles) * tt;
        pf.setup(p0, (it + 1) / n_tiles, t2, std::min(tt, T - t2));
      }
      const int64_t calls = tile_calls(pl0, n, 0, pl0.nblk) + tile_calls(pl1, n, 0, pl1.nblk) +
                            (wpsc ? tile_calls(plsc, n, 0, plsc.nblk) : 0);
      const int64_t per_call = pf.total ? ceil_div(pf.total, calls) : 0;
      const float* skip = xc.data_ptr<float>() + b * xc.stride(0) + t0;
      int64_t scs = xc.stride(1);
      if (wpsc) {
        compute_tile(plsc, wpsc, xbuf.get(), b, t0, n, 0, plsc.nblk, scb.get(), pl1.row_len, nullptr, 0, nullptr,
                     nullptr, pf, per_call);
        skip = scb.get(), scs = pl1.row_len;
      }
      if (alpha0.has_value())  // pack_tile's own ELU pass, over the same elements
        for (int64_t ci = 0; ci < c_in; ++ci)
          for (int64_t sl = 0; sl < pl0.nslot; ++sl)
            elu_inplace(xbuf.get() + (ci * pl0.nslot + sl) * pl0.row_len,
                        std::min(n + pl0.slot_need[sl], pl0.row_len), a0);
      compute_tile(pl0, wp0, xbuf.get(), b, t0, n, 0, pl0.nblk, hid.get(), pl1.row_len, nullptr, 0, nullptr,
                   nullptr, pf, per_call);
      if (alpha1.has_value())  // conv1's pack would copy the hidden tile just to apply this ELU
        for (int64_t ch = 0; ch < c_hid; ++ch) elu_inplace(hid.get() + ch * pl1.row_len, n, a1);
      compute_tile(pl1, wp1, hid.get(), b, t0, n, 0, pl1.nblk, o_base + b * out.stride(0) + t0, out.stride(1),
                   skip, scs, nullptr, nullptr, pf, per_call);
    }
  });
}

// Polyphase weight of a transposed conv: weight (c_in, c_out, kernel) -> (c_out*stride, c_in, M),
// M = ceil(kernel / stride), row co*stride + r, tap j = weight[:, co, (M - 1 - j)*stride + r] (0 past kernel).
at::Tensor polyphase_weight(const at::Tensor& weight, int64_t stride) {
  check_f32_cpu(weight, "weight");
  TORCH_CHECK(weight.dim() == 3 && weight.numel() > 0 && stride > 0,
              "fastcodec conv_transpose1d: weight must be a non-empty (c_in, c_out, kernel) and stride >= 1");
  const at::Tensor w = weight.contiguous();
  const int64_t c_in = w.size(0), c_out = w.size(1), K = w.size(2), M = ceil_div(K, stride);
  at::Tensor out = at::zeros({c_out * stride, c_in, M}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t co = 0; co < c_out; ++co)
    for (int64_t r = 0; r < stride; ++r)
      for (int64_t ci = 0; ci < c_in; ++ci)
        for (int64_t j = 0; j < M; ++j) {
          const int64_t k = (M - 1 - j) * stride + r;
          if (k < K) dst[((co * stride + r) * c_in + ci) * M + j] = src[(ci * c_out + co) * K + k];
        }
  return out;
}

// y = conv_transpose1d(act(x), weight, bias, stride)[..., trim_left : trim_left + out.size(2)], computed as
// `stride` interleaved convs of kernel M = ceil(kernel / stride) (no zero-stuffed input, no col2im):
// z[co*stride + r, q] = sum_{ci, j} wpoly[co*stride + r, ci, j] * act(x)[ci, q + j - (M - 1)], y[co, q*stride + r] = z + bias.
// x (B, c_in, T) any strides; wpack = pack_weight(polyphase_weight(weight, stride)); out (B, c_out, L) contiguous.
void conv_transpose1d(const at::Tensor& x, const at::Tensor& wpack, const c10::optional<at::Tensor>& bias,
                      const at::Tensor& out, int64_t c_out, int64_t kernel, int64_t stride, int64_t trim_left,
                      c10::optional<double> elu_alpha) {
  check_f32_cpu(x, "x");
  check_f32_cpu(wpack, "packed weight");
  check_f32_cpu(out, "out");
  TORCH_CHECK(x.dim() == 3 && x.size(0) > 0 && x.size(1) > 0 && x.size(2) > 0,
              "fastcodec conv_transpose1d: x must be a non-empty (batch, channels, time), got ", x.sizes());
  TORCH_CHECK(c_out > 0 && kernel > 0 && stride > 0 && trim_left >= 0,
              "fastcodec conv_transpose1d: c_out, kernel, stride must be >= 1 and trim_left >= 0");
  const int64_t B = x.size(0), c_in = x.size(1), T = x.size(2), M = ceil_div(kernel, stride);
  const int64_t full = (T - 1) * stride + kernel;
  TORCH_CHECK(out.dim() == 3 && out.size(0) == B && out.size(1) == c_out && out.size(2) >= 1 &&
                  trim_left + out.size(2) <= full && out.is_contiguous(),
              "fastcodec conv_transpose1d: out must be contiguous (", B, ", ", c_out, ", L) with 1 <= L <= ", full,
              " - trim_left, got ", out.sizes());
  TORCH_CHECK(wpack.is_contiguous() && wpack.dim() == 3 && wpack.size(0) == ceil_div(c_out * stride, MR) &&
                  wpack.size(1) == c_in * M && wpack.size(2) == MR,
              "fastcodec conv_transpose1d: packed weight has shape ", wpack.sizes(), ", expected (",
              ceil_div(c_out * stride, MR), ", ", c_in * M, ", ", MR, ")");
  const at::Tensor b_t = checked_bias(bias, "fastcodec conv_transpose1d", "bias", c_out);
  FcConv1dParams p{};
  p.x = x.data_ptr<float>();
  p.batch = B, p.c_in = c_in, p.c_out = c_out * stride, p.t_in = T, p.t_out = T + M - 1;
  p.kernel = M, p.stride = 1, p.dilation = 1, p.pad_left = M - 1, p.pad_right = M - 1, p.reflect_len = T;
  p.x_stride_b = x.stride(0), p.x_stride_c = x.stride(1), p.x_stride_t = x.stride(2);
  p.pad_mode = FC_PAD_CONSTANT;
  p.has_elu = elu_alpha.has_value() ? 1 : 0;
  p.elu_alpha = elu_alpha.has_value() ? (float)*elu_alpha : 0.f;
  const PhaseOut po{stride, c_out, trim_left, out.size(2), b_t.defined() ? b_t.data_ptr<float>() : nullptr,
                    out.data_ptr<float>(), out.stride(0), out.stride(1)};
  run_plan(make_plan(p), wpack.data_ptr<float>(), &po);
}

// Vectorised ELU alone, exposed so the tests can measure its error against float64.
at::Tensor elu(const at::Tensor& x, double alpha) { return fc_conv::elu_copy(x, alpha, "fastcodec conv1d"); }

int64_t block_rows() { return MR; }

bool has_avx512() { return FC_AVX512; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_weight", &pack_weight, "pack a (c_out, c_in, kernel) weight for conv1d");
  m.def("conv1d", &conv1d, "fused padded/ELU/skip dilated conv1d (float32, CPU)");
  m.def("polyphase_weight", &polyphase_weight, "transposed-conv weight as stride interleaved conv weights");
  m.def("conv_transpose1d", &conv_transpose1d, "fused ELU/bias/trim transposed conv1d (float32, CPU)");
  m.def("resblock", &resblock, "SEANet residual block, one parallel region over time tiles (float32, CPU)");
  m.def("elu", &elu, "vectorised ELU used inside conv1d");
  m.def("block_rows", &block_rows);
  m.def("has_avx512", &has_avx512);
  m.def("simd", &fc_conv::simd, "which vector path was compiled: avx512, avx2 or portable");
}
