// torch_binding.cpp — the CUDA kernels of this directory as PyTorch operators: torch.ops.moe_routing_cuda.<op>.
//
// setup.py builds this file and the .cu files into the extension moe_routing._C (CUDAExtension); loading it runs
// the registrations below. TORCH_LIBRARY declares the schemas, TORCH_LIBRARY_IMPL registers the CUDA
// implementations. Each implementation checks its arguments with TORCH_CHECK before anything runs (messages name
// the argument and what it must be), allocates its outputs, makes the inputs' device current and launches the C
// launchers of moe_ops.h on that device's current stream. moe_routing/ops/cuda_ext.py does the same checks in
// Python first, converts index and weight dtypes, and registers the fake implementations torch.compile uses.
//
// MOE_ROUTING_EMULATE (tests only, see csrc/emu/emu_build.py): the same code registered for CPU tensors and linked
// with the CPU-emulated launchers, so CI runs these checks and the argument passing; no device guard, no stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#ifndef MOE_ROUTING_EMULATE
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <optional>
#include <tuple>

#include "moe_ops.h"

namespace {

#ifdef MOE_ROUTING_EMULATE
constexpr const char* kDevice = "CPU";
bool on_device(const at::Tensor& t) { return t.is_cpu(); }
struct DeviceScope {
  explicit DeviceScope(const at::Tensor&) {}
};
cudaStream_t current_stream() { return nullptr; }
#else
constexpr const char* kDevice = "CUDA";
bool on_device(const at::Tensor& t) { return t.is_cuda(); }
// The launchers run on the current device: make it the inputs' device for the call.
struct DeviceScope {
  explicit DeviceScope(const at::Tensor& t) : guard(t.device()) {}
  c10::cuda::CUDAGuard guard;
};
cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }
#endif

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return MOE_FP32;
    case at::kHalf: return MOE_FP16;
    case at::kBFloat16: return MOE_BF16;
    case at::kDouble: return MOE_FP64;
    default: return -1;
  }
}

// `first` is the op's first tensor argument: every input must live on its device.
void check_device(const at::Tensor& t, const char* name, const at::Tensor& first) {
  TORCH_CHECK(on_device(t), name, " must be a ", kDevice, " tensor, got device ", t.device());
  TORCH_CHECK(t.device() == first.device(), name, " is on ", t.device(), " but the first input is on ",
              first.device());
}

