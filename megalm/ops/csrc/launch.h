// Kernel launchers on raw pointers (implemented in the .cu files, called from host.cpp).
// Plain C++ with CUDA types only, so host.cpp and the .cu files share no torch headers.
// Each returns cudaGetLastError() after its launch(es).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "doc_attention_params.h"

namespace megalm::launch {

// Threads per block the norm kernels use for a row of `cols` elements of `elem_size` bytes (host
// side of row_threads, to size the backward's row groups).
int norm_row_threads(int64_t cols, int64_t elem_size);

// out[b, c] = sum_g in[b, g, c] (summed in fp32, written as O): reduces per-group partial weight grads.
template <typename O>
cudaError_t column_sum(const float* in, O* out, int64_t B, int64_t G, int64_t C, cudaStream_t s);

// Weights W: float, or T itself.
template <typename T, typename W>
cudaError_t rms_norm_fwd(const T* x, const W* w, T* y, float* rstd, int64_t R, int64_t C,
                         float eps, cudaStream_t s);
// G row groups; dw_part [G, C] (or null when no weight grad is wanted), initialised by the kernel.
template <typename T, typename W>
cudaError_t rms_norm_bwd(const T* dy, const T* x, const W* w, const float* rstd, T* dx,
                         float* dw_part, int64_t R, int64_t C, int64_t G, cudaStream_t s);

// LayerNorm over rows [R, C] in batches of rows_per_batch rows; the affine params of batch b
// start at b * affine_stride (0: one [C] vector); plus_one uses (1 + w) (adaLN's 1 + scale).
template <typename T, typename W>
cudaError_t layer_norm_fwd(const T* x, const W* w, const W* b, T* y, float* mean,
                           float* rstd, int64_t R, int64_t C, int64_t rows_per_batch,
                           int64_t affine_stride, bool plus_one, float eps, cudaStream_t s);
// Grid (G, B); dw_part/db_part [B, G, C] or null, initialised by the kernel.
template <typename T, typename W>
cudaError_t layer_norm_bwd(const T* dy, const T* x, const W* w, const float* mean,
                           const float* rstd, T* dx, float* dw_part, float* db_part, int64_t B,
                           int64_t G, int64_t C, int64_t rows_per_batch, int64_t affine_stride,
                           bool plus_one, cudaStream_t s);

// q [B, T, hq, D] and k [B, T, hk, D] in one launch; cos/sin fp32 [B, T, D/2] when cos_batched,
// else [1, T, D/2] shared by the batch; inverse rotates by -angle (the backward).
template <typename T>
cudaError_t rope(const T* q, const T* k, T* qo, T* ko, const float* cos, const float* sin,
                 int64_t B, int64_t T_, int64_t hq, int64_t hk, int64_t head_dim, bool cos_batched,
                 bool inverse, cudaStream_t s);

template <typename T>
cudaError_t swiglu_fwd(const T* gate, const T* up, T* y, int64_t n, cudaStream_t s);
template <typename T>
cudaError_t swiglu_bwd(const T* dy, const T* gate, const T* up, T* dgate, T* dup, int64_t n,
                       cudaStream_t s);

// Unscaled grad = softmax - onehot (0 on ignored rows); may alias logits (in place), or be null
// for the loss only.
template <typename T>
cudaError_t cross_entropy_fwd(const T* logits, const int64_t* labels, T* grad, float* loss,
                              int64_t N, int64_t V, int64_t ignore_index, cudaStream_t s);

// y = x * (*factor) in fp32, stored as Out (In == Out, or float -> half / bfloat16).
template <typename In, typename Out>
cudaError_t scale(const In* x, const float* factor, Out* y, int64_t n, cudaStream_t s);

struct AdamHyper {
  float lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2_sqrt;
};
constexpr int64_t kAdamChunk = 65536;  // elements per block
// One launch's worth of tensors, passed by value as a kernel parameter (must stay < 4 KB):
// addresses per tensor, and for each block the tensor (index into these arrays) and chunk.
constexpr int kAdamMaxTensors = 24;
constexpr int kAdamMaxBlocks = 320;
struct AdamBatch {
  void* param[kAdamMaxTensors];
  const void* grad[kAdamMaxTensors];
  void* exp_avg[kAdamMaxTensors];
  void* exp_avg_sq[kAdamMaxTensors];
  float* master[kAdamMaxTensors];  // null without masters
  int64_t numel[kAdamMaxTensors];
  int32_t block_chunk[kAdamMaxBlocks];
  uint8_t block_tensor[kAdamMaxBlocks];
  int32_t nblocks;
};
static_assert(sizeof(AdamBatch) + sizeof(AdamHyper) <= 4096, "kernel parameters must fit 4 KB");
// P = param/grad type, S = moment type (float with masters, else P).
template <typename P, typename S>
cudaError_t adamw(const AdamBatch& batch, AdamHyper h, cudaStream_t s);

// Newton–Schulz prologue: buf (2 zeroed floats) -> buf[0] = 1 / (||x||_F + eps), on the device.
template <typename T>
cudaError_t inverse_frobenius_norm(const T* x, float* buf, float eps, int64_t n, cudaStream_t s);

// Document-masked attention (doc_attention.cuh), T = __half or __nv_bfloat16, p.D 64 or 128: the
// forward writes p.o and p.lse; the backward writes p.delta, adds into p.dq (zeroed fp32) and
// writes p.dk and p.dv.
template <typename T>
cudaError_t doc_attention_fwd(const attn::Params& p, cudaStream_t s);
template <typename T>
cudaError_t doc_attention_bwd(const attn::Params& p, cudaStream_t s);

}  // namespace megalm::launch
