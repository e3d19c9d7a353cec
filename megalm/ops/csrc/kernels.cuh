// Device helpers shared by the kernels. Deliberately free of torch headers: the .cu files only
// parse CUDA's own headers, which keeps nvcc fast (ATen is compiled once, by g++, in host.cpp).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

// kernel<<<grid, block, smem, stream>>>(args) is spelled MEGALM_KERNEL(grid, block, smem,
// stream, kernel)(args) and `extern __shared__ T name[]` MEGALM_EXTERN_SMEM(T, name), so the CPU
// emulation (emu/cuda_emu.h, which defines both its own way) runs these very sources in the tests.
#ifndef MEGALM_KERNEL
#define MEGALM_KERNEL(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define MEGALM_EXTERN_SMEM(T, name) extern __shared__ T name[]
#define MEGALM_ASSERT_ALIGNED16(p)  // the emulation checks what would fault here
#endif

namespace megalm {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;

// Explicit conversions: torch builds define __CUDA_NO_HALF_CONVERSIONS__ and friends.
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(double v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_f<double>(float v) { return static_cast<double>(v); }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the whole block; every thread gets the result. blockDim.x must be a multiple of 32.
// `smem` holds kMaxThreads / kWarp floats. With several warps it ends with a barrier so smem can
// be reused at once; a one-warp block (row_threads gives one for rows up to 128 vectors: GPT-2's
// 768 in bf16) uses no shared memory and no barrier, so callers must not rely on it as one. The
// butterfly leaves the same sum in every lane, the value the general path gives.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  if (blockDim.x == kWarp) return warp_sum(v);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < static_cast<int>(blockDim.x / kWarp); ++w) total += smem[w];  // same order everywhere
  __syncthreads();
  return total;
}

// Threads per row of `items` work items (vectors): a multiple of 32 in [32, 1024], ~4 per thread.
__host__ __device__ inline int row_threads(int64_t items) {
  int t = 32;
  while (t < kMaxThreads && t * 4 < items) t *= 2;
  return t;
}

// Row passes a thread keeps in registers: with row_threads' ~4 vectors per thread, a row of up to
// 4 * 1024 vectors is read from memory once instead of once per pass.
constexpr int kRowCache = 4;

// ---- 16-byte vector access -------------------------------------------------------------------
// A kernel templated on N (elements per access) uses these; N = 1 is the scalar path. When
// N * sizeof(T) is a multiple of 16 the access is split into 16-byte loads/stores, which needs the
// address 16-byte aligned: the host picks N > 1 only when every base pointer is 16-byte aligned and
// the row length / element count is a multiple of N (see vec_width).
template <typename T, int E>
struct alignas(sizeof(T) * E) Vec {
  T v[E];
};

template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));  // elements in 16 bytes

template <int N, typename T>
__device__ __forceinline__ void load_f(const T* p, float (&out)[N]) {
  constexpr int E = kVec16<T>;
  if constexpr (N % E == 0) {
    MEGALM_ASSERT_ALIGNED16(p);
#pragma unroll
    for (int c = 0; c < N / E; ++c) {
      const Vec<T, E> v = reinterpret_cast<const Vec<T, E>*>(p)[c];
#pragma unroll
      for (int i = 0; i < E; ++i) out[c * E + i] = to_f(v.v[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_f(p[i]);
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_f(T* p, const float (&in)[N]) {
  constexpr int E = kVec16<T>;
  if constexpr (N % E == 0) {
    MEGALM_ASSERT_ALIGNED16(p);
#pragma unroll
    for (int c = 0; c < N / E; ++c) {
      Vec<T, E> v;
#pragma unroll
      for (int i = 0; i < E; ++i) v.v[i] = from_f<T>(in[c * E + i]);
      reinterpret_cast<Vec<T, E>*>(p)[c] = v;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = from_f<T>(in[i]);
  }
}

__host__ __device__ inline bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Elements per access for T: 16 bytes' worth when `count` is a multiple of it and every pointer
// (null ones ignored) is 16-byte aligned, else 1.
template <typename T>
inline int vec_width(int64_t count, std::initializer_list<const void*> ptrs) {
  const int n = kVec16<T>;
  if (count % n != 0) return 1;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return 1;
  return n;
}

inline int grid_1d(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 65535LL * 32 ? 65535LL * 32 : blocks));
}

// Calls f(std::integral_constant<int, N>) with N = n when n is T's 16-byte width, else N = 1.
template <typename T, typename F>
inline void dispatch_vec(int n, F&& f) {
  if (n == kVec16<T>) {
    f(std::integral_constant<int, kVec16<T>>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// Per-thread column slots of a row walked with N-element accesses by `threads` threads: the
// accumulator of column (k * threads + t) * N + i lives at slot (k * N + i) * threads + t, so a
// warp touches consecutive shared-memory words (no bank conflicts). slots = rounds * N * threads.
inline int64_t acc_slots(int64_t cols, int threads, int n) {
  const int64_t per_round = static_cast<int64_t>(threads) * n;
  return (cols + per_round - 1) / per_round * per_round;
}

__device__ __forceinline__ int64_t acc_slot(int64_t k, int i, int n) {
  return (k * n + i) * blockDim.x + threadIdx.x;
}

// Largest dynamic shared memory a block may opt into on the current device.
inline int64_t max_dynamic_smem() {
  int dev = 0, bytes = 48 * 1024;
  if (cudaGetDevice(&dev) == cudaSuccess)
    cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  return bytes;
}

}  // namespace megalm

// Explicit instantiation for every element type the host dispatches on.
#define MEGALM_FOR_EACH_TYPE(M) M(float) M(double) M(__half) M(__nv_bfloat16)
