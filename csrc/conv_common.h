// What the two CPU conv kernels share: conv1d_cpu.cpp (offline, vectorised along time) and stream_cpu.cpp
// (streaming chunks, vectorised along output channels). Their micro-GEMMs are two tilings on purpose (see the
// top of each file); the reduction chunking, the argument checks and the helpers below are the same logic and
// live here once. Nothing here does arithmetic on the conv's data.
#pragma once
#include <torch/extension.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "elu_cpu.h"
#include "vf16.h"  // FC_AVX512 / FC_AVX2 and their intrinsics

namespace fc_conv {

constexpr int VL = 16;  // floats per 512-bit vector
// Reduction chunk: every output adds the chunk sums of 64 terms one after the other (rather than one running sum
// over c_in * kernel terms, up to 4096), which keeps the float32 error near oneDNN's
// (measured: bench/results/design-measurements.md).
constexpr int64_t KC = 64;

inline int64_t ceil_div(int64_t a, int64_t b) {  // b > 0, a of any sign
  return a >= 0 ? (a + b - 1) / b : -((-a) / b);
}

// op: the message prefix ("fastcodec conv1d", "fastcodec stream", ...).
inline void check_f32_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
}

// A float32 CPU bias of shape (n,) (its contiguity is the caller's business).
inline void check_bias(const at::Tensor& bias, const char* op, const char* name, int64_t n) {
  check_f32_cpu(bias, op, name);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == n, op, ": ", name, " must be (", n, ",), got ", bias.sizes());
}

// act(x) with the kernels' vectorised ELU, into a new contiguous tensor (the tests measure its error).
inline at::Tensor elu_copy(const at::Tensor& x, double alpha, const char* op) {
  check_f32_cpu(x, op, "x");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  std::memcpy(out.data_ptr<float>(), xc.data_ptr<float>(), xc.numel() * sizeof(float));
  fc_elu::elu_inplace(out.data_ptr<float>(), out.numel(), (float)alpha);
  return out;
}

inline std::string simd() { return FC_SIMD_NAME; }

}  // namespace fc_conv
