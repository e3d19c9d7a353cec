// A CPU emulation of the CUDA subset megalm's kernels use, so their exact sources run in the CPU
// test suite (tests/ops/test_*_emu.py), where no GPU is; emu/include/ stands in for CUDA's headers.
//
// Every CUDA thread of a block is a coroutine (ucontext) on ONE OS thread: the schedule is
// deterministic (warp by warp, see run_warp), so a result never depends on timing, and a missing
// barrier shows as a wrong result. Threads that exited no longer count at __syncthreads, as on
// the GPU. __shfl_xor_sync exchanges through block memory between two warp barriers, so all
// lanes must reach it. WMMA fragments hold the whole 16x16 tile in every lane, so only the tile
// ops (load, store, mma, fill) may touch them (code reading fragment elements would not port);
// the real API's alignment rules (32-byte pointers, ldm a multiple of 16 bytes) are checked.
#pragma once

#include <ucontext.h>

#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <functional>
#include <map>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) int4 {
  int x, y, z, w;
};
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
using cudaStream_t = void*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;

namespace megalm::emu {

// The first failure (alignment, shared memory size, a thread leaving while others wait): the
// entry points return it instead of aborting the test process.
inline std::string& failure() {
  static std::string msg;
  return msg;
}
inline void fail(const std::string& msg) {
  if (failure().empty()) failure() = msg;
}

// Lanes and warps run in increasing order, or (set by the tests for a second pass) decreasing:
// a missing barrier shows whichever side of it runs first.
inline bool& reverse_order() {
  static bool r = false;
  return r;
}

struct Block {
  std::vector<unsigned char> smem;
  std::vector<float> exchange;  // one slot per thread for __shfl_xor_sync
};

struct Scheduler {
  ucontext_t main{};
  std::vector<ucontext_t> ctx;
  std::vector<std::vector<char>> stacks;
  std::vector<int> state;  // 0 ready, 1 waiting at a barrier, 2 finished
  int current = 0;
  Block* block = nullptr;
  const std::function<void()>* body = nullptr;
};
inline Scheduler& sched() {
  static Scheduler s;
  return s;
}

}  // namespace megalm::emu

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace megalm::emu {

enum State { kReady = 0, kAtBlockBarrier = 1, kDone = 2, kAtWarpBarrier = 3 };

inline void wait(State st) {
  Scheduler& s = sched();
  s.state[s.current] = st;
  swapcontext(&s.ctx[s.current], &s.main);
}
inline void barrier() { wait(kAtBlockBarrier); }
inline void warp_barrier() { wait(kAtWarpBarrier); }

inline void trampoline() {
  Scheduler& s = sched();
  (*s.body)();
  s.state[s.current] = kDone;  // uc_link returns to the scheduler
}

constexpr size_t kMaxSmem = 227 * 1024;  // sm_90's opt-in maximum per block
constexpr size_t kStack = 128 * 1024;  // x 1024 threads at most: 128 MiB

// Runs warp w's lanes until each waits at a block barrier or is done: lanes meet at warp
// barriers. Warp-major on purpose: warp 0 runs ahead of the others up to the next __syncthreads,
// so a read of another warp's shared memory that lacks one sees stale data and the result breaks.
inline bool run_warp(Scheduler& s, int w, const dim3& block) {
  const int lo = w * 32, hi = std::min<int>(lo + 32, int(s.state.size()));
  for (;;) {
    bool ran = false;
    for (int i = lo; i < hi; ++i) {
      const int t = reverse_order() ? lo + hi - 1 - i : i;
      if (s.state[t] != kReady) continue;
      s.current = t;
      threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      swapcontext(&s.main, &s.ctx[t]);
      ran = true;
    }
    int at_warp = 0;
    for (int t = lo; t < hi; ++t) at_warp += s.state[t] == kAtWarpBarrier;
    if (at_warp == hi - lo) {
      for (int t = lo; t < hi; ++t) s.state[t] = kReady;
      continue;
    }
    if (at_warp != 0 && !ran) {
      fail("lanes of a warp wait at different barriers (non-uniform __syncwarp or shuffle)");
      return false;
    }
    if (!ran) return true;
  }
}

// Runs `body` as every thread of every block of `grid`, one block after the other.
inline void launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  if (smem_bytes > kMaxSmem) {
    fail("launch: " + std::to_string(smem_bytes) + " bytes of shared memory > the 227 KiB limit");
    return;
  }
  Scheduler& s = sched();
  const int n = static_cast<int>(block.x * block.y * block.z);
  if (n % 32 != 0 || n > 1024 || n == 0) {
    fail("launch: " + std::to_string(n) + " threads per block (a multiple of 32 up to 1024 here)");
    return;
  }
  s.ctx.assign(n, ucontext_t{});
  s.stacks.resize(n);
  for (auto& st : s.stacks) st.resize(kStack);
  s.state.assign(n, kReady);
  s.body = &body;
  gridDim = grid;
  blockDim = block;
  Block b;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        b.smem.assign(smem_bytes + 128, 0xFF);  // NaN in fp32, bf16 and fp16: a read before a write shows
        b.exchange.assign(n, 0.f);
        s.block = &b;
        blockIdx = dim3(x, y, z);
        for (int t = 0; t < n; ++t) {
          getcontext(&s.ctx[t]);
          s.ctx[t].uc_stack.ss_sp = s.stacks[t].data();
          s.ctx[t].uc_stack.ss_size = kStack;
          s.ctx[t].uc_link = &s.main;
          makecontext(&s.ctx[t], trampoline, 0);
          s.state[t] = kReady;
        }
        for (;;) {
          const int warps = n / 32;
          for (int i = 0; i < warps; ++i)
            if (!run_warp(s, reverse_order() ? warps - 1 - i : i, block)) return;
          // As on the GPU, threads that have exited no longer count at a block barrier.
          int waiting = 0;
          for (int st : s.state) waiting += st == kAtBlockBarrier;
          if (waiting == 0) break;
          for (int& st : s.state)
            if (st == kAtBlockBarrier) st = kReady;
        }
      }
}

