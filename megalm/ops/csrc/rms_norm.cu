// RMSNorm over rows of x [R, C]: one block per row, fp32 accumulation; weight is fp32 [C].
#include "common.cuh"
#include "ops.h"

namespace megalm {
namespace {

template <typename T>
__global__ void rms_norm_fwd_kernel(const T* __restrict__ x, const float* __restrict__ w,
                                    T* __restrict__ y, float* __restrict__ rstd_out, int64_t C,
                                    float eps) {
  __shared__ float smem[kMaxThreads / kWarp];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * C;
  T* yr = y + row * C;
  float ss = 0.f;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    const float v = static_cast<float>(xr[j]);
    ss += v * v;
  }
  ss = block_sum(ss, smem);
  const float rstd = rsqrtf(ss / static_cast<float>(C) + eps);
  if (threadIdx.x == 0) rstd_out[row] = rstd;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    float v = static_cast<float>(xr[j]) * rstd;
    if (w != nullptr) v *= w[j];
    yr[j] = static_cast<T>(v);
  }
}

// Rows g, g+G, g+2G...: dx per row, and this group's partial dw in dw_part[g, :].
template <typename T>
__global__ void rms_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                    const float* __restrict__ w, const float* __restrict__ rstd,
                                    T* __restrict__ dx, float* __restrict__ dw_part, int64_t R,
                                    int64_t C) {
  __shared__ float smem[kMaxThreads / kWarp];
  const int64_t G = gridDim.x;
  for (int64_t row = blockIdx.x; row < R; row += G) {
    const T* dyr = dy + row * C;
    const T* xr = x + row * C;
    const float r = rstd[row];
    // dx_j = r * (w_j dy_j - xhat_j * mean_i(w_i dy_i xhat_i)), xhat = x * r
    float dot = 0.f;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const float wdy = static_cast<float>(dyr[j]) * (w != nullptr ? w[j] : 1.f);
      dot += wdy * static_cast<float>(xr[j]) * r;
    }
    dot = block_sum(dot, smem) / static_cast<float>(C);
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const float g = static_cast<float>(dyr[j]);
      const float xhat = static_cast<float>(xr[j]) * r;
      const float wdy = g * (w != nullptr ? w[j] : 1.f);
      dx[row * C + j] = static_cast<T>(r * (wdy - xhat * dot));
      if (dw_part != nullptr) dw_part[blockIdx.x * C + j] += g * xhat;  // column owned by thread
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                double eps) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t R = x.size(0), C = x.size(1);
  auto y = at::empty_like(x);
  auto rstd = at::empty({R}, x.options().dtype(at::kFloat));
  if (R == 0) return {y, rstd};
  const float* w = weight.defined() ? weight.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_fwd", [&] {
    rms_norm_fwd_kernel<scalar_t><<<(unsigned)R, row_threads(C), 0,
                                    stream()>>>(
        x.data_ptr<scalar_t>(), w, y.data_ptr<scalar_t>(), rstd.data_ptr<float>(), C,
        static_cast<float>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                const at::Tensor& weight, const at::Tensor& rstd) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t R = x.size(0), C = x.size(1);
  auto dx = at::empty_like(x);
  at::Tensor dw = weight.defined() ? at::zeros({C}, x.options().dtype(at::kFloat)) : at::Tensor();
  if (R == 0) return {dx, dw};
  const int64_t G = partial_groups(R);
  at::Tensor part;
  if (weight.defined()) part = at::zeros({1, G, C}, x.options().dtype(at::kFloat));
  const float* w = weight.defined() ? weight.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_bwd", [&] {
    rms_norm_bwd_kernel<scalar_t><<<(unsigned)G, row_threads(C), 0,
                                    stream()>>>(
        dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w, rstd.data_ptr<float>(),
        dx.data_ptr<scalar_t>(), weight.defined() ? part.data_ptr<float>() : nullptr, R, C);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (weight.defined()) {
    auto dw2 = dw.view({1, C});
    column_sum(part, dw2);
  }
  return {dx, dw};
}

}  // namespace megalm
