// One streaming step of the causal SEANet convs on float32 CPU tensors (fastcodec/streaming.py): the chunk
// is written (through the ELU) into the conv's time-major state buffer and the frames it completes are
// computed into a caller-owned output, with no allocation after the first call.
//
// Why not conv1d_cpu.cpp's kernel: it vectorises along time, so at the 1-8 frames of a 320-sample chunk
// in the deep layers it uses 1 of 16 lanes and broadcasts every weight as a scalar, several times slower than
// reading the layer's weights once. Here the frames are the rows of a small GEMM vectorised along output
// channels: weights stream from memory as whole vectors, once per chunk. Conversely this tiling is not meant for
// whole signals. The two kernels sum each output in different orders, so one cannot replace the other without
// changing the bits of one path; bench/kernel_tilings.py times each at the other's shapes
// (bench/results/kernel-tilings-cpu-*.json; measured: bench/results/design-measurements.md). What they share
// (reduction chunk, argument checks, helpers) is in conv_common.h.
//
// Layouts: a state buffer (B, C, cap) is stored time-major (frame t of batch b at b*stride0 + t*C); an
// output (B, N, frames) has channel stride 1. Weights are packed in panels of `nw` output columns:
// packed[p][r][j] = W[r][p*nw + j] (zero past N), r = tap*C_in + ci, so a frame's reduction reads
// `kernel` contiguous runs of C_in floats from the buffer.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "conv_common.h"
#include "elu_cpu.h"
#include "vf16.h"  // FC_AVX512 / FC_AVX2 and their intrinsics

