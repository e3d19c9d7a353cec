// Device helpers shared by the kernels. Deliberately free of torch headers: the .cu files only
// parse CUDA's own headers, which keeps nvcc fast (ATen is compiled once, by g++, in host.cpp).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

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
// `smem` holds kMaxThreads / kWarp floats. Ends with a barrier so smem can be reused at once.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < static_cast<int>(blockDim.x / kWarp); ++w) total += smem[w];  // same order everywhere
  __syncthreads();
  return total;
}

// Threads per row of `cols` elements: a multiple of 32 in [32, 1024], ~4 elements per thread.
inline int row_threads(int64_t cols) {
  int t = 32;
  while (t < kMaxThreads && t * 4 < cols) t *= 2;
  return t;
}

inline int grid_1d(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 65535LL * 32 ? 65535LL * 32 : blocks));
}

}  // namespace megalm

// Explicit instantiation for every element type the host dispatches on.
#define MEGALM_FOR_EACH_TYPE(M) M(float) M(double) M(__half) M(__nv_bfloat16)
