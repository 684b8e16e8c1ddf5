// Fused CPU LSTM (SEANet's: unidirectional, with biases, time-major, any number of layers), offline and
// streaming.
//
// PyTorch's cell: gates = x W_ih^T + b_ih + h W_hh^T + b_hh in the order i, f, g, o;
// c' = sigmoid(f) * c + sigmoid(i) * tanh(g); h' = sigmoid(o) * tanh(c').
//
// Hidden units go in blocks of 16 (one SIMD lane each). `pack` stores each layer's weights as
// [block][k][gate][16], so one pass over a block's K x 64 floats gives all four gates of its 16 units.
// Every gate is summed in one fixed order: b_ih + b_hh, then the x terms, then the h terms, fma'd in
// blocks of KC = 64 terms whose partial sums are added to the total in order (at H = 512 the error is
// then at or below ATen's; one fma chain over all 1024 terms measured up to 2.7x ATen's). Lanes never mix, so a result does not depend on the thread count, on how batch rows are
// grouped, or on how a sequence is split into calls: all of those are bitwise identical.
//
// One OpenMP region per call. Each (layer, step) is a stage of tasks, one per group of unit blocks; at
// the first step of a time chunk a task first computes its blocks' input projections for all rows of the
// chunk (a small GEMM into G), then every task sums its blocks' gates from h_{t-1} and applies the cell
// in registers. A stage starts when the previous one is done (see Schedule). Layers alternate between y
// and one scratch sequence, the last writing y, so a layer never overwrites its own input. h and c
// (L, B, H) are read as the initial state and overwritten with the final one.
//
// Every entry point checks shapes, dtypes, devices, strides and overlaps with TORCH_CHECK before
// touching memory.
#include <torch/extension.h>

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "vf16.h"

