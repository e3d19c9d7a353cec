// What the tensor-core kernels need from CUDA, spelled once so the same kernel source also builds
// for the CPU emulation (emu/cuda_emu.h) that the CPU test suite runs it on.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

namespace megalm::dev {
namespace wmma = nvcuda::wmma;
using bf16 = __nv_bfloat16;
using fp16 = __half;
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(fp16 x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ bf16 from_float<bf16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ fp16 from_float<fp16>(float x) { return __float2half_rn(x); }
}  // namespace megalm::dev

#define MEGALM_DEV __device__ __forceinline__
#define MEGALM_UNROLL _Pragma("unroll")
#define MEGALM_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#define MEGALM_ASSERT_ALIGNED16(p)
// Launch with `smem` bytes of dynamic shared memory (above 48 KiB needs the opt-in attribute).
#define MEGALM_LAUNCH(kernel, grid, block, smem, stream, ...)                                   \
  do {                                                                                          \
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));      \
    kernel<<<grid, block, smem, stream>>>(__VA_ARGS__);                                         \
  } while (0)

#else  // the CPU emulation

#include "emu/cuda_emu.h"

namespace megalm::dev {
namespace wmma = megalm::emu::wmma;
using bf16 = megalm::emu::bf16;
using megalm::emu::to_float;
template <typename T> T from_float(float x);
template <> inline bf16 from_float<bf16>(float x) { return megalm::emu::bf16_from_float(x); }
}  // namespace megalm::dev

#define MEGALM_DEV inline
#define MEGALM_UNROLL
#define MEGALM_DYNAMIC_SMEM(name) unsigned char* name = megalm::emu::dynamic_smem()
#define MEGALM_LAUNCH(kernel, grid, block, smem, stream, ...)                                  \
  do {                                                                                         \
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));     \
    MEGALM_KERNEL(grid, block, smem, stream, kernel)(__VA_ARGS__);                             \
  } while (0)

#endif
