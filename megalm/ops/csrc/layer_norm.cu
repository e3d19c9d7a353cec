// LayerNorm over rows of x [R, C] with optional fp32 weight/bias [C]; fp32 accumulation.
#include "layer_norm_kernels.cuh"
#include "ops.h"

namespace megalm {

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x,
                                                              const at::Tensor& weight,
                                                              const at::Tensor& bias, double eps) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t R = x.size(0), C = x.size(1);
  auto y = at::empty_like(x);
  auto mean = at::empty({R}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({R}, x.options().dtype(at::kFloat));
  if (R == 0) return {y, mean, rstd};
  const float* w = weight.defined() ? weight.data_ptr<float>() : nullptr;
  const float* b = bias.defined() ? bias.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_fwd", [&] {
    ln_fwd_kernel<scalar_t><<<(unsigned)R, row_threads(C), 0, stream()>>>(
        x.data_ptr<scalar_t>(), w, b, y.data_ptr<scalar_t>(), mean.data_ptr<float>(),
        rstd.data_ptr<float>(), C, R, 0, false, static_cast<float>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& dy,
                                                              const at::Tensor& x,
                                                              const at::Tensor& weight,
                                                              const at::Tensor& mean,
                                                              const at::Tensor& rstd,
                                                              bool has_bias) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t R = x.size(0), C = x.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  auto dx = at::empty_like(x);
  at::Tensor dw = weight.defined() ? at::zeros({C}, f32) : at::Tensor();
  at::Tensor db = has_bias ? at::zeros({C}, f32) : at::Tensor();
  if (R == 0) return {dx, dw, db};
  const int64_t G = partial_groups(R);
  at::Tensor dw_part = weight.defined() ? at::zeros({1, G, C}, f32) : at::Tensor();
  at::Tensor db_part = has_bias ? at::zeros({1, G, C}, f32) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_bwd", [&] {
    ln_bwd_kernel<scalar_t><<<dim3((unsigned)G, 1), row_threads(C), 0,
                              stream()>>>(
        dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
        weight.defined() ? weight.data_ptr<float>() : nullptr, mean.data_ptr<float>(),
        rstd.data_ptr<float>(), dx.data_ptr<scalar_t>(),
        weight.defined() ? dw_part.data_ptr<float>() : nullptr,
        has_bias ? db_part.data_ptr<float>() : nullptr, C, R, 0, false);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (weight.defined()) {
    auto out = dw.view({1, C});
    column_sum(dw_part, out);
  }
  if (has_bias) {
    auto out = db.view({1, C});
    column_sum(db_part, out);
  }
  return {dx, dw, db};
}

}  // namespace megalm