// Dynamic shared memory of the running block, 128-byte aligned like the kernels declare it.
inline unsigned char* dynamic_smem() {
  auto p = reinterpret_cast<uintptr_t>(sched().block->smem.data());
  return reinterpret_cast<unsigned char*>((p + 127) & ~uintptr_t(127));
}

}  // namespace megalm::emu

inline void __syncthreads() { megalm::emu::barrier(); }
inline void __syncwarp(unsigned = 0xffffffffu) { megalm::emu::warp_barrier(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  auto& x = megalm::emu::sched().block->exchange;
  const int t = static_cast<int>(threadIdx.x);
  x[t] = v;
  megalm::emu::warp_barrier();
  const float r = x[(t & ~31) | ((t & 31) ^ lane_mask)];
  megalm::emu::warp_barrier();
  return r;
}

// One OS thread runs every CUDA thread: a plain add is atomic.
template <typename T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}

template <typename T>
inline T min(T a, T b) { return a < b ? a : b; }
template <typename T>
inline T max(T a, T b) { return a > b ? a : b; }

namespace megalm::emu {

// bfloat16 as its bits; conversions round to nearest even, like __float2bfloat16_rn.
struct bf16 {
  uint16_t bits;
};
inline float to_float(bf16 x) {
  uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline bf16 bf16_from_float(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {uint16_t((u >> 16) | 0x40)};
  u += 0x7FFF + ((u >> 16) & 1);
  return {uint16_t(u >> 16)};
}

}  // namespace megalm::emu

namespace megalm::emu {

// IEEE half as its bits; conversions round to nearest even, like __float2half_rn.
struct half {
  uint16_t bits;
};
inline float to_float(half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000) << 16, e = (h.bits >> 10) & 0x1f, m = h.bits & 0x3ff;
  if (e == 0) {  // zero or subnormal: m * 2^-24
    const float f = std::ldexp(float(m), -24);
    return sign ? -f : f;
  }
  const uint32_t u = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112) << 23) | (m << 13));
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline half half_from_float(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000, a = u & 0x7fffffff;
  if (a > 0x7f800000) return {uint16_t(sign | 0x7e00)};  // NaN
  if (a >= 0x477ff000) return {uint16_t(sign | 0x7c00)};  // >= 65520 rounds to inf
  if (a < 0x38800000) {                                   // below 2^-14: subnormal, m = f * 2^24
    float af;
    std::memcpy(&af, &a, 4);
    return {uint16_t(sign | uint32_t(std::nearbyint(af * 16777216.0f)))};
  }
  uint32_t h = (((a >> 23) - 112) << 10) | ((a & 0x7fffff) >> 13);
  const uint32_t rest = a & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h += 1;
  return {uint16_t(sign | h)};
}

inline std::map<const void*, int>& smem_opt_in() {  // kernel -> bytes it opted into
  static std::map<const void*, int> m;
  return m;
}

inline void check_aligned16(const void* p, const char* file, int line) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
    fail(std::string(file) + ":" + std::to_string(line) + ": 16-byte access to a misaligned address");
}

