// out = x * (*factor) in fp32, written in out's dtype: the loss backward applies dloss / n_targets
// to the unscaled CE gradient (T -> T) and to the fp32 weight-gradient buffer (float -> T) in one
// pass, reading the factor on the device (no host sync). 16-byte vectors + scalar tail.
#include "kernels.cuh"
#include "launch.h"

namespace megalm {
namespace {

constexpr int kThreads = 256;

template <typename In, typename Out, int N>
__global__ void __launch_bounds__(kThreads)
    scale_kernel(const In* __restrict__ x, const float* __restrict__ factor, Out* __restrict__ y,
                 int64_t n) {
  const float f = *factor;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * N;
  const int64_t body = n - n % N;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * N; i < body;
       i += stride) {
    float v[N];
    load_f<N>(x + i, v);
#pragma unroll
    for (int e = 0; e < N; ++e) v[e] *= f;
    store_f<N>(y + i, v);
  }
  if (blockIdx.x == 0 && body + threadIdx.x < n) {
    const int64_t i = body + threadIdx.x;
    y[i] = from_f<Out>(to_f(x[i]) * f);
  }
}

}  // namespace

namespace launch {

template <typename In, typename Out>
cudaError_t scale(const In* x, const float* factor, Out* y, int64_t n, cudaStream_t s) {
  dispatch_vec<Out>(vec_width<Out>(0, {x, y}), [&](auto v) {
    constexpr int N = decltype(v)::value;
    MEGALM_KERNEL(grid_1d((n + N - 1) / N, kThreads), kThreads, 0, s, scale_kernel<In, Out, N>)(
        x, factor, y, n);
  });
  return cudaGetLastError();
}

#define INSTANTIATE(T) \
  template cudaError_t scale<T, T>(const T*, const float*, T*, int64_t, cudaStream_t);
MEGALM_FOR_EACH_TYPE(INSTANTIATE)
#undef INSTANTIATE
template cudaError_t scale<float, __half>(const float*, const float*, __half*, int64_t,
                                          cudaStream_t);
template cudaError_t scale<float, __nv_bfloat16>(const float*, const float*, __nv_bfloat16*,
                                                 int64_t, cudaStream_t);
// Newton–Schulz: any input dtype -> bf16.
template cudaError_t scale<__half, __nv_bfloat16>(const __half*, const float*, __nv_bfloat16*,
                                                  int64_t, cudaStream_t);
template cudaError_t scale<double, __nv_bfloat16>(const double*, const float*, __nv_bfloat16*,
                                                  int64_t, cudaStream_t);

}  // namespace launch
}  // namespace megalm
