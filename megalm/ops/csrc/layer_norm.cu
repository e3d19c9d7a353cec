// LayerNorm over rows [R, C], fp32 accumulation, two-pass variance. Also serves adaLN: rows come
// in batches of T rows whose affine params start at batch * affine_stride, and plus_one turns
// the weight into (1 + scale) — so norm(x) * (1 + scale[b]) + shift[b] is the same kernel.
// N = elements per access (16-byte vectors when C and the pointers allow, else 1). The affine
// params W are fp32 or x's type (read as they are: a bf16 model's need no cast kernel per call).
#include "kernels.cuh"
#include "launch.h"

namespace megalm {
namespace {

template <int N, typename W>
__device__ __forceinline__ void gamma_at(const W* w, int64_t j, bool plus_one, float (&g)[N]) {
  if (w == nullptr) {
#pragma unroll
    for (int i = 0; i < N; ++i) g[i] = 1.f;
    return;
  }
  load_f<N>(w + j, g);
  if (plus_one) {
#pragma unroll
    for (int i = 0; i < N; ++i) g[i] += 1.f;
  }
}

template <typename T, typename W, int N>
__device__ __forceinline__ void ln_write(const float (&v)[N], const W* w, const W* b, int64_t off,
                                         int64_t j, bool plus_one, float mean, float rstd, T* yr) {
  float g[N], bb[N], o[N];
  gamma_at<N>(w != nullptr ? w + off : nullptr, j, plus_one, g);
  if (b != nullptr) load_f<N>(b + off + j, bb);
#pragma unroll
  for (int i = 0; i < N; ++i) o[i] = (v[i] - mean) * rstd * g[i] + (b != nullptr ? bb[i] : 0.f);
  store_f<N>(yr + j, o);
}

// One block per row. A row that fits kRowCache vectors per thread (nearly every width, given
// row_threads) is read from memory once and kept in registers for the three passes; wider rows
// are re-read per pass. Both paths sum in the same order.
template <typename T, typename W, int N>
__global__ void __launch_bounds__(kMaxThreads)
    ln_fwd_kernel(const T* __restrict__ x, const W* __restrict__ w, const W* __restrict__ b,
                  T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                  int64_t C, int64_t rows_per_batch, int64_t affine_stride, bool plus_one,
                  float eps) {
  __shared__ float smem[kMaxThreads / kWarp];
  const int64_t row = blockIdx.x;
  const int64_t off = (row / rows_per_batch) * affine_stride;
  const T* xr = x + row * C;
  T* yr = y + row * C;
  const int64_t step = static_cast<int64_t>(blockDim.x) * N;
  const int64_t j0 = static_cast<int64_t>(threadIdx.x) * N;
  float mean, rstd;
  if (C <= kRowCache * step) {
    float v[kRowCache][N];
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < kRowCache; ++k) {
      if (j0 + k * step >= C) continue;
      load_f<N>(xr + j0 + k * step, v[k]);
#pragma unroll
      for (int i = 0; i < N; ++i) s += v[k][i];
    }
    mean = block_sum(s, smem) / static_cast<float>(C);
    // Second pass: sum((x - mean)^2) is stable where E[x^2] - mean^2 cancels catastrophically.
    float var = 0.f;
#pragma unroll
    for (int k = 0; k < kRowCache; ++k) {
      if (j0 + k * step >= C) continue;
#pragma unroll
      for (int i = 0; i < N; ++i) var += (v[k][i] - mean) * (v[k][i] - mean);
    }
    rstd = rsqrtf(block_sum(var, smem) / static_cast<float>(C) + eps);
#pragma unroll
    for (int k = 0; k < kRowCache; ++k)
      if (j0 + k * step < C) ln_write<T, W, N>(v[k], w, b, off, j0 + k * step, plus_one, mean, rstd, yr);
  } else {
    float s = 0.f;
    for (int64_t j = j0; j < C; j += step) {
      float v[N];
      load_f<N>(xr + j, v);
#pragma unroll
      for (int i = 0; i < N; ++i) s += v[i];
    }
    mean = block_sum(s, smem) / static_cast<float>(C);
    float var = 0.f;
    for (int64_t j = j0; j < C; j += step) {
      float v[N];
      load_f<N>(xr + j, v);
#pragma unroll
      for (int i = 0; i < N; ++i) var += (v[i] - mean) * (v[i] - mean);
    }
    rstd = rsqrtf(block_sum(var, smem) / static_cast<float>(C) + eps);
    for (int64_t j = j0; j < C; j += step) {
      float v[N];
      load_f<N>(xr + j, v);
      ln_write<T, W, N>(v, w, b, off, j, plus_one, mean, rstd, yr);
    }
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// Block (g, batch) handles rows g, g+G, ... of its batch: writes dx, and keeps its partial sums
// of dy * xhat (dw) and dy (db) in shared memory — or, when C is too wide for it, directly in
// dw_part/db_part — writing dw_part[batch, g, :] / db_part[batch, g, :] once at the end.
template <typename T, typename W, int N>
__global__ void __launch_bounds__(kMaxThreads)
    ln_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ w,
                  const float* __restrict__ mean, const float* __restrict__ rstd,
                  T* __restrict__ dx, float* __restrict__ dw_part, float* __restrict__ db_part,
                  int64_t C, int64_t rows_per_batch, int64_t affine_stride, bool plus_one,
                  bool smem_acc, int64_t slots) {
  __shared__ float red[kMaxThreads / kWarp];
  MEGALM_EXTERN_SMEM(float, acc_smem);
  const int64_t G = gridDim.x, g = blockIdx.x, batch = blockIdx.y;
  const W* wb = w != nullptr ? w + batch * affine_stride : nullptr;
  const int64_t part_off = (batch * G + g) * C;
  float* dwp = dw_part != nullptr ? dw_part + part_off : nullptr;
  float* dbp = db_part != nullptr ? db_part + part_off : nullptr;
  float* dw_acc = acc_smem;          // slots floats
  float* db_acc = acc_smem + slots;  // slots floats
  const int64_t step = static_cast<int64_t>(blockDim.x) * N;
  // Each thread zeroes (and later uses) only its own columns: no barrier needed, and the partial
  // buffers may come uninitialised.
  if (smem_acc) {
    int64_t k = 0;
    for (int64_t j = threadIdx.x * N; j < C; j += step, ++k)
#pragma unroll
      for (int i = 0; i < N; ++i) dw_acc[acc_slot(k, i, N)] = db_acc[acc_slot(k, i, N)] = 0.f;
  } else {
    for (int64_t j = threadIdx.x * N; j < C; j += step)
#pragma unroll
      for (int i = 0; i < N; ++i) {
        if (dwp != nullptr) dwp[j + i] = 0.f;
        if (dbp != nullptr) dbp[j + i] = 0.f;
      }
  }
  for (int64_t t = g; t < rows_per_batch; t += G) {
    const int64_t row = batch * rows_per_batch + t;
    const T* dyr = dy + row * C;
    const T* xr = x + row * C;
    T* dxr = dx + row * C;
    const float mu = mean[row], r = rstd[row];
    // dx = r * (gy - mean(gy) - xhat * mean(gy * xhat)), gy = dy * gamma
    float s1 = 0.f, s2 = 0.f;
    for (int64_t j = threadIdx.x * N; j < C; j += step) {
      float d[N], v[N], ga[N];
      load_f<N>(dyr + j, d);
      load_f<N>(xr + j, v);
      gamma_at<N>(wb, j, plus_one, ga);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float gy = d[i] * ga[i];
        s1 += gy;
        s2 += gy * (v[i] - mu) * r;
      }
    }
    s1 = block_sum(s1, red) / static_cast<float>(C);
    s2 = block_sum(s2, red) / static_cast<float>(C);
    int64_t k = 0;
    for (int64_t j = threadIdx.x * N; j < C; j += step, ++k) {
      float d[N], v[N], ga[N], o[N];
      load_f<N>(dyr + j, d);
      load_f<N>(xr + j, v);
      gamma_at<N>(wb, j, plus_one, ga);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float xhat = (v[i] - mu) * r;
        o[i] = r * (d[i] * ga[i] - s1 - xhat * s2);
        if (smem_acc) {
          dw_acc[acc_slot(k, i, N)] += d[i] * xhat;
          db_acc[acc_slot(k, i, N)] += d[i];
        } else {
          if (dwp != nullptr) dwp[j + i] += d[i] * xhat;
          if (dbp != nullptr) dbp[j + i] += d[i];
        }
      }
      store_f<N>(dxr + j, o);
    }
  }
  if (smem_acc) {
    int64_t k = 0;
    for (int64_t j = threadIdx.x * N; j < C; j += step, ++k)
#pragma unroll
      for (int i = 0; i < N; ++i) {
        if (dwp != nullptr) dwp[j + i] = dw_acc[acc_slot(k, i, N)];
        if (dbp != nullptr) dbp[j + i] = db_acc[acc_slot(k, i, N)];
      }
  }
}

}  // namespace

