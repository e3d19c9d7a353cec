// RoPE, rotate_half layout, on x [B, T, H, D] with fp32 cos/sin [B, T, D/2]: one thread per pair.
#include "kernels.cuh"
#include "launch.h"

namespace megalm {
namespace {

template <typename T>
__global__ void rope_kernel(const T* __restrict__ x, const float* __restrict__ cos,
                            const float* __restrict__ sin, T* __restrict__ y, int64_t pairs,
                            int64_t heads, int64_t half, float sign) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < pairs;
       p += stride) {
    const int64_t i = p % half;      // frequency index
    const int64_t bth = p / half;    // (b, t, h) flattened
    const int64_t bt = bth / heads;  // (b, t) flattened: the cos/sin row
    const int64_t base = bth * 2 * half;
    const float c = cos[bt * half + i];
    const float s = sign * sin[bt * half + i];
    const float x1 = to_f(x[base + i]);
    const float x2 = to_f(x[base + half + i]);
    y[base + i] = from_f<T>(x1 * c - x2 * s);
    y[base + half + i] = from_f<T>(x2 * c + x1 * s);
  }
}

}  // namespace

namespace launch {

template <typename T>
cudaError_t rope(const T* x, const float* cos, const float* sin, T* y, int64_t numel,
                 int64_t heads, int64_t head_dim, bool inverse, cudaStream_t s) {
  const int64_t pairs = numel / 2;
  rope_kernel<T><<<grid_1d(pairs, 256), 256, 0, s>>>(x, cos, sin, y, pairs, heads, head_dim / 2,
                                                     inverse ? -1.f : 1.f);
  return cudaGetLastError();
}

#define INSTANTIATE(T)                                                                           \
  template cudaError_t rope<T>(const T*, const float*, const float*, T*, int64_t, int64_t,      \
                               int64_t, bool, cudaStream_t);
MEGALM_FOR_EACH_TYPE(INSTANTIATE)
#undef INSTANTIATE

}  // namespace launch
}  // namespace megalm
