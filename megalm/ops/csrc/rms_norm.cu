// RMSNorm over rows [R, C]: one block per row, fp32 accumulation; weight W [C] is fp32 or x's type
// (read as it is: a bf16 model's weight needs no cast kernel per call).
// N = elements per access (16-byte vectors when C and the pointers allow, else 1).
#include "kernels.cuh"
#include "launch.h"

namespace megalm {
namespace {

template <typename T, typename W, int N>
__device__ __forceinline__ void rms_write(const float (&v)[N], const W* w, int64_t j, float rstd, T* yr) {
  float g[N], o[N];
  if (w != nullptr) load_f<N>(w + j, g);
#pragma unroll
  for (int i = 0; i < N; ++i) o[i] = v[i] * (rstd * (w != nullptr ? g[i] : 1.f));
  store_f<N>(yr + j, o);
}

// One block per row; a row of up to kRowCache vectors per thread is read once (registers), a
// wider one twice. Both paths sum in the same order.
template <typename T, typename W, int N>
__global__ void __launch_bounds__(kMaxThreads)
    rms_norm_fwd_kernel(const T* __restrict__ x, const W* __restrict__ w, T* __restrict__ y,
                        float* __restrict__ rstd_out, int64_t C, float eps) {
  __shared__ float smem[kMaxThreads / kWarp];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * C;
  T* yr = y + row * C;
  const int64_t step = static_cast<int64_t>(blockDim.x) * N;
  const int64_t j0 = static_cast<int64_t>(threadIdx.x) * N;
  float ss = 0.f;
  if (C <= kRowCache * step) {
    float v[kRowCache][N];
#pragma unroll
    for (int k = 0; k < kRowCache; ++k) {
      if (j0 + k * step >= C) continue;
      load_f<N>(xr + j0 + k * step, v[k]);
#pragma unroll
      for (int i = 0; i < N; ++i) ss += v[k][i] * v[k][i];
    }
    const float rstd = rsqrtf(block_sum(ss, smem) / static_cast<float>(C) + eps);
    if (threadIdx.x == 0) rstd_out[row] = rstd;
#pragma unroll
    for (int k = 0; k < kRowCache; ++k)
      if (j0 + k * step < C) rms_write<T, W, N>(v[k], w, j0 + k * step, rstd, yr);
    return;
  }
  for (int64_t j = j0; j < C; j += step) {
    float v[N];
    load_f<N>(xr + j, v);
#pragma unroll
    for (int i = 0; i < N; ++i) ss += v[i] * v[i];
  }
  const float rstd = rsqrtf(block_sum(ss, smem) / static_cast<float>(C) + eps);
  if (threadIdx.x == 0) rstd_out[row] = rstd;
  for (int64_t j = j0; j < C; j += step) {
    float v[N];
    load_f<N>(xr + j, v);
    rms_write<T, W, N>(v, w, j, rstd, yr);
  }
}

// Block g handles rows g, g+G, ...: dx per row; its partial dw stays in shared memory (or, when C
// is too wide for shared memory, in dw_part directly) and is written to dw_part[g, :] once.
template <typename T, typename W, int N>
__global__ void __launch_bounds__(kMaxThreads)
    rms_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                        const W* __restrict__ w, const float* __restrict__ rstd,
                        T* __restrict__ dx, float* __restrict__ dw_part, int64_t R, int64_t C,
                        bool smem_acc) {
  __shared__ float red[kMaxThreads / kWarp];
  MEGALM_EXTERN_SMEM(float, acc_smem);
  const int64_t step = static_cast<int64_t>(blockDim.x) * N;
  float* part = dw_part != nullptr ? dw_part + blockIdx.x * C : nullptr;
  // Each thread owns the same columns in every row: no atomics, no barriers on the accumulators,
  // and the partial buffer may come uninitialised.
  if (part != nullptr) {
    int64_t k = 0;
    for (int64_t j = threadIdx.x * N; j < C; j += step, ++k)
#pragma unroll
      for (int i = 0; i < N; ++i) {
        if (smem_acc) {
          acc_smem[acc_slot(k, i, N)] = 0.f;
        } else {
          part[j + i] = 0.f;
        }
      }
  }
  for (int64_t row = blockIdx.x; row < R; row += gridDim.x) {
    const T* dyr = dy + row * C;
    const T* xr = x + row * C;
    T* dxr = dx + row * C;
    const float r = rstd[row];
    // dx_j = r * (w_j dy_j - xhat_j * mean_i(w_i dy_i xhat_i)), xhat = x * r
    float dot = 0.f;
    for (int64_t j = threadIdx.x * N; j < C; j += step) {
      float g[N], v[N], ww[N];
      load_f<N>(dyr + j, g);
      load_f<N>(xr + j, v);
      if (w != nullptr) load_f<N>(w + j, ww);
#pragma unroll
      for (int i = 0; i < N; ++i) dot += g[i] * (w != nullptr ? ww[i] : 1.f) * v[i] * r;
    }
    dot = block_sum(dot, red) / static_cast<float>(C);
    int64_t k = 0;
    for (int64_t j = threadIdx.x * N; j < C; j += step, ++k) {
      float g[N], v[N], ww[N], o[N];
      load_f<N>(dyr + j, g);
      load_f<N>(xr + j, v);
      if (w != nullptr) load_f<N>(w + j, ww);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float xhat = v[i] * r;
        o[i] = r * (g[i] * (w != nullptr ? ww[i] : 1.f) - xhat * dot);
        if (part != nullptr) {
          if (smem_acc) {
            acc_smem[acc_slot(k, i, N)] += g[i] * xhat;
          } else {
            part[j + i] += g[i] * xhat;
          }
        }
      }
      store_f<N>(dxr + j, o);
    }
  }
  if (part != nullptr && smem_acc) {
    int64_t k = 0;
    for (int64_t j = threadIdx.x * N; j < C; j += step, ++k)
#pragma unroll
      for (int i = 0; i < N; ++i) part[j + i] = acc_smem[acc_slot(k, i, N)];
  }
}

