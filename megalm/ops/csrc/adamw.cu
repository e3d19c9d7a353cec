// Multi-tensor AdamW: one launch updates many tensors. The tensor addresses and the block ->
// (tensor, chunk) map travel BY VALUE in the kernel's parameters (launch::AdamBatch, < 4 KB), so
// no host-to-device copy and no host synchronisation happens in an optimizer step. Math in fp32,
// optional fp32 masters; 16-byte vector accesses where a tensor's pointers allow, scalar tail.
#include "kernels.cuh"
#include "launch.h"

namespace megalm {
namespace {

constexpr int kThreads = 512;

template <typename P, typename S, int N>
__device__ __forceinline__ void adam_step(P* p, const P* g, S* m, S* v, float* master, int64_t i,
                                          const launch::AdamHyper& h, float step_size,
                                          float decay) {
  float w[N], gi[N], mi[N], vi[N];
  if (master != nullptr) {
    load_f<N>(master + i, w);
  } else {
    load_f<N>(p + i, w);
  }
  load_f<N>(g + i, gi);
  load_f<N>(m + i, mi);
  load_f<N>(v + i, vi);
#pragma unroll
  for (int e = 0; e < N; ++e) {
    w[e] *= decay;  // decoupled weight decay before the Adam step, as torch.optim.AdamW
    mi[e] += (1.f - h.beta1) * (gi[e] - mi[e]);
    vi[e] = vi[e] * h.beta2 + (1.f - h.beta2) * gi[e] * gi[e];
    const float denom = sqrtf(vi[e]) / h.bias_correction2_sqrt + h.eps;
    w[e] -= step_size * mi[e] / denom;
  }
  store_f<N>(m + i, mi);
  store_f<N>(v + i, vi);
  if (master != nullptr) store_f<N>(master + i, w);
  store_f<N>(p + i, w);
}

template <typename P, typename S>
__global__ void __launch_bounds__(kThreads) adamw_kernel(launch::AdamBatch batch, launch::AdamHyper h) {
  const int t = batch.block_tensor[blockIdx.x];
  const int64_t chunk = batch.block_chunk[blockIdx.x];
  P* p = static_cast<P*>(batch.param[t]);
  const P* g = static_cast<const P*>(batch.grad[t]);
  S* m = static_cast<S*>(batch.exp_avg[t]);
  S* v = static_cast<S*>(batch.exp_avg_sq[t]);
  float* master = batch.master[t];
  const int64_t n = batch.numel[t];
  const int64_t begin = chunk * launch::kAdamChunk;
  const int64_t end = begin + launch::kAdamChunk < n ? begin + launch::kAdamChunk : n;
  const float step_size = h.lr / h.bias_correction1;
  const float decay = 1.f - h.lr * h.weight_decay;
  constexpr int N = kVec16<P>;  // 16 bytes of params per access (fp32 moments: 2 x 16 bytes)
  // Chunk starts are multiples of N, so aligned bases keep every vector access aligned.
  const bool vec = aligned16(p) && aligned16(g) && aligned16(m) && aligned16(v) &&
                   (master == nullptr || aligned16(master));
  int64_t i = begin;
  if (vec) {
    const int64_t body = begin + (end - begin) / N * N;
    for (int64_t j = begin + threadIdx.x * N; j < body; j += static_cast<int64_t>(blockDim.x) * N)
      adam_step<P, S, N>(p, g, m, v, master, j, h, step_size, decay);
    i = body;
  }
  for (int64_t j = i + threadIdx.x; j < end; j += blockDim.x)
    adam_step<P, S, 1>(p, g, m, v, master, j, h, step_size, decay);
}

}  // namespace

namespace launch {

template <typename P, typename S>
cudaError_t adamw(const AdamBatch& batch, AdamHyper h, cudaStream_t s) {
  MEGALM_KERNEL(static_cast<unsigned>(batch.nblocks), kThreads, 0, s, adamw_kernel<P, S>)(batch, h);
  return cudaGetLastError();
}

template cudaError_t adamw<float, float>(const AdamBatch&, AdamHyper, cudaStream_t);
template cudaError_t adamw<__half, __half>(const AdamBatch&, AdamHyper, cudaStream_t);
template cudaError_t adamw<__half, float>(const AdamBatch&, AdamHyper, cudaStream_t);
template cudaError_t adamw<__nv_bfloat16, __nv_bfloat16>(const AdamBatch&, AdamHyper, cudaStream_t);
template cudaError_t adamw<__nv_bfloat16, float>(const AdamBatch&, AdamHyper, cudaStream_t);

}  // namespace launch
}  // namespace megalm