namespace {

using fc_conv::ceil_div;
using fc_conv::KC;
using fc_conv::VL;
using fc_elu::elu_inplace;

// Convs below this many multiply-adds (a few microseconds on one core) are not worth an OpenMP fork-join.
constexpr int64_t kParallelMinMacs = 1 << 17;

// One FR frames x NV vectors tile of one reduction chunk: c[f][n] = sum_{r < nk} w[r][n] * x[f*xfs + xoff[r]],
// then out[f*ofs + n] = (first ? bias[n] : out[f*ofs + n]) + c[f][n]. Only `mask` lanes of the last vector
// are stored.
template <int FR, int NV>
void micro(const float* __restrict x, int64_t xfs, const int32_t* __restrict xoff, const float* __restrict w,
           int64_t nw, int64_t nk, const float* bias, float* out, int64_t ofs, uint32_t mask, bool first) {
#if FC_AVX512
  __m512 acc[FR][NV];
  for (int f = 0; f < FR; ++f)
    for (int v = 0; v < NV; ++v) acc[f][v] = _mm512_setzero_ps();
  for (int64_t r = 0; r < nk; ++r) {
    const float* wr = w + r * nw;
    __m512 wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_ps(wr + v * VL);
    const float* xr = x + xoff[r];
    for (int f = 0; f < FR; ++f) {
      const __m512 xb = _mm512_set1_ps(xr[f * xfs]);
      for (int v = 0; v < NV; ++v) acc[f][v] = _mm512_fmadd_ps(wv[v], xb, acc[f][v]);
    }
  }
  const __mmask16 tail = (__mmask16)mask;
  for (int f = 0; f < FR; ++f)
    for (int v = 0; v < NV; ++v) {
      float* o = out + f * ofs + v * VL;
      const __mmask16 m = v == NV - 1 ? tail : (__mmask16)0xFFFF;
      const __m512 base = first ? (bias ? _mm512_maskz_loadu_ps(m, bias + v * VL) : _mm512_setzero_ps())
                                : _mm512_maskz_loadu_ps(m, o);
      _mm512_mask_storeu_ps(o, m, _mm512_add_ps(base, acc[f][v]));
    }
#elif FC_AVX2
  constexpr int NY = 2 * NV;  // ymm per frame
  __m256 acc[FR][NY];
  for (int f = 0; f < FR; ++f)
    for (int v = 0; v < NY; ++v) acc[f][v] = _mm256_setzero_ps();
  for (int64_t r = 0; r < nk; ++r) {
    const float* wr = w + r * nw;
    __m256 wv[NY];
    for (int v = 0; v < NY; ++v) wv[v] = _mm256_loadu_ps(wr + v * 8);
    const float* xr = x + xoff[r];
    for (int f = 0; f < FR; ++f) {
      const __m256 xb = _mm256_broadcast_ss(xr + f * xfs);
      for (int v = 0; v < NY; ++v) acc[f][v] = _mm256_fmadd_ps(wv[v], xb, acc[f][v]);
    }
  }
  const int last = __builtin_popcount(mask);  // lanes of the last 16-lane vector
  for (int f = 0; f < FR; ++f)
    for (int v = 0; v < NY; ++v) {
      const int lanes = v < NY - 2 ? 8 : std::min(8, last - 8 * (v - (NY - 2)));
      if (lanes <= 0) continue;
      float* o = out + f * ofs + v * 8;
      if (lanes == 8) {
        const __m256 base = first ? (bias ? _mm256_loadu_ps(bias + v * 8) : _mm256_setzero_ps()) : _mm256_loadu_ps(o);
        _mm256_storeu_ps(o, _mm256_add_ps(base, acc[f][v]));
      } else {
        const __m256i m = fc_vf::first_n8(lanes);
        const __m256 base = first ? (bias ? _mm256_maskload_ps(bias + v * 8, m) : _mm256_setzero_ps())
                                  : _mm256_maskload_ps(o, m);
        _mm256_maskstore_ps(o, m, _mm256_add_ps(base, acc[f][v]));
      }
    }
#else
  const int lanes = (NV - 1) * VL + __builtin_popcount(mask);
  for (int f = 0; f < FR; ++f)
    for (int j = 0; j < lanes; ++j) {
      float c = 0.f;
      for (int64_t r = 0; r < nk; ++r) c = std::fma(w[r * nw + j], x[f * xfs + xoff[r]], c);
      float* o = out + f * ofs + j;
      *o = (first ? (bias ? bias[j] : 0.f) : *o) + c;
    }
#endif
}

using MicroFn = void (*)(const float*, int64_t, const int32_t*, const float*, int64_t, int64_t, const float*, float*,
                         int64_t, uint32_t, bool);

// frames per tile for NV vectors: FR * NV accumulators + NV weights + 1 broadcast <= 32 zmm registers, or
// 16 ymm at 2 per vector (NV = 4: the weights are read as fma operands); on AVX2 a chunk through the 24 kHz
// encoder runs several times faster than the portable loops and ahead of the ATen steps
// (measured: bench/results/design-measurements.md).
#if FC_AVX2
constexpr int kMaxFrames[5] = {0, 6, 2, 1, 1};
#else
constexpr int kMaxFrames[5] = {0, 12, 12, 8, 6};
#endif

template <int NV, int... FR>
MicroFn pick_fr(int fr, std::integer_sequence<int, FR...>) {
  MicroFn fns[] = {micro<FR + 1, NV>...};
  return fns[fr - 1];
}

MicroFn pick(int nv, int fr) {
  switch (nv) {
    case 1: return pick_fr<1>(fr, std::make_integer_sequence<int, kMaxFrames[1]>{});
    case 2: return pick_fr<2>(fr, std::make_integer_sequence<int, kMaxFrames[2]>{});
    case 3: return pick_fr<3>(fr, std::make_integer_sequence<int, kMaxFrames[3]>{});
    default: return pick_fr<4>(fr, std::make_integer_sequence<int, kMaxFrames[4]>{});
  }
}

// out[f*ofs + n] = bias[n] + sum_{r < K} W[r][n] * x[f*xfs + xoff[r]] for f < F, n < N; W packed in
// panels of nw columns. The sums run in the same order whatever F, the tiling or the thread count.
//
// Threads split (panel, frame block) items: the deep layers (1-8 frames, MiBs of weights) split along
// panels, the shallow ones (one 16-64-column panel, 40-320 frames) along frames, where a single thread
// used to run 30 of a chunk's 32 convs. Below kParallelMinMacs multiply-adds one thread does it all (an
// OpenMP fork-join costs a few microseconds).
void gemm(const float* x, int64_t xfs, const int32_t* xoff, int64_t K, int64_t F, const float* wpack, int64_t N,
          int64_t nw, const float* bias, float* out, int64_t ofs) {
  const int64_t panels = ceil_div(N, nw);
  const int nv_full = (int)(nw / VL);
  // frames per item: whole micro-tiles, about 4 of them
  const int64_t fblk = 4 * kMaxFrames[std::min(nv_full, 4)];
  const int64_t fblocks = ceil_div(F, fblk);
  auto run = [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t p = i / fblocks, fa = (i % fblocks) * fblk, fb = std::min(F, fa + fblk);
      const int64_t n0 = p * nw, nn = std::min(nw, N - n0);
      const int nv = (int)ceil_div(nn, VL);
      const int last = (int)(nn - (nv - 1) * VL);
      const uint32_t mask = last == VL ? 0xFFFFu : (1u << last) - 1u;
      const int frmax = kMaxFrames[nv];
      const float* wp = wpack + p * K * nw;
      // chunk-major: the chunk's 64 x nw weights stay in L1 across the frame tiles
      for (int64_t r0 = 0; r0 < K; r0 += KC) {
        const int64_t nk = std::min(KC, K - r0);
        for (int64_t f0 = fa; f0 < fb; f0 += frmax) {
          const int fr = (int)std::min<int64_t>(frmax, fb - f0);
          pick(nv, fr)(x + f0 * xfs, xfs, xoff + r0, wp + r0 * nw, nw, nk, bias ? bias + n0 : nullptr,
                       out + f0 * ofs + n0, ofs, mask, r0 == 0);
        }
      }
    }
  };
  const int64_t items = panels * fblocks;
  if (at::get_num_threads() > 1 && items > 1 && F * K * N >= kParallelMinMacs && !at::in_parallel_region())
    at::parallel_for(0, items, 1, run);
  else
    run(0, items);
}

