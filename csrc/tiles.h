// The rows that the tiles of row-pair reductions read (csrc/cpu/tiles.h, csrc/cuda/tiles.cuh: LCC's
// region descriptors, SP's and RKD's (B, D) matrices as a grid of 1) and the combinations of two row
// elements they sum. Host/device-neutral (no CUDA headers).
#pragma once

#include <cstdint>

#include "common.h"

namespace kdfast {

// The descriptors of a (B, C, H, W) map cut into a k x k grid (k divides H and W), read in place
// through the map's strides: row n = i k^2 + py k + px (N = B k^2 rows) holds the D = C rh rw
// elements of region (py, px) of sample i. A row's elements are enumerated channel-major (c, y, x),
// or (y, x, c) when the channels are the map's fastest dim (channels_last), so that consecutive
// elements are close in memory: any fixed order gives the same dot products and norms.
struct Regions {
  // Sizes in int: N and D are below 2^31 (check_lcc_maps, check_row_pair), so the index divisions are 32-bit.
  int grid, positions;  // k, k^2
  int channels, rh, rw, dim;
  int64_t stride_b, stride_c, stride_h, stride_w;
  bool channels_inner;  // (y, x, c) order

  KDFAST_HOST_DEVICE int64_t row_offset(int n) const {
    const int i = n / positions, p = n % positions;
    return i * stride_b + (p / grid) * rh * stride_h + (p % grid) * rw * stride_w;
  }
  KDFAST_HOST_DEVICE int64_t element_offset(int e) const {
    const int area = rh * rw;
    const int c = channels_inner ? e % channels : e / area;
    const int yx = channels_inner ? e / channels : e % area;
    return c * stride_c + (yx / rw) * stride_h + (yx % rw) * stride_w;
  }
};

// The combinations of two row elements that the tiles of row pairs sum over the elements
// (csrc/cpu/tiles.h, csrc/cuda/tiles.cuh): combine(a, b) == combine(b, a), bitwise.
struct Product {
  template <typename T>
  KDFAST_HOST_DEVICE T operator()(T a, T b) const {
    return a * b;
  }
};
struct SquaredDifference {
  template <typename T>
  KDFAST_HOST_DEVICE T operator()(T a, T b) const {
    const T d = a - b;
    return d * d;
  }
};

}  // namespace kdfast
