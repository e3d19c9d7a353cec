// SwiGLU: y = silu(gate) * up, elementwise in fp32; backward gives dgate and dup.
// N = elements per access: 16-byte vectors over the first n - n % N elements, then a scalar tail.
#include "kernels.cuh"
#include "launch.h"

namespace megalm {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float sigmoid_f(float g) { return 1.f / (1.f + expf(-g)); }

template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    swiglu_fwd_kernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ y,
                      int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * N;
  const int64_t body = n - n % N;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * N; i < body;
       i += stride) {
    float g[N], u[N];
    load_f<N>(gate + i, g);
    load_f<N>(up + i, u);
#pragma unroll
    for (int e = 0; e < N; ++e) g[e] = g[e] * sigmoid_f(g[e]) * u[e];
    store_f<N>(y + i, g);
  }
  if (blockIdx.x == 0 && body + threadIdx.x < n) {  // scalar tail (< N elements)
    const int64_t i = body + threadIdx.x;
    const float g = to_f(gate[i]);
    y[i] = from_f<T>(g * sigmoid_f(g) * to_f(up[i]));
  }
}

template <int N>
__device__ __forceinline__ void swiglu_grad(const float (&d)[N], float (&g)[N], float (&u)[N]) {
#pragma unroll
  for (int e = 0; e < N; ++e) {
    const float sg = sigmoid_f(g[e]);
    const float du = d[e] * g[e] * sg;
    // d silu(g) / dg = sg * (1 + g * (1 - sg))
    g[e] = d[e] * u[e] * sg * (1.f + g[e] * (1.f - sg));
    u[e] = du;
  }
}

template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    swiglu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ gate,
                      const T* __restrict__ up, T* __restrict__ dgate, T* __restrict__ dup,
                      int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * N;
  const int64_t body = n - n % N;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * N; i < body;
       i += stride) {
    float d[N], g[N], u[N];
    load_f<N>(dy + i, d);
    load_f<N>(gate + i, g);
    load_f<N>(up + i, u);
    swiglu_grad<N>(d, g, u);
    store_f<N>(dgate + i, g);
    store_f<N>(dup + i, u);
  }
  if (blockIdx.x == 0 && body + threadIdx.x < n) {
    const int64_t i = body + threadIdx.x;
    float d[1] = {to_f(dy[i])}, g[1] = {to_f(gate[i])}, u[1] = {to_f(up[i])};
    swiglu_grad<1>(d, g, u);
    dgate[i] = from_f<T>(g[0]);
    dup[i] = from_f<T>(u[0]);
  }
}

inline int grid_for(int64_t n, int vec) {
  return grid_1d((n + vec - 1) / vec, kThreads);
}

// Pointers decide the width; the element count only decides the tail (any n works).
template <typename T>
int width(std::initializer_list<const void*> ptrs) {
  return vec_width<T>(0, ptrs);
}

}  // namespace

namespace launch {

template <typename T>
cudaError_t swiglu_fwd(const T* gate, const T* up, T* y, int64_t n, cudaStream_t s) {
  dispatch_vec<T>(width<T>({gate, up, y}), [&](auto v) {
    constexpr int N = decltype(v)::value;
    MEGALM_KERNEL(grid_for(n, N), kThreads, 0, s, swiglu_fwd_kernel<T, N>)(gate, up, y, n);
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t swiglu_bwd(const T* dy, const T* gate, const T* up, T* dgate, T* dup, int64_t n,
                       cudaStream_t s) {
  dispatch_vec<T>(width<T>({dy, gate, up, dgate, dup}), [&](auto v) {
    constexpr int N = decltype(v)::value;
    MEGALM_KERNEL(grid_for(n, N), kThreads, 0, s, swiglu_bwd_kernel<T, N>)(dy, gate, up, dgate, dup, n);
  });
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
