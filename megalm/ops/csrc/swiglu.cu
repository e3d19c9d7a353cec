// SwiGLU: y = silu(gate) * up, elementwise in fp32; backward gives dgate and dup.
#include "common.cuh"
#include "ops.h"

namespace megalm {
namespace {

__device__ __forceinline__ float sigmoidf(float g) { return 1.f / (1.f + expf(-g)); }

template <typename T>
__global__ void swiglu_fwd_kernel(const T* __restrict__ gate, const T* __restrict__ up,
                                  T* __restrict__ y, int64_t n) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float g = static_cast<float>(gate[i]);
    y[i] = static_cast<T>(g * sigmoidf(g) * static_cast<float>(up[i]));
  }
}

template <typename T>
__global__ void swiglu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ gate,
                                  const T* __restrict__ up, T* __restrict__ dgate,
                                  T* __restrict__ dup, int64_t n) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float g = static_cast<float>(gate[i]);
    const float u = static_cast<float>(up[i]);
    const float d = static_cast<float>(dy[i]);
    const float sg = sigmoidf(g);
    // d silu(g)/dg = sg * (1 + g * (1 - sg))
    dgate[i] = static_cast<T>(d * u * sg * (1.f + g * (1.f - sg)));
    dup[i] = static_cast<T>(d * g * sg);
  }
}

int64_t grid_for(int64_t n, int threads) {
  return std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, 65535LL * 32));
}

}  // namespace

at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up) {
  const c10::cuda::OptionalCUDAGuard guard(gate.device());
  auto y = at::empty_like(gate);
  const int64_t n = gate.numel();
  if (n == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "swiglu_fwd", [&] {
    swiglu_fwd_kernel<scalar_t><<<(unsigned)grid_for(n, 256), 256, 0,
                                  stream()>>>(
        gate.data_ptr<scalar_t>(), up.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& dy, const at::Tensor& gate,
                                              const at::Tensor& up) {
  const c10::cuda::OptionalCUDAGuard guard(gate.device());
  auto dgate = at::empty_like(gate);
  auto dup = at::empty_like(up);
  const int64_t n = gate.numel();
  if (n == 0) return {dgate, dup};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "swiglu_bwd", [&] {
    swiglu_bwd_kernel<scalar_t><<<(unsigned)grid_for(n, 256), 256, 0,
                                  stream()>>>(
        dy.data_ptr<scalar_t>(), gate.data_ptr<scalar_t>(), up.data_ptr<scalar_t>(),
        dgate.data_ptr<scalar_t>(), dup.data_ptr<scalar_t>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dgate, dup};
}

}  // namespace megalm
