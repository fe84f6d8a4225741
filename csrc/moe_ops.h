// moe_ops.h — C launchers of the CUDA twins of the Triton kernels (kernels/permute.py, combine.py, counts.py,
// topk_softmax.py), called by the torch binding (torch_binding.cpp) and by the CPU emulator's tests (emu/).
//
// Raw device pointers, sizes, a dtype code and a cudaStream_t; no torch headers. Every entry point launches on
// `stream`, does not synchronize, and returns a cudaError_t as int (0 = cudaSuccess; cudaErrorInvalidValue for a
// bad dtype code, negative size or missing required pointer; otherwise the launch error). Zero-sized work
// returns 0 without launching. All tensors are dense row-major (contiguous); indices are int64 and must be in
// range (not checked here: moe_routing/ops/cuda_ext.py checks them on the host with MOE_ROUTING_DEBUG=1).
//
// Data dtype codes (x, h, out, y, dy, d_h share it):  0 = float32, 1 = float16, 2 = bfloat16, 3 = float64.
// Weights (weight, d_weight) are float32 for float32/float16/bfloat16 data and float64 for float64 data.
// Accumulation is in float32 (float64 for float64 data).
#ifndef MOE_OPS_H_
#define MOE_OPS_H_

#include <stdint.h>
#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

enum moe_dtype { MOE_FP32 = 0, MOE_FP16 = 1, MOE_BF16 = 2, MOE_FP64 = 3 };

#if defined(_WIN32)
#define MOE_API __declspec(dllexport)
#else
#define MOE_API __attribute__((visibility("default")))
#endif

// Gather rows: out[n, :] = x[src_token[n], :] for n in [0, N).  x: [T, D], src_token: [N] (the token row each
// expert-sorted row gathers), out: [N, D].
MOE_API int moe_permute_fwd(const void* x, const int64_t* src_token, void* out, int64_t N, int64_t D, int dtype,
                            cudaStream_t stream);

// Unpermute + combine, token-major and atomic-free (one block owns whole output rows, pairs summed in order,
// so the result is deterministic):
//   y[t, :] = sum_{p = token_offsets[t]}^{token_offsets[t+1]-1} weight[p] * h[row_of_pair[p], :]   for t in [0, T)
// h: [N, D]; weight: [N] or NULL (weight 1: permute's backward); row_of_pair: [N] (the expert-sorted row of each
// pair); token_offsets: [T+1] CSR offsets of each token's pairs (pairs in token order); y: [T, D].
MOE_API int moe_combine_fwd(const void* h, const void* weight, const int64_t* row_of_pair,
                            const int64_t* token_offsets, void* y, int64_t T, int64_t D, int dtype,
                            cudaStream_t stream);

// Backward of combine, one block per pair p in [0, N):
//   d_h[row_of_pair[p], :] = weight[p] * dy[token[p], :]            (weight NULL: weight 1)
//   d_weight[p]            = <dy[token[p], :], h[row_of_pair[p], :]>  (d_weight NULL: not computed)
// dy: [T, D]; h, d_h: [N, D]; weight, row_of_pair, token, d_weight: [N]. `row_of_pair` must be a permutation
// for d_h to be fully written.
MOE_API int moe_combine_bwd(const void* dy, const void* h, const void* weight, const int64_t* row_of_pair,
                            const int64_t* token, void* d_h, void* d_weight, int64_t N, int64_t D, int dtype,
                            cudaStream_t stream);

// Expert counts, exclusive offsets and the stable expert-sorted order of N routed pairs (atomic-free,
// deterministic):
//   counts[e]  = #{p : expert[p] == e}                              e in [0, E)
//   offsets[e] = counts[0] + ... + counts[e-1]                      e in [0, E]  (offsets[0] = 0, offsets[E] = N)
//   pair_of_row[offsets[e] + r] = the r-th pair (in pair order) with expert e
// expert: [N]; counts: [E]; offsets: [E+1] (CSR: expert e's rows are offsets[e]..offsets[e+1]-1); pair_of_row:
// [N]; workspace: moe_expert_counts_workspace(N, E) bytes of device memory, 16-byte aligned (scratch, contents
// undefined on return). Pairs with an expert outside [0, E)
// are skipped (not counted, not placed). N = 0 zeroes counts and offsets without a launch.
MOE_API int64_t moe_expert_counts_workspace(int64_t N, int64_t E);  // -1 for N < 0 or E < 1
MOE_API int moe_expert_counts(const int64_t* expert, int64_t N, int64_t E, int64_t* counts, int64_t* offsets,
                              int64_t* pair_of_row, void* workspace, cudaStream_t stream);

// Fused router top-k + softmax over logits [T, E] (dtype code as above), 1 <= K <= E:
//   experts[t, :] = the K largest logits' ids in the order of a stable descending sort (NaN first, ties to the
//                   lowest id): always K distinct ids in [0, E), also for rows with NaN or -inf;
//   weights[t, j] = softmax over the K chosen logits (softmax_first == 0, or softmax_first && normalize), or the
//                   softmax over all E at experts[t, j] (softmax_first && !normalize). A row with a NaN gets NaN.
// weights: [T, K] float32 (float64 for float64 logits); experts: [T, K] int64.
MOE_API int moe_topk_softmax_fwd(const void* logits, void* weights, int64_t* experts, int64_t T, int64_t E,
                                 int64_t K, int softmax_first, int normalize, int dtype, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // MOE_OPS_H_
