// RoPE, rotate_half layout, on x [B, T, H, D] with fp32 cos/sin [B, T, D/2]: one thread per pair.
#include "common.cuh"
#include "ops.h"

namespace megalm {
namespace {

template <typename T>
__global__ void rope_kernel(const T* __restrict__ x, const float* __restrict__ cos,
                            const float* __restrict__ sin, T* __restrict__ y, int64_t pairs,
                            int64_t heads, int64_t half, float sign) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t p = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; p < pairs; p += stride) {
    const int64_t i = p % half;          // frequency index
    const int64_t bth = p / half;        // (b, t, h) flattened
    const int64_t bt = bth / heads;      // (b, t) flattened: the cos/sin row
    const int64_t base = bth * 2 * half;
    const float c = cos[bt * half + i];
    const float s = sign * sin[bt * half + i];
    const float x1 = static_cast<float>(x[base + i]);
    const float x2 = static_cast<float>(x[base + half + i]);
    y[base + i] = static_cast<T>(x1 * c - x2 * s);
    y[base + half + i] = static_cast<T>(x2 * c + x1 * s);
  }
}

}  // namespace

at::Tensor rope_fwd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                    bool inverse) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  const int64_t half = x.size(3) / 2;
  const int64_t pairs = x.numel() / 2;
  if (pairs == 0) return y;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((pairs + threads - 1) / threads, 65535LL * 32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rope_fwd", [&] {
    rope_kernel<scalar_t><<<(unsigned)blocks, threads, 0, stream()>>>(
        x.data_ptr<scalar_t>(), cos.data_ptr<float>(), sin.data_ptr<float>(),
        y.data_ptr<scalar_t>(), pairs, x.size(2), half, inverse ? -1.f : 1.f);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace megalm
