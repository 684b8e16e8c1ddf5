// Direct dilated conv1d for float32 CPU tensors with the padding, the input ELU, the bias and the
// residual add fused, so SEANet's pad -> ELU -> conv -> add chain reads its input once and writes its
// output once. See conv1d_params.h for the exact formula.
//
// Scheme (a GEMM with the im2col done on the fly): the output is cut into time tiles of `tt` frames;
// per tile the input span it needs is packed once, de-interleaved into `stride` phase rows so every
// tap reads consecutive floats, with the padding and the ELU applied while packing. A register
// micro-kernel then computes MR output channels x NR frames, summing r = ci*kernel + k in chunks of
// KC terms in a fixed order: every output sees the same sums whatever the tiling or the thread count.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "conv1d_params.h"
#include "elu_cpu.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using fc_elu::elu_inplace;

constexpr int MR = 6;        // output channels per micro-tile: 6 x 4 zmm accumulators + 4 inputs + 1 weight <= 32 registers
constexpr int VL = 16;       // floats per 512-bit vector
constexpr int NV = 4;        // vectors along time per micro-tile
constexpr int NR = NV * VL;  // 64 frames per micro-tile
// Reduction chunk: sums of 64 terms added chunk by chunk keep the float32 error near oneDNN's
// (one running sum over c_in*kernel terms, up to 2080 in the tests, measured up to 13x torch's error).
constexpr int64_t KC = 64;
// Packed input per time tile: about 160 KiB keeps it in a 1-2 MiB L2 beside the weights it meets.
constexpr int64_t kPackBudgetFloats = 40 * 1024;
constexpr int64_t kMaxTile = 32 * NR;

inline int64_t ceil_div(int64_t a, int64_t b) {  // b > 0, a of any sign
  return a >= 0 ? (a + b - 1) / b : -((-a) / b);
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

Plan make_plan(const FcConv1dParams& p) {
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
  const int64_t per_frame = std::max<int64_t>(1, p.c_in * pl.nslot);
  int64_t tt = (kPackBudgetFloats / per_frame) / NR * NR;
  tt = std::min(std::max<int64_t>(tt, NR), kMaxTile);
  // keep at least ~4 tiles per thread when the signal allows, so both cores get even work
  const int64_t want = 4 * (int64_t)at::get_num_threads();
  while (tt > NR && p.batch * ceil_div(p.t_out, tt) < want) tt -= NR;
  pl.tt = tt;
  pl.row_len = (tt + pl.max_off + VL - 1) / VL * VL;
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
#if defined(__AVX512F__)
  if (step == 1) {
    for (; j + VL <= n; j += VL) _mm512_storeu_ps(dst + j, _mm512_loadu_ps(src + j));
  } else if (step <= (int64_t)(INT32_MAX / VL)) {
    const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32((int32_t)step));
    for (; j + VL <= n; j += VL) _mm512_storeu_ps(dst + j, _mm512_i32gather_ps(idx, src + j * step, 4));
  }
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
#if defined(__AVX512F__)
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
#if defined(__AVX512F__)
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

void run_plan(const Plan& pl, const float* wpack, const PhaseOut* po = nullptr) {
  const FcConv1dParams& p = pl.p;
  const int64_t nred = p.c_in * p.kernel;
  const int64_t nthreads = at::get_num_threads();
  // split output channels too when there are fewer tiles than threads (short signals, B=1)
  int64_t n_co = 1;
  while (n_co < pl.nblk && p.batch * pl.n_tiles * n_co < 2 * nthreads) ++n_co;
  const int64_t blk_per = ceil_div(pl.nblk, n_co);
  const int64_t items = p.batch * pl.n_tiles * n_co;
  const size_t buf_floats = (size_t)(p.c_in * pl.nslot * pl.row_len);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    const size_t bytes = (buf_floats * sizeof(float) + 63) / 64 * 64;
    std::unique_ptr<float, FreeDeleter> buf(static_cast<float*>(std::aligned_alloc(64, bytes)));
    TORCH_CHECK(buf, "fastcodec conv1d: out of memory for a ", bytes, "-byte pack buffer");
    std::memset(buf.get(), 0, bytes);  // lanes past a tile's end are read (never stored): keep them finite
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
      // one output block at a time over the whole tile: its rows are written in runs of tt frames
      // (A/B-measured 7% faster in total over SEANet's layers than sub-tile-major order)
      const int64_t calls = (blk_hi - blk_lo) * ceil_div(n, NR) * ceil_div(nred, KC);
      const int64_t per_call = pf.total ? ceil_div(pf.total, calls) : 0;
      for (int64_t blk = blk_lo; blk < blk_hi; ++blk) {
        const int64_t co = blk * MR;
        const int rows = (int)std::min<int64_t>(MR, p.c_out - co);
        for (int64_t u = 0; u < n; u += NR) {
          const int64_t nn = std::min<int64_t>(NR, n - u);
          const int nvec = (int)ceil_div(nn, VL);
          const int last = (int)(nn - (nvec - 1) * VL);
          float* o = po ? ztile : p.out + b * p.out_stride_b + co * p.out_stride_c + t0 + u;
          const int64_t ocs = po ? NR : p.out_stride_c;
          const float* sk = p.skip ? p.skip + b * p.skip_stride_b + co * p.skip_stride_c + t0 + u : nullptr;
          for (int64_t r0 = 0; r0 < nred; r0 += KC) {
            pf.issue(per_call);
            pick_micro(rows, nvec)(buf.get() + u, pl.xoff.data() + r0, wpack + (blk * nred + r0) * MR,
                                   std::min<int64_t>(KC, nred - r0), r0 == 0, r0 + KC >= nred,
                                   p.bias ? p.bias + co : nullptr, sk, p.skip_stride_c, o, ocs, last);
          }
          if (po) scatter_phases(*po, o, rows, co, b, t0 + u, nn);
        }
      }
    }
  });
}

