// Python bindings of the fused ops; every argument is checked here, before any kernel runs.
#include <torch/extension.h>

#include "host.h"

namespace {

using at::Tensor;

void check_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_float_like(const Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, name,
              " must be float64/float32/float16/bfloat16, got ", s);
}

void check_same(const Tensor& a, const Tensor& b, const char* an, const char* bn) {
  TORCH_CHECK(a.sizes() == b.sizes(), an, " and ", bn, " must have the same shape, got ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), an, " and ", bn, " must share a dtype");
  TORCH_CHECK(a.device() == b.device(), an, " and ", bn, " must be on the same device");
}

// An optional [C] norm weight/bias on x's device, contiguous, in float32 or x's own dtype (read as
// it is: a bf16 model's weights need no cast per call; host.cpp also checks weight and bias agree).
void check_affine(const c10::optional<Tensor>& t, const Tensor& x, at::IntArrayRef shape,
                  const char* name) {
  if (!t.has_value()) return;
  check_cuda(*t, name);
  TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == x.scalar_type(), name,
              " must be float32 or x's dtype ", x.scalar_type(), ", got ", t->scalar_type());
  TORCH_CHECK(t->sizes() == shape, name, " must have shape ", shape, ", got ", t->sizes());
  TORCH_CHECK(t->is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t->device() == x.device(), name, " must be on the device of x");
}

// adaLN's per-sample scale/shift [B, C]: float32 (the Python side converts them).
void check_adaln_param(const Tensor& t, const Tensor& x, const char* name) {
  check_cuda(t, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32 (convert on the host)");
  TORCH_CHECK(t.sizes() == at::IntArrayRef({x.size(0), x.size(2)}), name, " must have shape [B, C], got ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), name, " must be on the device of x");
}

void check_rows(const Tensor& x, const char* name) {
  check_cuda(x, name);
  check_float_like(x, name);
  TORCH_CHECK(x.dim() == 2, name, " must be 2-D [rows, cols], got ", x.dim(), "-D");
}

void check_row_stats(const Tensor& s, const Tensor& x, const char* name) {
  check_cuda(s, name);
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.numel() == x.numel() / std::max<int64_t>(1, x.size(-1)),
              name, " must be float32 with one value per row");
}

Tensor opt(const c10::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

std::tuple<Tensor, Tensor> rms_norm_fwd(const Tensor& x, const c10::optional<Tensor>& w,
                                        double eps) {
  check_rows(x, "x");
  check_affine(w, x, {x.size(1)}, "weight");
  return megalm::rms_norm_fwd(x, opt(w), eps);
}

std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& dy, const Tensor& x,
                                        const c10::optional<Tensor>& w, const Tensor& rstd) {
  check_rows(x, "x");
  check_cuda(dy, "dy");
  check_same(dy, x, "dy", "x");
  check_affine(w, x, {x.size(1)}, "weight");
  check_row_stats(rstd, x, "rstd");
  return megalm::rms_norm_bwd(dy, x, opt(w), rstd);
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& x, const c10::optional<Tensor>& w,
                                                  const c10::optional<Tensor>& b, double eps) {
  check_rows(x, "x");
  check_affine(w, x, {x.size(1)}, "weight");
  check_affine(b, x, {x.size(1)}, "bias");
  return megalm::layer_norm_fwd(x, opt(w), opt(b), eps);
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& dy, const Tensor& x,
                                                  const c10::optional<Tensor>& w,
                                                  const Tensor& mean, const Tensor& rstd,
                                                  bool has_bias) {
  check_rows(x, "x");
  check_cuda(dy, "dy");
  check_same(dy, x, "dy", "x");
  check_affine(w, x, {x.size(1)}, "weight");
  check_row_stats(mean, x, "mean");
  check_row_stats(rstd, x, "rstd");
  return megalm::layer_norm_bwd(dy, x, opt(w), mean, rstd, has_bias);
}

void check_adaln(const Tensor& x, const Tensor& scale) {
  check_cuda(x, "x");
  check_float_like(x, "x");
  TORCH_CHECK(x.dim() == 3, "x must be [B, T, D], got ", x.dim(), "-D");
  TORCH_CHECK(x.size(0) <= 65535, "adaln: batch size above 65535 is not supported");
  check_adaln_param(scale, x, "scale");
}

std::tuple<Tensor, Tensor, Tensor> adaln_fwd(const Tensor& x, const Tensor& shift,
                                             const Tensor& scale, double eps) {
  check_adaln(x, scale);
  check_adaln_param(shift, x, "shift");
  return megalm::adaln_fwd(x, shift, scale, eps);
}

std::tuple<Tensor, Tensor, Tensor> adaln_bwd(const Tensor& dy, const Tensor& x,
                                             const Tensor& scale, const Tensor& mean,
                                             const Tensor& rstd) {
  check_adaln(x, scale);
  check_cuda(dy, "dy");
  check_same(dy, x, "dy", "x");
  check_row_stats(mean, x, "mean");
  check_row_stats(rstd, x, "rstd");
  return megalm::adaln_bwd(dy, x, scale, mean, rstd);
}

std::tuple<Tensor, Tensor> rope_fwd(const Tensor& q, const Tensor& k, const Tensor& cos,
                                    const Tensor& sin, bool inverse) {
  for (const auto* x : {&q, &k}) {
    check_cuda(*x, "q/k");
    check_float_like(*x, "q/k");
    TORCH_CHECK(x->dim() == 4 && x->size(3) % 2 == 0, "q/k must be [B, T, H, D] with even D");
  }
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.device() == k.device(),
              "q and k must share dtype and device");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "q and k must agree on B, T and D");
  for (const auto* t : {&cos, &sin}) {
    check_cuda(*t, "cos/sin");
    TORCH_CHECK(t->scalar_type() == at::kFloat, "cos/sin must be float32 (convert on the host)");
    TORCH_CHECK(t->dim() == 3 && (t->size(0) == q.size(0) || t->size(0) == 1) &&
                    t->size(1) == q.size(1) && t->size(2) == q.size(3) / 2,
                "cos/sin must be [B or 1, T, D/2] matching q, got ", t->sizes());
    TORCH_CHECK(t->device() == q.device(), "cos/sin must be on the device of q");
  }
  TORCH_CHECK(cos.sizes() == sin.sizes(), "cos and sin must have the same shape");
  return megalm::rope_fwd(q, k, cos, sin, inverse);
}

