// CUDA instantiations of the document-masked attention kernels (doc_attention.cuh).
#include "doc_attention.cuh"
#include "launch.h"

namespace megalm::launch {

template <typename T>
cudaError_t doc_attention_fwd(const attn::Params& p, cudaStream_t s) {
  if (p.D == 64) attn::launch_fwd<T, 64>(p, s); else attn::launch_fwd<T, 128>(p, s);
  return cudaGetLastError();
}

template <typename T>
cudaError_t doc_attention_bwd(const attn::Params& p, cudaStream_t s) {
  if (p.D == 64) attn::launch_bwd<T, 64>(p, s); else attn::launch_bwd<T, 128>(p, s);
  return cudaGetLastError();
}

template cudaError_t doc_attention_fwd<__half>(const attn::Params&, cudaStream_t);
template cudaError_t doc_attention_fwd<__nv_bfloat16>(const attn::Params&, cudaStream_t);
template cudaError_t doc_attention_bwd<__half>(const attn::Params&, cudaStream_t);
template cudaError_t doc_attention_bwd<__nv_bfloat16>(const attn::Params&, cudaStream_t);

}  // namespace megalm::launch
