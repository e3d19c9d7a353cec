// The elementwise, row and optimizer kernels (cross_entropy.cu, swiglu.cu, rope.cu, scale.cu,
// adamw.cu, newton_schulz.cu), built for the CPU emulation as their own translation units with
// this one: C entry points over raw buffers for tests/ops/test_ops_emu.py. dtype codes: 0 float32,
// 1 bfloat16.
#include "../launch.h"
#include "entry.h"

namespace {

using megalm::emu::failure;

template <typename F>
int by_dtype(int dtype, F&& f) {
  failure().clear();
  if (dtype == 0) f(float{});
  else f(__nv_bfloat16{});
  return failure().empty() ? 0 : 1;
}

}  // namespace

extern "C" {


int megalm_emu_cross_entropy_fwd(int dt, const void* logits, const int64_t* labels, void* grad,
                                 float* loss, int64_t N, int64_t V, int64_t ignore_index) {
  return by_dtype(dt, [&](auto t) {
    using T = decltype(t);
    megalm::launch::cross_entropy_fwd<T>(static_cast<const T*>(logits), labels, static_cast<T*>(grad),
                                         loss, N, V, ignore_index, nullptr);
  });
}

int megalm_emu_swiglu_fwd(int dt, const void* gate, const void* up, void* y, int64_t n) {
  return by_dtype(dt, [&](auto t) {
    using T = decltype(t);
    megalm::launch::swiglu_fwd<T>(static_cast<const T*>(gate), static_cast<const T*>(up),
                                  static_cast<T*>(y), n, nullptr);
  });
}

int megalm_emu_swiglu_bwd(int dt, const void* dy, const void* gate, const void* up, void* dgate,
                          void* dup, int64_t n) {
  return by_dtype(dt, [&](auto t) {
    using T = decltype(t);
    megalm::launch::swiglu_bwd<T>(static_cast<const T*>(dy), static_cast<const T*>(gate),
                                  static_cast<const T*>(up), static_cast<T*>(dgate),
                                  static_cast<T*>(dup), n, nullptr);
  });
}

int megalm_emu_rope(int dt, const void* q, const void* k, void* qo, void* ko, const float* cos,
                    const float* sin, int64_t B, int64_t T, int64_t hq, int64_t hk, int64_t D,
                    int cos_batched, int inverse) {
  return by_dtype(dt, [&](auto t) {
    using E = decltype(t);
    megalm::launch::rope<E>(static_cast<const E*>(q), static_cast<const E*>(k), static_cast<E*>(qo),
                            static_cast<E*>(ko), cos, sin, B, T, hq, hk, D, cos_batched != 0,
                            inverse != 0, nullptr);
  });
}

// y (bf16) = x (fp32 when x_fp32, else bf16) * factor[0].
int megalm_emu_scale_to_bf16(int x_fp32, const void* x, const float* factor, void* y, int64_t n) {
  failure().clear();
  auto* out = static_cast<__nv_bfloat16*>(y);
  if (x_fp32) megalm::launch::scale<float, __nv_bfloat16>(static_cast<const float*>(x), factor, out, n, nullptr);
  else megalm::launch::scale<__nv_bfloat16, __nv_bfloat16>(static_cast<const __nv_bfloat16*>(x), factor, out, n,
                                                           nullptr);
  return failure().empty() ? 0 : 1;
}

// One multi_tensor_adamw launch over n tensors (params/grads in P = dtype, moments fp32 when
// masters are given, else P), every chunk of every tensor a block, as host.cpp's batches hold them.
int megalm_emu_adamw(int dt, int n, void** params, void** grads, void** exp_avgs, void** exp_avg_sqs,
                     float** masters, const int64_t* numels, float lr, float beta1, float beta2, float eps,
                     float weight_decay, float bias_correction1, float bias_correction2_sqrt) {
  using megalm::launch::AdamBatch;
  failure().clear();
  AdamBatch b{};
  for (int t = 0; t < n; ++t) {
    b.param[t] = params[t];
    b.grad[t] = grads[t];
    b.exp_avg[t] = exp_avgs[t];
    b.exp_avg_sq[t] = exp_avg_sqs[t];
    b.master[t] = masters != nullptr ? masters[t] : nullptr;
    b.numel[t] = numels[t];
    for (int64_t c = 0; c * megalm::launch::kAdamChunk < numels[t]; ++c) {
      b.block_tensor[b.nblocks] = static_cast<uint8_t>(t);
      b.block_chunk[b.nblocks] = static_cast<int32_t>(c);
      ++b.nblocks;
    }
  }
  const megalm::launch::AdamHyper h{lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2_sqrt};
  const bool m = masters != nullptr;
  if (dt == 0) megalm::launch::adamw<float, float>(b, h, nullptr);
  else if (m) megalm::launch::adamw<__nv_bfloat16, float>(b, h, nullptr);
  else megalm::launch::adamw<__nv_bfloat16, __nv_bfloat16>(b, h, nullptr);
  return failure().empty() ? 0 : 1;
}

// buf (2 zeroed floats) -> buf[0] = 1 / (||x||_F + eps): Newton-Schulz's prologue.
int megalm_emu_inverse_frobenius_norm(int dt, const void* x, float* buf, float eps, int64_t n) {
  return by_dtype(dt, [&](auto t) {
    using T = decltype(t);
    megalm::launch::inverse_frobenius_norm<T>(static_cast<const T*>(x), buf, eps, n, nullptr);
  });
}

}  // extern "C"