// Reduction offsets r = tap*C + ci -> tap*dilation*C + ci, in a per-thread table (no allocation once grown).
const int32_t* reduction_offsets(int64_t kernel, int64_t dilation, int64_t C) {
  static thread_local std::vector<int32_t> table;
  static thread_local int64_t key[3] = {-1, -1, -1};
  if (key[0] != kernel || key[1] != dilation || key[2] != C) {
    table.resize(kernel * C);
    for (int64_t k = 0; k < kernel; ++k)
      for (int64_t c = 0; c < C; ++c) table[k * C + c] = (int32_t)(k * dilation * C + c);
    key[0] = kernel, key[1] = dilation, key[2] = C;
  }
  return table.data();
}

float* scratch(std::vector<float>& v, int64_t n) {
  if ((int64_t)v.size() < n) v.resize(n);
  return v.data();
}

void check_f32_cpu(const at::Tensor& t, const char* name) { fc_conv::check_f32_cpu(t, "fastcodec stream", name); }

void check_packed(const at::Tensor& wpack, int64_t K, int64_t N) {
  check_f32_cpu(wpack, "packed weight");
  TORCH_CHECK(wpack.dim() == 3 && wpack.is_contiguous() && wpack.size(1) == K && wpack.size(2) % VL == 0 &&
                  wpack.size(2) >= VL && wpack.size(2) <= 4 * VL && wpack.size(0) == ceil_div(N, wpack.size(2)),
              "fastcodec stream: packed weight has shape ", wpack.sizes(), ", expected (ceil(", N, " / nw), ", K,
              ", nw) with nw in {16, 32, 48, 64}");
}

const float* bias_ptr(const c10::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return nullptr;
  fc_conv::check_bias(*bias, "fastcodec stream", "bias", N);
  TORCH_CHECK(bias->is_contiguous(), "fastcodec stream: bias must be contiguous");
  return bias->data_ptr<float>();
}

// Output (B, N, frames) with channel stride 1: returns the frame stride.
int64_t check_out(const at::Tensor& out, int64_t B, int64_t N, int64_t frames, const char* name) {
  check_f32_cpu(out, name);
  TORCH_CHECK(out.dim() == 3 && out.size(0) == B && out.size(1) == N && out.size(2) == frames &&
                  (N == 1 || out.stride(1) == 1) && (frames == 1 || out.stride(2) >= N) &&
                  (B == 1 || out.stride(0) >= N * frames),
              "fastcodec stream: ", name, " must be (", B, ", ", N, ", ", frames, ") with channel stride 1, got ",
              out.sizes(), " strides ", out.strides());
  return frames == 1 ? N : out.stride(2);
}

// dst[t*C + c] = act(x[b, c, t]) for t < T.
void write_frames(const at::Tensor& x, int64_t b, float* dst, c10::optional<double> alpha) {
  const int64_t C = x.size(1), T = x.size(2);
  const float* xb = x.data_ptr<float>() + b * x.stride(0);
  const int64_t sc = x.stride(1), st = x.stride(2);
  if (sc == 1 || C == 1) {
    if (st == C) std::memcpy(dst, xb, sizeof(float) * C * T);
    else
      for (int64_t t = 0; t < T; ++t) std::memcpy(dst + t * C, xb + t * st, sizeof(float) * C);
  } else {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c) dst[t * C + c] = xb[c * sc + t * st];
  }
  if (alpha.has_value()) elu_inplace(dst, C * T, (float)*alpha);
}

}  // namespace

