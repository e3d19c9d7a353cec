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
// RoPE on q [B, T, Hq, D] and k [B, T, Hk, D] in one launch; cos/sin fp32 [1 or B, T, D/2];
// inverse rotates by -angle (the backward).
std::tuple<at::Tensor, at::Tensor> rope_fwd(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& cos, const at::Tensor& sin,
                                            bool inverse);
at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up);
std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& dy, const at::Tensor& gate,
                                              const at::Tensor& up);
// CE rows: logits [N, V], labels int64 [N]. Returns (loss per row fp32 [N], unscaled grad
// softmax - onehot [N, V] in logits dtype — aliasing logits when inplace, undefined when
// !need_grad).
std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits,
                                                     const at::Tensor& labels,
                                                     int64_t ignore_index, bool inplace,
                                                     bool need_grad);
// out = x * factor (fp32 one-element tensor on the device), computed in fp32; out has x's shape
// and x's dtype, or half/bfloat16 when x is float32.
void scale_cast(const at::Tensor& x, const at::Tensor& factor, const at::Tensor& out);
void multi_tensor_adamw(const std::vector<at::Tensor>& params,
                        const std::vector<at::Tensor>& grads,
                        const std::vector<at::Tensor>& exp_avgs,
                        const std::vector<at::Tensor>& exp_avg_sqs,
                        const std::vector<at::Tensor>& masters, double lr, double beta1,
                        double beta2, double eps, double weight_decay, double bias_correction1,
                        double bias_correction2);

// Quintic Newton–Schulz on a 2-D g (any float dtype): g / (||g||_F + eps) in bf16, then `steps`
// iterations X <- a·X + (b·A + c·A²)·X with A = X·Xᵀ on the wide orientation (bf16 GEMMs,
// fp32 accumulation). Returns bf16 with g's shape.
at::Tensor newton_schulz(const at::Tensor& g, int64_t steps, double a, double b, double c,
                         double eps);

// Document-masked causal attention (doc_attention_host.cpp): q [B, T, Hq, D], k/v [B, T, Hk, D]
// (half/bfloat16, D 64 or 128, Hk dividing Hq), doc_start int32 [B, T]: query i sees keys
// doc_start[i] <= j <= i. Forward: (out like q, lse fp32 [B, Hq, T]); backward: (dq, dk, dv).
std::tuple<at::Tensor, at::Tensor> doc_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v,
                                                     const at::Tensor& doc_start);
std::tuple<at::Tensor, at::Tensor, at::Tensor> doc_attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& doc_start);

}  // namespace megalm
