// SwiGLU: y = silu(gate) * up, elementwise in fp32; backward gives dgate and dup.
#include "kernels.cuh"
#include "launch.h"

namespace megalm {
namespace {

__device__ __forceinline__ float sigmoid_f(float g) { return 1.f / (1.f + expf(-g)); }

template <typename T>
__global__ void swiglu_fwd_kernel(const T* __restrict__ gate, const T* __restrict__ up,
                                  T* __restrict__ y, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float g = to_f(gate[i]);
    y[i] = from_f<T>(g * sigmoid_f(g) * to_f(up[i]));
  }
}

template <typename T>
__global__ void swiglu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ gate,
                                  const T* __restrict__ up, T* __restrict__ dgate,
                                  T* __restrict__ dup, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float g = to_f(gate[i]);
    const float u = to_f(up[i]);
    const float d = to_f(dy[i]);
    const float sg = sigmoid_f(g);
    // d silu(g) / dg = sg * (1 + g * (1 - sg))
    dgate[i] = from_f<T>(d * u * sg * (1.f + g * (1.f - sg)));
    dup[i] = from_f<T>(d * g * sg);
  }
}

}  // namespace

namespace launch {

template <typename T>
cudaError_t swiglu_fwd(const T* gate, const T* up, T* y, int64_t n, cudaStream_t s) {
  swiglu_fwd_kernel<T><<<grid_1d(n, 256), 256, 0, s>>>(gate, up, y, n);
  return cudaGetLastError();
}

template <typename T>
cudaError_t swiglu_bwd(const T* dy, const T* gate, const T* up, T* dgate, T* dup, int64_t n,
                       cudaStream_t s) {
  swiglu_bwd_kernel<T><<<grid_1d(n, 256), 256, 0, s>>>(dy, gate, up, dgate, dup, n);
  return cudaGetLastError();
}

#define INSTANTIATE(T)                                                                          \
  template cudaError_t swiglu_fwd<T>(const T*, const T*, T*, int64_t, cudaStream_t);           \
  template cudaError_t swiglu_bwd<T>(const T*, const T*, const T*, T*, T*, int64_t,            \
                                     cudaStream_t);
MEGALM_FOR_EACH_TYPE(INSTANTIATE)
#undef INSTANTIATE

}  // namespace launch
}  // namespace megalm
