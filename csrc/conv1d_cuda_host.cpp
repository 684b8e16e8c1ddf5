// Host driver of the CUDA conv's kernel bodies (conv1d_cuda_body.cuh), for tests on machines without a GPU:
// the same launch plan (tiles, shared memory, grid chunking) and, per block, the same phases in the same
// order, each run for every thread before the next starts (what __syncthreads guarantees). Shared memory
// starts as NaN and has a guard zone, so a read of an unstaged element or a write past the allocation shows.
// Built with g++ by tests/test_cuda_host.py; not part of any extension.
#include <math.h>
#include <stdint.h>

#include <vector>

#include "conv1d_cuda_body.cuh"

using namespace fc_cuda;

namespace {

constexpr int64_t kGuard = 64;  // floats after the shared allocation that must stay untouched

int run_tiled(const FcConv1dParams& p, int64_t ci_chunk, int64_t max_y, int64_t max_z, int64_t* n_launches) {
  const size_t smem_bytes = tiled_smem_bytes(p, ci_chunk);
  if (smem_bytes > (size_t)kSmemBytes) return 3;
  const int64_t smem_floats = (int64_t)(smem_bytes / sizeof(float));
  std::vector<float> smem(smem_floats + kGuard);
  std::vector<float> acc((size_t)kTimeTile * kCoTile);
  return for_each_tiled_launch(p, max_y, max_z,
      [&](int64_t n_t, int64_t nc, int64_t nb, int64_t b0, int64_t c0) -> int {
        if (nc > max_y || nb > max_z || nc < 1 || nb < 1) return 4;
        ++*n_launches;
        for (int64_t bz = 0; bz < nb; ++bz)
          for (int64_t by = 0; by < nc; ++by)
            for (int64_t bx = 0; bx < n_t; ++bx) {
              const int64_t b = b0 + bz, co0 = (c0 + by) * kCoTile, t0 = bx * kTimeTile;
              for (float& v : smem) v = NAN;
              for (int tid = 0; tid < kTimeTile; ++tid) tiled_init(p, co0, &acc[(size_t)tid * kCoTile]);
              for (int64_t ci0 = 0; ci0 < p.c_in; ci0 += ci_chunk) {
                for (int tid = 0; tid < kTimeTile; ++tid)
                  tiled_stage(p, (int)ci_chunk, b, co0, t0, ci0, tid, kTimeTile, smem.data());
                for (int tid = 0; tid < kTimeTile; ++tid)
                  tiled_accumulate(p, (int)ci_chunk, ci0, tid, smem.data(), &acc[(size_t)tid * kCoTile]);
              }
              for (int64_t g = smem_floats; g < smem_floats + kGuard; ++g)
                if (!isnan(smem[g])) return 5;
              for (int tid = 0; tid < kTimeTile; ++tid) tiled_store(p, b, co0, t0 + tid, &acc[(size_t)tid * kCoTile]);
            }
        return 0;
      });
}

}  // namespace

extern "C" {

int64_t fastcodec_conv1d_host_params_size(void) { return (int64_t)sizeof(FcConv1dParams); }

// Runs the conv as conv1d_cuda.cu's launcher would: 0 on success, 1 invalid params, 3 shared memory over
// budget, 4 a grid chunk over its limit, 5 a write past shared memory. max_grid_y/z (<= 0: the CUDA limits)
// shrink the grid limits so chunking is exercised on small shapes; mode 1 forces the direct kernel with
// at most direct_per_launch outputs a launch (<= 0: the launcher's). *n_launches counts the launches.
int fastcodec_conv1d_host(const FcConv1dParams* p, int64_t max_grid_y, int64_t max_grid_z, int mode,
                          int64_t direct_per_launch, int64_t* n_launches) {
  if (!params_valid(p)) return 1;
  *n_launches = 0;
  const int64_t ci_chunk = tiled_ci_chunk(*p);
  if (mode == 0 && ci_chunk >= 1)
    return run_tiled(*p, ci_chunk, max_grid_y > 0 ? max_grid_y : kMaxGridY, max_grid_z > 0 ? max_grid_z : kMaxGridZ,
                     n_launches);
  const int64_t per_launch = direct_per_launch > 0 ? direct_per_launch : (int64_t)0x7fffffff * kDirectThreads;
  return for_each_direct_launch(*p, per_launch, [&](int64_t blocks, int64_t first, int64_t count) -> int {
    ++*n_launches;
    for (int64_t blk = 0; blk < blocks; ++blk)
      for (int64_t tid = 0; tid < kDirectThreads; ++tid) {
        const int64_t idx = first + blk * kDirectThreads + tid;
        if (idx < first + count) direct_output(*p, idx);
      }
    return 0;
  });
}

}  // extern "C"