// w (K, N) -> (ceil(N / nw), K, nw): panel p holds columns [p*nw, p*nw + nw), zeros past N.
at::Tensor pack_panels(const at::Tensor& w, int64_t nw) {
  check_f32_cpu(w, "weight");
  TORCH_CHECK(w.dim() == 2 && w.numel() > 0, "fastcodec stream: weight must be a non-empty (K, N), got ", w.sizes());
  TORCH_CHECK(nw >= VL && nw <= 4 * VL && nw % VL == 0, "fastcodec stream: nw must be 16, 32, 48 or 64, got ", nw);
  const at::Tensor wc = w.contiguous();
  const int64_t K = wc.size(0), N = wc.size(1), P = ceil_div(N, nw);
  at::Tensor packed = at::zeros({P, K, nw}, wc.options());
  const float* src = wc.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  for (int64_t p = 0; p < P; ++p)
    for (int64_t r = 0; r < K; ++r) {
      const int64_t n0 = p * nw, nn = std::min(nw, N - n0);
      std::memcpy(dst + (p * K + r) * nw, src + r * N + n0, sizeof(float) * nn);
    }
  return packed;
}

// Streaming conv step. buf (B, C, cap) time-major holds n valid samples from `start`; x (B, C, T) any strides.
// Appends act(x) after them (first moving the n samples to the front when the T new ones would not fit) and,
// when frames > 0, writes out (B, N, frames) = conv1d(valid samples)[:frames] + bias, span = (kernel - 1) *
// dilation + 1 and frame f reading samples [f*stride, f*stride + span); wpack = pack_panels of the weight as
// (kernel*C, N) rows (tap, channel). Returns the index of the first valid sample (0 after a move).
int64_t conv_push(const at::Tensor& buf, const at::Tensor& x, int64_t start, int64_t n, c10::optional<double> alpha,
                  int64_t frames, int64_t kernel, int64_t stride, int64_t dilation, const at::Tensor& wpack,
                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& out_opt) {
  check_f32_cpu(buf, "state buffer");
  check_f32_cpu(x, "x");
  TORCH_CHECK(buf.dim() == 3 && x.dim() == 3 && x.size(0) == buf.size(0) && x.size(1) == buf.size(1),
              "fastcodec stream: x ", x.sizes(), " does not match the state buffer ", buf.sizes());
  const int64_t B = buf.size(0), C = buf.size(1), cap = buf.size(2), T = x.size(2);
  TORCH_CHECK((C == 1 || buf.stride(1) == 1) && buf.stride(2) == C && (B == 1 || buf.stride(0) >= cap * C),
              "fastcodec stream: the state buffer must be time-major, got strides ", buf.strides());
  TORCH_CHECK(start >= 0 && n >= 0 && start + n <= cap && n + T <= cap, "fastcodec stream: ", n,
              " valid samples at ", start, " plus ", T, " new ones do not fit the buffer of ", cap);
  TORCH_CHECK(kernel >= 1 && stride >= 1 && dilation >= 1 && frames >= 0, "fastcodec stream: bad conv geometry");
  const int64_t span = (kernel - 1) * dilation + 1;
  TORCH_CHECK(frames == 0 || (frames - 1) * stride + span <= n + T, "fastcodec stream: ", frames,
              " frames need more than the ", n + T, " samples held");
  const int64_t K = kernel * C;
  TORCH_CHECK(K * dilation < INT32_MAX, "fastcodec stream: reduction too long");
  float* bp = buf.data_ptr<float>();
  const int64_t bs = buf.stride(0);
  if (start + n + T > cap) {
    for (int64_t b = 0; b < B; ++b) std::memmove(bp + b * bs, bp + b * bs + start * C, sizeof(float) * n * C);
    start = 0;
  }
  for (int64_t b = 0; b < B; ++b) write_frames(x, b, bp + b * bs + (start + n) * C, alpha);
  if (frames == 0) return start;
  TORCH_CHECK(out_opt.has_value(), "fastcodec stream: ", frames, " frames need an output tensor");
  const at::Tensor& out = *out_opt;
  TORCH_CHECK(out.dim() == 3, "fastcodec stream: out must be (B, N, frames), got ", out.sizes());
  const int64_t N = out.size(1);
  check_packed(wpack, K, N);
  const float* bias_p = bias_ptr(bias, N);
  const int64_t ofs = check_out(out, B, N, frames, "out");
  const int32_t* xoff = reduction_offsets(kernel, dilation, C);
  for (int64_t b = 0; b < B; ++b)
    gemm(bp + b * bs + start * C, stride * C, xoff, K, frames, wpack.data_ptr<float>(), N, wpack.size(2), bias_p,
         out.data_ptr<float>() + b * out.stride(0), ofs);
  return start;
}

