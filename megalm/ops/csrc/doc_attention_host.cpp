// Tensor-level host code of the document-masked attention (argument checks: bindings.cpp).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "host.h"
#include "launch.h"

namespace megalm {
namespace {

attn::Params params_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& doc_start) {
  return attn::make_params(q.data_ptr(), k.data_ptr(), v.data_ptr(), doc_start.data_ptr<int32_t>(),
                           static_cast<int>(q.size(0)), static_cast<int>(q.size(1)),
                           static_cast<int>(q.size(2)), static_cast<int>(k.size(2)),
                           static_cast<int>(q.size(3)));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> doc_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v,
                                                     const at::Tensor& doc_start) {
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  auto out = at::empty_like(q);
  auto lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  attn::Params p = params_of(q, k, v, doc_start);
  p.o = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  C10_CUDA_CHECK(q.scalar_type() == at::kHalf ? launch::doc_attention_fwd<__half>(p, stream())
                                              : launch::doc_attention_fwd<__nv_bfloat16>(p, stream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> doc_attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& doc_start) {
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  auto dq = at::zeros(q.sizes(), q.options().dtype(at::kFloat));  // summed over key tiles
  auto dk = at::empty_like(k);
  auto dv = at::empty_like(v);
  if (q.numel() == 0) return {dq.to(q.scalar_type()), dk, dv};
  auto delta = at::empty_like(lse);
  attn::Params p = params_of(q, k, v, doc_start);
  p.o = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.dout = dout.data_ptr();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr<float>();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  C10_CUDA_CHECK(q.scalar_type() == at::kHalf ? launch::doc_attention_bwd<__half>(p, stream())
                                              : launch::doc_attention_bwd<__nv_bfloat16>(p, stream()));
  return {dq.to(q.scalar_type()), dk, dv};
}

}  // namespace megalm
