// cuda_emu.h: the CUDA execution model on the CPU, so that kdfast's CUDA C++ kernels (csrc/cuda/*.cu)
// compile a second time as host C++ (g++) and run on CPU memory, in tests and CI without a GPU.
//
// What it emulates:
// * A launch (kdfast::gpu::launch_kernel, csrc/cuda/launch.cuh) runs the grid's blocks one after the
//   other, in an order chosen by set_schedule() or $KDFAST_EMU_SCHEDULE (block order: forward,
//   reverse or a seeded shuffle), and the threads of a block as cooperative fibers (ucontext) on
//   the calling OS thread: each thread runs until it reaches a barrier, a warp operation or its end,
//   then the next runnable thread of the thread order (forward, reverse or shuffled) runs.
// * threadIdx, blockIdx, blockDim, gridDim; __global__, __device__, __host__, __forceinline__,
//   __launch_bounds__ (ignored); __shared__ variables (function-local statics: one copy, used by
//   the block that runs; blocks run one at a time) and dynamic shared memory
//   (KDFAST_DYNAMIC_SHARED in csrc/cuda/launch.cuh, sized by the launch).
// * __syncthreads(): a real barrier. It releases when every live thread of the block waits at
//   the same call site (file:line); threads waiting at different sites, or a barrier reached after
//   some threads of the block exited, are reported (a barrier in divergent code). A site is the
//   line of the __syncthreads call: two calls of one helper that holds a barrier are one site.
// * __shfl_sync, __shfl_up_sync, __shfl_down_sync, __shfl_xor_sync, __syncwarp: every lane of the
//   mask must reach the same call site with the same mask; a lane of the mask that exited, waits at
//   a barrier or at another warp operation, and a read from a lane outside the mask, are reported.
// * atomics (atomicAdd, atomicMax, atomicMin, atomicExch, atomicCAS: plain read-modify-writes, the
//   fibers of a launch never run concurrently), __ldg, the fast-math intrinsics used (__expf,
//   __logf, __fdividef, rsqrtf), c10::cuda / ATen cuda stand-ins (csrc/emu/include).
// Errors are thrown as std::runtime_error (a RuntimeError in Python) at the end of the block.
//
// Races: threads run in a schedule-dependent order between two barriers, so a missing
// __syncthreads (a thread reads shared memory that another writes in the same barrier interval)
// changes a result between thread orders; tests compare results under several block and thread
// orders (tests/test_cuda_emulation.py). The emulator does not track memory accesses itself.
//
// What it cannot show: the GPU memory model (visibility and ordering between blocks, fences,
// caches, atomics' contention and their non-determinism), warp scheduling and independent thread
// scheduling (lanes of a warp interleave only at warp operations and barriers here, so code that
// relies on implicit warp-synchronous execution without __syncwarp is not exercised as on a GPU),
// real timing and performance, and resource limits (registers, shared memory size, threads per
// block beyond 1024, grid limits other than the checks below); out-of-bounds accesses are found
// only by building with AddressSanitizer. Kernels run slowly: use small shapes.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define KDFAST_CUDA_EMU 1

// ---------------------------------------------------------------------------------------------
// Qualifiers and built-in types
// ---------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr operator uint3() const { return {x, y, z}; }
};

using cudaStream_t = struct CUstream_st*;
enum cudaError_t { cudaSuccess = 0 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }

