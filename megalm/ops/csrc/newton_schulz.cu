// Newton–Schulz prologue for Muon: 1 / (||G||_F + eps) computed on the device in one launch (the
// last block to finish turns the sum of squares into the factor), then scale.cu's kernel writes
// G · factor as bf16 — no host sync. The quintic iterations themselves are cuBLAS GEMMs issued
// from host.cpp with their elementwise terms (b·A + c·A², a·X + B·X) in the GEMM epilogue.
#include "kernels.cuh"
#include "launch.h"

namespace megalm {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 1024;

// buf[0] accumulates sum(x²) in fp32 (one atomic per block); buf[1], read as a counter, tells the
// last block, which replaces buf[0] with 1 / (sqrt(sum) + eps).
template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    inverse_norm_kernel(const T* __restrict__ x, float* buf, float eps, int64_t n) {
  __shared__ float smem[kMaxThreads / kWarp];
  __shared__ bool last;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * N;
  const int64_t body = n - n % N;
  float acc = 0.f;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * N; i < body;
       i += stride) {
    float v[N];
    load_f<N>(x + i, v);
#pragma unroll
    for (int e = 0; e < N; ++e) acc += v[e] * v[e];
  }
  if (blockIdx.x == 0 && body + threadIdx.x < n) {  // scalar tail (< N elements)
    const float v = to_f(x[body + threadIdx.x]);
    acc += v * v;
  }
  const float total = block_sum(acc, smem);
  if (threadIdx.x == 0) {
    atomicAdd(buf, total);
    __threadfence();  // this block's sum is visible before its ticket is
    const unsigned ticket = atomicAdd(reinterpret_cast<unsigned*>(buf + 1), 1u);
    last = ticket == gridDim.x - 1;
  }
  __syncthreads();
  if (last && threadIdx.x == 0) {
    const float sumsq = atomicAdd(buf, 0.f);  // read through L2: every block's sum is in
    buf[0] = 1.f / (sqrtf(sumsq) + eps);
  }
}

}  // namespace

namespace launch {

template <typename T>
cudaError_t inverse_frobenius_norm(const T* x, float* buf, float eps, int64_t n, cudaStream_t s) {
  dispatch_vec<T>(vec_width<T>(0, {x}), [&](auto v) {
    constexpr int N = decltype(v)::value;
    const int blocks = grid_1d((n + N - 1) / N, kThreads);
    MEGALM_KERNEL(blocks < kMaxBlocks ? blocks : kMaxBlocks, kThreads, 0, s, inverse_norm_kernel<T, N>)(
        x, buf, eps, n);
  });
  return cudaGetLastError();
}

#define INSTANTIATE(T) \
  template cudaError_t inverse_frobenius_norm<T>(const T*, float*, float, int64_t, cudaStream_t);
MEGALM_FOR_EACH_TYPE(INSTANTIATE)
#undef INSTANTIATE

}  // namespace launch
}  // namespace megalm
