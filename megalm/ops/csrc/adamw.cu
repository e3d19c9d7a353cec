// Multi-tensor AdamW: one launch updates many tensors. The host builds a table of pointers and
// sizes plus a (tensor, chunk) list per block; math in fp32, optional fp32 master weights.
#include <vector>

#include "common.cuh"
#include "ops.h"

namespace megalm {
namespace {

constexpr int64_t kChunk = 65536;  // elements per block
constexpr int kThreads = 512;

struct AdamHyper {
  float lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2_sqrt;
};

// meta row per tensor: [param, grad, exp_avg, exp_avg_sq, master, numel] as int64.
template <typename P, typename S>
__global__ void adamw_kernel(const int64_t* __restrict__ meta, const int32_t* __restrict__ blocks,
                             AdamHyper h) {
  const int32_t t = blocks[2 * blockIdx.x], chunk = blocks[2 * blockIdx.x + 1];
  const int64_t* row = meta + 6 * (int64_t)t;
  P* p = reinterpret_cast<P*>(row[0]);
  const P* g = reinterpret_cast<const P*>(row[1]);
  S* m = reinterpret_cast<S*>(row[2]);
  S* v = reinterpret_cast<S*>(row[3]);
  float* master = reinterpret_cast<float*>(row[4]);
  const int64_t n = row[5];
  const int64_t begin = (int64_t)chunk * kChunk;
  const int64_t end = begin + kChunk < n ? begin + kChunk : n;
  const float step_size = h.lr / h.bias_correction1;
  const float decay = 1.f - h.lr * h.weight_decay;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    float w = master != nullptr ? master[i] : static_cast<float>(p[i]);
    const float gi = static_cast<float>(g[i]);
    float mi = static_cast<float>(m[i]);
    float vi = static_cast<float>(v[i]);
    w *= decay;  // decoupled weight decay, before the Adam step (as torch.optim.AdamW)
    mi += (1.f - h.beta1) * (gi - mi);
    vi = vi * h.beta2 + (1.f - h.beta2) * gi * gi;
    const float denom = sqrtf(vi) / h.bias_correction2_sqrt + h.eps;
    w -= step_size * mi / denom;
    m[i] = static_cast<S>(mi);
    v[i] = static_cast<S>(vi);
    if (master != nullptr) master[i] = w;
    p[i] = static_cast<P>(w);
  }
}

template <typename P, typename S>
void launch(const at::Tensor& meta, const at::Tensor& blocks, int64_t nblocks, const AdamHyper& h) {
  adamw_kernel<P, S><<<(unsigned)nblocks, kThreads, 0, stream()>>>(
      meta.data_ptr<int64_t>(), blocks.data_ptr<int32_t>(), h);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void multi_tensor_adamw(const std::vector<at::Tensor>& params,
                        const std::vector<at::Tensor>& grads,
                        const std::vector<at::Tensor>& exp_avgs,
                        const std::vector<at::Tensor>& exp_avg_sqs,
                        const std::vector<at::Tensor>& masters, double lr, double beta1,
                        double beta2, double eps, double weight_decay, double bias_correction1,
                        double bias_correction2) {
  if (params.empty()) return;
  const c10::cuda::OptionalCUDAGuard guard(params[0].device());
  const bool has_master = !masters.empty();
  const int64_t n = (int64_t)params.size();
  auto meta = at::empty({n, 6}, at::TensorOptions().dtype(at::kLong));
  auto* mp = meta.data_ptr<int64_t>();
  std::vector<int32_t> table;
  for (int64_t i = 0; i < n; ++i) {
    mp[6 * i + 0] = reinterpret_cast<int64_t>(params[i].data_ptr());
    mp[6 * i + 1] = reinterpret_cast<int64_t>(grads[i].data_ptr());
    mp[6 * i + 2] = reinterpret_cast<int64_t>(exp_avgs[i].data_ptr());
    mp[6 * i + 3] = reinterpret_cast<int64_t>(exp_avg_sqs[i].data_ptr());
    mp[6 * i + 4] = has_master ? reinterpret_cast<int64_t>(masters[i].data_ptr()) : 0;
    mp[6 * i + 5] = params[i].numel();
    const int64_t chunks = (params[i].numel() + kChunk - 1) / kChunk;
    TORCH_CHECK(chunks < INT32_MAX, "multi_tensor_adamw: tensor too large");
    for (int64_t c = 0; c < chunks; ++c) {
      table.push_back((int32_t)i);
      table.push_back((int32_t)c);
    }
  }
  const int64_t nblocks = (int64_t)table.size() / 2;
  if (nblocks == 0) return;
  TORCH_CHECK(nblocks <= INT32_MAX, "multi_tensor_adamw: too many chunks for one launch");
  auto blocks_cpu = at::from_blob(table.data(), {(int64_t)table.size()},
                                  at::TensorOptions().dtype(at::kInt));
  // Blocking copies from pageable memory: the host buffers above may die right after.
  auto dev = params[0].device();
  auto meta_d = meta.to(dev);
  auto blocks_d = blocks_cpu.to(dev);
  const AdamHyper h{(float)lr, (float)beta1, (float)beta2, (float)eps, (float)weight_decay,
                    (float)bias_correction1, (float)std::sqrt(bias_correction2)};
  const auto pt = params[0].scalar_type();
  if (pt == at::kFloat) {
    launch<float, float>(meta_d, blocks_d, nblocks, h);
  } else if (pt == at::kHalf) {
    if (has_master) launch<at::Half, float>(meta_d, blocks_d, nblocks, h);
    else launch<at::Half, at::Half>(meta_d, blocks_d, nblocks, h);
  } else if (pt == at::kBFloat16) {
    if (has_master) launch<at::BFloat16, float>(meta_d, blocks_d, nblocks, h);
    else launch<at::BFloat16, at::BFloat16>(meta_d, blocks_d, nblocks, h);
  } else {
    TORCH_CHECK(false, "multi_tensor_adamw: unsupported param dtype ", pt);
  }
}

}  // namespace megalm