Tensor swiglu_fwd(const Tensor& gate, const Tensor& up) {
  check_cuda(gate, "gate");
  check_cuda(up, "up");
  check_float_like(gate, "gate");
  check_same(gate, up, "gate", "up");
  return megalm::swiglu_fwd(gate, up);
}

std::tuple<Tensor, Tensor> swiglu_bwd(const Tensor& dy, const Tensor& gate, const Tensor& up) {
  check_cuda(dy, "dy");
  check_cuda(gate, "gate");
  check_cuda(up, "up");
  check_same(gate, up, "gate", "up");
  check_same(dy, gate, "dy", "gate");
  return megalm::swiglu_bwd(dy, gate, up);
}

std::tuple<Tensor, Tensor> cross_entropy_fwd(const Tensor& logits, const Tensor& labels,
                                             int64_t ignore_index, bool inplace, bool need_grad) {
  check_rows(logits, "logits");
  check_cuda(labels, "labels");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels must be int64");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0),
              "labels must be [N] matching logits [N, V]");
  TORCH_CHECK(labels.device() == logits.device(), "logits and labels must be on one device");
  TORCH_CHECK(logits.size(0) <= INT32_MAX, "cross_entropy: more than 2^31 - 1 rows");
  return megalm::cross_entropy_fwd(logits, labels, ignore_index, inplace, need_grad);
}

void scale_cast(const Tensor& x, const Tensor& factor, const Tensor& out) {
  check_cuda(x, "x");
  check_cuda(out, "out");
  check_float_like(x, "x");
  TORCH_CHECK(x.sizes() == out.sizes() && x.device() == out.device(),
              "x and out must share shape and device");
  const auto in = x.scalar_type(), o = out.scalar_type();
  TORCH_CHECK(in == o || (in == at::kFloat && (o == at::kHalf || o == at::kBFloat16)),
              "scale_cast: out must have x's dtype, or float16/bfloat16 for float32 x");
  TORCH_CHECK(factor.is_cuda() && factor.scalar_type() == at::kFloat && factor.numel() == 1 &&
                  factor.device() == x.device(),
              "factor must be a one-element float32 tensor on x's device");
  megalm::scale_cast(x, factor, out);
}

void multi_tensor_adamw(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                        const std::vector<Tensor>& exp_avgs,
                        const std::vector<Tensor>& exp_avg_sqs, const std::vector<Tensor>& masters,
                        double lr, double beta1, double beta2, double eps, double weight_decay,
                        double bias_correction1, double bias_correction2) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n,
              "params, grads, exp_avgs, exp_avg_sqs must have the same length");
  TORCH_CHECK(masters.empty() || masters.size() == n, "masters must be empty or match params");
  const bool has_master = !masters.empty();
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    check_cuda(p, "param");
    const auto pt = p.scalar_type();
    TORCH_CHECK(pt == at::kFloat || pt == at::kHalf || pt == at::kBFloat16,
                "param must be float32/float16/bfloat16, got ", pt);
    TORCH_CHECK(pt == params[0].scalar_type() && p.device() == params[0].device(),
                "all params of one launch must share dtype and device");
    check_cuda(grads[i], "grad");
    check_same(p, grads[i], "param", "grad");
    const auto st = has_master ? at::kFloat : pt;
    for (const auto* s : {&exp_avgs[i], &exp_avg_sqs[i]}) {
      check_cuda(*s, "exp_avg/exp_avg_sq");
      TORCH_CHECK(s->scalar_type() == st && s->sizes() == p.sizes() && s->device() == p.device(),
                  "optimizer state must match the param's shape/device, dtype ", st);
    }
    if (has_master) {
      check_cuda(masters[i], "master");
      TORCH_CHECK(masters[i].scalar_type() == at::kFloat && masters[i].sizes() == p.sizes() &&
                      masters[i].device() == p.device(),
                  "master weights must be float32 with the param's shape/device");
      TORCH_CHECK(pt != at::kFloat, "master weights only for float16/bfloat16 params");
    }
  }
  TORCH_CHECK(bias_correction1 > 0 && bias_correction2 > 0, "bias corrections must be > 0");
  megalm::multi_tensor_adamw(params, grads, exp_avgs, exp_avg_sqs, masters, lr, beta1, beta2, eps,
                             weight_decay, bias_correction1, bias_correction2);
}

