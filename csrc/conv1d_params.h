// Parameters of the fused dilated conv1d, shared by the CPU kernel (conv1d_cpu.cpp) and the CUDA
// kernels (conv1d_cuda.cu). Plain C so nvcc compiles it without torch headers and Python can mirror it
// with ctypes. Sizes and strides are int64 and in elements: 32-bit offsets overflow at B*C*T > 2^31.
//
// out[b, co, t] = bias[co] + sum_{ci, k} w[co, ci, k] * act(P[b, ci, t*stride + k*dilation]) (+ skip[b, co, t])
// where P is x padded by (pad_left, pad_right) in constant (zeros), reflect or replicate mode and act is ELU or
// identity.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define FC_HOST_DEVICE __host__ __device__
#else
#define FC_HOST_DEVICE
#endif

#define FC_PAD_CONSTANT 0
#define FC_PAD_REFLECT 1
#define FC_PAD_REPLICATE 2

typedef struct FcConv1dParams {
  const float* x;       // (batch, c_in, t_in), any strides
  const float* weight;  // CUDA: contiguous (c_out, c_in, kernel); the CPU kernel takes a packed copy instead
  const float* bias;    // (c_out,) contiguous, or NULL
  const float* skip;    // (batch, c_out, t_out), any strides, or NULL
  float* out;           // (batch, c_out, t_out), time stride 1
  int64_t batch, c_in, c_out, t_in, t_out;
  int64_t kernel, stride, dilation, pad_left, pad_right;
  // reflect: audiocraft zero-extends inputs no longer than the pad to max(pad_left, pad_right) + 1
  // samples before reflecting; reflect_len is that extended length (t_in when no extension is needed)
  int64_t reflect_len;
  int64_t x_stride_b, x_stride_c, x_stride_t;
  int64_t skip_stride_b, skip_stride_c, skip_stride_t;
  int64_t out_stride_b, out_stride_c;
  int32_t pad_mode;
  int32_t has_elu;
  float elu_alpha;
  int32_t reserved;  // keeps the struct size a multiple of 8 on every ABI (checked from Python)
} FcConv1dParams;

static inline FC_HOST_DEVICE int fc_pad_mode_valid(int64_t pad_mode) {
  return pad_mode == FC_PAD_CONSTANT || pad_mode == FC_PAD_REFLECT || pad_mode == FC_PAD_REPLICATE;
}

// Source sample of padded position i (0 <= i < pad_left + t_in + pad_right), or -1 where the padded
// signal is zero (constant padding, or the zeros audiocraft appends before reflecting a short input).
static inline FC_HOST_DEVICE int64_t fc_source_index(int64_t i, int64_t pad_left, int64_t t_in,
                                                     int64_t reflect_len, int32_t pad_mode) {
  int64_t j = i - pad_left;
  if (pad_mode == FC_PAD_REFLECT) {
    if (j < 0) j = -j;
    else if (j >= reflect_len) j = 2 * (reflect_len - 1) - j;
  } else if (pad_mode == FC_PAD_REPLICATE) {
    if (j < 0) j = 0;
    else if (j >= t_in) j = t_in - 1;
  }
  return (j >= 0 && j < t_in) ? j : -1;
}

// Extended length for reflect padding (audiocraft's pad1d): max(t_in, max_pad + 1).
static inline FC_HOST_DEVICE int64_t fc_reflect_len(int64_t t_in, int64_t pad_left, int64_t pad_right) {
  int64_t max_pad = pad_left > pad_right ? pad_left : pad_right;
  return t_in > max_pad ? t_in : max_pad + 1;
}
