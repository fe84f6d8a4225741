// counts.cu — expert counts, exclusive offsets and the stable expert-sorted order of routed pairs.
//
// CUDA C++ twin of kernels/counts.py, atomic-free and deterministic:
//   1. block_rank:  each block of kBlockN pairs ranks every pair among the block's earlier pairs with the same
//                   expert (shared memory) and writes its per-expert histogram row (the last pair of an expert
//                   in the block writes rank + 1; the row is zeroed first).
//   2. column_scan: one thread per expert turns its histogram column into each block's base within the expert
//                   (exclusive scan over blocks) and writes the expert's count.
//   3. offsets:     exclusive scan of the counts (one thread: E is small, and a serial sum is exact and simple).
//   4. scatter:     pair_of_row[offsets[e] + base[block][e] + rank] = pair; ties keep pair order (a stable sort).
// Pairs whose expert is outside [0, E) are skipped (never read out of bounds); the caller validates ids.
// Compiled and emulator-checked, not yet run on a GPU: see csrc/README.md.
#include "moe_ops.h"

#include <stdint.h>

namespace {

constexpr int kBlockN = 256;  // pairs per block in passes 1 and 4 (threads per block)
constexpr int kScanThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

int64_t blocks_for(int64_t N) { return (N + kBlockN - 1) / kBlockN; }

__global__ void block_rank_kernel(const int64_t* __restrict__ expert, int64_t N, int64_t E,
                                  int64_t* __restrict__ partial, int32_t* __restrict__ rank) {
  __shared__ int64_t s_expert[kBlockN];
  const int64_t b = blockIdx.x;
  const int tid = int(threadIdx.x);
  const int64_t n = b * kBlockN + tid;
  const int64_t e = n < N ? expert[n] : -1;
  s_expert[tid] = e;
  for (int64_t i = tid; i < E; i += kBlockN) partial[b * E + i] = 0;
  __syncthreads();  // the row is zeroed and every expert id is in shared memory before anyone writes a count
  if (e < 0 || e >= E) return;
  int r = 0;
  bool last = true;
  for (int j = 0; j < kBlockN; ++j) {
    if (s_expert[j] == e) {
      if (j < tid) ++r;
      if (j > tid) last = false;
    }
  }
  rank[n] = r;
  if (last) partial[b * E + e] = r + 1;  // exactly one writer per (block, expert) present
}

__global__ void column_scan_kernel(int64_t* __restrict__ partial, int64_t B, int64_t E, int64_t* __restrict__ counts) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < E; e += stride) {
    int64_t run = 0;
    for (int64_t b = 0; b < B; ++b) {  // adjacent threads read adjacent experts: coalesced
      const int64_t c = partial[b * E + e];
      partial[b * E + e] = run;
      run += c;
    }
    counts[e] = run;
  }
}

__global__ void offsets_kernel(const int64_t* __restrict__ counts, int64_t E, int64_t* __restrict__ offsets) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  int64_t run = 0;
  offsets[0] = 0;
  for (int64_t e = 0; e < E; ++e) {
    run += counts[e];
    offsets[e + 1] = run;
  }
}

__global__ void scatter_kernel(const int64_t* __restrict__ expert, int64_t N, int64_t E,
                               const int64_t* __restrict__ partial, const int32_t* __restrict__ rank,
                               const int64_t* __restrict__ offsets, int64_t* __restrict__ pair_of_row) {
  const int64_t b = blockIdx.x;
  const int64_t n = b * kBlockN + threadIdx.x;
  if (n >= N) return;
  const int64_t e = expert[n];
  if (e < 0 || e >= E) return;
  pair_of_row[offsets[e] + partial[b * E + e] + rank[n]] = n;
}

}  // namespace

extern "C" int64_t moe_expert_counts_workspace(int64_t N, int64_t E) {
  if (N < 0 || E < 1) return -1;
  const int64_t rank_bytes = (N * int64_t(sizeof(int32_t)) + 15) / 16 * 16;
  return blocks_for(N) * E * int64_t(sizeof(int64_t)) + rank_bytes;
}

extern "C" int moe_expert_counts(const int64_t* expert, int64_t N, int64_t E, int64_t* counts, int64_t* offsets,
                                 int64_t* pair_of_row, void* workspace, cudaStream_t stream) {
  if (N < 0 || E < 1 || counts == nullptr || offsets == nullptr) return int(cudaErrorInvalidValue);
  if (N == 0) {  // no pairs: zero counts and offsets without a launch
    cudaError_t err = cudaMemsetAsync(counts, 0, size_t(E) * sizeof(int64_t), stream);
    if (err == cudaSuccess) err = cudaMemsetAsync(offsets, 0, size_t(E + 1) * sizeof(int64_t), stream);
    return int(err);
  }
  if (expert == nullptr || pair_of_row == nullptr || workspace == nullptr) return int(cudaErrorInvalidValue);
  const int64_t B = blocks_for(N);
  if (B > 0x7fffffff) return int(cudaErrorInvalidValue);  // grid.x limit (N > 5e11 pairs)
  int64_t* partial = static_cast<int64_t*>(workspace);
  int32_t* rank = reinterpret_cast<int32_t*>(partial + B * E);
  block_rank_kernel<<<dim3(unsigned(B)), dim3(kBlockN), 0, stream>>>(expert, N, E, partial, rank);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return int(err);
  int64_t scan_blocks = (E + kScanThreads - 1) / kScanThreads;
  if (scan_blocks > kMaxBlocks) scan_blocks = kMaxBlocks;
  column_scan_kernel<<<dim3(unsigned(scan_blocks)), dim3(kScanThreads), 0, stream>>>(partial, B, E, counts);
  if ((err = cudaGetLastError()) != cudaSuccess) return int(err);
  offsets_kernel<<<dim3(1), dim3(1), 0, stream>>>(counts, E, offsets);
  if ((err = cudaGetLastError()) != cudaSuccess) return int(err);
  scatter_kernel<<<dim3(unsigned(B)), dim3(kBlockN), 0, stream>>>(expert, N, E, partial, rank, offsets, pair_of_row);
  return int(cudaGetLastError());
}