// Copies run at once (host and "device" memory are both CPU memory; launches are synchronous).
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t = nullptr) {
  if (bytes > 0) std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  return cudaMemcpyAsync(dst, src, bytes, kind);
}
inline cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t = nullptr) {
  if (bytes > 0) std::memset(dst, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

// The fields of cudaDeviceProp that kdfast reads.
struct cudaDeviceProp {
  int multiProcessorCount, maxThreadsPerBlock, maxThreadsPerMultiProcessor, warpSize, major, minor;
  size_t sharedMemPerBlock, sharedMemPerBlockOptin, sharedMemPerMultiprocessor;
  int maxGridSize[3];
};

namespace cuda_emu {

// ---------------------------------------------------------------------------------------------
// Schedules: the order of the blocks of a launch and of the threads of a block
// ---------------------------------------------------------------------------------------------
enum class Order { kForward, kReverse, kShuffle };

struct Schedule {
  Order blocks = Order::kForward;
  Order threads = Order::kForward;
  uint64_t seed = 0;
};

inline Order parse_order(const std::string& name) {
  if (name == "forward") return Order::kForward;
  if (name == "reverse") return Order::kReverse;
  if (name == "shuffle") return Order::kShuffle;
  throw std::invalid_argument("cuda_emu: order must be 'forward', 'reverse' or 'shuffle', got '" + name + "'");
}

// $KDFAST_EMU_SCHEDULE = "<block order>[,<thread order>[,<seed>]]", e.g. "shuffle,reverse,7".
inline Schedule schedule_from_env() {
  Schedule s;
  const char* env = std::getenv("KDFAST_EMU_SCHEDULE");
  if (env == nullptr || *env == '\0') return s;
  std::stringstream in(env);
  std::string part;
  if (std::getline(in, part, ',')) s.blocks = parse_order(part);
  if (std::getline(in, part, ',')) s.threads = parse_order(part);
  if (std::getline(in, part, ',')) s.seed = std::stoull(part);
  return s;
}

inline Schedule& schedule() {
  static Schedule s = schedule_from_env();
  return s;
}

// The properties of an H200 (sm_90, 132 SMs).
inline cudaDeviceProp h200_properties() {
  return {132, 1024, 2048, 32, 9, 0, 48 << 10, 227 << 10, 228 << 10, {2147483647, 65535, 65535}};
}

// Sets the schedule of the following launches.
inline void set_schedule(Order blocks, Order threads, uint64_t seed) { schedule() = {blocks, threads, seed}; }

// 0 .. n-1 in `order` (shuffled with a generator seeded by `seed` and `salt`).
inline std::vector<int64_t> ordering(int64_t n, Order order, uint64_t seed, uint64_t salt) {
  std::vector<int64_t> v(static_cast<size_t>(n));
  std::iota(v.begin(), v.end(), int64_t{0});
  if (order == Order::kReverse) std::reverse(v.begin(), v.end());
  if (order == Order::kShuffle) {
    std::mt19937_64 gen(seed * 0x9E3779B97F4A7C15ull + salt);
    std::shuffle(v.begin(), v.end(), gen);
  }
  return v;
}

// ---------------------------------------------------------------------------------------------
// Threads (fibers) of a block
// ---------------------------------------------------------------------------------------------
constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = size_t{256} << 10;  // per thread; the lowest page is a guard page
constexpr size_t kShuffleBytes = 16;               // the largest shuffled value

struct Site {
  const char* file = nullptr;
  int line = 0;
  bool operator==(const Site& o) const { return line == o.line && std::strcmp(file, o.file) == 0; }
  std::string str() const { return std::string(file) + ":" + std::to_string(line); }
};

enum class State { kRunnable, kBarrier, kWarpOp, kDone };

enum class WarpOp { kIndex, kUp, kDown, kXor, kSync };

struct Fiber {
  ucontext_t context;
  uint3 thread_idx;
  int linear = 0;
  State state = State::kRunnable;
  Site site;
  // the pending warp operation of a kWarpOp fiber, and its result once resolved
  WarpOp op = WarpOp::kSync;
  unsigned mask = 0;
  int arg = 0, width = kWarpSize;
  size_t value_bytes = 0;
  unsigned char value[kShuffleBytes], result[kShuffleBytes];
};

const char* const kStateNames[] = {"running", "waiting at __syncthreads", "waiting at a warp operation", "exited"};

class Stacks {
 public:
  char* get(size_t i) {
    while (stacks_.size() <= i) {
      void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) throw std::runtime_error("cuda_emu: cannot map a thread stack");
      mprotect(p, static_cast<size_t>(sysconf(_SC_PAGESIZE)), PROT_NONE);
      stacks_.push_back(static_cast<char*>(p));
    }
    return stacks_[i];
  }

 private:
  std::vector<char*> stacks_;  // kept for the process' lifetime: reused by every launch
};

// The block being run and its threads.
struct BlockRun {
  dim3 grid, block;
  uint3 block_idx{0, 0, 0};
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  ucontext_t scheduler;
  std::function<void()> body;  // one thread's kernel call
  std::vector<unsigned char> dynamic_shared;
  std::string error;  // the first error of the block
  std::exception_ptr thrown;
};

inline BlockRun*& active() {
  static BlockRun* run = nullptr;
  return run;
}

inline BlockRun& run() {
  BlockRun* r = active();
  if (r == nullptr) throw std::logic_error("cuda_emu: device code called outside a kernel launch");
  return *r;
}

inline Fiber& this_thread() { return *run().current; }

// Parks the calling thread (its state is already set) and resumes the scheduler.
inline void park() {
  BlockRun& r = run();
  swapcontext(&r.current->context, &r.scheduler);
}

// Records an error and parks the thread for good (the block is abandoned).
[[noreturn]] inline void fail(const std::string& message) {
  BlockRun& r = run();
  if (r.error.empty()) r.error = message;
  r.current->state = State::kDone;
  park();
  std::abort();  // never resumed
}

inline std::string thread_name(const BlockRun& r, const Fiber& f) {
  std::ostringstream s;
  s << "thread (" << f.thread_idx.x << "," << f.thread_idx.y << "," << f.thread_idx.z << ") of block ("
    << r.block_idx.x << "," << r.block_idx.y << "," << r.block_idx.z << ")";
  return s.str();
}

inline void fiber_main() {
  BlockRun& r = run();
  try {
    r.body();
  } catch (...) {
    if (!r.thrown) r.thrown = std::current_exception();
  }
  r.current->state = State::kDone;
}  // returns to uc_link: the scheduler

// ---------------------------------------------------------------------------------------------
// Barriers and warp operations
// ---------------------------------------------------------------------------------------------
inline void syncthreads(Site site) {
  Fiber& f = this_thread();
  f.state = State::kBarrier;
  f.site = site;
  park();
}

// The lane that `lane` reads in a pending warp operation `f`.
inline int source_lane(const Fiber& f, int lane) {
  const int base = lane / f.width * f.width, end = base + f.width;
  switch (f.op) {
    case WarpOp::kIndex:
      return base + ((f.arg % f.width) + f.width) % f.width;
    case WarpOp::kUp:
      return lane - f.arg >= base ? lane - f.arg : lane;
    case WarpOp::kDown:
      return lane + f.arg < end ? lane + f.arg : lane;
    case WarpOp::kXor:
      return (lane ^ f.arg) < end ? (lane ^ f.arg) : lane;
    case WarpOp::kSync:
      return lane;
  }
  return lane;
}

// Completes the warp operation of `f`'s warp once every lane of the mask waits at it; reports a
// lane of the mask that cannot arrive or waits elsewhere.
inline void try_resolve_warp(BlockRun& r, const Fiber& f) {
  const int warp_base = f.linear / kWarpSize * kWarpSize;
  const int threads = static_cast<int>(r.fibers.size());
  auto where = [&](const Fiber& g) { return f.site.str() + " (" + thread_name(r, g) + ")"; };
  for (int lane = 0; lane < kWarpSize; ++lane) {
    if (!(f.mask >> lane & 1u)) continue;
    if (warp_base + lane >= threads) {
      fail("cuda_emu: warp operation at " + where(f) + ": lane " + std::to_string(lane) +
           " of the mask does not exist (the block has " + std::to_string(threads) + " threads)");
    }
    const Fiber& g = r.fibers[warp_base + lane];
    if (g.state == State::kRunnable) return;  // not arrived yet
    if (g.state != State::kWarpOp) {
      fail("cuda_emu: warp operation at " + where(f) + ": lane " + std::to_string(lane) + " of the mask is " +
           kStateNames[static_cast<int>(g.state)] + (g.state == State::kBarrier ? " " + g.site.str() : "") +
           " (a warp operation in divergent code, or after a lane exited)");
    }
    if (!(g.site == f.site) || g.mask != f.mask || g.op != f.op || g.value_bytes != f.value_bytes) {
      fail("cuda_emu: warp operation at " + where(f) + ": lane " + std::to_string(lane) +
           " waits at a different warp operation (" + g.site.str() + ", mask " + std::to_string(g.mask) + ")");
    }
  }
  for (int lane = 0; lane < kWarpSize; ++lane) {
    if (!(f.mask >> lane & 1u)) continue;
    Fiber& g = r.fibers[warp_base + lane];
    const int src = source_lane(g, lane);
    if (!(f.mask >> src & 1u)) {
      fail("cuda_emu: warp operation at " + where(g) + ": lane " + std::to_string(lane) + " reads lane " +
           std::to_string(src) + ", outside the mask");
    }
    std::memcpy(g.result, r.fibers[warp_base + src].value, g.value_bytes);
  }
  for (int lane = 0; lane < kWarpSize; ++lane) {
    if (f.mask >> lane & 1u) r.fibers[warp_base + lane].state = State::kRunnable;
  }
}

template <typename T>
T warp_op(Site site, WarpOp op, unsigned mask, const T& value, int arg, int width) {
  static_assert(sizeof(T) <= kShuffleBytes && std::is_trivially_copyable<T>::value, "cuda_emu: unsupported type");
  BlockRun& r = run();
  Fiber& f = *r.current;
  const int lane = f.linear % kWarpSize;
  if (!(mask >> lane & 1u)) {
    fail("cuda_emu: warp operation at " + site.str() + " by " + thread_name(r, f) + ": the calling lane " +
         std::to_string(lane) + " is not in the mask");
  }
  if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0) {
    fail("cuda_emu: warp operation at " + site.str() + ": width " + std::to_string(width) +
         " is not a power of two <= 32");
  }
  f.state = State::kWarpOp;
  f.site = site;
  f.op = op;
  f.mask = mask;
  f.arg = arg;
  f.width = width;
  f.value_bytes = sizeof(T);
  std::memcpy(f.value, &value, sizeof(T));
  try_resolve_warp(r, f);
  if (f.state != State::kRunnable) park();
  T out;
  std::memcpy(&out, f.result, sizeof(T));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Launches
// ---------------------------------------------------------------------------------------------
inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

inline Stacks& stacks() {
  static Stacks s;
  return s;
}

// Why the warp operation that `f` waits at cannot complete, when no thread can run.
inline std::string stalled_warp_op(const BlockRun& r, const Fiber& f) {
  const int warp_base = f.linear / kWarpSize * kWarpSize;
  for (int lane = 0; lane < kWarpSize; ++lane) {
    if (!(f.mask >> lane & 1u)) continue;
    const Fiber& g = r.fibers[warp_base + lane];
    if (g.state != State::kWarpOp || !(g.site == f.site)) {
      return "cuda_emu: warp operation at " + f.site.str() + " (" + thread_name(r, f) + ") never completes: lane " +
             std::to_string(lane) + " of its mask is " + kStateNames[static_cast<int>(g.state)] +
             (g.state == State::kDone ? "" : " " + g.site.str()) +
             " (a warp operation in divergent code, or after a lane exited)";
    }
  }
  return "cuda_emu: warp operation at " + f.site.str() + " never completes";
}

// Why no thread can run: the error that describes the block's state, or "" when every live
// thread waits at one barrier (which is then released).
inline std::string blocked_state(BlockRun& r) {
  const Fiber* first = nullptr;
  int exited = 0;
  for (Fiber& f : r.fibers) {
    if (f.state == State::kDone) {
      ++exited;
      continue;
    }
    if (f.state == State::kWarpOp) return stalled_warp_op(r, f);
    if (first == nullptr) first = &f;
    if (!(f.site == first->site)) {
      return "cuda_emu: __syncthreads in divergent code: " + thread_name(r, *first) + " waits at " +
             first->site.str() + ", " + thread_name(r, f) + " at " + f.site.str();
    }
  }
  if (first != nullptr && exited > 0) {
    return "cuda_emu: __syncthreads in divergent code: " + std::to_string(r.fibers.size() - exited) +
           " threads wait at " + first->site.str() + " (" + thread_name(r, *first) + ") while " +
           std::to_string(exited) + " threads of the block have exited";
  }
  return "";
}

// Runs one block: every thread until all exit. Returns the error ("" if none).
inline std::string run_block(BlockRun& r, const Schedule& s, uint64_t block_linear) {
  const int threads = static_cast<int>(r.fibers.size());
  for (int t = 0; t < threads; ++t) {
    Fiber& f = r.fibers[t];
    f.state = State::kRunnable;
    getcontext(&f.context);
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    f.context.uc_stack.ss_sp = stacks().get(t) + page;
    f.context.uc_stack.ss_size = kStackBytes - page;
    f.context.uc_link = &r.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  const std::vector<int64_t> order = ordering(threads, s.threads, s.seed, block_linear);
  for (;;) {
    bool ran = false;
    for (const int64_t t : order) {
      Fiber& f = r.fibers[t];
      if (f.state != State::kRunnable) continue;
      ran = true;
      r.current = &f;
      swapcontext(&r.scheduler, &f.context);
      r.current = nullptr;
      if (!r.error.empty() || r.thrown) return r.error;
    }
    if (ran) continue;
    if (std::all_of(r.fibers.begin(), r.fibers.end(), [](const Fiber& f) { return f.state == State::kDone; })) {
      return "";
    }
    const std::string blocked = blocked_state(r);
    if (!blocked.empty()) return blocked;
    for (Fiber& f : r.fibers) {
      if (f.state == State::kBarrier) f.state = State::kRunnable;
    }
  }
}

// kernel<<<grid, block, shared_bytes>>>(args...) on the CPU: blocks and threads in the order of
// schedule(); each thread gets its own copy of the parameters.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, Args&&... args) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64) {
    throw std::runtime_error("cuda_emu: invalid block (" + std::to_string(block.x) + "," + std::to_string(block.y) +
                             "," + std::to_string(block.z) + "): 1 to 1024 threads, z <= 64");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    throw std::runtime_error("cuda_emu: invalid grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
                             std::to_string(grid.z) + "): x < 2^31, y and z <= 65535, none 0");
  }
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  std::lock_guard<std::mutex> lock(launch_mutex());
  BlockRun r;
  r.grid = grid;
  r.block = block;
  r.fibers.resize(threads);
  for (uint64_t t = 0; t < threads; ++t) {
    Fiber& f = r.fibers[t];
    f.linear = static_cast<int>(t);
    f.thread_idx = {static_cast<unsigned>(t % block.x), static_cast<unsigned>(t / block.x % block.y),
                    static_cast<unsigned>(t / (uint64_t{block.x} * block.y))};
  }
  r.dynamic_shared.resize(std::max<size_t>(shared_bytes, 1));
  r.body = [&] {
    std::tuple<std::decay_t<Params>...> mine = params;
    std::apply(kernel, mine);
  };
  const Schedule s = schedule();
  const int64_t blocks = int64_t{grid.x} * grid.y * grid.z;
  BlockRun* const outer = active();
  active() = &r;
  std::string error;
  for (const int64_t b : ordering(blocks, s.blocks, s.seed, 0)) {
    r.block_idx = {static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                   static_cast<unsigned>(b / (int64_t{grid.x} * grid.y))};
    error = run_block(r, s, static_cast<uint64_t>(b));
    if (!error.empty() || r.thrown) break;
  }
  active() = outer;
  if (r.thrown) std::rethrow_exception(r.thrown);
  if (!error.empty()) throw std::runtime_error(error);
}

// The launch's dynamic shared memory (shared_bytes of launch(), 16-byte aligned).
template <typename T>
T* dynamic_shared() {
  static_assert(alignof(T) <= 16, "cuda_emu: over-aligned dynamic shared memory");
  return reinterpret_cast<T*>(run().dynamic_shared.data());
}

}  // namespace cuda_emu

