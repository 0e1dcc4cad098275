// Read-only loads of kernel inputs from global memory: load_global<acc_t>(p) reads *p through the
// non-coherent read-only path (__ldg: ld.global.nc, whatever the compiler can prove about where p
// points, e.g. a pointer read from a by-value argument table) and converts it to acc_t. Only for
// memory that no thread writes during the kernel. Element types: float, double, c10::Half,
// c10::BFloat16 (the 16-bit ones loaded as their bits).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

namespace kdfast {
namespace gpu {

template <typename acc_t, typename T>
__device__ __forceinline__ acc_t load_global(const T* p) {
  if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) {
    const T v(__ldg(reinterpret_cast<const unsigned short*>(p)), T::from_bits());
    return static_cast<acc_t>(static_cast<float>(v));
  } else {
    return static_cast<acc_t>(__ldg(p));
  }
}

}  // namespace gpu
}  // namespace kdfast
