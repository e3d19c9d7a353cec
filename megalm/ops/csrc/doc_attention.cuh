// Document-masked causal attention of packed rows on tensor cores (WMMA, bf16/fp16 in, fp32
// accumulation), forward and backward, FlashAttention-style: no T x T score or mask ever exists.
//
// Query i sees key j iff doc_start[i] <= j <= i (doc_start: the first position of i's document in
// its row). Tiles of 64 queries x 64 keys; a tile of queries needs keys from its FIRST query's
// document start up to its last query only, so the key blocks of earlier documents are never
// read (block skipping): with ~256-token documents in 1024-token rows that is ~1/3 of causal's
// work. The backward goes by key tile, over the query tiles up to the end of the tile's last
// key's document, and adds dQ into an fp32 buffer atomically.
//
// Layouts: q [B, T, Hq, D], k/v [B, T, Hk, D] (Hq a multiple of Hk: grouped-query attention),
// o like q, lse/delta fp32 [B, Hq, T], doc_start int32 [B, T]; D is 64 or 128.
// Shared between the CUDA build (doc_attention.cu) and the CPU emulation (emu/), so everything
// the kernels do goes through device_compat.cuh, and every __syncwarp/__syncthreads/shuffle is
// reached by all warps (uniform control flow: the emulation's barriers need it).
#pragma once

#include "doc_attention_params.h"
#include "doc_attention_tiles.cuh"