// Launch through MEGALM_KERNEL(grid, block, smem, stream, kernel)(args...).
struct Launcher {
  dim3 grid, block;
  size_t smem;
  template <typename F>
  auto with(F* kernel) const {
    // Above 48 KiB of dynamic shared memory a GPU launch fails unless the kernel opted in.
    const auto opted = smem_opt_in().find(reinterpret_cast<const void*>(kernel));
    if (smem > 48 * 1024 && (opted == smem_opt_in().end() || size_t(opted->second) < smem))
      fail("launch: " + std::to_string(smem) + " bytes of dynamic shared memory without cudaFuncSetAttribute");
    return [*this, kernel](auto... args) { launch(grid, block, smem, [&] { kernel(args...); }); };
  }
};

}  // namespace megalm::emu

// What the kernels use of cuda_runtime.h, cuda_bf16.h and cuda_fp16.h (emu/include/ forwards
// those names here).
using __nv_bfloat16 = megalm::emu::bf16;
using __half = megalm::emu::half;
inline float __bfloat162float(__nv_bfloat16 x) { return megalm::emu::to_float(x); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return megalm::emu::bf16_from_float(x); }
inline float __half2float(__half x) { return megalm::emu::to_float(x); }
inline __half __float2half_rn(float x) { return megalm::emu::half_from_float(x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline void __threadfence() {}  // one OS thread: every write is already visible
// 16-byte vector accesses fault on a GPU when misaligned: the kernels' helpers check here.
#define MEGALM_ASSERT_ALIGNED16(p) megalm::emu::check_aligned16(p, __FILE__, __LINE__)
inline cudaError_t cudaGetLastError() { return megalm::emu::failure().empty() ? cudaSuccess : 1; }
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute, int bytes) {
  megalm::emu::smem_opt_in()[reinterpret_cast<const void*>(kernel)] = bytes;
  return cudaSuccess;
}
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin, cudaDevAttrMultiProcessorCount };
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMaxSharedMemoryPerBlockOptin ? int(megalm::emu::kMaxSmem) : 132;
  return cudaSuccess;
}
// Static __shared__ arrays: one copy per kernel, which the block's coroutines share (blocks run
// one after the other).
#define __shared__ static
#define MEGALM_EXTERN_SMEM(T, name) T* name = reinterpret_cast<T*>(megalm::emu::dynamic_smem())
#define MEGALM_KERNEL(grid, block, smem, stream, ...) \
  ((void)(stream), megalm::emu::Launcher{dim3(grid), dim3(block), size_t(smem)}.with(__VA_ARGS__))

namespace megalm::emu::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  float v[16][16];
};

inline void check(const void* p, unsigned ldm, size_t elem, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    fail(std::string(what) + ": pointer not 32-byte aligned");
  if ((ldm * elem) % 16 != 0) fail(std::string(what) + ": ldm not a multiple of 16 bytes");
}

template <typename T>
inline float as_float(T x) { return to_float(x); }
inline float as_float(float x) { return x; }

template <typename T>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  check(p, ldm, sizeof(T), "load matrix_a");
  for (int m = 0; m < 16; ++m)
    for (int k = 0; k < 16; ++k) f.v[m][k] = as_float(p[m * ldm + k]);
}
template <typename T>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, col_major>& f, const T* p, unsigned ldm) {
  check(p, ldm, sizeof(T), "load matrix_a");
  for (int m = 0; m < 16; ++m)
    for (int k = 0; k < 16; ++k) f.v[m][k] = as_float(p[k * ldm + m]);
}
template <typename T>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  check(p, ldm, sizeof(T), "load matrix_b");
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 16; ++n) f.v[k][n] = as_float(p[k * ldm + n]);
}
template <typename T>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major>& f, const T* p, unsigned ldm) {
  check(p, ldm, sizeof(T), "load matrix_b");
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 16; ++n) f.v[k][n] = as_float(p[n * ldm + k]);
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p,
                             unsigned ldm, layout_t layout) {
  check(p, ldm, sizeof(float), "load accumulator");
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n)
      f.v[m][n] = layout == mem_row_major ? p[m * ldm + n] : p[n * ldm + m];
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t layout) {
  check(p, ldm, sizeof(float), "store accumulator");
  // Every lane holds the whole tile and writes its share of it (element e by lane e % 32), so a
  // lane that reads the tile back before a __syncwarp sees stale data where later lanes write.
  const unsigned lane = threadIdx.x % 32;
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n)
      if (unsigned(m * 16 + n) % 32 == lane)
        (layout == mem_row_major ? p[m * ldm + n] : p[n * ldm + m]) = f.v[m][n];
}
inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float x) {
  for (auto& row : f.v)
    for (float& e : row) e = x;
}
template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16][16];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float acc = c.v[m][n];
      for (int k = 0; k < 16; ++k) acc += a.v[m][k] * b.v[k][n];
      out[m][n] = acc;
    }
  std::memcpy(d.v, out, sizeof(out));
}

}  // namespace megalm::emu::wmma
