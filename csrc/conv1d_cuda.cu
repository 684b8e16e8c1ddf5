// CUDA version of the fused dilated conv1d (formula in conv1d_params.h): padding (constant/reflect/replicate,
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
//
// The kernels' bodies live in conv1d_cuda_body.cuh as __host__ __device__ functions, one per phase
// between __syncthreads, so csrc/conv1d_cuda_host.cpp runs the same code block by block on the CPU.
#include <cuda_runtime.h>
#include <stdint.h>

#include "conv1d_cuda_body.cuh"
#include "conv1d_params.h"

namespace {

using namespace fc_cuda;

__global__ void __launch_bounds__(kTimeTile)
conv1d_tiled_kernel(FcConv1dParams p, int ci_chunk, int64_t b0, int64_t co_blk0) {
  extern __shared__ float smem[];
  const int64_t b = b0 + blockIdx.z;
  const int64_t co0 = (co_blk0 + blockIdx.y) * kCoTile;
  const int64_t t0 = (int64_t)blockIdx.x * kTimeTile;
  float acc[kCoTile];
  tiled_init(p, co0, acc);
  for (int64_t ci0 = 0; ci0 < p.c_in; ci0 += ci_chunk) {
    tiled_stage(p, ci_chunk, b, co0, t0, ci0, (int)threadIdx.x, (int)blockDim.x, smem);
    __syncthreads();
    tiled_accumulate(p, ci_chunk, ci0, (int)threadIdx.x, smem, acc);
    __syncthreads();
  }
  tiled_store(p, b, co0, t0 + threadIdx.x, acc);
}

__global__ void conv1d_direct_kernel(FcConv1dParams p, int64_t first, int64_t count) {
  const int64_t idx = first + (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx < first + count) direct_output(p, idx);
}

cudaError_t launch(const FcConv1dParams& p, cudaStream_t stream) {
  const int64_t ci_chunk = tiled_ci_chunk(p);
  if (ci_chunk >= 1) {
    const size_t smem = tiled_smem_bytes(p, ci_chunk);
    const int err = for_each_tiled_launch(p, kMaxGridY, kMaxGridZ,
        [&](int64_t n_t, int64_t nc, int64_t nb, int64_t b0, int64_t c0) -> int {
          dim3 grid((unsigned)n_t, (unsigned)nc, (unsigned)nb);
          conv1d_tiled_kernel<<<grid, kTimeTile, smem, stream>>>(p, (int)ci_chunk, b0, c0);
          return (int)cudaGetLastError();
        });
    return (cudaError_t)err;
  }
  const int err = for_each_direct_launch(p, (int64_t)0x7fffffff * kDirectThreads,
      [&](int64_t blocks, int64_t first, int64_t count) -> int {
        conv1d_direct_kernel<<<(unsigned)blocks, kDirectThreads, 0, stream>>>(p, first, count);
        return (int)cudaGetLastError();
      });
  return (cudaError_t)err;
}

}  // namespace

extern "C" {

// sizeof(FcConv1dParams), so the ctypes mirror can verify its layout.
int64_t fastcodec_conv1d_params_size(void) { return (int64_t)sizeof(FcConv1dParams); }

const char* fastcodec_cuda_error_string(int err) { return cudaGetErrorString((cudaError_t)err); }

// Launch on `stream` of device `device`; returns a cudaError_t (0 on success). The arguments were
// validated in Python; this re-checks what would make a kernel read or write out of bounds.
int fastcodec_conv1d_cuda(const FcConv1dParams* p, int device, cudaStream_t stream) {
  if (!params_valid(p)) return (int)cudaErrorInvalidValue;
  int prev = -1;
  cudaError_t err = cudaGetDevice(&prev);
  if (err != cudaSuccess) return (int)err;
  if (prev != device && (err = cudaSetDevice(device)) != cudaSuccess) return (int)err;
  err = launch(*p, stream);
  if (prev != device) cudaSetDevice(prev);
  return (int)err;
}

}  // extern "C"