namespace megalm::attn {

using namespace megalm::dev;

// Forward shared memory (byte offsets; every region starts 128-byte aligned).
template <typename T, int D>
struct FwdSmem {
  using Dm = Dims<D>;
  static constexpr size_t q = 0;
  static constexpr size_t k = q + sizeof(T) * kTile * Dm::LD;
  static constexpr size_t v = k + sizeof(T) * kTile * Dm::LD;
  static constexpr size_t s = v + sizeof(T) * kTile * Dm::LD;  // fp32 scores [64][LS]
  static constexpr size_t p = s + sizeof(float) * kTile * Dm::LS;  // T probabilities [64][LP]
  static constexpr size_t o = p + sizeof(T) * kTile * Dm::LP;  // fp32 output [64][LO]
  static constexpr size_t bytes = o + sizeof(float) * kTile * Dm::LO;
};

// Backward shared memory. `work` holds the warps' S^T and dP^T slices while the probabilities
// are formed, then the dQ tile, then the final dK/dV rows.
template <typename T, int D>
struct BwdSmem {
  using Dm = Dims<D>;
  static constexpr size_t k = 0;
  static constexpr size_t v = k + sizeof(T) * kTile * Dm::LD;
  static constexpr size_t q = v + sizeof(T) * kTile * Dm::LD;
  static constexpr size_t dout = q + sizeof(T) * kTile * Dm::LD;
  static constexpr size_t pt = dout + sizeof(T) * kTile * Dm::LD;  // T P^T [64 keys][LP]
  static constexpr size_t dst = pt + sizeof(T) * kTile * Dm::LP;   // T dS^T [64 keys][LP]
  static constexpr size_t work = dst + sizeof(T) * kTile * Dm::LP;
  static constexpr size_t st_bytes = sizeof(float) * kTile * Dm::LS;  // S^T; dP^T follows
  static constexpr size_t tile_bytes = sizeof(float) * kTile * Dm::LO;
  static constexpr size_t work_bytes = 2 * st_bytes > tile_bytes ? 2 * st_bytes : tile_bytes;
  static constexpr size_t rows = work + work_bytes;  // lse, delta (fp32), doc_start (int) [64]
  static constexpr size_t bytes = rows + 3 * sizeof(float) * kTile + sizeof(int) * 4;
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) doc_attn_fwd_kernel(Params p) {
  using S = FwdSmem<T, D>;
  using Dm = Dims<D>;
  MEGALM_DYNAMIC_SMEM(smem);
  T* qs = reinterpret_cast<T*>(smem + S::q);
  T* ks = reinterpret_cast<T*>(smem + S::k);
  T* vs = reinterpret_cast<T*>(smem + S::v);
  float* ss = reinterpret_cast<float*>(smem + S::s);
  T* ps = reinterpret_cast<T*>(smem + S::p);
  float* os = reinterpret_cast<float*>(smem + S::o);

  const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * kTile;
  const int hk = h / (p.Hq / p.Hk);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = lane >> 1, half = lane & 1;  // lanes 2r, 2r+1 share row r of the warp's 16
  const int row = warp * 16 + r, qi = q0 + row;
  const int32_t* starts = p.doc_start + int64_t(b) * p.T;
  const int q_start = qi < p.T ? starts[qi] : 0;

  load_rows<T, D>(qs, static_cast<const T*>(p.q), b, q0, h, p.T, p.Hq);
  for (int i = threadIdx.x; i < kTile * Dm::LO; i += kThreads) os[i] = 0.f;

  float* s_w = ss + warp * 16 * Dm::LS;
  T* p_w = ps + warp * 16 * Dm::LP;
  float* o_w = os + warp * 16 * Dm::LO;
  float m = -INFINITY, l = 0.f;
  // doc_start is non-decreasing along a row: the first query's document starts first.
  const int kt_lo = max(starts[q0], 0) / kTile, kt_hi = (min(q0 + kTile, p.T) - 1) / kTile;
  for (int kt = kt_lo; kt <= kt_hi; ++kt) {
    const int k0 = kt * kTile;
    if (p.tiles != nullptr && threadIdx.x == 0) atomicAdd(p.tiles, 1);
    __syncthreads();  // every warp is done with the previous K/V tile
    load_rows<T, D>(ks, static_cast<const T*>(p.k), b, k0, hk, p.T, p.Hk);
    load_rows<T, D>(vs, static_cast<const T*>(p.v), b, k0, hk, p.T, p.Hk);
    __syncthreads();
    // S_w = Q_w K^T (K^T read column-major from the K rows)
    warp_gemm<T, wmma::row_major, wmma::col_major, D / 16, kTile / 16>(
        s_w, Dm::LS, qs + warp * 16 * Dm::LD, Dm::LD, ks, Dm::LD, false);
    __syncwarp();
    float sv[32];
    float mx = -INFINITY;
    MEGALM_UNROLL
    for (int c = 0; c < 32; ++c) {
      const int col = rotated<32>(c, r, half), kj = k0 + col;
      const bool ok = qi < p.T && kj <= qi && kj >= q_start;
      sv[c] = ok ? s_w[r * Dm::LS + col] * p.scale_log2 : -INFINITY;
      mx = fmaxf(mx, sv[c]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_new = fmaxf(m, mx);
    const float base = m_new == -INFINITY ? 0.f : m_new;  // nothing visible to this row yet
    const float alpha = exp2f(m - base);
    float sum = 0.f;
    MEGALM_UNROLL
    for (int c = 0; c < 32; ++c) {
      const float pr = exp2f(sv[c] - base);
      sum += pr;
      p_w[r * Dm::LP + rotated<32>(c, r, half)] = from_float<T>(pr);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l = l * alpha + sum;
    m = m_new;
    for (int c = 0; c < D / 2; ++c) o_w[r * Dm::LO + rotated<D / 2>(c, r, half)] *= alpha;
    __syncwarp();
    // O_w += P_w V
    warp_gemm<T, wmma::row_major, wmma::row_major, kTile / 16, D / 16>(
        o_w, Dm::LO, p_w, Dm::LP, vs, Dm::LD, true);
    __syncwarp();
  }
  // 1 / l per row through the warp's (now free) score rows, then O out in 16-byte vectors.
  float* inv = s_w;
  if (half == 0) {
    inv[r] = l > 0.f ? 1.f / l : 0.f;
    if (qi < p.T) p.lse[(int64_t(b) * p.Hq + h) * p.T + qi] = m + log2f(l);
  }
  __syncwarp();
  store_rows<T, D>(static_cast<T*>(p.o), o_w, Dm::LO, inv, b, q0 + warp * 16, h, p.T, p.Hq);
}

// delta[b, h, t] = sum_d dO * O, one warp per (b, t, h) row.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) doc_attn_delta_kernel(Params p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t rows = int64_t(p.B) * p.T * p.Hq;
  const int64_t row = int64_t(blockIdx.x) * (kThreads / 32) + warp;
  float acc = 0.f;
  if (row < rows) {
    const T* o = static_cast<const T*>(p.o) + row * D;
    const T* g = static_cast<const T*>(p.dout) + row * D;
    for (int d = lane; d < D; d += 32) acc += to_float(o[d]) * to_float(g[d]);
  }
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (row < rows && lane == 0) {
    const int h = int(row % p.Hq);
    const int64_t bt = row / p.Hq;
    const int t = int(bt % p.T), b = int(bt / p.T);
    p.delta[(int64_t(b) * p.Hq + h) * p.T + t] = acc;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) doc_attn_bwd_kernel(Params p) {
  using S = BwdSmem<T, D>;
  using Dm = Dims<D>;
  MEGALM_DYNAMIC_SMEM(smem);
  T* ks = reinterpret_cast<T*>(smem + S::k);
  T* vs = reinterpret_cast<T*>(smem + S::v);
  T* qs = reinterpret_cast<T*>(smem + S::q);
  T* dos = reinterpret_cast<T*>(smem + S::dout);
  T* pt = reinterpret_cast<T*>(smem + S::pt);
  T* dst = reinterpret_cast<T*>(smem + S::dst);
  float* st = reinterpret_cast<float*>(smem + S::work);
  float* dpt = reinterpret_cast<float*>(smem + S::work + S::st_bytes);
  float* tile = reinterpret_cast<float*>(smem + S::work);  // dQ, then dK / dV rows
  float* lse_s = reinterpret_cast<float*>(smem + S::rows);
  float* delta_s = lse_s + kTile;
  int* qstart_s = reinterpret_cast<int*>(delta_s + kTile);
  int* q_end_s = qstart_s + kTile;

  const int b = blockIdx.z, hk = blockIdx.y, k0 = blockIdx.x * kTile;
  const int rep = p.Hq / p.Hk;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = lane >> 1, half = lane & 1;  // lanes 2r, 2r+1 share key row r of the warp's 16
  const int kj = k0 + warp * 16 + r;
  const int32_t* starts = p.doc_start + int64_t(b) * p.T;
  const int k_last = min(k0 + kTile, p.T) - 1;

  load_rows<T, D>(ks, static_cast<const T*>(p.k), b, k0, hk, p.T, p.Hk);
  load_rows<T, D>(vs, static_cast<const T*>(p.v), b, k0, hk, p.T, p.Hk);
  if (threadIdx.x == 0) {
    // The last query that sees any key of the tile ends k_last's document: the largest i with
    // starts[i] <= k_last (starts is non-decreasing, and starts[k_last] <= k_last).
    int lo = k_last, hi = p.T - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (starts[mid] <= k_last) lo = mid; else hi = mid - 1;
    }
    *q_end_s = lo;
  }
  __syncthreads();
  const int qt_lo = k0 / kTile, qt_hi = *q_end_s / kTile;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dk_acc[D / 16], dv_acc[D / 16];
  MEGALM_UNROLL
  for (int nt = 0; nt < D / 16; ++nt) {
    wmma::fill_fragment(dk_acc[nt], 0.f);
    wmma::fill_fragment(dv_acc[nt], 0.f);
  }
  float* st_w = st + warp * 16 * Dm::LS;
  float* dpt_w = dpt + warp * 16 * Dm::LS;
  T* pt_w = pt + warp * 16 * Dm::LP;
  T* dst_w = dst + warp * 16 * Dm::LP;

  for (int h = hk * rep; h < (hk + 1) * rep; ++h) {
    for (int qt = qt_lo; qt <= qt_hi; ++qt) {
      const int q0 = qt * kTile;
      if (p.tiles != nullptr && threadIdx.x == 0) atomicAdd(p.tiles, 1);
      __syncthreads();  // every warp is done with the previous query tile
      load_rows<T, D>(qs, static_cast<const T*>(p.q), b, q0, h, p.T, p.Hq);
      load_rows<T, D>(dos, static_cast<const T*>(p.dout), b, q0, h, p.T, p.Hq);
      for (int i = threadIdx.x; i < kTile; i += kThreads) {
        const int t = q0 + i;
        const bool in = t < p.T;
        lse_s[i] = in ? p.lse[(int64_t(b) * p.Hq + h) * p.T + t] : 0.f;
        delta_s[i] = in ? p.delta[(int64_t(b) * p.Hq + h) * p.T + t] : 0.f;
        qstart_s[i] = in ? starts[t] : p.T;  // past T: sees no key
      }
      __syncthreads();
      // S^T_w = K_w Q^T and dP^T_w = V_w dO^T (16 keys x 64 queries each)
      warp_gemm<T, wmma::row_major, wmma::col_major, D / 16, kTile / 16>(
          st_w, Dm::LS, ks + warp * 16 * Dm::LD, Dm::LD, qs, Dm::LD, false);
      warp_gemm<T, wmma::row_major, wmma::col_major, D / 16, kTile / 16>(
          dpt_w, Dm::LS, vs + warp * 16 * Dm::LD, Dm::LD, dos, Dm::LD, false);
      __syncwarp();
      MEGALM_UNROLL
      for (int c = 0; c < 32; ++c) {
        const int col = rotated<32>(c, r, half), qi = q0 + col;
        const bool ok = kj < p.T && qi < p.T && kj <= qi && qstart_s[col] <= kj;
        const float pr = ok ? exp2f(st_w[r * Dm::LS + col] * p.scale_log2 - lse_s[col]) : 0.f;
        // dS = P (dP - delta), times the softmax scale here so dQ and dK need no pass of their own
        const float ds = pr * (dpt_w[r * Dm::LS + col] - delta_s[col]) * p.scale;
        pt_w[r * Dm::LP + col] = from_float<T>(pr);
        dst_w[r * Dm::LP + col] = from_float<T>(ds);
      }
      __syncwarp();
      // dV_w += P^T_w dO and dK_w += dS^T_w Q, in registers across all query tiles and heads
      warp_gemm_regs<T, kTile / 16, D / 16>(dv_acc, pt_w, Dm::LP, dos, Dm::LD);
      warp_gemm_regs<T, kTile / 16, D / 16>(dk_acc, dst_w, Dm::LP, qs, Dm::LD);
      __syncthreads();  // all of dS^T is written; S^T / dP^T are no longer read (tile reuses them)
      // dQ rows of this warp = dS K: dS[q][key] is dS^T read column-major
      warp_gemm<T, wmma::col_major, wmma::row_major, kTile / 16, D / 16>(
          tile + warp * 16 * Dm::LO, Dm::LO, dst + warp * 16, Dm::LP, ks, Dm::LD, false);
      __syncwarp();
      for (int i = lane; i < 16 * D; i += 32) {
        const int rr = i / D, d = i % D, qi = q0 + warp * 16 + rr;
        if (qi < p.T)
          atomicAdd(p.dq + ((int64_t(b) * p.T + qi) * p.Hq + h) * D + d,
                    tile[(warp * 16 + rr) * Dm::LO + d]);
      }
    }
  }
  // dK and dV of the warp's 16 keys, through the (now free) tile, out in T.
  __syncthreads();
  float* ones = lse_s + warp * 16;  // a row scale of 1 (the softmax scale is already in dS)
  if (lane < 16) ones[lane] = 1.f;
  float* tile_w = tile + warp * 16 * Dm::LO;
  for (int which = 0; which < 2; ++which) {
    MEGALM_UNROLL
    for (int nt = 0; nt < D / 16; ++nt)
      wmma::store_matrix_sync(tile_w + nt * 16, which == 0 ? dk_acc[nt] : dv_acc[nt], Dm::LO,
                              wmma::mem_row_major);
    __syncwarp();
    store_rows<T, D>(static_cast<T*>(which == 0 ? p.dk : p.dv), tile_w, Dm::LO, ones, b,
                     k0 + warp * 16, hk, p.T, p.Hk);
    __syncwarp();
  }
}

// Launchers (host side), shared by the CUDA build and the emulation.
template <typename T, int D>
cudaError_t launch_fwd(const Params& p, cudaStream_t stream) {
  auto kernel = doc_attn_fwd_kernel<T, D>;
  const dim3 grid((p.T + kTile - 1) / kTile, p.Hq, p.B);
  const size_t smem = FwdSmem<T, D>::bytes;
  MEGALM_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, p);
  return cudaSuccess;
}

template <typename T, int D>
cudaError_t launch_bwd(const Params& p, cudaStream_t stream) {
  auto delta = doc_attn_delta_kernel<T, D>;
  const int64_t rows = int64_t(p.B) * p.T * p.Hq;
  const dim3 delta_grid(unsigned((rows + kThreads / 32 - 1) / (kThreads / 32)));
  MEGALM_LAUNCH(delta, delta_grid, dim3(kThreads), 0, stream, p);
  auto kernel = doc_attn_bwd_kernel<T, D>;
  const dim3 grid((p.T + kTile - 1) / kTile, p.Hk, p.B);
  const size_t bwd_smem = BwdSmem<T, D>::bytes;
  MEGALM_LAUNCH(kernel, grid, dim3(kThreads), bwd_smem, stream, p);
  return cudaSuccess;
}

}  // namespace megalm::attn