namespace {

using namespace fc_vf;  // VF and its operations; L = 16 floats per vector = units per block
constexpr int NG = 4;          // gates per unit
constexpr int BW = NG * L;     // packed floats per block and k
constexpr int RMAX = 6;        // rows per micro-kernel: 24 partial sums + 4 weights + 1 broadcast of 32 registers
constexpr int64_t KC = 64;     // terms per partial sum (blocked summation, see above)
constexpr int64_t kChunkRows = 192;  // input-projection rows per time chunk: G chunk 1.5 MiB at H = 512


// exp(x), Cephes' expf scheme: n = round(x log2 e), r = x - n ln2 (ln2 in two parts), degree-7 polynomial,
// exact scaling by 2^n. Inputs are clamped to [-104, 88.8] first (so n stays in [-150, 129]); results
// below 2^-149 round to 0 and above FLT_MAX become +inf, as exp does; NaN stays NaN.
inline VF vexp(VF x) {
  x = vmax(vset1(-104.0f), vmin(vset1(88.8f), x));
  const VF n = vround(vmul(x, vset1(1.44269504088896341f)));
  VF r = vfma(n, vset1(-0.693359375f), x);
  r = vfma(n, vset1(2.12194440e-4f), r);
  const VF z = vmul(r, r);
  VF p = vset1(1.9875691500e-4f);
  p = vfma(p, r, vset1(1.3981999507e-3f));
  p = vfma(p, r, vset1(8.3334519073e-3f));
  p = vfma(p, r, vset1(4.1665795894e-2f));
  p = vfma(p, r, vset1(1.6666665459e-1f));
  p = vfma(p, r, vset1(5.0000001201e-1f));
  p = vadd(vfma(p, z, r), vset1(1.0f));
  return vscalef(p, n);
}

inline VF vsigmoid(VF x) {
  const VF one = vset1(1.0f);
  return vdiv(one, vadd(one, vexp(vsub(vset1(0.0f), x))));
}

// tanh: Cephes' tanhf on |x| (an odd polynomial below 0.625, else 1 - 2 / (exp(2|x|) + 1)), then x's sign
// (so tanh(-0) = -0 and NaN stays NaN)
inline VF vtanh(VF x) {
  const VF one = vset1(1.0f);
  const VF ax = vabs(x);
  const VF big = vsub(one, vdiv(vset1(2.0f), vadd(vexp(vadd(ax, ax)), one)));
  const VF z = vmul(ax, ax);
  VF p = vset1(-5.70498872745e-3f);
  p = vfma(p, z, vset1(2.06390887954e-2f));
  p = vfma(p, z, vset1(-5.37397155531e-2f));
  p = vfma(p, z, vset1(1.33314422036e-1f));
  p = vfma(p, z, vset1(-3.33332819422e-1f));
  const VF small = vfma(vmul(p, z), ax, ax);
  return vcopysign(vselect_lt(ax, vset1(0.625f), small, big), x);
}

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<float[], AlignedFree>;

Buffer alloc(int64_t n) {
  size_t bytes = ((static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(float) + 63) / 64) * 64;
  void* p = std::aligned_alloc(64, bytes);
  TORCH_CHECK(p != nullptr, "fastcodec lstm_cpu: out of memory allocating ", bytes, " bytes");
  return Buffer(static_cast<float*>(p));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <int N>
using Int = std::integral_constant<int, N>;

// f(Int<r>{}) for r in [1, RMAX]
template <class F>
inline void with_rows(int r, F&& f) {
  switch (r) {
    case 1: f(Int<1>{}); break;
    case 2: f(Int<2>{}); break;
    case 3: f(Int<3>{}); break;
    case 4: f(Int<4>{}); break;
    case 5: f(Int<5>{}); break;
    default: f(Int<6>{}); break;
  }
}

// For R rows a[r] and NU unit blocks w + u * wstride (each K x BW floats, packed [k][gate][16]):
// acc[r][u][g] = init(r, u, g), then acc += a[r][k] * w[u][k][g] for k = 0, 1, ..., K - 1 (fma); then
// epi(r, u, acc[r][u]). The same order for every lane, whatever R and NU.
#if FC_AVX2
// AVX2: 16 ymm registers hold one row x 3 slices of 8 units x 4 gates (12 partial sums, the weights read as
// fma operands) or 2 rows x 1 slice (8 partial sums, 4 weights, 2 broadcasts). The R x NU x 4 x 16 lanes
// are cut into such tiles, each lane summed exactly as below: acc = init, then per KC chunk a partial
// fma chain over k from zero, added to acc. About 4x the portable loops' speed and close to ATen's (both read
// W_hh from memory at every step; measured: bench/results/design-measurements.md).
// acc: the kernel's [R][nslices][NG] sums; this tile adds to rows r0.. of slices s0.. (slice s = unit block
// s / 2, lanes 8 * (s % 2)..).
template <int RS, int SS>
inline __attribute__((always_inline)) void gate_tile_avx2(const float* const* a, int64_t K, const float* w,
                                                          int64_t wstride, int nslices, int r0, int s0,
                                                          __m256* acc) {
  const float* ws[SS];
  for (int s = 0; s < SS; ++s) ws[s] = w + ((s0 + s) / 2) * wstride + ((s0 + s) % 2) * 8;
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t k1 = std::min(K, k0 + KC);
    __m256 part[RS][SS][NG];
#pragma GCC unroll 4
    for (int r = 0; r < RS; ++r)
#pragma GCC unroll 4
      for (int s = 0; s < SS; ++s)
#pragma GCC unroll 4
        for (int g = 0; g < NG; ++g) part[r][s][g] = _mm256_setzero_ps();
    for (int64_t k = k0; k < k1; ++k) {
      __m256 av[RS];
#pragma GCC unroll 4
      for (int r = 0; r < RS; ++r) av[r] = _mm256_broadcast_ss(a[r0 + r] + k);
#pragma GCC unroll 4
      for (int s = 0; s < SS; ++s)
#pragma GCC unroll 4
        for (int g = 0; g < NG; ++g) {
          const __m256 wv = _mm256_loadu_ps(ws[s] + k * BW + g * L);
#pragma GCC unroll 4
          for (int r = 0; r < RS; ++r) part[r][s][g] = _mm256_fmadd_ps(av[r], wv, part[r][s][g]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < RS; ++r)
#pragma GCC unroll 4
      for (int s = 0; s < SS; ++s)
#pragma GCC unroll 4
        for (int g = 0; g < NG; ++g) {
          __m256* p = acc + ((r0 + r) * nslices + s0 + s) * NG + g;
          *p = _mm256_add_ps(*p, part[r][s][g]);
        }
  }
}
#endif

template <int R, int NU, class Init, class Epi>
inline __attribute__((always_inline)) void gate_kernel(const float* const* a, int64_t K, const float* w,
                                                       int64_t wstride, Init&& init, Epi&& epi) {
#if FC_AVX2
  constexpr int S = 2 * NU;  // 8-unit slices
  alignas(32) __m256 acc[R][S][NG];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < NU; ++u)
      for (int g = 0; g < NG; ++g) {
        const VF v = init(r, u, g);
        acc[r][2 * u][g] = v.lo;
        acc[r][2 * u + 1][g] = v.hi;
      }
  __m256* ap = &acc[0][0][0];
  if constexpr (R == 1) {
    int s0 = 0;
    for (; s0 + 3 <= S; s0 += 3) gate_tile_avx2<1, 3>(a, K, w, wstride, S, 0, s0, ap);
    if (S - s0 == 2) gate_tile_avx2<1, 2>(a, K, w, wstride, S, 0, s0, ap);
    if (S - s0 == 1) gate_tile_avx2<1, 1>(a, K, w, wstride, S, 0, s0, ap);
  } else {
    for (int s = 0; s < S; ++s) {
      int r0 = 0;
      for (; r0 + 2 <= R; r0 += 2) gate_tile_avx2<2, 1>(a, K, w, wstride, S, r0, s, ap);
      if (r0 < R) gate_tile_avx2<1, 1>(a, K, w, wstride, S, r0, s, ap);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < NU; ++u) {
      VF v[NG];
      for (int g = 0; g < NG; ++g) v[g] = {acc[r][2 * u][g], acc[r][2 * u + 1][g]};
      epi(r, u, v);
    }
#else
  VF acc[R][NU][NG], part[R][NU][NG];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int u = 0; u < NU; ++u)
#pragma GCC unroll 4
      for (int g = 0; g < NG; ++g) acc[r][u][g] = init(r, u, g);
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t k1 = std::min(K, k0 + KC);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int u = 0; u < NU; ++u)
#pragma GCC unroll 4
        for (int g = 0; g < NG; ++g) part[r][u][g] = vset1(0.0f);
    for (int64_t k = k0; k < k1; ++k) {
      VF wv[NU][NG];
#pragma GCC unroll 4
      for (int u = 0; u < NU; ++u)
#pragma GCC unroll 4
        for (int g = 0; g < NG; ++g) wv[u][g] = vload(w + u * wstride + k * BW + g * L);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const VF av = vset1(a[r][k]);
#pragma GCC unroll 4
        for (int u = 0; u < NU; ++u)
#pragma GCC unroll 4
          for (int g = 0; g < NG; ++g) part[r][u][g] = vfma(av, wv[u][g], part[r][u][g]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int u = 0; u < NU; ++u)
#pragma GCC unroll 4
        for (int g = 0; g < NG; ++g) acc[r][u][g] = vadd(acc[r][u][g], part[r][u][g]);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int u = 0; u < NU; ++u) epi(r, u, acc[r][u]);
#endif
}

// n rows in ceil(n / RMAX) groups of balanced sizes: group i starts at start(i) and has size(i) rows
struct RowGroups {
  int64_t n, count, base, extra;
  explicit RowGroups(int64_t rows) : n(rows), count(ceil_div(rows, RMAX)), base(rows / count), extra(rows % count) {}
  int64_t start(int64_t i) const { return i * base + std::min(i, extra); }
  int size(int64_t i) const { return static_cast<int>(base + (i < extra ? 1 : 0)); }
  int max_size() const { return static_cast<int>(base + (extra ? 1 : 0)); }
};

// Blocks per micro-kernel for groups of at most `rows` rows: at 1 or 2 rows the kernel reads weights
// faster than it multiplies, so several blocks keep enough independent fma chains in flight.
inline int blocks_per_kernel(int rows) { return rows == 1 ? 4 : rows == 2 ? 2 : 1; }

// Calls f(j, nu) over blocks [j0, j1) in runs of nu <= group blocks
template <class F>
inline void for_blocks(int64_t j0, int64_t j1, int group, F&& f) {
  for (int64_t j = j0; j < j1; j += group) f(j, static_cast<int>(std::min<int64_t>(group, j1 - j)));
}

// gate_kernel<R, nu> for a runtime nu in [1, 4]
template <int R, class Init, class Epi>
inline void gate_kernel_nu(int nu, const float* const* a, int64_t K, const float* w, int64_t wstride, Init&& init,
                           Epi&& epi) {
  switch (nu) {
    case 4: if constexpr (R == 1) { gate_kernel<R, 4>(a, K, w, wstride, init, epi); break; } [[fallthrough]];
    case 3: if constexpr (R == 1) { gate_kernel<R, 3>(a, K, w, wstride, init, epi); break; } [[fallthrough]];
    case 2: if constexpr (R <= 2) { gate_kernel<R, 2>(a, K, w, wstride, init, epi); break; } [[fallthrough]];
    default: gate_kernel<R, 1>(a, K, w, wstride, init, epi);
  }
}

struct Layer {
  const float* wih;   // [nb][I][BW]
  const float* whh;   // [nb][H][BW]
  const float* bias;  // [nb][BW] = b_ih + b_hh
  int64_t I;
};

struct Problem {
  int64_t T, B, H, nb, Tc;
  const float* x;        // layer 0's input rows: x + t * xs_t + b * xs_b
  int64_t xs_t, xs_b;
  float* y;              // (T, B, H) contiguous: the last layer's output
  float* scratch;        // (T, B, H): the output of the layers l with L - 1 - l odd
  float* G;              // (Tc * B, nb, BW): a chunk's input projections, [row][block][gate][16]
  float* cwork;          // (B, nb * 16): c between steps
  float* hlast;          // (L, B, H): each layer's last h, copied into h after the parallel region
  const float* h;        // h[l][b][k] at h + l * hs_l + b * hs_b + k: read only inside the region
  float* c;              // read at step 0 and written at the last step, by the task owning the unit
  int64_t hs_l, hs_b, cs_l, cs_b;
  std::vector<Layer> layers;
  float* out(size_t l) const { return (layers.size() - 1 - l) % 2 == 0 ? y : scratch; }
};

// Step s = l * T + t is a stage of `ntask` tasks (groups of unit blocks); a task of stage s may start once
// every task of stage s - 1 is done (`done` counts finished tasks). Task lists are split among the
// threads for cache affinity, and a thread that runs out takes tasks from the others' lists: on a
// shared machine a thread whose core is taken does not hold up each step, as a barrier would.
struct alignas(64) Counter {
  std::atomic<int64_t> v{0};
};

struct Schedule {
  int64_t ntask = 0;
  Counter done;
  std::unique_ptr<Counter[]> next;  // per owner: tasks of its list claimed so far, over all stages
};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

inline void wait_for(const std::atomic<int64_t>& v, int64_t target) {
  for (int spins = 0; v.load(std::memory_order_acquire) < target; ++spins) {
    if (spins < 4000) cpu_relax();
    else std::this_thread::yield();  // the thread we wait for may be waiting for this core
  }
}

// Claims the next task of `stage` from owner list counter c of n tasks per stage; -1 when none is left.
inline int64_t claim(std::atomic<int64_t>& c, int64_t stage, int64_t n) {
  const int64_t end = (stage + 1) * n;
  int64_t v = c.load(std::memory_order_relaxed);
  while (v < end && !c.compare_exchange_weak(v, v + 1, std::memory_order_relaxed)) {
  }
  return v < end ? v - stage * n : -1;
}

// Layer l, step t for unit blocks [ja, jb): at the first step of a time chunk, first the chunk's input
// projection for these blocks; then the gates from h_{t-1} and the cell.
void step_task(const Problem& p, size_t l, int64_t t, int64_t ja, int64_t jb, int step_group) {
  const Layer& ly = p.layers[l];
  const int64_t T = p.T, B = p.B, H = p.H, Hp = p.nb * L, gstride = p.nb * BW;
  const int64_t t0 = t - t % p.Tc;
  const float* a[RMAX];
  if (t == t0) {
    const int64_t n0 = t0 * B;
    const float* xin = l == 0 ? nullptr : p.out(l - 1);
    const RowGroups groups((std::min(T, t0 + p.Tc) - t0) * B);
    for_blocks(ja, jb, blocks_per_kernel(groups.max_size()), [&](int64_t j, int nu) {
      const float* w = ly.wih + j * ly.I * BW;
      for (int64_t gi = 0; gi < groups.count; ++gi) {
        const int64_t r0 = groups.start(gi);
        const int R = groups.size(gi);
        for (int r = 0; r < R; ++r) {
          const int64_t n = n0 + r0 + r;
          a[r] = l == 0 ? p.x + (n / B) * p.xs_t + (n % B) * p.xs_b : xin + n * H;
        }
        auto init = [&](int, int u, int g) { return vload(ly.bias + (j + u) * BW + g * L); };
        auto epi = [&](int r, int u, VF* acc) {
          float* dst = p.G + (r0 + r) * gstride + (j + u) * BW;
          for (int g = 0; g < NG; ++g) vstore(dst + g * L, acc[g]);
        };
        with_rows(R, [&](auto RC) { gate_kernel_nu<decltype(RC)::value>(nu, a, ly.I, w, ly.I * BW, init, epi); });
      }
    });
  }
  const RowGroups bgroups(B);
  float* y = p.out(l) + t * B * H;
  const float* h0 = p.h + static_cast<int64_t>(l) * p.hs_l;
  float* c0 = p.c + static_cast<int64_t>(l) * p.cs_l;
  float* hl = p.hlast + static_cast<int64_t>(l) * B * H;
  for_blocks(ja, jb, step_group, [&](int64_t j, int nu) {
    const float* w = ly.whh + j * H * BW;
    for (int64_t gi = 0; gi < bgroups.count; ++gi) {
      const int64_t b0 = bgroups.start(gi);
      const int R = bgroups.size(gi);
      for (int r = 0; r < R; ++r) a[r] = t == 0 ? h0 + (b0 + r) * p.hs_b : y - B * H + (b0 + r) * H;
      const float* grow = p.G + ((t - t0) * B + b0) * gstride + j * BW;
      auto init = [&](int r, int u, int g) { return vload(grow + r * gstride + u * BW + g * L); };
      auto epi = [&](int r, int u, VF* acc) {
        const int64_t b = b0 + r, col = (j + u) * L;
        const int n = static_cast<int>(std::min<int64_t>(L, H - col));
        float* cw = p.cwork + b * Hp + col;
        const VF c_prev = t == 0 ? vload_n(c0 + b * p.cs_b + col, n) : vload(cw);
        const VF ig = vsigmoid(acc[0]), fg = vsigmoid(acc[1]), gg = vtanh(acc[2]), og = vsigmoid(acc[3]);
        const VF cn = vadd(vmul(fg, c_prev), vmul(ig, gg));
        const VF hn = vmul(og, vtanh(cn));
        vstore_n(y + b * H + col, hn, n);
        if (t == T - 1) {
          vstore_n(c0 + b * p.cs_b + col, cn, n);
          vstore_n(hl + b * H + col, hn, n);
        } else {
          vstore(cw, cn);
        }
      };
      with_rows(R, [&](auto RC) { gate_kernel_nu<decltype(RC)::value>(nu, a, H, w, H * BW, init, epi); });
    }
  });
}

// The whole multi-layer sequence on the calling OpenMP team (see the file comment and Schedule).
void run(const Problem& p, Schedule& sc, int step_group) {
  const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
  const int64_t nt = sc.ntask, T = p.T;
  int64_t stage = 0;
  for (size_t l = 0; l < p.layers.size(); ++l)
    for (int64_t t = 0; t < T; ++t, ++stage) {
      wait_for(sc.done.v, stage * nt);
      for (int v = 0; v < nth; ++v) {
        const int r = (tid + v) % nth;
        const int64_t lo = nt * r / nth, n = nt * (r + 1) / nth - lo;
        for (int64_t k; n > 0 && (k = claim(sc.next[r].v, stage, n)) >= 0;) {
          const int64_t ja = (lo + k) * step_group;
          step_task(p, l, t, ja, std::min(p.nb, ja + step_group), step_group);
          sc.done.v.fetch_add(1, std::memory_order_release);
        }
      }
    }
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

// Packs one layer list (nn.LSTM._flat_weights order: w_ih, w_hh, b_ih, b_hh per layer) into
// [w_ih_packed (nb, I, 64), w_hh_packed (nb, H, 64), bias (nb, 64)] per layer, nb = ceil(H / 16),
// units past H zero.
std::vector<at::Tensor> pack(const std::vector<at::Tensor>& weights, int64_t num_layers) {
  TORCH_CHECK_VALUE(num_layers >= 1, "num_layers must be >= 1, got ", num_layers);
  TORCH_CHECK_VALUE(static_cast<int64_t>(weights.size()) == 4 * num_layers, "expected 4 tensors per layer (w_ih, w_hh, b_ih, b_hh) = ",
                    4 * num_layers, ", got ", weights.size());
  for (size_t i = 0; i < weights.size(); ++i) check_float(weights[i], "LSTM weight");
  TORCH_CHECK_VALUE(weights[1].dim() == 2 && weights[1].size(0) > 0 && weights[1].size(0) == 4 * weights[1].size(1),
                    "w_hh_l0 must be (4 * hidden, hidden) with hidden >= 1, got ", weights[1].sizes());
  const int64_t H = weights[1].size(1), nb = ceil_div(H, L);
  std::vector<at::Tensor> out;
  for (int64_t l = 0; l < num_layers; ++l) {
    const at::Tensor w_ih = weights[4 * l].contiguous(), w_hh = weights[4 * l + 1].contiguous();
    const at::Tensor b_ih = weights[4 * l + 2].contiguous(), b_hh = weights[4 * l + 3].contiguous();
    TORCH_CHECK_VALUE(w_ih.dim() == 2 && w_ih.size(0) == 4 * H && w_ih.size(1) > 0 && (l == 0 || w_ih.size(1) == H),
                      "w_ih_l", l, " must be (", 4 * H, ", ", l == 0 ? std::string("input_size") : std::to_string(H),
                      "), got ", w_ih.sizes());
    TORCH_CHECK_VALUE(w_hh.dim() == 2 && w_hh.size(0) == 4 * H && w_hh.size(1) == H, "w_hh_l", l, " must be (", 4 * H,
                      ", ", H, "), got ", w_hh.sizes());
    TORCH_CHECK_VALUE(b_ih.dim() == 1 && b_ih.size(0) == 4 * H, "b_ih_l", l, " must be (", 4 * H, ",), got ", b_ih.sizes());
    TORCH_CHECK_VALUE(b_hh.dim() == 1 && b_hh.size(0) == 4 * H, "b_hh_l", l, " must be (", 4 * H, ",), got ", b_hh.sizes());
    const int64_t I = w_ih.size(1);
    at::Tensor pih = at::zeros({nb, I, BW}, w_ih.options());
    at::Tensor phh = at::zeros({nb, H, BW}, w_ih.options());
    at::Tensor pb = at::zeros({nb, BW}, w_ih.options());
    const float *wi = w_ih.data_ptr<float>(), *wh = w_hh.data_ptr<float>();
    const float *bi = b_ih.data_ptr<float>(), *bh = b_hh.data_ptr<float>();
    float *di = pih.data_ptr<float>(), *dh = phh.data_ptr<float>(), *db = pb.data_ptr<float>();
    at::parallel_for(0, nb, 1, [&](int64_t jb, int64_t je) {
      for (int64_t j = jb; j < je; ++j)
        for (int g = 0; g < NG; ++g)
          for (int lane = 0; lane < L && j * L + lane < H; ++lane) {
            const int64_t row = g * H + j * L + lane, col = g * L + lane;
            for (int64_t k = 0; k < I; ++k) di[(j * I + k) * BW + col] = wi[row * I + k];
            for (int64_t k = 0; k < H; ++k) dh[(j * H + k) * BW + col] = wh[row * H + k];
            db[j * BW + col] = bi[row] + bh[row];
          }
    });
    out.push_back(pih);
    out.push_back(phh);
    out.push_back(pb);
  }
  return out;
}

void check_state(const at::Tensor& t, const char* name, int64_t layers, int64_t B) {
  check_float(t, name);
  TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == layers && t.size(1) == B && t.size(2) >= 1, name,
                    " must be (num_layers=", layers, ", batch=", B, ", hidden), got ", t.sizes());
  TORCH_CHECK_VALUE(t.stride(2) == 1 || t.size(2) == 1, name, " must have unit stride along hidden, got strides ",
                    t.strides());
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
                    " has elements that share memory (expanded?); it is written in place");
}

