// topk_softmax.cu — fused router top-k + softmax: experts[t, :] = the k largest logits of row t, weights their
// softmax (or the full-row softmax at those ids).
//
// CUDA C++ twin of kernels/topk_softmax.py, same order and results: selection on the logits in the order of a
// stable descending sort (NaN first, lowest id among NaNs; then larger values; ties to the lowest id). One warp per
// token (grid-stride over tokens); lane l owns experts l, l + 32, ... Round j: each lane takes its best entry that
// ranks *after* round j-1's pick (so no "taken" state is kept), then a butterfly of __shfl_xor_sync gives every
// lane the warp's best. The order is strict and total, so all lanes agree and a NaN or -inf row still gets k
// distinct ids in [0, E). Math in float (double for double logits); weights are float (double).
// Compiled and emulator-checked, not yet run on a GPU: see csrc/README.md.
#include "acc_types.cuh"
#include "moe_ops.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;  // tokens per block
constexpr int64_t kMaxBlocks = int64_t(1) << 20;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float acc_exp(float v) { return expf(v); }
__device__ __forceinline__ double acc_exp(double v) { return exp(v); }

// Whether (av, ai) comes before (bv, bi) in the selection order.
template <typename A>
__device__ __forceinline__ bool ranks_before(A av, int64_t ai, A bv, int64_t bi) {
  const bool an = av != av, bn = bv != bv;
  if (an || bn) return an && (!bn || ai < bi);
  return av > bv || (av == bv && ai < bi);
}

template <typename A>
__device__ __forceinline__ A warp_sum_all(A v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}

// blockDim = (32, kWarpsPerBlock); every branch below is uniform across a warp (t, j, flags), so the shuffles
// always see all 32 lanes.
template <typename T>
__global__ void topk_softmax_kernel(const T* __restrict__ logits, acc_t<T>* __restrict__ weights,
                                    int64_t* __restrict__ experts, int64_t T_, int64_t E, int64_t K,
                                    bool full_softmax) {
  using A = acc_t<T>;
  const int lane = int(threadIdx.x);
  const int64_t stride = int64_t(gridDim.x) * blockDim.y;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; t < T_; t += stride) {
    const T* row = logits + t * E;
    A prev_v = A(0), top = A(0), sum = A(0), denom = A(1);
    int64_t prev_i = -1;
    for (int64_t j = 0; j < K; ++j) {
      A best_v = A(0);
      int64_t best_i = -1;
      for (int64_t e = lane; e < E; e += kWarp) {
        const A x = to_acc(row[e]);
        if (prev_i >= 0 && !ranks_before(prev_v, prev_i, x, e)) continue;  // picked in an earlier round
        if (best_i < 0 || ranks_before(x, e, best_v, best_i)) {
          best_v = x;
          best_i = e;
        }
      }
#pragma unroll
      for (int off = kWarp / 2; off > 0; off >>= 1) {
        const A ov = __shfl_xor_sync(kFull, best_v, off);
        const int64_t oi = __shfl_xor_sync(kFull, best_i, off);
        if (oi >= 0 && (best_i < 0 || ranks_before(ov, oi, best_v, best_i))) {
          best_v = ov;
          best_i = oi;
        }
      }
      if (best_i < 0 || best_i >= E) best_i = E - 1;  // unreachable (E - j >= 1 entries remain): memory safety
      if (j == 0) {
        top = best_v;  // the row maximum (NaN when the row has a NaN: then every weight is NaN, as in torch)
        if (full_softmax) {
          A part = A(0);
          for (int64_t e = lane; e < E; e += kWarp) part += acc_exp(to_acc(row[e]) - top);
          denom = warp_sum_all(part);
        }
      }
      const A w = acc_exp(best_v - top);
      sum += w;
      if (lane == 0) {
        experts[t * K + j] = best_i;
        weights[t * K + j] = w;
      }
      prev_v = best_v;
      prev_i = best_i;
    }
    if (lane == 0) {  // the same thread wrote these values: no synchronisation needed
      const A scale = full_softmax ? denom : sum;
      for (int64_t j = 0; j < K; ++j) weights[t * K + j] /= scale;
    }
  }
}

template <typename T>
cudaError_t launch(const void* logits, void* weights, int64_t* experts, int64_t T_, int64_t E, int64_t K,
                   bool full_softmax, cudaStream_t stream) {
  int64_t blocks = (T_ + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  topk_softmax_kernel<T><<<dim3(unsigned(blocks)), dim3(kWarp, kWarpsPerBlock), 0, stream>>>(
      static_cast<const T*>(logits), static_cast<acc_t<T>*>(weights), experts, T_, E, K, full_softmax);
  return cudaGetLastError();
}

}  // namespace

extern "C" int moe_topk_softmax_fwd(const void* logits, void* weights, int64_t* experts, int64_t T, int64_t E,
                                    int64_t K, int softmax_first, int normalize, int dtype, cudaStream_t stream) {
  if (T < 0 || E < 1 || K < 1 || K > E || dtype < MOE_FP32 || dtype > MOE_FP64) return int(cudaErrorInvalidValue);
  if (T == 0) return int(cudaSuccess);
  if (logits == nullptr || weights == nullptr || experts == nullptr) return int(cudaErrorInvalidValue);
  // softmax_first + normalize renormalises the k probabilities: exactly the softmax over the k chosen logits
  const bool full = softmax_first != 0 && normalize == 0;
  switch (dtype) {
    case MOE_FP32: return int(launch<float>(logits, weights, experts, T, E, K, full, stream));
    case MOE_FP16: return int(launch<__half>(logits, weights, experts, T, E, K, full, stream));
    case MOE_BF16: return int(launch<__nv_bfloat16>(logits, weights, experts, T, E, K, full, stream));
    case MOE_FP64: return int(launch<double>(logits, weights, experts, T, E, K, full, stream));
    default: return int(cudaErrorInvalidValue);
  }
}