// Block (32 columns x kSumSlices group slices): slice s sums groups s, s + kSumSlices, ...
// (coalesced across the 32 columns), then slice 0 adds the slices in order. The backward uses
// up to 16 groups per SM, so a sum over groups must not be one thread's serial loop.
constexpr int kSumSlices = 32;

template <typename O>
__global__ void __launch_bounds__(kWarp * kSumSlices)
    column_sum_kernel(const float* __restrict__ in, O* __restrict__ out, int64_t groups,
                      int64_t cols) {
  __shared__ float part[kSumSlices][kWarp + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarp + threadIdx.x;
  const int64_t b = blockIdx.y;
  float acc = 0.f;
  if (c < cols) {
    const float* src = in + b * groups * cols + c;
    for (int64_t g = threadIdx.y; g < groups; g += kSumSlices) acc += src[g * cols];
  }
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float total = 0.f;
    for (int s = 0; s < kSumSlices; ++s) total += part[s][threadIdx.x];
    out[b * cols + c] = from_f<O>(total);  // rounded once, like a cast of the fp32 sum
  }
}

}  // namespace

namespace launch {

int norm_row_threads(int64_t cols, int64_t elem_size) {
  const int64_t vec = 16 / elem_size;  // vec_width's choice when the pointers are aligned
  return row_threads(cols % vec == 0 ? cols / vec : cols);
}

template <typename O>
cudaError_t column_sum(const float* in, O* out, int64_t B, int64_t G, int64_t C, cudaStream_t s) {
  dim3 grid(static_cast<unsigned>((C + kWarp - 1) / kWarp), static_cast<unsigned>(B));
  MEGALM_KERNEL(grid, dim3(kWarp, kSumSlices), 0, s, column_sum_kernel<O>)(in, out, G, C);
  return cudaGetLastError();
}

template <typename T, typename W>
cudaError_t rms_norm_fwd(const T* x, const W* w, T* y, float* rstd, int64_t R, int64_t C,
                         float eps, cudaStream_t s) {
  dispatch_vec<T>(vec_width<T>(C, {x, w, y}), [&](auto n) {
    constexpr int N = decltype(n)::value;
    MEGALM_KERNEL(static_cast<unsigned>(R), row_threads(C / N), 0, s, rms_norm_fwd_kernel<T, W, N>)(
        x, w, y, rstd, C, eps);
  });
  return cudaGetLastError();
}

template <typename T, typename W>
cudaError_t rms_norm_bwd(const T* dy, const T* x, const W* w, const float* rstd, T* dx,
                         float* dw_part, int64_t R, int64_t C, int64_t G, cudaStream_t s) {
  cudaError_t err = cudaSuccess;
  dispatch_vec<T>(vec_width<T>(C, {dy, x, w, dx}), [&](auto n) {
    constexpr int N = decltype(n)::value;
    const int threads = row_threads(C / N);
    const int64_t bytes = dw_part != nullptr ? acc_slots(C, threads, N) * 4 : 0;
    const bool smem_acc = dw_part != nullptr && bytes + 1024 <= max_dynamic_smem();
    const size_t smem = smem_acc ? static_cast<size_t>(bytes) : 0;
    if (smem > 48 * 1024) {
      err = cudaFuncSetAttribute(rms_norm_bwd_kernel<T, W, N>,
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (err != cudaSuccess) return;
    }
    MEGALM_KERNEL(static_cast<unsigned>(G), threads, smem, s, rms_norm_bwd_kernel<T, W, N>)(
        dy, x, w, rstd, dx, dw_part, R, C, smem_acc);
  });
  return err != cudaSuccess ? err : cudaGetLastError();
}

#define INSTANTIATE(T, W)                                                                       \
  template cudaError_t rms_norm_fwd<T, W>(const T*, const W*, T*, float*, int64_t, int64_t,    \
                                          float, cudaStream_t);                                \
  template cudaError_t rms_norm_bwd<T, W>(const T*, const T*, const W*, const float*, T*,      \
                                          float*, int64_t, int64_t, int64_t, cudaStream_t);
// Weights in fp32 (any x) or in x's own type.
#define INSTANTIATE_FP32_WEIGHT(T) INSTANTIATE(T, float)
MEGALM_FOR_EACH_TYPE(INSTANTIATE_FP32_WEIGHT)
INSTANTIATE(double, double)
INSTANTIATE(__half, __half)
INSTANTIATE(__nv_bfloat16, __nv_bfloat16)
#undef INSTANTIATE_FP32_WEIGHT
#undef INSTANTIATE
template cudaError_t column_sum<float>(const float*, float*, int64_t, int64_t, int64_t, cudaStream_t);
template cudaError_t column_sum<double>(const float*, double*, int64_t, int64_t, int64_t, cudaStream_t);
template cudaError_t column_sum<__half>(const float*, __half*, int64_t, int64_t, int64_t, cudaStream_t);
template cudaError_t column_sum<__nv_bfloat16>(const float*, __nv_bfloat16*, int64_t, int64_t, int64_t,
                                               cudaStream_t);

}  // namespace launch
}  // namespace megalm