void check_data(const at::Tensor& t, const char* name, int64_t dim, const at::Tensor& first) {
  check_device(t, name, first);
  TORCH_CHECK(dtype_code(t.scalar_type()) >= 0, name, " must be float32, float16, bfloat16 or float64, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_index(const at::Tensor& t, const char* name, int64_t n, const at::Tensor& first) {
  check_device(t, name, first);
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape [", n, "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Weights are float32 for float32/float16/bfloat16 data and float64 for float64 data (moe_ops.h).
void check_weight(const at::Tensor& t, const char* name, int64_t n, at::ScalarType data, const at::Tensor& first) {
  check_device(t, name, first);
  const at::ScalarType want = data == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(t.scalar_type() == want, name, " must be ", want, " for ", data, " data, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape [", n, "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_status(int status, const char* launcher) {
  TORCH_CHECK(status == 0, launcher, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(status)),
              " (cudaError ", status, ")");
}

const int64_t* index_ptr(const at::Tensor& t) { return t.numel() ? t.data_ptr<int64_t>() : nullptr; }

at::Tensor permute_impl(const at::Tensor& x, const at::Tensor& src_token) {
  check_data(x, "x", 2, x);
  TORCH_CHECK(src_token.dim() == 1, "src_token must be 1-D, got shape ", src_token.sizes());
  check_index(src_token, "src_token", src_token.size(0), x);
  const int64_t N = src_token.size(0), D = x.size(1);
  DeviceScope scope(x);
  at::Tensor out = at::empty({N, D}, x.options());
  if (N == 0 || D == 0) return out;
  check_status(moe_permute_fwd(x.data_ptr(), index_ptr(src_token), out.data_ptr(), N, D, dtype_code(x.scalar_type()),
                               current_stream()),
               "moe_permute_fwd");
  return out;
}

at::Tensor combine_impl(const at::Tensor& h, const std::optional<at::Tensor>& weight, const at::Tensor& row_of_pair,
                        const at::Tensor& token_offsets) {
  check_data(h, "h", 2, h);
  const int64_t N = h.size(0), D = h.size(1);
  TORCH_CHECK(token_offsets.dim() == 1 && token_offsets.size(0) >= 1,
              "token_offsets must be 1-D [T+1] (T >= 0), got shape ", token_offsets.sizes());
  const int64_t T = token_offsets.size(0) - 1;
  check_index(token_offsets, "token_offsets", T + 1, h);
  check_index(row_of_pair, "row_of_pair", N, h);
  if (weight.has_value()) check_weight(*weight, "weight", N, h.scalar_type(), h);
  DeviceScope scope(h);
  at::Tensor y = at::empty({T, D}, h.options());
  if (T == 0 || D == 0) return y;
  const void* w = weight.has_value() && N > 0 ? weight->data_ptr() : nullptr;
  check_status(moe_combine_fwd(N ? h.data_ptr() : nullptr, w, index_ptr(row_of_pair), index_ptr(token_offsets),
                               y.data_ptr(), T, D, dtype_code(h.scalar_type()), current_stream()),
               "moe_combine_fwd");
  return y;
}

std::tuple<at::Tensor, at::Tensor> combine_backward_impl(const at::Tensor& grad, const at::Tensor& h,
                                                         const at::Tensor& weight, const at::Tensor& row_of_pair,
                                                         const at::Tensor& token) {
  check_data(grad, "grad", 2, grad);
  check_data(h, "h", 2, grad);
  const int64_t N = h.size(0), D = h.size(1);
  TORCH_CHECK(grad.scalar_type() == h.scalar_type(), "grad must have h's dtype ", h.scalar_type(), ", got ",
              grad.scalar_type());
  TORCH_CHECK(grad.size(1) == D, "grad must be [T, ", D, "] (h's width), got ", grad.sizes());
  check_weight(weight, "weight", N, h.scalar_type(), grad);
  check_index(row_of_pair, "row_of_pair", N, grad);
  check_index(token, "token", N, grad);
  DeviceScope scope(grad);
  at::Tensor d_h = at::empty_like(h);
  at::Tensor d_weight = at::empty_like(weight);
  if (N == 0) return {d_h, d_weight};
  check_status(moe_combine_bwd(D ? grad.data_ptr() : nullptr, D ? h.data_ptr() : nullptr, weight.data_ptr(),
                               index_ptr(row_of_pair), index_ptr(token), D ? d_h.data_ptr() : nullptr,
                               d_weight.data_ptr(), N, D, dtype_code(h.scalar_type()), current_stream()),
               "moe_combine_bwd");
  return {d_h, d_weight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sort_by_expert_impl(const at::Tensor& expert, int64_t num_experts) {
  TORCH_CHECK(num_experts >= 1, "num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(expert.dim() == 1, "expert must be 1-D [N], got shape ", expert.sizes());
  check_index(expert, "expert", expert.size(0), expert);
  const int64_t N = expert.size(0), E = num_experts;
  DeviceScope scope(expert);
  const at::TensorOptions i64 = expert.options().dtype(at::kLong);
  at::Tensor pair_of_row = at::empty({N}, i64);
  at::Tensor counts = at::empty({E}, i64);
  at::Tensor offsets = at::empty({E + 1}, i64);
  const int64_t work_bytes = moe_expert_counts_workspace(N, E);
  TORCH_CHECK(work_bytes >= 0, "moe_expert_counts_workspace rejected N=", N, ", E=", E);
  at::Tensor work = at::empty({work_bytes}, expert.options().dtype(at::kByte));
  check_status(moe_expert_counts(index_ptr(expert), N, E, counts.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                                 N ? pair_of_row.data_ptr<int64_t>() : nullptr,
                                 work_bytes ? work.data_ptr() : nullptr, current_stream()),
               "moe_expert_counts");
  return {pair_of_row, counts, offsets};
}

std::tuple<at::Tensor, at::Tensor> topk_softmax_impl(const at::Tensor& logits, int64_t k, bool softmax_before_topk,
                                                     bool normalize) {
  check_data(logits, "logits", 2, logits);
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "k must be in [1, E=", E, "], got ", k);
  DeviceScope scope(logits);
  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor weights = at::empty({T, k}, logits.options().dtype(acc));
  at::Tensor experts = at::empty({T, k}, logits.options().dtype(at::kLong));
  if (T == 0) return {weights, experts};
  check_status(moe_topk_softmax_fwd(logits.data_ptr(), weights.data_ptr(), experts.data_ptr<int64_t>(), T, E, k,
                                    softmax_before_topk ? 1 : 0, normalize ? 1 : 0, dtype_code(logits.scalar_type()),
                                    current_stream()),
               "moe_topk_softmax_fwd");
  return {weights, experts};
}

void register_impls(torch::Library& m) {
  m.impl("permute", &permute_impl);
  m.impl("combine", &combine_impl);
  m.impl("combine_backward", &combine_backward_impl);
  m.impl("sort_by_expert", &sort_by_expert_impl);
  m.impl("topk_softmax", &topk_softmax_impl);
}

}  // namespace

// Semantics: moe_ops.h (same argument names). Outputs are new tensors on the inputs' device.
TORCH_LIBRARY(moe_routing_cuda, m) {
  m.def("permute(Tensor x, Tensor src_token) -> Tensor");
  m.def("combine(Tensor h, Tensor? weight, Tensor row_of_pair, Tensor token_offsets) -> Tensor");
  m.def("combine_backward(Tensor grad, Tensor h, Tensor weight, Tensor row_of_pair, Tensor token) -> (Tensor, Tensor)");
  m.def("sort_by_expert(Tensor expert, int num_experts) -> (Tensor, Tensor, Tensor)");
  m.def("topk_softmax(Tensor logits, int k, bool softmax_before_topk, bool normalize) -> (Tensor, Tensor)");
}

#ifdef MOE_ROUTING_EMULATE
TORCH_LIBRARY_IMPL(moe_routing_cuda, CPU, m) { register_impls(m); }
#else
TORCH_LIBRARY_IMPL(moe_routing_cuda, CUDA, m) { register_impls(m); }
#endif
