// CUDA version of the fused dilated conv1d (formula in conv1d_params.h): padding (constant/reflect,
// audiocraft's short-input rule), input ELU, bias and residual add in one kernel.
//
// No torch headers: the launcher is extern "C" on a FcConv1dParams (raw pointers, int64 sizes and
// strides) and a cudaStream_t, so plain nvcc builds it (CI compile-checks sm_80 and sm_90 without a
// GPU) and fastcodec/ops/conv.py calls it through ctypes.
//
// Tiled kernel: a block computes kCoTile output channels x kTimeTile frames; per chunk of input
// channels it stages the padded, activated input span and the weights in shared memory, then each
// thread accumulates one frame for kCoTile channels in registers. Each chunk's sum over
// r = ci*kernel + k starts from zero and is then added to the total (which starts at the bias): chunked
// sums keep the float32 error near cuDNN's, as on the CPU. Shapes whose span does not fit
// in shared memory use a direct kernel (one thread per output) that reads global memory.
#include <cuda_runtime.h>
#include <stdint.h>

#include "conv1d_params.h"

namespace {

constexpr int kTimeTile = 128;              // frames per block = threads per block
constexpr int kCoTile = 16;                 // output channels per block (registers per thread)
constexpr int kMaxCiChunk = 32;
constexpr int64_t kSmemBytes = 40 * 1024;   // below the 48 KiB a kernel gets without opting in
constexpr int64_t kMaxGridY = 65535, kMaxGridZ = 65535;

__device__ __forceinline__ float fc_act(float v, const FcConv1dParams& p) {
  return (p.has_elu && v <= 0.f) ? p.elu_alpha * expm1f(v) : v;
}

// Activated padded input P[b, ci, i] (0 for padding and past the padded end).
__device__ __forceinline__ float fc_load_padded(const FcConv1dParams& p, const float* xc, int64_t i) {
  if (i >= p.pad_left + p.t_in + p.pad_right) return 0.f;
  const int64_t src = fc_source_index(i, p.pad_left, p.t_in, p.reflect_len, p.pad_mode);
  return src >= 0 ? fc_act(xc[src * p.x_stride_t], p) : 0.f;
}

__global__ void __launch_bounds__(kTimeTile)
conv1d_tiled_kernel(FcConv1dParams p, int ci_chunk, int64_t b0, int64_t co_blk0) {
  extern __shared__ float smem[];
  const int64_t span = (int64_t)(kTimeTile - 1) * p.stride + (p.kernel - 1) * p.dilation + 1;
  float* xs = smem;                          // [ci_chunk][span]
  float* ws = smem + (int64_t)ci_chunk * span;  // [kCoTile][ci_chunk * kernel]
  const int64_t b = b0 + blockIdx.z;
  const int64_t co0 = (co_blk0 + blockIdx.y) * kCoTile;
  const int64_t t0 = (int64_t)blockIdx.x * kTimeTile;
  const int64_t t = t0 + threadIdx.x;
  const int64_t i0 = t0 * p.stride;
  const int64_t nred_chunk_max = (int64_t)ci_chunk * p.kernel;

  float acc[kCoTile];
#pragma unroll
  for (int m = 0; m < kCoTile; ++m) acc[m] = (p.bias && co0 + m < p.c_out) ? p.bias[co0 + m] : 0.f;

  for (int64_t ci0 = 0; ci0 < p.c_in; ci0 += ci_chunk) {
    const int64_t nci = (p.c_in - ci0) < ci_chunk ? (p.c_in - ci0) : ci_chunk;
    for (int64_t e = threadIdx.x; e < nci * span; e += blockDim.x) {
      const int64_t c = e / span, q = e - c * span;
      const float* xc = p.x + b * p.x_stride_b + (ci0 + c) * p.x_stride_c;
      xs[e] = fc_load_padded(p, xc, i0 + q);
    }
    const int64_t nred = nci * p.kernel;
    for (int64_t e = threadIdx.x; e < (int64_t)kCoTile * nred; e += blockDim.x) {
      const int64_t m = e / nred, r = e - m * nred;
      const int64_t co = co0 + m;
      ws[m * nred_chunk_max + r] = co < p.c_out ? p.weight[(co * p.c_in + ci0) * p.kernel + r] : 0.f;
    }
    __syncthreads();
    const float* xt = xs + threadIdx.x * p.stride;
    float part[kCoTile];
#pragma unroll
    for (int m = 0; m < kCoTile; ++m) part[m] = 0.f;
    for (int64_t c = 0; c < nci; ++c) {
      for (int64_t k = 0; k < p.kernel; ++k) {
        const float v = xt[c * span + k * p.dilation];
        const int64_t r = c * p.kernel + k;
#pragma unroll
        for (int m = 0; m < kCoTile; ++m) part[m] = fmaf(ws[m * nred_chunk_max + r], v, part[m]);
      }
    }
#pragma unroll
    for (int m = 0; m < kCoTile; ++m) acc[m] += part[m];
    __syncthreads();
  }
  if (t >= p.t_out) return;
#pragma unroll
  for (int m = 0; m < kCoTile; ++m) {
    const int64_t co = co0 + m;
    if (co >= p.c_out) break;
    float y = acc[m];
    if (p.skip) y += p.skip[b * p.skip_stride_b + co * p.skip_stride_c + t * p.skip_stride_t];
    p.out[b * p.out_stride_b + co * p.out_stride_c + t] = y;
  }
}

__global__ void conv1d_direct_kernel(FcConv1dParams p, int64_t first, int64_t count) {
  const int64_t idx = first + (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= first + count) return;
  const int64_t t = idx % p.t_out;
  const int64_t co = (idx / p.t_out) % p.c_out;
  const int64_t b = idx / (p.t_out * p.c_out);
  float acc = p.bias ? p.bias[co] : 0.f;
  for (int64_t ci = 0; ci < p.c_in; ++ci) {
    const float* xc = p.x + b * p.x_stride_b + ci * p.x_stride_c;
    const float* w = p.weight + (co * p.c_in + ci) * p.kernel;
    for (int64_t k = 0; k < p.kernel; ++k)
      acc = fmaf(w[k], fc_load_padded(p, xc, t * p.stride + k * p.dilation), acc);
  }
  if (p.skip) acc += p.skip[b * p.skip_stride_b + co * p.skip_stride_c + t * p.skip_stride_t];
  p.out[b * p.out_stride_b + co * p.out_stride_c + t] = acc;
}

cudaError_t launch(const FcConv1dParams& p, cudaStream_t stream) {
  const int64_t span = (int64_t)(kTimeTile - 1) * p.stride + (p.kernel - 1) * p.dilation + 1;
  const int64_t per_ci = (span + (int64_t)kCoTile * p.kernel) * (int64_t)sizeof(float);
  int64_t ci_chunk = kSmemBytes / per_ci;
  if (ci_chunk > kMaxCiChunk) ci_chunk = kMaxCiChunk;
  if (ci_chunk > p.c_in) ci_chunk = p.c_in;
  if (ci_chunk >= 1) {
    const size_t smem = (size_t)(ci_chunk * per_ci);
    const int64_t n_t = (p.t_out + kTimeTile - 1) / kTimeTile;
    const int64_t n_co = (p.c_out + kCoTile - 1) / kCoTile;
    if (n_t > 0x7fffffff) return cudaErrorInvalidValue;
    for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridZ) {
      const int64_t nb = (p.batch - b0) < kMaxGridZ ? (p.batch - b0) : kMaxGridZ;
      for (int64_t c0 = 0; c0 < n_co; c0 += kMaxGridY) {
        const int64_t nc = (n_co - c0) < kMaxGridY ? (n_co - c0) : kMaxGridY;
        dim3 grid((unsigned)n_t, (unsigned)nc, (unsigned)nb);
        conv1d_tiled_kernel<<<grid, kTimeTile, smem, stream>>>(p, (int)ci_chunk, b0, c0);
        cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
      }
    }
    return cudaSuccess;
  }
  const int64_t total = p.batch * p.c_out * p.t_out;
  const int threads = 256;
  const int64_t per_launch = (int64_t)0x7fffffff * threads;
  for (int64_t first = 0; first < total; first += per_launch) {
    const int64_t count = (total - first) < per_launch ? (total - first) : per_launch;
    conv1d_direct_kernel<<<(unsigned)((count + threads - 1) / threads), threads, 0, stream>>>(p, first, count);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

extern "C" {

// sizeof(FcConv1dParams), so the ctypes mirror can verify its layout.
int64_t fastcodec_conv1d_params_size(void) { return (int64_t)sizeof(FcConv1dParams); }

const char* fastcodec_cuda_error_string(int err) { return cudaGetErrorString((cudaError_t)err); }

// Launch on `stream` of device `device`; returns a cudaError_t (0 on success). The arguments were
// validated in Python; this re-checks what would make a kernel read or write out of bounds.
int fastcodec_conv1d_cuda(const FcConv1dParams* p, int device, cudaStream_t stream) {
  if (!p || !p->x || !p->weight || !p->out) return (int)cudaErrorInvalidValue;
  if (p->batch <= 0 || p->c_in <= 0 || p->c_out <= 0 || p->t_in <= 0 || p->t_out <= 0 || p->kernel <= 0 ||
      p->stride <= 0 || p->dilation <= 0 || p->pad_left < 0 || p->pad_right < 0)
    return (int)cudaErrorInvalidValue;
  if (p->pad_mode != FC_PAD_CONSTANT && p->pad_mode != FC_PAD_REFLECT) return (int)cudaErrorInvalidValue;
  if (p->pad_mode == FC_PAD_REFLECT && p->reflect_len != fc_reflect_len(p->t_in, p->pad_left, p->pad_right))
    return (int)cudaErrorInvalidValue;
  const int64_t span = (p->kernel - 1) * p->dilation + 1;
  const int64_t padded = p->pad_left + p->t_in + p->pad_right;
  if (span > padded || p->t_out != (padded - span) / p->stride + 1) return (int)cudaErrorInvalidValue;
  int prev = -1;
  cudaError_t err = cudaGetDevice(&prev);
  if (err != cudaSuccess) return (int)err;
  if (prev != device && (err = cudaSetDevice(device)) != cudaSuccess) return (int)err;
  err = launch(*p, stream);
  if (prev != device) cudaSetDevice(prev);
  return (int)err;
}

}  // extern "C"