// [first, last] byte addresses a tensor can touch
std::pair<uintptr_t, uintptr_t> span(const at::Tensor& t) {
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  int64_t lo = 0, hi = 0;
  for (int64_t d = 0; d < t.dim(); ++d) (t.stride(d) < 0 ? lo : hi) += (t.size(d) - 1) * t.stride(d);
  return {p + lo * static_cast<int64_t>(t.element_size()), p + (hi + 1) * static_cast<int64_t>(t.element_size()) - 1};
}

// a written tensor must not share memory with anything else the call reads or writes
void check_apart(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  const auto sa = span(a), sb = span(b);
  TORCH_CHECK_VALUE(sa.second < sb.first || sb.second < sa.first, an, " and ", bn,
                    " share memory; the LSTM writes ", an, " while it reads ", bn);
}

// y (T, B, H) = the LSTM over x (T, B, I) from the state (h, c) (L, B, H), which is overwritten with the
// final state. Writes into out when given (T, B, H contiguous), else into a new tensor.
at::Tensor forward(const at::Tensor& x, const std::vector<at::Tensor>& packed, const at::Tensor& h,
                   const at::Tensor& c, const c10::optional<at::Tensor>& out) {
  check_float(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 3, "x must be (time, batch, input_size), got ", x.sizes());
  TORCH_CHECK_VALUE(x.size(0) > 0 && x.size(1) > 0 && x.size(2) > 0, "x must be non-empty, got ", x.sizes());
  TORCH_CHECK_VALUE(x.stride(2) == 1 || x.size(2) == 1, "x must have unit stride along input_size, got strides ",
                    x.strides());
  TORCH_CHECK_VALUE(!packed.empty() && packed.size() % 3 == 0, "packed weights must come from pack() (3 tensors per layer), got ",
                    packed.size(), " tensors");
  const int64_t T = x.size(0), B = x.size(1), nl = static_cast<int64_t>(packed.size() / 3);
  check_state(h, "h", nl, B);
  check_state(c, "c", nl, B);
  const int64_t H = h.size(2), nb = ceil_div(H, L);
  TORCH_CHECK_VALUE(c.size(2) == H, "c must have hidden size ", H, " like h, got ", c.sizes());
  Problem p;
  for (int64_t l = 0; l < nl; ++l) {
    const at::Tensor &wih = packed[3 * l], &whh = packed[3 * l + 1], &bias = packed[3 * l + 2];
    for (const at::Tensor* t : {&wih, &whh, &bias}) {
      check_float(*t, "packed weight");
      TORCH_CHECK_VALUE(t->is_contiguous(), "packed weights must be contiguous (as pack() returns them)");
    }
    const int64_t I = l == 0 ? x.size(2) : H;
    TORCH_CHECK_VALUE(wih.dim() == 3 && wih.size(0) == nb && wih.size(1) == I && wih.size(2) == BW, "layer ", l,
                      ": packed w_ih must be (", nb, ", ", I, ", ", BW, ") for input size ", I, " and hidden size ", H,
                      ", got ", wih.sizes());
    TORCH_CHECK_VALUE(whh.dim() == 3 && whh.size(0) == nb && whh.size(1) == H && whh.size(2) == BW, "layer ", l,
                      ": packed w_hh must be (", nb, ", ", H, ", ", BW, ") for hidden size ", H, ", got ", whh.sizes());
    TORCH_CHECK_VALUE(bias.dim() == 2 && bias.size(0) == nb && bias.size(1) == BW, "layer ", l, ": packed bias must be (",
                      nb, ", ", BW, "), got ", bias.sizes());
    p.layers.push_back({wih.data_ptr<float>(), whh.data_ptr<float>(), bias.data_ptr<float>(), I});
  }
  at::Tensor y;
  if (out.has_value()) {
    y = *out;
    check_float(y, "out");
    TORCH_CHECK_VALUE(y.dim() == 3 && y.size(0) == T && y.size(1) == B && y.size(2) == H, "out must be (", T, ", ", B,
                      ", ", H, "), got ", y.sizes());
    TORCH_CHECK_VALUE(y.is_contiguous(), "out must be contiguous");
  } else {
    y = at::empty({T, B, H}, x.options());
  }
  check_apart(y, "out", x, "x");
  check_apart(h, "h", c, "c");
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&h, "h"}, {&c, "c"}}) {
    check_apart(*t, name, x, "x");
    check_apart(*t, name, y, "out");
  }
  for (const at::Tensor& w : packed) {
    check_apart(y, "out", w, "the packed weights");
    check_apart(h, "h", w, "the packed weights");
    check_apart(c, "c", w, "the packed weights");
  }
  p.T = T; p.B = B; p.H = H; p.nb = nb;
  p.x = x.data_ptr<float>(); p.xs_t = x.stride(0); p.xs_b = x.stride(1);
  p.y = y.data_ptr<float>();
  p.h = h.data_ptr<float>(); p.hs_l = h.stride(0); p.hs_b = h.stride(1);
  p.c = c.data_ptr<float>(); p.cs_l = c.stride(0); p.cs_b = c.stride(1);
  p.Tc = std::min(T, std::max<int64_t>(1, kChunkRows / B));
  Buffer G = alloc(p.Tc * B * nb * BW), scratch = alloc(nl > 1 ? T * B * H : 0), cwork = alloc(B * nb * L);
  Buffer hlast = alloc(nl * B * H);
  p.G = G.get(); p.scratch = scratch.get(); p.cwork = cwork.get(); p.hlast = hlast.get();
  const int step_group = blocks_per_kernel(RowGroups(B).max_size());
  const int nt = std::max(1, at::get_num_threads());
  Schedule sc;
  sc.ntask = ceil_div(nb, step_group);
  sc.next.reset(new Counter[nt]);
