// RMSNorm over rows [R, C]: one block per row, fp32 accumulation; weight is fp32 [C].
#include "kernels.cuh"
#include "launch.h"

namespace megalm {
namespace {

template <typename T>
__global__ void rms_norm_fwd_kernel(const T* __restrict__ x, const float* __restrict__ w,
                                    T* __restrict__ y, float* __restrict__ rstd_out, int64_t C,
                                    float eps) {
  __shared__ float smem[kMaxThreads / kWarp];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * C;
  float ss = 0.f;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    const float v = to_f(xr[j]);
    ss += v * v;
  }
  ss = block_sum(ss, smem);
  const float rstd = rsqrtf(ss / static_cast<float>(C) + eps);
  if (threadIdx.x == 0) rstd_out[row] = rstd;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    float v = to_f(xr[j]) * rstd;
    if (w != nullptr) v *= w[j];
    y[row * C + j] = from_f<T>(v);
  }
}

// Block g handles rows g, g+G, ...: dx per row, and its partial dw in dw_part[g, :]
// (each thread owns its columns, so no atomics).
template <typename T>
__global__ void rms_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                    const float* __restrict__ w, const float* __restrict__ rstd,
                                    T* __restrict__ dx, float* __restrict__ dw_part, int64_t R,
                                    int64_t C) {
  __shared__ float smem[kMaxThreads / kWarp];
  for (int64_t row = blockIdx.x; row < R; row += gridDim.x) {
    const T* dyr = dy + row * C;
    const T* xr = x + row * C;
    const float r = rstd[row];
    // dx_j = r * (w_j dy_j - xhat_j * mean_i(w_i dy_i xhat_i)), xhat = x * r
    float dot = 0.f;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const float wdy = to_f(dyr[j]) * (w != nullptr ? w[j] : 1.f);
      dot += wdy * to_f(xr[j]) * r;
    }
    dot = block_sum(dot, smem) / static_cast<float>(C);
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const float g = to_f(dyr[j]);
      const float xhat = to_f(xr[j]) * r;
      const float wdy = g * (w != nullptr ? w[j] : 1.f);
      dx[row * C + j] = from_f<T>(r * (wdy - xhat * dot));
      if (dw_part != nullptr) dw_part[blockIdx.x * C + j] += g * xhat;
    }
  }
}

__global__ void column_sum_kernel(const float* __restrict__ in, float* __restrict__ out,
                                  int64_t groups, int64_t cols) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (c >= cols) return;
  const float* src = in + b * groups * cols + c;
  float acc = 0.f;
  for (int64_t g = 0; g < groups; ++g) acc += src[g * cols];
  out[b * cols + c] = acc;
}

}  // namespace

namespace launch {

cudaError_t column_sum(const float* in, float* out, int64_t B, int64_t G, int64_t C,
                       cudaStream_t s) {
  const int threads = 256;
  dim3 grid(static_cast<unsigned>((C + threads - 1) / threads), static_cast<unsigned>(B));
  column_sum_kernel<<<grid, threads, 0, s>>>(in, out, G, C);
  return cudaGetLastError();
}

template <typename T>
cudaError_t rms_norm_fwd(const T* x, const float* w, T* y, float* rstd, int64_t R, int64_t C,
                         float eps, cudaStream_t s) {
  rms_norm_fwd_kernel<T><<<static_cast<unsigned>(R), row_threads(C), 0, s>>>(x, w, y, rstd, C, eps);
  return cudaGetLastError();
}

template <typename T>
cudaError_t rms_norm_bwd(const T* dy, const T* x, const float* w, const float* rstd, T* dx,
                         float* dw_part, int64_t R, int64_t C, int64_t G, cudaStream_t s) {
  rms_norm_bwd_kernel<T><<<static_cast<unsigned>(G), row_threads(C), 0, s>>>(dy, x, w, rstd, dx,
                                                                            dw_part, R, C);
  return cudaGetLastError();
}

#define INSTANTIATE(T)                                                                          \
  template cudaError_t rms_norm_fwd<T>(const T*, const float*, T*, float*, int64_t, int64_t,   \
                                       float, cudaStream_t);                                   \
  template cudaError_t rms_norm_bwd<T>(const T*, const T*, const float*, const float*, T*,     \
                                       float*, int64_t, int64_t, int64_t, cudaStream_t);
MEGALM_FOR_EACH_TYPE(INSTANTIATE)
#undef INSTANTIATE

}  // namespace launch
}  // namespace megalm