// q [B, T, Hq, D] (half/bfloat16, D 64 or 128), k/v [B, T, Hk, D] with Hk dividing Hq, doc_start
// int32 [B, T], all contiguous on one device; the kernels read 16-byte vectors.
void check_doc_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& doc_start) {
  for (const auto& [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}}) {
    check_cuda(*t, name);
    TORCH_CHECK(t->dim() == 4, name, " must be 4-D [B, T, heads, D], got ", t->dim(), "-D");
    TORCH_CHECK(t->scalar_type() == at::kHalf || t->scalar_type() == at::kBFloat16, name,
                " must be float16/bfloat16, got ", t->scalar_type());
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
  }
  check_same(k, v, "k", "v");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.device() == k.device(),
              "q and k must share a dtype and device");
  TORCH_CHECK(q.size(3) == 64 || q.size(3) == 128, "head dim must be 64 or 128, got ", q.size(3));
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "k must be [B, T, Hk, D] matching q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0, "KV heads ", k.size(2),
              " must divide query heads ", q.size(2));
  TORCH_CHECK(q.size(0) <= 65535 && q.size(2) <= 65535 && q.size(1) < (int64_t(1) << 30) &&
                  q.numel() / q.size(3) < (int64_t(1) << 32),
              "q is too large for the launch grid: ", q.sizes());
  check_cuda(doc_start, "doc_start");
  TORCH_CHECK(doc_start.scalar_type() == at::kInt, "doc_start must be int32, got ", doc_start.scalar_type());
  TORCH_CHECK(doc_start.sizes() == q.sizes().slice(0, 2), "doc_start must be [B, T], got ", doc_start.sizes());
  TORCH_CHECK(doc_start.device() == q.device(), "doc_start must be on the device of q");
}

std::tuple<Tensor, Tensor> doc_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                             const Tensor& doc_start) {
  check_doc_attention(q, k, v, doc_start);
  return megalm::doc_attention_fwd(q, k, v, doc_start);
}

std::tuple<Tensor, Tensor, Tensor> doc_attention_bwd(const Tensor& dout, const Tensor& q,
                                                     const Tensor& k, const Tensor& v,
                                                     const Tensor& out, const Tensor& lse,
                                                     const Tensor& doc_start) {
  check_doc_attention(q, k, v, doc_start);
  check_cuda(dout, "dout");
  check_same(dout, q, "dout", "q");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(dout.data_ptr()) % 16 == 0, "dout must be 16-byte aligned");
  check_cuda(out, "out");
  check_same(out, q, "out", "q");
  check_cuda(lse, "lse");
  TORCH_CHECK(lse.scalar_type() == at::kFloat &&
                  lse.sizes() == at::IntArrayRef({q.size(0), q.size(2), q.size(1)}),
              "lse must be float32 [B, Hq, T], got ", lse.scalar_type(), " ", lse.sizes());
  return megalm::doc_attention_bwd(dout, q, k, v, out, lse, doc_start);
}

Tensor newton_schulz(const Tensor& g, int64_t steps, double a, double b, double c, double eps) {
  check_cuda(g, "g");
  check_float_like(g, "g");
  TORCH_CHECK(g.dim() == 2, "g must be 2-D [rows, cols], got ", g.dim(), "-D");
  TORCH_CHECK(steps >= 0, "steps must be >= 0, got ", steps);
  TORCH_CHECK(eps > 0, "eps must be > 0, got ", eps);
  return megalm::newton_schulz(g, steps, a, b, c, eps);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megalm fused CUDA ops";
  m.def("rms_norm_fwd", &rms_norm_fwd);
  m.def("rms_norm_bwd", &rms_norm_bwd);
  m.def("layer_norm_fwd", &layer_norm_fwd);
  m.def("layer_norm_bwd", &layer_norm_bwd);
  m.def("adaln_fwd", &adaln_fwd);
  m.def("adaln_bwd", &adaln_bwd);
  m.def("rope_fwd", &rope_fwd);
  m.def("swiglu_fwd", &swiglu_fwd);
  m.def("swiglu_bwd", &swiglu_bwd);
  m.def("cross_entropy_fwd", &cross_entropy_fwd);
  m.def("scale_cast", &scale_cast);
  m.def("multi_tensor_adamw", &multi_tensor_adamw);
  m.def("newton_schulz", &newton_schulz);
  m.def("doc_attention_fwd", &doc_attention_fwd);
  m.def("doc_attention_bwd", &doc_attention_bwd);
}
