// The CUDA conv's logic (conv1d_cuda.cu) as __host__ __device__ functions, one per phase between two
// __syncthreads of a block, plus the launch plan (tiles, shared memory, grid chunking in y/z). nvcc
// compiles them into the kernels; g++ compiles the same header into csrc/conv1d_cuda_host.cpp, which
// drives the phases block by block and thread by thread on the host so the tests check the indexing
// (tiles, halo, stride, dilation, padding, chunking, short inputs) on a machine without a GPU.
#pragma once
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "conv1d_params.h"

#if defined(__CUDACC__)
#define FC_HD __host__ __device__ __forceinline__
#else
#define FC_HD inline
#endif
#if defined(__CUDA_ARCH__)
#define FC_UNROLL _Pragma("unroll")
#else
#define FC_UNROLL
#endif

namespace fc_cuda {

constexpr int kTimeTile = 128;              // frames per block = threads per block
constexpr int kCoTile = 16;                 // output channels per block (registers per thread)
constexpr int kMaxCiChunk = 32;
constexpr int64_t kSmemBytes = 40 * 1024;   // below the 48 KiB a kernel gets without opting in
constexpr int64_t kMaxGridY = 65535, kMaxGridZ = 65535;
constexpr int kDirectThreads = 256;

FC_HD float act(float v, const FcConv1dParams& p) {
  return (p.has_elu && v <= 0.f) ? p.elu_alpha * expm1f(v) : v;
}

// Activated padded input P[b, ci, i] (0 for padding and past the padded end).
FC_HD float load_padded(const FcConv1dParams& p, const float* xc, int64_t i) {
  if (i >= p.pad_left + p.t_in + p.pad_right) return 0.f;
  const int64_t src = fc_source_index(i, p.pad_left, p.t_in, p.reflect_len, p.pad_mode);
  return src >= 0 ? act(xc[src * p.x_stride_t], p) : 0.f;
}

// Input span a tile of kTimeTile frames reads: the frames' strided starts plus the dilated kernel (the halo).
FC_HD int64_t tiled_span(const FcConv1dParams& p) {
  return (int64_t)(kTimeTile - 1) * p.stride + (p.kernel - 1) * p.dilation + 1;
}

// Phase 0 (per thread): the accumulators start at the bias.
FC_HD void tiled_init(const FcConv1dParams& p, int64_t co0, float* acc) {
  FC_UNROLL
  for (int m = 0; m < kCoTile; ++m) acc[m] = (p.bias && co0 + m < p.c_out) ? p.bias[co0 + m] : 0.f;
}

// Phase 1 (per thread `tid` of `nthreads`): stage input channels [ci0, ci0 + ci_chunk) of the tile's padded,
// activated span and the matching weights in shared memory: xs [ci_chunk][span], ws [kCoTile][ci_chunk * kernel].
FC_HD void tiled_stage(const FcConv1dParams& p, int ci_chunk, int64_t b, int64_t co0, int64_t t0, int64_t ci0,
                       int tid, int nthreads, float* smem) {
  const int64_t span = tiled_span(p);
  float* xs = smem;
  float* ws = smem + (int64_t)ci_chunk * span;
  const int64_t i0 = t0 * p.stride;
  const int64_t nci = (p.c_in - ci0) < ci_chunk ? (p.c_in - ci0) : ci_chunk;
  for (int64_t e = tid; e < nci * span; e += nthreads) {
    const int64_t c = e / span, q = e - c * span;
    const float* xc = p.x + b * p.x_stride_b + (ci0 + c) * p.x_stride_c;
    xs[e] = load_padded(p, xc, i0 + q);
  }
  const int64_t nred = nci * p.kernel;
  const int64_t nred_chunk_max = (int64_t)ci_chunk * p.kernel;
  for (int64_t e = tid; e < (int64_t)kCoTile * nred; e += nthreads) {
    const int64_t m = e / nred, r = e - m * nred;
    const int64_t co = co0 + m;
    ws[m * nred_chunk_max + r] = co < p.c_out ? p.weight[(co * p.c_in + ci0) * p.kernel + r] : 0.f;
  }
}

// Phase 2 (per thread): frame t0 + tid of the tile accumulates the staged chunk for kCoTile channels. The
// chunk's sum starts from zero and is then added to the total: chunked sums keep the float32 error near cuDNN's.
FC_HD void tiled_accumulate(const FcConv1dParams& p, int ci_chunk, int64_t ci0, int tid, const float* smem,
                            float* acc) {
  const int64_t span = tiled_span(p);
  const float* ws = smem + (int64_t)ci_chunk * span;
  const int64_t nred_chunk_max = (int64_t)ci_chunk * p.kernel;
  const int64_t nci = (p.c_in - ci0) < ci_chunk ? (p.c_in - ci0) : ci_chunk;
  const float* xt = smem + (int64_t)tid * p.stride;
  float part[kCoTile];
  FC_UNROLL
  for (int m = 0; m < kCoTile; ++m) part[m] = 0.f;
  for (int64_t c = 0; c < nci; ++c) {
    for (int64_t k = 0; k < p.kernel; ++k) {
      const float v = xt[c * span + k * p.dilation];
      const int64_t r = c * p.kernel + k;
  FC_UNROLL
      for (int m = 0; m < kCoTile; ++m) part[m] = fmaf(ws[m * nred_chunk_max + r], v, part[m]);
    }
  }
  FC_UNROLL
  for (int m = 0; m < kCoTile; ++m) acc[m] += part[m];
}

// Phase 3 (per thread): write frame t of channels [co0, co0 + kCoTile) (+ skip).
FC_HD void tiled_store(const FcConv1dParams& p, int64_t b, int64_t co0, int64_t t, const float* acc) {
  if (t >= p.t_out) return;
  FC_UNROLL
  for (int m = 0; m < kCoTile; ++m) {
    const int64_t co = co0 + m;
    if (co >= p.c_out) break;
    float y = acc[m];
    if (p.skip) y += p.skip[b * p.skip_stride_b + co * p.skip_stride_c + t * p.skip_stride_t];
    p.out[b * p.out_stride_b + co * p.out_stride_c + t] = y;
  }
}

// The direct kernel's thread: output element idx (b, co, t) from global memory.
FC_HD void direct_output(const FcConv1dParams& p, int64_t idx) {
  const int64_t t = idx % p.t_out;
  const int64_t co = (idx / p.t_out) % p.c_out;
  const int64_t b = idx / (p.t_out * p.c_out);
  float acc = p.bias ? p.bias[co] : 0.f;
  for (int64_t ci = 0; ci < p.c_in; ++ci) {
    const float* xc = p.x + b * p.x_stride_b + ci * p.x_stride_c;
    const float* w = p.weight + (co * p.c_in + ci) * p.kernel;
    for (int64_t k = 0; k < p.kernel; ++k) acc = fmaf(w[k], load_padded(p, xc, t * p.stride + k * p.dilation), acc);
  }
  if (p.skip) acc += p.skip[b * p.skip_stride_b + co * p.skip_stride_c + t * p.skip_stride_t];
  p.out[b * p.out_stride_b + co * p.out_stride_c + t] = acc;
}

// What would make a kernel read or write out of bounds (the launcher re-checks what Python validated).
inline bool params_valid(const FcConv1dParams* p) {
  if (!p || !p->x || !p->weight || !p->out) return false;
  if (p->batch <= 0 || p->c_in <= 0 || p->c_out <= 0 || p->t_in <= 0 || p->t_out <= 0 || p->kernel <= 0 ||
      p->stride <= 0 || p->dilation <= 0 || p->pad_left < 0 || p->pad_right < 0)
    return false;
  if (!fc_pad_mode_valid(p->pad_mode)) return false;
  if (p->pad_mode == FC_PAD_REFLECT && p->reflect_len != fc_reflect_len(p->t_in, p->pad_left, p->pad_right))
    return false;
  const int64_t span = (p->kernel - 1) * p->dilation + 1;
  const int64_t padded = p->pad_left + p->t_in + p->pad_right;
  return span <= padded && p->t_out == (padded - span) / p->stride + 1;
}

// Input channels per shared-memory chunk of the tiled kernel (0: the span does not fit, use the direct kernel).
inline int64_t tiled_ci_chunk(const FcConv1dParams& p) {
  const int64_t per_ci = (tiled_span(p) + (int64_t)kCoTile * p.kernel) * (int64_t)sizeof(float);
  int64_t ci_chunk = kSmemBytes / per_ci;
  if (ci_chunk > kMaxCiChunk) ci_chunk = kMaxCiChunk;
  if (ci_chunk > p.c_in) ci_chunk = p.c_in;
  return ci_chunk;
}

inline size_t tiled_smem_bytes(const FcConv1dParams& p, int64_t ci_chunk) {
  return (size_t)(ci_chunk * (tiled_span(p) + (int64_t)kCoTile * p.kernel) * (int64_t)sizeof(float));
}

// Calls launch(grid_x, grid_y, grid_z, b0, co_blk0) for every tiled launch, the grid chunked in y (output
// channel blocks) and z (batch) at max_y / max_z; returns the first non-zero result (1: grid x too large).
template <class Launch>
inline int for_each_tiled_launch(const FcConv1dParams& p, int64_t max_y, int64_t max_z, Launch&& launch) {
  const int64_t n_t = (p.t_out + kTimeTile - 1) / kTimeTile;
  const int64_t n_co = (p.c_out + kCoTile - 1) / kCoTile;
  if (n_t > 0x7fffffff) return 1;
  for (int64_t b0 = 0; b0 < p.batch; b0 += max_z) {
    const int64_t nb = (p.batch - b0) < max_z ? (p.batch - b0) : max_z;
    for (int64_t c0 = 0; c0 < n_co; c0 += max_y) {
      const int64_t nc = (n_co - c0) < max_y ? (n_co - c0) : max_y;
      const int err = launch(n_t, nc, nb, b0, c0);
      if (err) return err;
    }
  }
  return 0;
}

// Calls launch(blocks, first, count) for every direct launch of kDirectThreads-thread blocks, at most
// per_launch outputs each.
template <class Launch>
inline int for_each_direct_launch(const FcConv1dParams& p, int64_t per_launch, Launch&& launch) {
  const int64_t total = p.batch * p.c_out * p.t_out;
  for (int64_t first = 0; first < total; first += per_launch) {
    const int64_t count = (total - first) < per_launch ? (total - first) : per_launch;
    const int err = launch((count + kDirectThreads - 1) / kDirectThreads, first, count);
    if (err) return err;
  }
  return 0;
}

}  // namespace fc_cuda