#pragma omp parallel num_threads(nt)
  run(p, sc, step_group);
  float* hp = h.data_ptr<float>();
  for (int64_t l = 0; l < nl; ++l)
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(hp + l * p.hs_l + b * p.hs_b, p.hlast + (l * B + b) * H, sizeof(float) * H);
  return y;
}

// (sigmoid(x), tanh(x)) with the kernel's vector math, for accuracy tests
std::vector<at::Tensor> pointwise(const at::Tensor& x) {
  check_float(x, "x");
  const at::Tensor xc = x.contiguous();
  at::Tensor s = at::empty_like(xc), t = at::empty_like(xc);
  const int64_t n = xc.numel();
  const float* px = xc.data_ptr<float>();
  float *ps = s.data_ptr<float>(), *pt = t.data_ptr<float>();
  for (int64_t i = 0; i < n; i += L) {
    const int m = static_cast<int>(std::min<int64_t>(L, n - i));
    const VF v = vload_n(px + i, m);
    vstore_n(ps + i, vsigmoid(v), m);
    vstore_n(pt + i, vtanh(v), m);
  }
  return {s, t};
}

std::string simd() { return FC_SIMD_NAME; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcodec fused CPU LSTM";
  m.def("pack", &pack, "per layer [w_ih (nb, I, 64), w_hh (nb, H, 64), bias (nb, 64)] from nn.LSTM._flat_weights",
        py::arg("weights"), py::arg("num_layers"));
  m.def("forward", &forward, "y (T, B, H) = LSTM(x (T, B, I)); h, c (L, B, H) updated in place to the final state",
        py::arg("x"), py::arg("packed"), py::arg("h"), py::arg("c"), py::arg("out") = py::none());
  m.def("pointwise", &pointwise, "(sigmoid(x), tanh(x)) as the kernel computes them", py::arg("x"));
  m.def("simd", &simd, "which vector path was compiled: avx512, avx2 or portable");
}
