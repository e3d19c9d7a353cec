// adaLN: layer_norm(x [B, T, D], no affine) * (1 + scale[b]) + shift[b]; shift/scale fp32 [B, D].
#include "layer_norm_kernels.cuh"
#include "ops.h"

namespace megalm {

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_fwd(const at::Tensor& x,
                                                         const at::Tensor& shift,
                                                         const at::Tensor& scale, double eps) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2), R = B * T;
  auto y = at::empty_like(x);
  auto mean = at::empty({R}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({R}, x.options().dtype(at::kFloat));
  if (R == 0) return {y, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adaln_fwd", [&] {
    ln_fwd_kernel<scalar_t><<<(unsigned)R, row_threads(D), 0, stream()>>>(
        x.data_ptr<scalar_t>(), scale.data_ptr<float>(), shift.data_ptr<float>(),
        y.data_ptr<scalar_t>(), mean.data_ptr<float>(), rstd.data_ptr<float>(), D, T, D, true,
        static_cast<float>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                         const at::Tensor& scale,
                                                         const at::Tensor& mean,
                                                         const at::Tensor& rstd) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  const auto f32 = x.options().dtype(at::kFloat);
  auto dx = at::empty_like(x);
  auto dshift = at::zeros({B, D}, f32);
  auto dscale = at::zeros({B, D}, f32);
  if (B * T == 0) return {dx, dshift, dscale};
  // Enough row groups per batch to fill the GPU, but never more groups than rows.
  const int64_t G = std::max<int64_t>(1, std::min<int64_t>(T, (partial_groups(B * T) + B - 1) / B));
  auto dscale_part = at::zeros({B, G, D}, f32);
  auto dshift_part = at::zeros({B, G, D}, f32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adaln_bwd", [&] {
    ln_bwd_kernel<scalar_t><<<dim3((unsigned)G, (unsigned)B), row_threads(D), 0,
                              stream()>>>(
        dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), scale.data_ptr<float>(),
        mean.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr<scalar_t>(),
        dscale_part.data_ptr<float>(), dshift_part.data_ptr<float>(), D, T, D, true);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  column_sum(dscale_part, dscale);
  column_sum(dshift_part, dshift);
  return {dx, dshift, dscale};
}

}  // namespace megalm
