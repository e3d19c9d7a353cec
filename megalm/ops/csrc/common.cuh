// Shared device helpers: fp32 block reductions and the column-sum used by norm backwards.
#pragma once

// Only c10 CUDA headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers, which a
// minimal CUDA toolkit (nvcc + cudart only) does not ship.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>

namespace megalm {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the whole block; every thread gets the result. blockDim.x must be a multiple of 32.
// `smem` holds kMaxThreads / kWarp floats. Ends with a barrier so smem can be reused at once.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < nwarps; ++w) total += smem[w];  // same order in every thread
  __syncthreads();
  return total;
}

// Threads per row for a row of `cols` elements: a multiple of 32, at most 1024, at least 32.
inline int row_threads(int64_t cols) {
  int t = 32;
  while (t < kMaxThreads && t * 4 < cols) t *= 2;
  return t;
}

// out[b, c] = sum_g in[b, g, c] for in [B, G, C] fp32 (partial sums of norm weight grads).
// Defined here (static) so each translation unit has its own copy: no relocatable device code.
static __global__ void column_sum_kernel(const float* __restrict__ in, float* __restrict__ out,
                                         int64_t groups, int64_t cols) {
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (c >= cols) return;
  const float* src = in + b * groups * cols + c;
  float acc = 0.f;
  for (int64_t g = 0; g < groups; ++g) acc += src[g * cols];
  out[b * cols + c] = acc;
}

inline void column_sum(const at::Tensor& partial, at::Tensor& out) {
  // partial [B, G, C] fp32 contiguous; out [B, C] fp32 contiguous
  const int64_t B = partial.size(0), G = partial.size(1), C = partial.size(2);
  const int threads = 256;
  dim3 grid((unsigned)((C + threads - 1) / threads), (unsigned)B);
  column_sum_kernel<<<grid, threads, 0, c10::cuda::getCurrentCUDAStream().stream()>>>(
      partial.data_ptr<float>(), out.data_ptr<float>(), G, C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// How many row-groups a backward splits rows into (each writes one partial [C] row).
inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline int64_t partial_groups(int64_t rows) {
  int device = 0, sms = 1;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return std::max<int64_t>(1, std::min<int64_t>(rows, 4 * (int64_t)sms));
}

}  // namespace megalm
