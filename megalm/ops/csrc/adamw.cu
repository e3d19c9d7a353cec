// Multi-tensor AdamW: one launch updates many tensors. The host builds a table of pointers and
// sizes plus a (tensor, chunk) list, one entry per block; math in fp32, optional fp32 masters.
#include "kernels.cuh"
#include "launch.h"

namespace megalm {
namespace {

constexpr int kThreads = 512;

template <typename P, typename S>
__global__ void adamw_kernel(const int64_t* __restrict__ meta, const int32_t* __restrict__ blocks,
                             launch::AdamHyper h) {
  const int32_t t = blocks[2 * blockIdx.x], chunk = blocks[2 * blockIdx.x + 1];
  const int64_t* row = meta + 6 * static_cast<int64_t>(t);
  P* p = reinterpret_cast<P*>(row[0]);
  const P* g = reinterpret_cast<const P*>(row[1]);
  S* m = reinterpret_cast<S*>(row[2]);
  S* v = reinterpret_cast<S*>(row[3]);
  float* master = reinterpret_cast<float*>(row[4]);
  const int64_t n = row[5];
  const int64_t begin = static_cast<int64_t>(chunk) * launch::kAdamChunk;
  const int64_t end = begin + launch::kAdamChunk < n ? begin + launch::kAdamChunk : n;
  const float step_size = h.lr / h.bias_correction1;
  const float decay = 1.f - h.lr * h.weight_decay;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    float w = master != nullptr ? master[i] : to_f(p[i]);
    const float gi = to_f(g[i]);
    float mi = to_f(m[i]);
    float vi = to_f(v[i]);
    w *= decay;  // decoupled weight decay before the Adam step, as torch.optim.AdamW
    mi += (1.f - h.beta1) * (gi - mi);
    vi = vi * h.beta2 + (1.f - h.beta2) * gi * gi;
    const float denom = sqrtf(vi) / h.bias_correction2_sqrt + h.eps;
    w -= step_size * mi / denom;
    m[i] = from_f<S>(mi);
    v[i] = from_f<S>(vi);
    if (master != nullptr) master[i] = w;
    p[i] = from_f<P>(w);
  }
}

}  // namespace

namespace launch {

template <typename P, typename S>
cudaError_t adamw(const int64_t* meta, const int32_t* blocks, int64_t nblocks, AdamHyper h,
                  cudaStream_t s) {
  adamw_kernel<P, S><<<static_cast<unsigned>(nblocks), kThreads, 0, s>>>(meta, blocks, h);
  return cudaGetLastError();
}

template cudaError_t adamw<float, float>(const int64_t*, const int32_t*, int64_t, AdamHyper,
                                         cudaStream_t);
template cudaError_t adamw<__half, __half>(const int64_t*, const int32_t*, int64_t, AdamHyper,
                                           cudaStream_t);
template cudaError_t adamw<__half, float>(const int64_t*, const int32_t*, int64_t, AdamHyper,
                                          cudaStream_t);
template cudaError_t adamw<__nv_bfloat16, __nv_bfloat16>(const int64_t*, const int32_t*, int64_t,
                                                         AdamHyper, cudaStream_t);
template cudaError_t adamw<__nv_bfloat16, float>(const int64_t*, const int32_t*, int64_t,
                                                 AdamHyper, cudaStream_t);

}  // namespace launch
}  // namespace megalm
