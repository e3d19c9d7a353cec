// The document-masked attention kernels, built for the CPU emulation (cuda_emu.h): C entry points
// over raw bf16 buffers for tests/ops/test_doc_attention_emu.py (ctypes). Not part of the CUDA
// build (megalm.ops.build compiles csrc/ only).
#include "../doc_attention.cuh"
#include "entry.h"

extern "C" {


// Dynamic shared memory per block of the forward / backward kernel (16-bit types).
int megalm_emu_smem_bytes(int D, int backward) {
  using megalm::dev::bf16;
  using namespace megalm::attn;
  if (D == 64) return int(backward ? BwdSmem<bf16, 64>::bytes : FwdSmem<bf16, 64>::bytes);
  return int(backward ? BwdSmem<bf16, 128>::bytes : FwdSmem<bf16, 128>::bytes);
}

int megalm_emu_doc_attention_fwd(const void* q, const void* k, const void* v,
                                 const int32_t* doc_start, void* o, float* lse, int* tiles, int B,
                                 int T, int Hq, int Hk, int D) {
  using megalm::dev::bf16;
  megalm::emu::failure().clear();
  auto p = megalm::attn::make_params(q, k, v, doc_start, B, T, Hq, Hk, D);
  p.o = o;
  p.lse = lse;
  p.tiles = tiles;
  if (D == 64) megalm::attn::launch_fwd<bf16, 64>(p, nullptr);
  else megalm::attn::launch_fwd<bf16, 128>(p, nullptr);
  return megalm::emu::failure().empty() ? 0 : 1;
}

int megalm_emu_doc_attention_bwd(const void* dout, const void* q, const void* k, const void* v,
                                 const void* o, const float* lse, const int32_t* doc_start,
                                 float* delta, float* dq, void* dk, void* dv, int* tiles, int B,
                                 int T, int Hq, int Hk, int D) {
  using megalm::dev::bf16;
  megalm::emu::failure().clear();
  auto p = megalm::attn::make_params(q, k, v, doc_start, B, T, Hq, Hk, D);
  p.o = const_cast<void*>(o);
  p.lse = const_cast<float*>(lse);
  p.dout = dout;
  p.delta = delta;
  p.dq = dq;
  p.dk = dk;
  p.dv = dv;
  p.tiles = tiles;
  if (D == 64) megalm::attn::launch_bwd<bf16, 64>(p, nullptr);
  else megalm::attn::launch_bwd<bf16, 128>(p, nullptr);
  return megalm::emu::failure().empty() ? 0 : 1;
}

// For the tests of the emulation itself: what would fault or hang on a GPU is reported.
int megalm_emu_selfcheck(int what) {
  namespace wmma = megalm::dev::wmma;
  using megalm::dev::bf16;
  megalm::emu::failure().clear();
  if (what == 0) {  // a WMMA load from a pointer off the 32-byte grid
    megalm::emu::launch(dim3(1), dim3(32), 1024, [] {
      MEGALM_DYNAMIC_SMEM(smem);
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> f;
      wmma::load_matrix_sync(f, reinterpret_cast<const bf16*>(smem + 16), 16);
    });
  } else {  // a warp barrier that half the warp's lanes never reach
    megalm::emu::launch(dim3(1), dim3(64), 0, [] {
      if (threadIdx.x % 32 < 16) __syncwarp();
    });
  }
  return megalm::emu::failure().empty() ? 0 : 1;
}

}  // extern "C"