void check_f32_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastcodec conv1d: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fastcodec conv1d: ", name, " must be float32, got ", t.scalar_type());
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
  TORCH_CHECK(pad_mode == FC_PAD_CONSTANT || pad_mode == FC_PAD_REFLECT, "fastcodec conv1d: bad pad_mode ", pad_mode);
  TORCH_CHECK(wpack.is_contiguous() && wpack.dim() == 3 && wpack.size(0) == ceil_div(c_out, MR) &&
                  wpack.size(1) == c_in * kernel && wpack.size(2) == MR,
              "fastcodec conv1d: packed weight has shape ", wpack.sizes(), ", expected (", ceil_div(c_out, MR), ", ",
              c_in * kernel, ", ", MR, ")");
  const int64_t span = (kernel - 1) * dilation + 1, padded = pad_left + t_in + pad_right;
  TORCH_CHECK(span <= padded, "fastcodec conv1d: kernel span ", span, " exceeds the padded input length ", padded);
  const int64_t t_out = (padded - span) / stride + 1;
  at::Tensor b_t, s_t;
  if (bias.has_value()) {
    check_f32_cpu(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == c_out, "fastcodec conv1d: bias must be (", c_out, ",), got ",
                bias->sizes());
    b_t = bias->contiguous();
  }
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
  at::Tensor b_t;
  if (bias.has_value()) {
    check_f32_cpu(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == c_out, "fastcodec conv_transpose1d: bias must be (", c_out,
                ",), got ", bias->sizes());
    b_t = bias->contiguous();
  }
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
at::Tensor elu(const at::Tensor& x, double alpha) {
  check_f32_cpu(x, "x");
  at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  std::memcpy(out.data_ptr<float>(), xc.data_ptr<float>(), xc.numel() * sizeof(float));
  elu_inplace(out.data_ptr<float>(), out.numel(), (float)alpha);
  return out;
}

int64_t block_rows() { return MR; }

bool has_avx512() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_weight", &pack_weight, "pack a (c_out, c_in, kernel) weight for conv1d");
  m.def("conv1d", &conv1d, "fused padded/ELU/skip dilated conv1d (float32, CPU)");
  m.def("polyphase_weight", &polyphase_weight, "transposed-conv weight as stride interleaved conv weights");
  m.def("conv_transpose1d", &conv_transpose1d, "fused ELU/bias/trim transposed conv1d (float32, CPU)");
  m.def("elu", &elu, "vectorised ELU used inside conv1d");
  m.def("block_rows", &block_rows);
  m.def("has_avx512", &has_avx512);
}
