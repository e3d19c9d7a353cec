// RoPE, rotate_half layout, on q [B, T, Hq, D] and k [B, T, Hk, D] in ONE launch, with fp32
// cos/sin [1 or B, T, D/2] (a batch of 1 is broadcast: cos_bstride = 0). Each work item rotates
// N consecutive pairs (16-byte vectors when D/2 and the pointers allow). Index math in 32 bits
// whenever the tensors fit (I = uint32_t), else 64.
#include "kernels.cuh"
#include "launch.h"

namespace megalm {
namespace {

constexpr int kThreads = 256;

template <typename T, int N, typename I>
__device__ __forceinline__ void rotate(const T* __restrict__ x, T* __restrict__ y,
                                       const float* __restrict__ cos, const float* __restrict__ sin,
                                       I item, I heads, I T_, I half, I cos_bstride, float sign) {
  const I per_row = half / N;
  const I row = item / per_row;            // (b, t, h) flattened
  const I i = (item - row * per_row) * N;  // first frequency index of this item
  const I bt = row / heads;
  const I b = bt / T_;
  const I t = bt - b * T_;
  const I cs = b * cos_bstride + t * half + i;
  const I base = row * 2 * half + i;
  float c[N], s[N], x1[N], x2[N];
  load_f<N>(cos + cs, c);
  load_f<N>(sin + cs, s);
  load_f<N>(x + base, x1);
  load_f<N>(x + base + half, x2);
  float o1[N], o2[N];
#pragma unroll
  for (int e = 0; e < N; ++e) {
    const float se = sign * s[e];
    o1[e] = x1[e] * c[e] - x2[e] * se;
    o2[e] = x2[e] * c[e] + x1[e] * se;
  }
  store_f<N>(y + base, o1);
  store_f<N>(y + base + half, o2);
}

template <typename T, int N, typename I>
__global__ void __launch_bounds__(kThreads)
    rope_kernel(const T* __restrict__ q, const T* __restrict__ k, T* __restrict__ qo,
                T* __restrict__ ko, const float* __restrict__ cos, const float* __restrict__ sin,
                I items_q, I items_k, I hq, I hk, I T_, I half, I cos_bstride, float sign) {
  const I total = items_q + items_k;
  const I stride = static_cast<I>(gridDim.x) * blockDim.x;
  for (I p = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; p < total; p += stride) {
    if (p < items_q) {
      rotate<T, N, I>(q, qo, cos, sin, p, hq, T_, half, cos_bstride, sign);
    } else {
      rotate<T, N, I>(k, ko, cos, sin, p - items_q, hk, T_, half, cos_bstride, sign);
    }
  }
}

}  // namespace

namespace launch {

template <typename T>
cudaError_t rope(const T* q, const T* k, T* qo, T* ko, const float* cos, const float* sin,
                 int64_t B, int64_t T_, int64_t hq, int64_t hk, int64_t head_dim, bool cos_batched,
                 bool inverse, cudaStream_t s) {
  const int64_t half = head_dim / 2;
  const int n = vec_width<T>(half, {q, k, qo, ko, cos, sin});
  const int64_t items_q = B * T_ * hq * half / n, items_k = B * T_ * hk * half / n;
  // 32-bit indices when every element offset (x and cos/sin) fits.
  const bool small = B * T_ * (hq > hk ? hq : hk) * head_dim < (int64_t{1} << 31) &&
                     items_q + items_k < (int64_t{1} << 31);
  const float sign = inverse ? -1.f : 1.f;
  const int64_t bstride = cos_batched ? T_ * half : 0;
  const int grid = grid_1d(items_q + items_k, kThreads);
  dispatch_vec<T>(n, [&](auto v) {
    constexpr int N = decltype(v)::value;
    if (small) {
      using I = uint32_t;
      MEGALM_KERNEL(grid, kThreads, 0, s, rope_kernel<T, N, I>)(
          q, k, qo, ko, cos, sin, static_cast<I>(items_q), static_cast<I>(items_k),
          static_cast<I>(hq), static_cast<I>(hk), static_cast<I>(T_), static_cast<I>(half),
          static_cast<I>(bstride), sign);
    } else {
      MEGALM_KERNEL(grid, kThreads, 0, s, rope_kernel<T, N, int64_t>)(
          q, k, qo, ko, cos, sin, items_q, items_k, hq, hk, T_, half, bstride, sign);
    }
  });
  return cudaGetLastError();
}

#define INSTANTIATE(T)                                                                           \
  template cudaError_t rope<T>(const T*, const T*, T*, T*, const float*, const float*, int64_t, \
                               int64_t, int64_t, int64_t, int64_t, bool, bool, cudaStream_t);
MEGALM_FOR_EACH_TYPE(INSTANTIATE)
#undef INSTANTIATE

}  // namespace launch
}  // namespace megalm
