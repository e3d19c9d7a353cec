// Tensor-level host code: allocate outputs, pick the element type, launch (launch.h). Compiled
// once by the host compiler; the .cu files never see torch headers.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "host.h"
#include "launch.h"

namespace megalm {
namespace {

// at:: element types -> the CUDA types the kernels are instantiated for (same layout).
template <typename T> struct Cuda { using type = T; };
template <> struct Cuda<at::Half> { using type = __half; };
template <> struct Cuda<at::BFloat16> { using type = __nv_bfloat16; };

template <typename T>
typename Cuda<T>::type* ptr(const at::Tensor& t) {
  return reinterpret_cast<typename Cuda<T>::type*>(t.data_ptr<T>());
}

const float* fptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// An optional tensor of element type T (null when undefined).
template <typename T>
typename Cuda<T>::type* optr(const at::Tensor& t) {
  return t.defined() ? ptr<T>(t) : nullptr;
}

// A norm's affine params (any of them may be undefined) are read as they are: fp32, or x's own
// type (a bf16 model's weights then need no cast kernel per call). The dtype they share.
at::ScalarType affine_type(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  const at::ScalarType t = w.defined() ? w.scalar_type() : b.defined() ? b.scalar_type() : at::kFloat;
  TORCH_CHECK(!w.defined() || !b.defined() || w.scalar_type() == b.scalar_type(),
              "norm: weight and bias must share a dtype, got ", w.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(t == at::kFloat || t == x.scalar_type(), "norm: affine params must be fp32 or x's dtype ",
              x.scalar_type(), ", got ", t);
  return t;
}
float* fptr_mut(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// How many row groups (blocks) a norm backward uses: at most one per row, else enough resident
// warps to keep the memory system busy. Blocks are row_threads wide, one warp at GPT-2's width in
// bf16, so a fixed few blocks per SM (4, before) left each SM with ~4 warps and the backward at
// ~15% of the bandwidth; up to 16 blocks (and ~32 warps) per SM cost G [C] fp32 partials, which
// the column sum reduces in parallel.
int64_t partial_groups(int64_t rows, int64_t cols, int64_t elem_size) {
  int device = 0, sms = 1;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int threads = launch::norm_row_threads(cols, elem_size);
  const int64_t per_sm = std::max<int64_t>(1, std::min<int64_t>(16, 1024 / threads));
  return std::max<int64_t>(1, std::min<int64_t>(rows, per_sm * static_cast<int64_t>(sms)));
}

void sum_groups(const at::Tensor& part, at::Tensor& out) {  // part [B, G, C] fp32 -> out [B, C], out's dtype
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "sum_groups", [&] {
    C10_CUDA_CHECK(launch::column_sum(part.data_ptr<float>(), ptr<scalar_t>(out), part.size(0), part.size(1),
                                      part.size(2), stream()));
  });
}

#define MEGALM_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                double eps) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t R = x.size(0), C = x.size(1);
  auto y = at::empty_like(x);
  auto rstd = at::empty({R}, x.options().dtype(at::kFloat));
  if (R == 0) return {y, rstd};
  const bool fp32_weight = affine_type(x, weight, at::Tensor()) == at::kFloat;
  MEGALM_DISPATCH(x.scalar_type(), "rms_norm_fwd", [&] {
    C10_CUDA_CHECK(fp32_weight ? launch::rms_norm_fwd(ptr<scalar_t>(x), fptr(weight), ptr<scalar_t>(y),
                                                      rstd.data_ptr<float>(), R, C, static_cast<float>(eps),
                                                      stream())
                               : launch::rms_norm_fwd(ptr<scalar_t>(x), optr<scalar_t>(weight), ptr<scalar_t>(y),
                                                      rstd.data_ptr<float>(), R, C, static_cast<float>(eps),
                                                      stream()));
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                const at::Tensor& weight, const at::Tensor& rstd) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t R = x.size(0), C = x.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  const at::ScalarType wt = affine_type(x, weight, at::Tensor());
  const auto wopt = x.options().dtype(wt);  // dw comes back in the weight's dtype
  auto dx = at::empty_like(x);
  if (R == 0) return {dx, weight.defined() ? at::zeros({C}, wopt) : at::Tensor()};
  // The kernel initialises every partial and the column sum writes every output: no memsets.
  at::Tensor dw = weight.defined() ? at::empty({1, C}, wopt) : at::Tensor();
  const int64_t G = partial_groups(R, C, x.element_size());
  at::Tensor part = weight.defined() ? at::empty({1, G, C}, f32) : at::Tensor();
  MEGALM_DISPATCH(x.scalar_type(), "rms_norm_bwd", [&] {
    C10_CUDA_CHECK(wt == at::kFloat
                       ? launch::rms_norm_bwd(ptr<scalar_t>(dy), ptr<scalar_t>(x), fptr(weight),
                                              rstd.data_ptr<float>(), ptr<scalar_t>(dx), fptr_mut(part), R, C, G,
                                              stream())
                       : launch::rms_norm_bwd(ptr<scalar_t>(dy), ptr<scalar_t>(x), optr<scalar_t>(weight),
                                              rstd.data_ptr<float>(), ptr<scalar_t>(dx), fptr_mut(part), R, C, G,
                                              stream()));
  });
  if (weight.defined()) sum_groups(part, dw);
  return {dx, weight.defined() ? dw.view({C}) : dw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x,
                                                              const at::Tensor& weight,
                                                              const at::Tensor& bias, double eps) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t R = x.size(0), C = x.size(1);
  auto y = at::empty_like(x);
  auto mean = at::empty({R}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({R}, x.options().dtype(at::kFloat));
  if (R == 0) return {y, mean, rstd};
  const bool fp32_affine = affine_type(x, weight, bias) == at::kFloat;
  MEGALM_DISPATCH(x.scalar_type(), "layer_norm_fwd", [&] {
    C10_CUDA_CHECK(fp32_affine ? launch::layer_norm_fwd(ptr<scalar_t>(x), fptr(weight), fptr(bias),
                                                        ptr<scalar_t>(y), mean.data_ptr<float>(),
                                                        rstd.data_ptr<float>(), R, C, R, 0, false,
                                                        static_cast<float>(eps), stream())
                               : launch::layer_norm_fwd(ptr<scalar_t>(x), optr<scalar_t>(weight),
                                                        optr<scalar_t>(bias), ptr<scalar_t>(y),
                                                        mean.data_ptr<float>(), rstd.data_ptr<float>(), R, C, R,
                                                        0, false, static_cast<float>(eps), stream()));
  });
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
  // dw and db come back in the weight's dtype (the caller keeps the bias in it; fp32 without a weight).
  const at::ScalarType wt = weight.defined() ? affine_type(x, weight, at::Tensor()) : at::kFloat;
  const auto wopt = x.options().dtype(wt);
  auto dx = at::empty_like(x);
  auto flat = [C](const at::Tensor& t) { return t.defined() ? t.view({C}) : t; };
  if (R == 0) {
    return {dx, weight.defined() ? at::zeros({C}, wopt) : at::Tensor(), has_bias ? at::zeros({C}, wopt) : at::Tensor()};
  }
  // The kernel initialises every partial and the column sum writes every output: no memsets.
  // The weight's and the bias's partials lie in one [n, G, C] buffer: one column-sum launch for both.
  const int64_t G = partial_groups(R, C, x.element_size());
  const int64_t n = (weight.defined() ? 1 : 0) + (has_bias ? 1 : 0);
  at::Tensor parts = n ? at::empty({n, G, C}, f32) : at::Tensor();
  at::Tensor sums = n ? at::empty({n, C}, wopt) : at::Tensor();
  at::Tensor dw_part = weight.defined() ? parts[0] : at::Tensor();
  at::Tensor db_part = has_bias ? parts[n - 1] : at::Tensor();
  MEGALM_DISPATCH(x.scalar_type(), "layer_norm_bwd", [&] {
    C10_CUDA_CHECK(wt == at::kFloat
                       ? launch::layer_norm_bwd(ptr<scalar_t>(dy), ptr<scalar_t>(x), fptr(weight),
                                                mean.data_ptr<float>(), rstd.data_ptr<float>(), ptr<scalar_t>(dx),
                                                fptr_mut(dw_part), fptr_mut(db_part), 1, G, C, R, 0, false, stream())
                       : launch::layer_norm_bwd(ptr<scalar_t>(dy), ptr<scalar_t>(x), optr<scalar_t>(weight),
                                                mean.data_ptr<float>(), rstd.data_ptr<float>(), ptr<scalar_t>(dx),
                                                fptr_mut(dw_part), fptr_mut(db_part), 1, G, C, R, 0, false,
                                                stream()));
  });
  if (n) sum_groups(parts, sums);
  at::Tensor dw = weight.defined() ? sums[0] : at::Tensor();
  at::Tensor db = has_bias ? sums[n - 1] : at::Tensor();
  return {dx, flat(dw), flat(db)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_fwd(const at::Tensor& x,
                                                         const at::Tensor& shift,
                                                         const at::Tensor& scale, double eps) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2), R = B * T;
  auto y = at::empty_like(x);
  auto mean = at::empty({R}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({R}, x.options().dtype(at::kFloat));
  if (R == 0) return {y, mean, rstd};
  MEGALM_DISPATCH(x.scalar_type(), "adaln_fwd", [&] {
    C10_CUDA_CHECK(launch::layer_norm_fwd(ptr<scalar_t>(x), scale.data_ptr<float>(),
                                          shift.data_ptr<float>(), ptr<scalar_t>(y),
                                          mean.data_ptr<float>(), rstd.data_ptr<float>(), R, D, T,
                                          D, true, static_cast<float>(eps), stream()));
  });
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
  if (B * T == 0) return {dx, at::zeros({B, D}, f32), at::zeros({B, D}, f32)};
  // The kernel initialises every partial and the column sums write every output: no memsets.
  auto dshift = at::empty({B, D}, f32);
  auto dscale = at::empty({B, D}, f32);
  const int64_t G = std::max<int64_t>(
      1, std::min<int64_t>(T, (partial_groups(B * T, D, x.element_size()) + B - 1) / B));
  auto dscale_part = at::empty({B, G, D}, f32);
  auto dshift_part = at::empty({B, G, D}, f32);
  MEGALM_DISPATCH(x.scalar_type(), "adaln_bwd", [&] {
    C10_CUDA_CHECK(launch::layer_norm_bwd(ptr<scalar_t>(dy), ptr<scalar_t>(x),
                                          scale.data_ptr<float>(), mean.data_ptr<float>(),
                                          rstd.data_ptr<float>(), ptr<scalar_t>(dx),
                                          dscale_part.data_ptr<float>(),
                                          dshift_part.data_ptr<float>(), B, G, D, T, D, true,
                                          stream()));
  });
  sum_groups(dscale_part, dscale);
  sum_groups(dshift_part, dshift);
  return {dx, dshift, dscale};
}

std::tuple<at::Tensor, at::Tensor> rope_fwd(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& cos, const at::Tensor& sin,
                                            bool inverse) {
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  auto qo = at::empty_like(q);
  auto ko = at::empty_like(k);
  if (q.numel() + k.numel() == 0) return {qo, ko};
  MEGALM_DISPATCH(q.scalar_type(), "rope_fwd", [&] {
    C10_CUDA_CHECK(launch::rope(ptr<scalar_t>(q), ptr<scalar_t>(k), ptr<scalar_t>(qo),
                                ptr<scalar_t>(ko), cos.data_ptr<float>(), sin.data_ptr<float>(),
                                q.size(0), q.size(1), q.size(2), k.size(2), q.size(3),
                                cos.size(0) != 1, inverse, stream()));
  });
  return {qo, ko};
}

at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up) {
  const c10::cuda::OptionalCUDAGuard guard(gate.device());
  auto y = at::empty_like(gate);
  if (gate.numel() == 0) return y;
  MEGALM_DISPATCH(gate.scalar_type(), "swiglu_fwd", [&] {
    C10_CUDA_CHECK(launch::swiglu_fwd(ptr<scalar_t>(gate), ptr<scalar_t>(up), ptr<scalar_t>(y),
                                      gate.numel(), stream()));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& dy, const at::Tensor& gate,
                                              const at::Tensor& up) {
  const c10::cuda::OptionalCUDAGuard guard(gate.device());
  auto dgate = at::empty_like(gate);
  auto dup = at::empty_like(up);
  if (gate.numel() == 0) return {dgate, dup};
  MEGALM_DISPATCH(gate.scalar_type(), "swiglu_bwd", [&] {
    C10_CUDA_CHECK(launch::swiglu_bwd(ptr<scalar_t>(dy), ptr<scalar_t>(gate), ptr<scalar_t>(up),
                                      ptr<scalar_t>(dgate), ptr<scalar_t>(dup), gate.numel(),
                                      stream()));
  });
  return {dgate, dup};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits,
                                                     const at::Tensor& labels,
                                                     int64_t ignore_index, bool inplace,
                                                     bool need_grad) {
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1);
  at::Tensor grad = !need_grad ? at::Tensor() : (inplace ? logits : at::empty_like(logits));
  auto loss = at::empty({N}, logits.options().dtype(at::kFloat));
  if (N == 0) return {loss, grad};
  MEGALM_DISPATCH(logits.scalar_type(), "cross_entropy_fwd", [&] {
    C10_CUDA_CHECK(launch::cross_entropy_fwd(ptr<scalar_t>(logits), labels.data_ptr<int64_t>(),
                                             need_grad ? ptr<scalar_t>(grad) : nullptr,
                                             loss.data_ptr<float>(), N, V, ignore_index, stream()));
  });
  return {loss, grad};
}

void scale_cast(const at::Tensor& x, const at::Tensor& factor, const at::Tensor& out) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t n = x.numel();
  if (n == 0) return;
  const float* f = factor.data_ptr<float>();
  if (x.scalar_type() == out.scalar_type()) {
    MEGALM_DISPATCH(x.scalar_type(), "scale_cast", [&] {
      C10_CUDA_CHECK(launch::scale(ptr<scalar_t>(x), f, ptr<scalar_t>(out), n, stream()));
    });
  } else if (out.scalar_type() == at::kHalf) {
    C10_CUDA_CHECK(launch::scale(x.data_ptr<float>(), f, ptr<at::Half>(out), n, stream()));
  } else {
    C10_CUDA_CHECK(launch::scale(x.data_ptr<float>(), f, ptr<at::BFloat16>(out), n, stream()));
  }
}

void multi_tensor_adamw(const std::vector<at::Tensor>& params,
                        const std::vector<at::Tensor>& grads,
                        const std::vector<at::Tensor>& exp_avgs,
                        const std::vector<at::Tensor>& exp_avg_sqs,
                        const std::vector<at::Tensor>& masters, double lr, double beta1,
                        double beta2, double eps, double weight_decay, double bias_correction1,
                        double bias_correction2) {
  if (params.empty()) return;
  const c10::cuda::OptionalCUDAGuard guard(params[0].device());
  const bool has_master = !masters.empty();
  const launch::AdamHyper h{static_cast<float>(lr), static_cast<float>(beta1),
                            static_cast<float>(beta2), static_cast<float>(eps),
                            static_cast<float>(weight_decay), static_cast<float>(bias_correction1),
                            static_cast<float>(std::sqrt(bias_correction2))};
  const auto pt = params[0].scalar_type();
  auto launch_batch = [&](const launch::AdamBatch& b) {
    cudaError_t err;
    if (pt == at::kFloat) {
      err = launch::adamw<float, float>(b, h, stream());
    } else if (pt == at::kHalf) {
      err = has_master ? launch::adamw<__half, float>(b, h, stream())
                       : launch::adamw<__half, __half>(b, h, stream());
    } else if (pt == at::kBFloat16) {
      err = has_master ? launch::adamw<__nv_bfloat16, float>(b, h, stream())
                       : launch::adamw<__nv_bfloat16, __nv_bfloat16>(b, h, stream());
    } else {
      TORCH_CHECK(false, "multi_tensor_adamw: unsupported param dtype ", pt);
    }
    C10_CUDA_CHECK(err);
  };
  // Fill fixed-size batches (as apex's multi_tensor_apply): a batch launches when its tensor
  // slots or block slots are full; a tensor with chunks left carries over into the next batch.
  launch::AdamBatch b{};
  int nt = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    if (n == 0) continue;
    b.param[nt] = params[i].data_ptr();
    b.grad[nt] = grads[i].data_ptr();
    b.exp_avg[nt] = exp_avgs[i].data_ptr();
    b.exp_avg_sq[nt] = exp_avg_sqs[i].data_ptr();
    b.master[nt] = has_master ? masters[i].data_ptr<float>() : nullptr;
    b.numel[nt] = n;
    const int64_t chunks = (n + launch::kAdamChunk - 1) / launch::kAdamChunk;
    TORCH_CHECK(chunks < INT32_MAX, "multi_tensor_adamw: tensor too large");
    ++nt;
    for (int64_t c = 0; c < chunks; ++c) {
      b.block_tensor[b.nblocks] = static_cast<uint8_t>(nt - 1);
      b.block_chunk[b.nblocks] = static_cast<int32_t>(c);
      ++b.nblocks;
      const bool blocks_full = b.nblocks == launch::kAdamMaxBlocks;
      const bool tensors_full = nt == launch::kAdamMaxTensors && c == chunks - 1;
      if (blocks_full || tensors_full) {
        launch_batch(b);
        const bool carry = c < chunks - 1;  // this tensor continues in the next batch
        if (carry) {
          b.param[0] = b.param[nt - 1];
          b.grad[0] = b.grad[nt - 1];
          b.exp_avg[0] = b.exp_avg[nt - 1];
          b.exp_avg_sq[0] = b.exp_avg_sq[nt - 1];
          b.master[0] = b.master[nt - 1];
          b.numel[0] = b.numel[nt - 1];
        }
        nt = carry ? 1 : 0;
        b.nblocks = 0;
      }
    }
  }
  if (b.nblocks > 0) launch_batch(b);
}

at::Tensor newton_schulz(const at::Tensor& g, int64_t steps, double a, double b, double c,
                         double eps) {
  const c10::cuda::OptionalCUDAGuard guard(g.device());
  auto x = at::empty(g.sizes(), g.options().dtype(at::kBFloat16));
  if (g.numel() == 0) return x;
  auto factor = at::zeros({2}, g.options().dtype(at::kFloat));  // 1 / (norm + eps), a counter
  MEGALM_DISPATCH(g.scalar_type(), "newton_schulz", [&] {
    C10_CUDA_CHECK(launch::inverse_frobenius_norm(ptr<scalar_t>(g), factor.data_ptr<float>(),
                                                  static_cast<float>(eps), g.numel(), stream()));
    C10_CUDA_CHECK(launch::scale(ptr<scalar_t>(g), factor.data_ptr<float>(),
                                 reinterpret_cast<__nv_bfloat16*>(x.data_ptr<at::BFloat16>()),
                                 g.numel(), stream()));
  });
  // Iterate on the wide orientation so A = X·Xᵀ is the smaller Gram matrix; a transposed view is
  // a cuBLAS transpose flag, not a copy.
  const bool tall = g.size(0) > g.size(1);
  at::Tensor X = tall ? x.t() : x;
  for (int64_t i = 0; i < steps; ++i) {
    const auto A = at::mm(X, X.t());
    const auto B = at::addmm(A, A, A, /*beta=*/b, /*alpha=*/c);  // b·A + c·A² in one GEMM
    X = at::addmm(X, B, X, /*beta=*/a, /*alpha=*/1.0);          // a·X + B·X in one GEMM
  }
  return tall ? X.t() : X;
}

}  // namespace megalm
