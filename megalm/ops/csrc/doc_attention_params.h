// The arguments of the document-masked attention kernels (doc_attention.cuh): plain pointers and
// sizes, shared by host.cpp's launchers, the CUDA build and the CPU emulation.
#pragma once

#include <cmath>
#include <cstdint>

namespace megalm::attn {

// q [B, T, Hq, D], k/v/dk/dv [B, T, Hk, D], o/dout like q, doc_start int32 [B, T],
// lse/delta fp32 [B, Hq, T], dq fp32 like q.
struct Params {
  const void* q;
  const void* k;
  const void* v;
  const int32_t* doc_start;
  void* o;
  float* lse;  // log2-domain: m + log2(l) of the scores scaled by log2(e)/sqrt(D)
  const void* dout;
  float* delta;  // rowsum(dO * O), written by the backward's first kernel
  float* dq;     // fp32 accumulator, zeroed by the caller
  void* dk;
  void* dv;
  int* tiles;  // null, or counts the tiles visited (the CPU tests hold the block skipping)
  int B, T, Hq, Hk, D;
  float scale;       // 1/sqrt(D)
  float scale_log2;  // log2(e)/sqrt(D)
};

// The inputs' part of the arguments; outputs and the backward's buffers are set by the caller.
inline Params make_params(const void* q, const void* k, const void* v, const int32_t* doc_start,
                          int B, int T, int Hq, int Hk, int D) {
  Params p{};
  p.q = q;
  p.k = k;
  p.v = v;
  p.doc_start = doc_start;
  p.B = B;
  p.T = T;
  p.Hq = Hq;
  p.Hk = Hk;
  p.D = D;
  p.scale = 1.f / std::sqrt(static_cast<float>(D));
  p.scale_log2 = p.scale * 1.4426950408889634f;  // exp(x) = exp2(x * log2(e))
  return p;
}

}  // namespace megalm::attn
