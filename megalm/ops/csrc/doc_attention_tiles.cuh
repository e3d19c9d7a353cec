// Tile plumbing of the document-attention kernels (doc_attention.cuh): the tile shape, shared
// memory row strides, tile loads and stores between global rows and shared memory, and the
// warp-level WMMA GEMMs over shared-memory tiles. Builds for CUDA and for the CPU emulation.
#pragma once

#include <type_traits>

#include "device_compat.cuh"

namespace megalm::attn {

using namespace megalm::dev;

constexpr int kThreads = 128;  // 4 warps, each owning 16 rows of a 64-row tile
constexpr int kTile = 64;      // queries per query tile = keys per key tile
constexpr int kPad = 8;        // 16-bit elements of padding per smem row (bank spread, 16 B)
constexpr int kPadF = 4;       // fp32 elements of padding per smem row (16 B)


template <int D>
struct Dims {
  static constexpr int LD = D + kPad;       // 16-bit [64][D] tiles
  static constexpr int LP = kTile + kPad;   // 16-bit [64][64] tiles
  static constexpr int LS = kTile + kPadF;  // fp32 [64][64] tiles
  static constexpr int LO = D + kPadF;      // fp32 [64][D] tiles
};

// Rows t0 .. t0+63 of head h of a [B, T, H, D] tensor into a [64][LD] smem tile, zeros outside
// [0, T) (the kernels mask those rows, but 0 * garbage could be NaN). Every load is issued before
// the first store, so a thread's loads are in flight together.
template <typename T, int D>
MEGALM_DEV void load_rows(T* dst, const T* src, int b, int t0, int h, int T_, int H) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kChunks = D / kVec;
  constexpr int kPer = kTile * kChunks / kThreads;
  static_assert(kTile * kChunks % kThreads == 0, "whole chunks per thread");
  int4 val[kPer];
  MEGALM_UNROLL
  for (int j = 0; j < kPer; ++j) {
    const int i = threadIdx.x + j * kThreads, r = i / kChunks, c = (i % kChunks) * kVec, t = t0 + r;
    val[j] = make_int4(0, 0, 0, 0);
    if (t >= 0 && t < T_) {
      const T* row = src + ((int64_t(b) * T_ + t) * H + h) * D + c;
      MEGALM_ASSERT_ALIGNED16(row);
      val[j] = *reinterpret_cast<const int4*>(row);
    }
  }
  MEGALM_UNROLL
  for (int j = 0; j < kPer; ++j) {
    const int i = threadIdx.x + j * kThreads, r = i / kChunks, c = (i % kChunks) * kVec;
    *reinterpret_cast<int4*>(dst + r * Dims<D>::LD + c) = val[j];
  }
}

// A warp's 16 fp32 rows (row stride ld, row rr scaled by scale[rr]) to rows t0 .. t0+15 of head h
// of a [B, T, H, D] tensor in T, rows past T skipped: lanes run along the rows in 16-byte vectors,
// so a warp writes whole lines.
template <typename T, int D>
MEGALM_DEV void store_rows(T* dst, const float* src, int ld, const float* scale, int b, int t0, int h,
                           int T_, int H) {
  constexpr int kVec = 16 / sizeof(T);
  const int lane = threadIdx.x % 32;
  for (int i = lane; i < 16 * (D / kVec); i += 32) {
    const int rr = i / (D / kVec), c = (i % (D / kVec)) * kVec, t = t0 + rr;
    if (t >= T_) continue;
    alignas(16) T v[kVec];
    MEGALM_UNROLL
    for (int e = 0; e < kVec; ++e) v[e] = from_float<T>(src[rr * ld + c + e] * scale[rr]);
    int4 packed;
    memcpy(&packed, v, sizeof(packed));
    T* row = dst + ((int64_t(b) * T_ + t) * H + h) * D + c;
    MEGALM_ASSERT_ALIGNED16(row);
    *reinterpret_cast<int4*>(row) = packed;
  }
}

// The column lane (r, half) visits at step c of a walk over its half of a row of 2 * n: rotated
// by the row so that the 32 lanes hit 32 different banks of the padded fp32 rows (row stride
// = 4 mod 32 words) instead of 4 lanes per bank.
template <int n>
MEGALM_DEV int rotated(int c, int r, int half) {
  return half * n + ((c + (r >> 2) + 16 * half) & (n - 1));
}

// C[16][16 * NT] (fp32, row stride ldc) (+)= A[16][16 * KT] · B, where B is read as
// [KT*16][NT*16] from `b` with the given layout: row_major b[k * ldb + n], col_major
// b[n * ldb + k]. k-outer over groups of 4 output tiles: each A fragment is loaded once per group.
template <typename T, typename LA, typename LB, int KT, int NT>
MEGALM_DEV void warp_gemm(float* c, int ldc, const T* a, int lda, const T* b, int ldb,
                          bool accumulate) {
  constexpr int kGroup = NT < 4 ? NT : 4;
  static_assert(NT % kGroup == 0, "output tiles in whole groups");
  MEGALM_UNROLL
  for (int g = 0; g < NT; g += kGroup) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kGroup];
    MEGALM_UNROLL
    for (int n = 0; n < kGroup; ++n) {
      if (accumulate) {
        wmma::load_matrix_sync(acc[n], c + (g + n) * 16, ldc, wmma::mem_row_major);
      } else {
        wmma::fill_fragment(acc[n], 0.f);
      }
    }
    MEGALM_UNROLL
    for (int kt = 0; kt < KT; ++kt) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> fa;
      wmma::load_matrix_sync(fa, std::is_same<LA, wmma::row_major>::value ? a + kt * 16 : a + kt * 16 * lda, lda);
      MEGALM_UNROLL
      for (int n = 0; n < kGroup; ++n) {
        const int nt = g + n;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> fb;
        wmma::load_matrix_sync(fb, std::is_same<LB, wmma::row_major>::value ? b + kt * 16 * ldb + nt * 16
                                                                            : b + nt * 16 * ldb + kt * 16, ldb);
        wmma::mma_sync(acc[n], fa, fb, acc[n]);
      }
    }
    MEGALM_UNROLL
    for (int n = 0; n < kGroup; ++n)
      wmma::store_matrix_sync(c + (g + n) * 16, acc[n], ldc, wmma::mem_row_major);
  }
}

// acc[NT] += A[16][16 * KT] (row-major smem) · B[KT*16][NT*16] (row-major smem), A loaded once
// per k step: the backward's dK / dV, whose accumulators live in registers for the whole kernel.
template <typename T, int KT, int NT>
MEGALM_DEV void warp_gemm_regs(wmma::fragment<wmma::accumulator, 16, 16, 16, float>* acc, const T* a,
                               int lda, const T* b, int ldb) {
  MEGALM_UNROLL
  for (int kt = 0; kt < KT; ++kt) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, a + kt * 16, lda);
    MEGALM_UNROLL
    for (int nt = 0; nt < NT; ++nt) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
      wmma::load_matrix_sync(fb, b + kt * 16 * ldb + nt * 16, ldb);
      wmma::mma_sync(acc[nt], fa, fb, acc[nt]);
    }
  }
}

}  // namespace megalm::attn
