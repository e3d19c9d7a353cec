// Softmax cross-entropy rows: one block per row, online (max, sum-exp) in fp32 over 16-byte
// vectors, then (when a gradient is wanted) one more pass writing the UNSCALED gradient
// softmax - onehot in the logits dtype, optionally in place. The caller applies dloss / n in fp32.
#include <cmath>

#include "kernels.cuh"
#include "launch.h"

namespace megalm {
namespace {

struct MaxSum {
  float m;  // running max
  float s;  // sum of exp(x - m)
};

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  // An empty side has m = -inf; exp(-inf - -inf) would be NaN, so handle it explicitly.
  if (a.m == -INFINITY) return b;
  if (b.m == -INFINITY) return a;
  const float m = fmaxf(a.m, b.m);
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

__device__ __forceinline__ MaxSum block_max_sum(MaxSum v, float* sm_m, float* sm_s) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
    v = merge(v, other);
  }
  if (lane == 0) {
    sm_m[warp] = v.m;
    sm_s[warp] = v.s;
  }
  __syncthreads();
  MaxSum total{-INFINITY, 0.f};
  for (int w = 0; w < (int)(blockDim.x / kWarp); ++w) total = merge(total, {sm_m[w], sm_s[w]});
  __syncthreads();
  return total;
}

template <typename T, int N>
__global__ void __launch_bounds__(kMaxThreads)
    ce_kernel(const T* logits, const int64_t* __restrict__ labels, T* grad,
              float* __restrict__ loss, int64_t V, int64_t ignore_index) {
  // `grad` may alias `logits` (in place): each element is read then written by the same thread,
  // and the target logit is read before the writing pass starts (barrier in block_max_sum).
  __shared__ float sm_m[kMaxThreads / kWarp], sm_s[kMaxThreads / kWarp];
  const int64_t row = blockIdx.x;
  const T* xr = logits + row * V;  // no __restrict__: may alias gr
  const int64_t label = labels[row];
  const bool valid = label != ignore_index;
  const bool in_range = label >= 0 && label < V;
  const int64_t step = static_cast<int64_t>(blockDim.x) * N;
  MaxSum acc{-INFINITY, 0.f};
  for (int64_t j = threadIdx.x * N; j < V; j += step) {
    float x[N];
    load_f<N>(xr + j, x);
    float m = x[0];
#pragma unroll
    for (int i = 1; i < N; ++i) m = fmaxf(m, x[i]);
    if (m == -INFINITY) continue;  // nothing to add
    if (m > acc.m) {
      acc.s = acc.m == -INFINITY ? 0.f : acc.s * expf(acc.m - m);
      acc.m = m;
    }
#pragma unroll
    for (int i = 0; i < N; ++i) acc.s += expf(x[i] - acc.m);
  }
  const float target = (valid && in_range) ? to_f(xr[label]) : 0.f;
  acc = block_max_sum(acc, sm_m, sm_s);
  const float lse = acc.m + logf(acc.s);
  if (threadIdx.x == 0) loss[row] = !valid ? 0.f : (in_range ? lse - target : NAN);
  if (grad == nullptr) return;
  T* gr = grad + row * V;
  for (int64_t j = threadIdx.x * N; j < V; j += step) {
    float x[N];
    load_f<N>(xr + j, x);
#pragma unroll
    for (int i = 0; i < N; ++i)
      x[i] = valid ? expf(x[i] - lse) - (j + i == label ? 1.f : 0.f) : 0.f;
    store_f<N>(gr + j, x);
  }
}

}  // namespace

namespace launch {

template <typename T>
cudaError_t cross_entropy_fwd(const T* logits, const int64_t* labels, T* grad, float* loss,
                              int64_t N, int64_t V, int64_t ignore_index, cudaStream_t s) {
  dispatch_vec<T>(vec_width<T>(V, {logits, grad}), [&](auto v) {
    constexpr int W = decltype(v)::value;
    MEGALM_KERNEL(static_cast<unsigned>(N), row_threads(V / W), 0, s, ce_kernel<T, W>)(
        logits, labels, grad, loss, V, ignore_index);
  });
  return cudaGetLastError();
}

#define INSTANTIATE(T)                                                                       \
  template cudaError_t cross_entropy_fwd<T>(const T*, const int64_t*, T*, float*, int64_t,  \
                                            int64_t, int64_t, cudaStream_t);
MEGALM_FOR_EACH_TYPE(INSTANTIATE)
#undef INSTANTIATE

}  // namespace launch
}  // namespace megalm