// ---------------------------------------------------------------------------------------------
// Built-in variables and functions of device code
// ---------------------------------------------------------------------------------------------
#define threadIdx (::cuda_emu::this_thread().thread_idx)
#define blockIdx (::cuda_emu::run().block_idx)
#define blockDim (static_cast<const dim3&>(::cuda_emu::run().block))
#define gridDim (static_cast<const dim3&>(::cuda_emu::run().grid))
#define warpSize 32

#define KDFAST_EMU_SITE (::cuda_emu::Site{__FILE__, __LINE__})
#define __syncthreads() ::cuda_emu::syncthreads(KDFAST_EMU_SITE)
#define __syncwarp(...) ::cuda_emu::syncwarp(KDFAST_EMU_SITE __VA_OPT__(,) __VA_ARGS__)
#define __shfl_sync(mask, value, lane, ...) \
  ::cuda_emu::warp_op(KDFAST_EMU_SITE, ::cuda_emu::WarpOp::kIndex, mask, value, lane __VA_OPT__(,) __VA_ARGS__)
#define __shfl_up_sync(mask, value, delta, ...) \
  ::cuda_emu::warp_op(KDFAST_EMU_SITE, ::cuda_emu::WarpOp::kUp, mask, value, delta __VA_OPT__(,) __VA_ARGS__)
