// permute.cu — gather token rows into expert-sorted order: out[n, :] = x[src_token[n], :]
// (src_token: the token row that expert-sorted row n gathers).
//
// CUDA C++ twin of kernels/permute.py. A pure row copy, so the kernel moves bytes: the row is copied in the widest
// unit (16/8/4/2/1 bytes) that divides the row size and both base addresses. Blocks are [threads over the row] x
// [rows per block]; a grid-stride loop over rows keeps the grid within launch limits for any N.
// Compiled, not yet run: see csrc/README.md.
#include "moe_ops.h"

#include <stdint.h>

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

int element_size(int dtype) {
  switch (dtype) {
    case MOE_FP32: return 4;
    case MOE_FP16: return 2;
    case MOE_BF16: return 2;
    case MOE_FP64: return 8;
    default: return 0;
  }
}

// V is the copy unit (int4 = 16 bytes ... char = 1 byte); units_per_row = row bytes / sizeof(V).
template <typename V>
__global__ void gather_rows_kernel(const V* __restrict__ x, const int64_t* __restrict__ src_token,
                                   V* __restrict__ out,
                                   int64_t N, int64_t units_per_row) {
  const int64_t row_stride = int64_t(gridDim.x) * blockDim.y;
  for (int64_t n = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; n < N; n += row_stride) {
    const V* src = x + src_token[n] * units_per_row;
    V* dst = out + n * units_per_row;
    for (int64_t i = threadIdx.x; i < units_per_row; i += blockDim.x) dst[i] = src[i];
  }
}

template <typename V>
cudaError_t launch_gather(const void* x, const int64_t* src_token, void* out, int64_t N, int64_t row_bytes,
                          cudaStream_t stream) {
  const int64_t units = row_bytes / int64_t(sizeof(V));
  int tx = 32;
  while (tx < kThreads && tx < units) tx *= 2;  // threads along the row: a power of two in [32, 256]
  const int ty = kThreads / tx;                 // short rows: several rows per block
  int64_t blocks = (N + ty - 1) / ty;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  gather_rows_kernel<V><<<dim3(unsigned(blocks)), dim3(tx, ty), 0, stream>>>(
      static_cast<const V*>(x), src_token, static_cast<V*>(out), N, units);
  return cudaGetLastError();
}

}  // namespace

extern "C" int moe_permute_fwd(const void* x, const int64_t* src_token, void* out, int64_t N, int64_t D, int dtype,
                               cudaStream_t stream) {
  const int esize = element_size(dtype);
  if (esize == 0 || N < 0 || D < 0) return int(cudaErrorInvalidValue);
  if (N == 0 || D == 0) return int(cudaSuccess);
  if (x == nullptr || src_token == nullptr || out == nullptr) return int(cudaErrorInvalidValue);
  const int64_t row_bytes = D * esize;
  const uint64_t align = uint64_t(reinterpret_cast<uintptr_t>(x)) | uint64_t(reinterpret_cast<uintptr_t>(out)) |
                         uint64_t(row_bytes);
  cudaError_t err;
  if (align % 16 == 0) {
    err = launch_gather<int4>(x, src_token, out, N, row_bytes, stream);
  } else if (align % 8 == 0) {
    err = launch_gather<int2>(x, src_token, out, N, row_bytes, stream);
  } else if (align % 4 == 0) {
    err = launch_gather<int>(x, src_token, out, N, row_bytes, stream);
  } else if (align % 2 == 0) {
    err = launch_gather<short>(x, src_token, out, N, row_bytes, stream);
  } else {
    err = launch_gather<char>(x, src_token, out, N, row_bytes, stream);
  }
  return int(err);
}