namespace launch {

template <typename T, typename W>
cudaError_t layer_norm_fwd(const T* x, const W* w, const W* b, T* y, float* mean,
                           float* rstd, int64_t R, int64_t C, int64_t rows_per_batch,
                           int64_t affine_stride, bool plus_one, float eps, cudaStream_t s) {
  // affine_stride is C or 0, so every batch's params stay 16-byte aligned when C allows.
  dispatch_vec<T>(vec_width<T>(C, {x, w, b, y}), [&](auto n) {
    constexpr int N = decltype(n)::value;
    MEGALM_KERNEL(static_cast<unsigned>(R), row_threads(C / N), 0, s, ln_fwd_kernel<T, W, N>)(
        x, w, b, y, mean, rstd, C, rows_per_batch, affine_stride, plus_one, eps);
  });
  return cudaGetLastError();
}

template <typename T, typename W>
cudaError_t layer_norm_bwd(const T* dy, const T* x, const W* w, const float* mean,
                           const float* rstd, T* dx, float* dw_part, float* db_part, int64_t B,
                           int64_t G, int64_t C, int64_t rows_per_batch, int64_t affine_stride,
                           bool plus_one, cudaStream_t s) {
  cudaError_t err = cudaSuccess;
  dispatch_vec<T>(vec_width<T>(C, {dy, x, w, dx}), [&](auto n) {
    constexpr int N = decltype(n)::value;
    const int threads = row_threads(C / N);
    const int64_t slots = acc_slots(C, threads, N);
    const bool want = dw_part != nullptr || db_part != nullptr;
    const int64_t bytes = 2 * slots * 4;
    const bool smem_acc = want && bytes + 1024 <= max_dynamic_smem();
    const size_t smem = smem_acc ? static_cast<size_t>(bytes) : 0;
    if (smem > 48 * 1024) {
      err = cudaFuncSetAttribute(ln_bwd_kernel<T, W, N>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(smem));
      if (err != cudaSuccess) return;
    }
    dim3 grid(static_cast<unsigned>(G), static_cast<unsigned>(B));
    MEGALM_KERNEL(grid, threads, smem, s, ln_bwd_kernel<T, W, N>)(
        dy, x, w, mean, rstd, dx, dw_part, db_part, C, rows_per_batch, affine_stride, plus_one,
        smem_acc, slots);
  });
  return err != cudaSuccess ? err : cudaGetLastError();
}

#define INSTANTIATE(T, W)                                                                       \
  template cudaError_t layer_norm_fwd<T, W>(const T*, const W*, const W*, T*, float*, float*,  \
                                            int64_t, int64_t, int64_t, int64_t, bool, float,   \
                                            cudaStream_t);                                     \
  template cudaError_t layer_norm_bwd<T, W>(const T*, const T*, const W*, const float*,        \
                                            const float*, T*, float*, float*, int64_t, int64_t, \
                                            int64_t, int64_t, int64_t, bool, cudaStream_t);
// Affine params in fp32 (any x; adaLN's scale/shift) or in x's own type.
#define INSTANTIATE_FP32_WEIGHT(T) INSTANTIATE(T, float)
MEGALM_FOR_EACH_TYPE(INSTANTIATE_FP32_WEIGHT)
INSTANTIATE(double, double)
INSTANTIATE(__half, __half)
INSTANTIATE(__nv_bfloat16, __nv_bfloat16)
#undef INSTANTIATE_FP32_WEIGHT
#undef INSTANTIATE

}  // namespace launch
}  // namespace megalm
