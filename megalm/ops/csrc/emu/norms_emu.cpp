// The norm kernels (layer_norm.cu, rms_norm.cu: forward, backward, the weight-grad column sum),
// built for the CPU emulation: C entry points over raw buffers for tests/ops/test_norms_emu.py.
// dtype codes: 0 float32, 1 bfloat16 (x and y); the affine params are fp32 or x's own type.
#include "../layer_norm.cu"
#include "entry.h"
#include "../rms_norm.cu"

namespace {

using megalm::emu::failure;

int status() { return failure().empty() ? 0 : 1; }

template <typename F>
int by_dtype(int x_dtype, int w_fp32, F&& f) {
  failure().clear();
  if (x_dtype == 0) f(float{}, float{});
  else if (w_fp32) f(__nv_bfloat16{}, float{});
  else f(__nv_bfloat16{}, __nv_bfloat16{});
  return status();
}

}  // namespace

extern "C" {


int megalm_emu_rms_norm_fwd(int dt, int w32, const void* x, const void* w, void* y, float* rstd,
                            int64_t R, int64_t C, float eps) {
  return by_dtype(dt, w32, [&](auto t, auto wt) {
    using T = decltype(t);
    using W = decltype(wt);
    megalm::launch::rms_norm_fwd<T, W>(static_cast<const T*>(x), static_cast<const W*>(w),
                                       static_cast<T*>(y), rstd, R, C, eps, nullptr);
  });
}

int megalm_emu_rms_norm_bwd(int dt, int w32, const void* dy, const void* x, const void* w,
                            const float* rstd, void* dx, float* dw_part, int64_t R, int64_t C,
                            int64_t G) {
  return by_dtype(dt, w32, [&](auto t, auto wt) {
    using T = decltype(t);
    using W = decltype(wt);
    megalm::launch::rms_norm_bwd<T, W>(static_cast<const T*>(dy), static_cast<const T*>(x),
                                       static_cast<const W*>(w), rstd, static_cast<T*>(dx), dw_part,
                                       R, C, G, nullptr);
  });
}

int megalm_emu_layer_norm_fwd(int dt, int w32, const void* x, const void* w, const void* b,
                              void* y, float* mean, float* rstd, int64_t R, int64_t C, float eps) {
  return by_dtype(dt, w32, [&](auto t, auto wt) {
    using T = decltype(t);
    using W = decltype(wt);
    megalm::launch::layer_norm_fwd<T, W>(static_cast<const T*>(x), static_cast<const W*>(w),
                                         static_cast<const W*>(b), static_cast<T*>(y), mean, rstd,
                                         R, C, R, 0, false, eps, nullptr);
  });
}

int megalm_emu_layer_norm_bwd(int dt, int w32, const void* dy, const void* x, const void* w,
                              const float* mean, const float* rstd, void* dx, float* dw_part,
                              float* db_part, int64_t R, int64_t C, int64_t G) {
  return by_dtype(dt, w32, [&](auto t, auto wt) {
    using T = decltype(t);
    using W = decltype(wt);
    megalm::launch::layer_norm_bwd<T, W>(static_cast<const T*>(dy), static_cast<const T*>(x),
                                         static_cast<const W*>(w), mean, rstd, static_cast<T*>(dx),
                                         dw_part, db_part, 1, G, C, R, 0, false, nullptr);
  });
}

// out [B, C] (fp32 when out_fp32, else bf16) = the sum over G of in [B, G, C].
int megalm_emu_column_sum(int out_fp32, const float* in, void* out, int64_t B, int64_t G, int64_t C) {
  failure().clear();
  if (out_fp32) megalm::launch::column_sum<float>(in, static_cast<float*>(out), B, G, C, nullptr);
  else megalm::launch::column_sum<__nv_bfloat16>(in, static_cast<__nv_bfloat16*>(out), B, G, C, nullptr);
  return status();
}

int megalm_emu_norm_row_threads(int64_t cols, int64_t elem_size) {
  return megalm::launch::norm_row_threads(cols, elem_size);
}

}  // extern "C"