#define __shfl_down_sync(mask, value, delta, ...) \
  ::cuda_emu::warp_op(KDFAST_EMU_SITE, ::cuda_emu::WarpOp::kDown, mask, value, delta __VA_OPT__(,) __VA_ARGS__)
#define __shfl_xor_sync(mask, value, lane_mask, ...) \
  ::cuda_emu::warp_op(KDFAST_EMU_SITE, ::cuda_emu::WarpOp::kXor, mask, value, lane_mask __VA_OPT__(,) __VA_ARGS__)

namespace cuda_emu {

template <typename T>
T warp_op(Site site, WarpOp op, unsigned mask, const T& value, int arg) {
  return warp_op(site, op, mask, value, arg, kWarpSize);
}

inline void syncwarp(Site site, unsigned mask = 0xffffffffu) {
  warp_op(site, WarpOp::kSync, mask, 0, 0, kWarpSize);
}

}  // namespace cuda_emu

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

namespace cuda_emu {
// The read-modify-write of every atomic: a block's threads never run at the same time here, and
// blocks run one after another, so a plain update is atomic. Returns the old value, as CUDA's do.
template <typename T, typename Update>
inline T atomic_update(T* address, Update update) {
  const T old = *address;
  *address = update(old);
  return old;
}
}  // namespace cuda_emu

template <typename T>
inline T atomicAdd(T* address, T value) {
  return cuda_emu::atomic_update(address, [&](T old) { return old + value; });
}
template <typename T>
inline T atomicMax(T* address, T value) {
  return cuda_emu::atomic_update(address, [&](T old) { return std::max(old, value); });
}
template <typename T>
inline T atomicMin(T* address, T value) {
  return cuda_emu::atomic_update(address, [&](T old) { return std::min(old, value); });
}
template <typename T>
inline T atomicExch(T* address, T value) {
  return cuda_emu::atomic_update(address, [&](T) { return value; });
}
template <typename T>
inline T atomicCAS(T* address, T compare, T value) {
  return cuda_emu::atomic_update(address, [&](T old) { return old == compare ? value : old; });
}

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
