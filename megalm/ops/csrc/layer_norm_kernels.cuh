// LayerNorm kernels shared by layer_norm.cu (affine [C]) and adaln.cu (affine [B, C], 1 + scale).
// Rows are grouped in batches of T rows; the affine params of batch b start at b * affine_stride.
#pragma once

#include "common.cuh"

namespace megalm {

template <typename T>
__global__ void ln_fwd_kernel(const T* __restrict__ x, const float* __restrict__ w,
                              const float* __restrict__ b, T* __restrict__ y,
                              float* __restrict__ mean_out, float* __restrict__ rstd_out,
                              int64_t C, int64_t rows_per_batch, int64_t affine_stride,
                              bool plus_one, float eps) {
  __shared__ float smem[kMaxThreads / kWarp];
  const int64_t row = blockIdx.x;
  const int64_t off = (row / rows_per_batch) * affine_stride;
  const T* xr = x + row * C;
  float s = 0.f;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) s += static_cast<float>(xr[j]);
  const float mean = block_sum(s, smem) / static_cast<float>(C);
  // Second pass for the variance: sum((x - mean)^2) is stable where E[x^2] - mean^2 is not.
  float v = 0.f;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    const float d = static_cast<float>(xr[j]) - mean;
    v += d * d;
  }
  const float rstd = rsqrtf(block_sum(v, smem) / static_cast<float>(C) + eps);
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    float o = (static_cast<float>(xr[j]) - mean) * rstd;
    if (w != nullptr) o *= plus_one ? 1.f + w[off + j] : w[off + j];
    if (b != nullptr) o += b[off + j];
    y[row * C + j] = static_cast<T>(o);
  }
}

// Block (g, batch) handles rows g, g+G, ... of its batch; writes dx and the partial sums
// dw_part[batch, g, :] = sum dy * xhat and db_part[batch, g, :] = sum dy (columns owned per thread).
template <typename T>
__global__ void ln_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                              const float* __restrict__ w, const float* __restrict__ mean,
                              const float* __restrict__ rstd, T* __restrict__ dx,
                              float* __restrict__ dw_part, float* __restrict__ db_part, int64_t C,
                              int64_t rows_per_batch, int64_t affine_stride, bool plus_one) {
  __shared__ float smem[kMaxThreads / kWarp];
  const int64_t G = gridDim.x, g = blockIdx.x, batch = blockIdx.y;
  const int64_t off = batch * affine_stride;
  const int64_t part_off = (batch * G + g) * C;
  for (int64_t t = g; t < rows_per_batch; t += G) {
    const int64_t row = batch * rows_per_batch + t;
    const T* dyr = dy + row * C;
    const T* xr = x + row * C;
    const float mu = mean[row], r = rstd[row];
    // dx = r * (gy - mean(gy) - xhat * mean(gy * xhat)), gy = dy * gamma
    float s1 = 0.f, s2 = 0.f;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const float gamma = w == nullptr ? 1.f : (plus_one ? 1.f + w[off + j] : w[off + j]);
      const float gy = static_cast<float>(dyr[j]) * gamma;
      s1 += gy;
      s2 += gy * (static_cast<float>(xr[j]) - mu) * r;
    }
    s1 = block_sum(s1, smem) / static_cast<float>(C);
    s2 = block_sum(s2, smem) / static_cast<float>(C);
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const float gamma = w == nullptr ? 1.f : (plus_one ? 1.f + w[off + j] : w[off + j]);
      const float d = static_cast<float>(dyr[j]);
      const float xhat = (static_cast<float>(xr[j]) - mu) * r;
      dx[row * C + j] = static_cast<T>(r * (d * gamma - s1 - xhat * s2));
      if (dw_part != nullptr) dw_part[part_off + j] += d * xhat;
      if (db_part != nullptr) db_part[part_off + j] += d;
    }
  }
}

}  // namespace megalm
