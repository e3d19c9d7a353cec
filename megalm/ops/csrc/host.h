// Tensor-level entry points (host.cpp); argument checks live in bindings.cpp.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace megalm {

// RMSNorm / LayerNorm on x [R, C] (contiguous); weight/bias fp32 [C] or undefined.
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                double eps);
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                const at::Tensor& weight, const at::Tensor& rstd);
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x,
                                                              const at::Tensor& weight,
                                                              const at::Tensor& bias, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& dy,
                                                              const at::Tensor& x,
                                                              const at::Tensor& weight,
                                                              const at::Tensor& mean,
                                                              const at::Tensor& rstd,
                                                              bool has_bias);
// adaLN: x [B, T, D]; shift/scale fp32 [B, D].
std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_fwd(const at::Tensor& x,
                                                         const at::Tensor& shift,
                                                         const at::Tensor& scale, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                         const at::Tensor& scale,
                                                         const at::Tensor& mean,
                                                         const at::Tensor& rstd);
// RoPE: x [B, T, H, D]; cos/sin fp32 [B, T, D/2]; inverse rotates by -angle (the backward).
at::Tensor rope_fwd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                    bool inverse);
at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up);
std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& dy, const at::Tensor& gate,
                                              const at::Tensor& up);
// CE rows: logits [N, V], labels int64 [N], grad_scale fp32 scalar tensor on device.
// Returns (loss per row fp32 [N], grad [N, V] in logits dtype; aliases logits when inplace).
std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits,
                                                     const at::Tensor& labels,
                                                     const at::Tensor& grad_scale,
                                                     int64_t ignore_index, bool inplace);
void multi_tensor_adamw(const std::vector<at::Tensor>& params,
                        const std::vector<at::Tensor>& grads,
                        const std::vector<at::Tensor>& exp_avgs,
                        const std::vector<at::Tensor>& exp_avg_sqs,
                        const std::vector<at::Tensor>& masters, double lr, double beta1,
                        double beta2, double eps, double weight_decay, double bias_correction1,
                        double bias_correction2);

}  // namespace megalm