// Streaming transposed conv step (stride s, kernel k, ov = k - s). x (B, C_in, T) any strides; wpack =
// pack_panels of the weight as (C_in, k*C_out) columns (tap, channel); pending (B, C_out, ov) time-major, the
// overlap carried from the previous frames (no bias). With y the overlap-add of act(x)'s frames plus pending:
// out (B, C_out, T*s - drop) = y[drop : T*s] + bias; pending = y[T*s : T*s + ov].
void convtr_push(const at::Tensor& x, c10::optional<double> alpha, int64_t kernel, int64_t stride,
                 const at::Tensor& wpack, const c10::optional<at::Tensor>& bias, const at::Tensor& pending,
                 int64_t drop, const at::Tensor& out) {
  check_f32_cpu(x, "x");
  check_f32_cpu(pending, "pending");
  TORCH_CHECK(x.dim() == 3 && x.size(0) >= 1 && x.size(1) >= 1 && x.size(2) >= 1,
              "fastcodec stream: x must be a non-empty (B, C_in, T), got ", x.sizes());
  TORCH_CHECK(kernel >= stride && stride >= 1, "fastcodec stream: transposed conv needs kernel >= stride >= 1");
  const int64_t B = x.size(0), C = x.size(1), T = x.size(2), ov = kernel - stride, done = T * stride;
  TORCH_CHECK(out.dim() == 3, "fastcodec stream: out must be (B, N, L), got ", out.sizes());
  const int64_t N = out.size(1);
  TORCH_CHECK(pending.dim() == 3 && pending.size(0) == B && pending.size(1) == N && pending.size(2) == ov &&
                  (ov == 0 || N == 1 || pending.stride(1) == 1) && (ov <= 1 || pending.stride(2) == N),
              "fastcodec stream: pending must be a time-major (", B, ", ", N, ", ", ov, "), got ", pending.sizes(),
              " strides ", pending.strides());
  TORCH_CHECK(drop >= 0 && drop < done, "fastcodec stream: drop ", drop, " must be in [0, ", done, ")");
  check_packed(wpack, C, kernel * N);
  const float* bias_p = bias_ptr(bias, N);
  const int64_t ofs = check_out(out, B, N, done - drop, "out");
  static thread_local std::vector<float> xa_buf, contrib_buf, y_buf;
  float* xa = scratch(xa_buf, T * C);
  float* contrib = scratch(contrib_buf, T * kernel * N);
  float* y = scratch(y_buf, (done + ov) * N);
  const int32_t* xoff = reduction_offsets(1, 1, C);
  for (int64_t b = 0; b < B; ++b) {
    write_frames(x, b, xa, alpha);
    gemm(xa, C, xoff, C, T, wpack.data_ptr<float>(), kernel * N, wpack.size(2), nullptr, contrib, kernel * N);
    std::memset(y, 0, sizeof(float) * (done + ov) * N);
    // tap-major, as the ATen path adds them: sample i sums its frames' taps j = i - t*s in increasing j
    for (int64_t j = 0; j < kernel; ++j)
      for (int64_t t = 0; t < T; ++t) {
        float* yi = y + (t * stride + j) * N;
        const float* c = contrib + t * kernel * N + j * N;
        for (int64_t n = 0; n < N; ++n) yi[n] += c[n];
      }
    float* pb = ov ? pending.data_ptr<float>() + b * pending.stride(0) : nullptr;
    for (int64_t i = 0; i < ov; ++i)
      for (int64_t n = 0; n < N; ++n) y[i * N + n] += pb[i * N + n];
    float* ob = out.data_ptr<float>() + b * out.stride(0);
    for (int64_t i = drop; i < done; ++i)
      for (int64_t n = 0; n < N; ++n) ob[(i - drop) * ofs + n] = y[i * N + n] + (bias_p ? bias_p[n] : 0.f);
    if (ov) std::memcpy(pb, y + done * N, sizeof(float) * ov * N);
  }
}

// The vectorised ELU alone (tests measure its error against float64).
at::Tensor elu(const at::Tensor& x, double alpha) { return fc_conv::elu_copy(x, alpha, "fastcodec stream"); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("simd", &fc_conv::simd, "which vector path was compiled: avx512, avx2 or portable");
  m.def("pack_panels", &pack_panels, "pack a (K, N) weight in panels of nw output columns");
  m.def("conv_push", &conv_push, "streaming conv step on a time-major state buffer (float32, CPU)");
  m.def("convtr_push", &convtr_push, "streaming transposed conv step with carried overlap (float32, CPU)");
  m.def("elu", &elu, "vectorised ELU of the streaming steps");
}
