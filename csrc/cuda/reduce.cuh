// Deterministic warp and block sums shared by kdfast's CUDA kernels (at, block_attention, crd, hcl,
// lcc, sp, rkd).
#pragma once

#include "../common.h"

namespace kdfast {
namespace gpu {

constexpr int kWarpSize = 32;

// Butterfly sum over aligned groups of `width` lanes (a power of two <= 32): every lane of a group
// gets the same sum, bitwise (the two lanes of each exchange add the same pair, a + b == b + a).
// All 32 lanes of the warp call it.
template <typename acc_t>
__device__ __forceinline__ acc_t sum_over_lanes(acc_t v, int width) {
  for (int offset = 1; offset < width; offset *= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sums each v[k] over a block of kBlockThreads threads; every thread gets the totals (warps added
// in order: deterministic). All threads of the block call it.
template <int kBlockThreads, int N, typename acc_t>
__device__ __forceinline__ void block_sum(acc_t (&v)[N]) {
  __shared__ acc_t partial[kBlockThreads / kWarpSize][N];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int k = 0; k < N; ++k) v[k] = sum_over_lanes(v[k], kWarpSize);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) partial[warp][k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    v[k] = 0;
    for (int w = 0; w < kBlockThreads / kWarpSize; ++w) v[k] += partial[w][k];
  }
  __syncthreads();  // `partial` may be written again by the next call
}

// MapScalars (csrc/common.h) of m_s, m_t (n values each): each thread sums the entries
// k = threadIdx.x + j kBlockThreads, then block_sum. All threads of the block call it.
template <int kBlockThreads, typename acc_t, typename index_t>
__device__ __forceinline__ MapScalars<acc_t> block_map_scalars(const acc_t* ms, const acc_t* mt, index_t n) {
  acc_t dots[3] = {0, 0, 0};  // ss, tt, st
  for (index_t k = threadIdx.x; k < n; k += kBlockThreads) {
    dots[0] += ms[k] * ms[k];
    dots[1] += mt[k] * mt[k];
    dots[2] += ms[k] * mt[k];
  }
  block_sum<kBlockThreads>(dots);
  return MapScalars<acc_t>(dots[0], dots[1], dots[2]);
}

}  // namespace gpu
}  // namespace kdfast
