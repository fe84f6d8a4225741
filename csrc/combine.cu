// combine.cu — unpermute + combine (forward, token-major and atomic-free) and its backward (pair-major).
//
// CUDA C++ twin of kernels/combine.py. Load -> convert to the accumulate type (float; double for double data) ->
// compute -> store. Each thread owns VEC consecutive features (VEC * sizeof(T) <= 16 bytes, one vector load),
// chosen on the host from D and the pointers' alignment.
//   forward:  block = [threads over D] x [tokens per block]; each (token, feature pack) is owned by one thread
//             that sums the token's pairs in CSR order -> no atomics, deterministic.
//   backward: one block per pair (grid-stride): d_h row = w * dy row, d_w = block-reduced dot(dy row, h row).
// row_of_pair[p] is the expert-sorted row (of h / d_h) that holds pair p.
// Compiled, not yet run: see csrc/README.md.
#include "acc_types.cuh"
#include "moe_ops.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

// ---- stores from the accumulate type (to_acc and acc_t: acc_types.cuh) -------------------------------------

__device__ __forceinline__ void store_acc(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_acc(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_acc(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_acc(double* p, double v) { *p = v; }

// VEC elements moved with one aligned vector load/store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_pack(const T* p, acc_t<T> (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = to_acc(pk.v[j]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const acc_t<T> (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int j = 0; j < VEC; ++j) store_acc(&pk.v[j], in[j]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// ---- forward ------------------------------------------------------------------------------------------------
// W is the weight type (float, or double for double data); weight may be null (weight 1).
template <typename T, typename W, int VEC>
__global__ void combine_fwd_kernel(const T* __restrict__ h, const W* __restrict__ weight,
                                   const int64_t* __restrict__ row_of_pair, const int64_t* __restrict__ offsets,
                                   T* __restrict__ y, int64_t T_, int64_t D) {
  using A = acc_t<T>;
  const int64_t packs = D / VEC;
  const int64_t token_stride = int64_t(gridDim.x) * blockDim.y;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; t < T_; t += token_stride) {
    const int64_t start = offsets[t];
    const int64_t end = offsets[t + 1];
    for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
      A acc[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] = A(0);
      for (int64_t p = start; p < end; ++p) {  // fixed order: deterministic
        const A w = weight == nullptr ? A(1) : A(weight[p]);
        A v[VEC];
        load_pack<T, VEC>(h + row_of_pair[p] * D + i * VEC, v);
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] += w * v[j];
      }
      store_pack<T, VEC>(y + t * D + i * VEC, acc);
    }
  }
}

// ---- backward -----------------------------------------------------------------------------------------------
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// blockDim.x is a multiple of 32 (<= 1024); every thread calls this. Result valid in thread 0.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* smem /* [32] */) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = int(threadIdx.x) < nwarps ? smem[lane] : A(0);
  if (warp == 0) v = warp_sum(v);
  __syncthreads();  // smem reusable by the next pair
  return v;
}

template <typename T, typename W, int VEC>
__global__ void combine_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ h, const W* __restrict__ weight,
                                   const int64_t* __restrict__ row_of_pair, const int64_t* __restrict__ token,
                                   T* __restrict__ d_h, W* __restrict__ d_weight, int64_t N, int64_t D) {
  using A = acc_t<T>;
  __shared__ A smem[32];
  const int64_t packs = D / VEC;
  for (int64_t p = blockIdx.x; p < N; p += gridDim.x) {  // uniform per block: safe around __syncthreads
    const int64_t r = row_of_pair[p];
    const int64_t t = token[p];
    const A w = weight == nullptr ? A(1) : A(weight[p]);
    A dot = A(0);
    for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
      A g[VEC];
      load_pack<T, VEC>(dy + t * D + i * VEC, g);
      A out[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] = w * g[j];
      store_pack<T, VEC>(d_h + r * D + i * VEC, out);
      if (d_weight != nullptr) {
        A hv[VEC];
        load_pack<T, VEC>(h + r * D + i * VEC, hv);
#pragma unroll
        for (int j = 0; j < VEC; ++j) dot += g[j] * hv[j];
      }
    }
    if (d_weight != nullptr) {  // uniform branch: every thread of the block reduces
      dot = block_sum(dot, smem);
      if (threadIdx.x == 0) d_weight[p] = W(dot);
    }
  }
}

// ---- host dispatch ------------------------------------------------------------------------------------------
bool aligned(const void* p, int64_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % uint64_t(bytes) == 0;
}

// Widest VEC (VEC * sizeof(T) <= 16) dividing D with every data pointer aligned to VEC * sizeof(T).
template <typename T>
int pick_vec(int64_t D, const void* a, const void* b, const void* c) {
  for (int vec = int(16 / sizeof(T)); vec > 1; vec /= 2) {
    const int64_t bytes = int64_t(vec) * int64_t(sizeof(T));
    if (D % vec == 0 && aligned(a, bytes) && aligned(b, bytes) && aligned(c, bytes)) return vec;
  }
  return 1;
}

int threads_along(int64_t packs, int max_threads) {
  int tx = 32;
  while (tx < max_threads && tx < packs) tx *= 2;
  return tx;
}

template <typename T, typename W, int VEC>
cudaError_t launch_fwd_vec(const void* h, const void* weight, const int64_t* row_of_pair, const int64_t* offsets,
                           void* y, int64_t T_, int64_t D, cudaStream_t stream) {
  const int tx = threads_along(D / VEC, kThreads);
  const int ty = kThreads / tx;
  int64_t blocks = (T_ + ty - 1) / ty;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  combine_fwd_kernel<T, W, VEC><<<dim3(unsigned(blocks)), dim3(tx, ty), 0, stream>>>(
      static_cast<const T*>(h), static_cast<const W*>(weight), row_of_pair, offsets, static_cast<T*>(y), T_, D);
  return cudaGetLastError();
}

template <typename T, typename W>
cudaError_t launch_fwd(const void* h, const void* weight, const int64_t* row_of_pair, const int64_t* offsets, void* y,
                       int64_t T_, int64_t D, cudaStream_t stream) {
  const int vec = pick_vec<T>(D, h, y, nullptr);
  if constexpr (16 / sizeof(T) >= 8) {
    if (vec == 8) return launch_fwd_vec<T, W, 8>(h, weight, row_of_pair, offsets, y, T_, D, stream);
  }
  if constexpr (16 / sizeof(T) >= 4) {
    if (vec == 4) return launch_fwd_vec<T, W, 4>(h, weight, row_of_pair, offsets, y, T_, D, stream);
  }
  if (vec == 2) return launch_fwd_vec<T, W, 2>(h, weight, row_of_pair, offsets, y, T_, D, stream);
  return launch_fwd_vec<T, W, 1>(h, weight, row_of_pair, offsets, y, T_, D, stream);
}

template <typename T, typename W, int VEC>
cudaError_t launch_bwd_vec(const void* dy, const void* h, const void* weight, const int64_t* row_of_pair,
                           const int64_t* token, void* d_h, void* d_weight, int64_t N, int64_t D,
                           cudaStream_t stream) {
  const int tx = threads_along(D / VEC, kThreads);
  const int64_t blocks = N < kMaxBlocks ? N : kMaxBlocks;
  combine_bwd_kernel<T, W, VEC><<<dim3(unsigned(blocks)), dim3(tx), 0, stream>>>(
      static_cast<const T*>(dy), static_cast<const T*>(h), static_cast<const W*>(weight), row_of_pair, token,
      static_cast<T*>(d_h), static_cast<W*>(d_weight), N, D);
  return cudaGetLastError();
}

template <typename T, typename W>
cudaError_t launch_bwd(const void* dy, const void* h, const void* weight, const int64_t* row_of_pair,
                       const int64_t* token, void* d_h, void* d_weight, int64_t N, int64_t D, cudaStream_t stream) {
  const int vec = pick_vec<T>(D, dy, d_weight != nullptr ? h : nullptr, d_h);
  if constexpr (16 / sizeof(T) >= 8) {
    if (vec == 8) return launch_bwd_vec<T, W, 8>(dy, h, weight, row_of_pair, token, d_h, d_weight, N, D, stream);
  }
  if constexpr (16 / sizeof(T) >= 4) {
    if (vec == 4) return launch_bwd_vec<T, W, 4>(dy, h, weight, row_of_pair, token, d_h, d_weight, N, D, stream);
  }
  if (vec == 2) return launch_bwd_vec<T, W, 2>(dy, h, weight, row_of_pair, token, d_h, d_weight, N, D, stream);
  return launch_bwd_vec<T, W, 1>(dy, h, weight, row_of_pair, token, d_h, d_weight, N, D, stream);
}

}  // namespace

extern "C" int moe_combine_fwd(const void* h, const void* weight, const int64_t* row_of_pair,
                               const int64_t* token_offsets, void* y, int64_t T, int64_t D, int dtype,
                               cudaStream_t stream) {
  if (T < 0 || D < 0 || dtype < MOE_FP32 || dtype > MOE_FP64) return int(cudaErrorInvalidValue);
  if (T == 0 || D == 0) return int(cudaSuccess);
  if (y == nullptr || token_offsets == nullptr) return int(cudaErrorInvalidValue);
  // h and row_of_pair may be null only when no token has pairs; the kernel never reads them then.
  switch (dtype) {
    case MOE_FP32: return int(launch_fwd<float, float>(h, weight, row_of_pair, token_offsets, y, T, D, stream));
    case MOE_FP16: return int(launch_fwd<__half, float>(h, weight, row_of_pair, token_offsets, y, T, D, stream));
    case MOE_BF16: return int(launch_fwd<__nv_bfloat16, float>(h, weight, row_of_pair, token_offsets, y, T, D, stream));
    case MOE_FP64: return int(launch_fwd<double, double>(h, weight, row_of_pair, token_offsets, y, T, D, stream));
    default: return int(cudaErrorInvalidValue);
  }
}

extern "C" int moe_combine_bwd(const void* dy, const void* h, const void* weight, const int64_t* row_of_pair,
                               const int64_t* token, void* d_h, void* d_weight, int64_t N, int64_t D, int dtype,
                               cudaStream_t stream) {
  if (N < 0 || D < 0 || dtype < MOE_FP32 || dtype > MOE_FP64) return int(cudaErrorInvalidValue);
  if (N == 0) return int(cudaSuccess);
  if (D == 0) {  // empty rows: d_h is empty, every dot product is 0
    if (d_weight == nullptr) return int(cudaSuccess);
    const size_t wbytes = dtype == MOE_FP64 ? sizeof(double) : sizeof(float);
    return int(cudaMemsetAsync(d_weight, 0, size_t(N) * wbytes, stream));
  }
  if (dy == nullptr || d_h == nullptr || row_of_pair == nullptr || token == nullptr ||
      (d_weight != nullptr && h == nullptr))
    return int(cudaErrorInvalidValue);
  const int64_t* rop = row_of_pair;
  switch (dtype) {
    case MOE_FP32: return int(launch_bwd<float, float>(dy, h, weight, rop, token, d_h, d_weight, N, D, stream));
    case MOE_FP16: return int(launch_bwd<__half, float>(dy, h, weight, rop, token, d_h, d_weight, N, D, stream));
    case MOE_BF16: return int(launch_bwd<__nv_bfloat16, float>(dy, h, weight, rop, token, d_h, d_weight, N, D, stream));
    case MOE_FP64: return int(launch_bwd<double, double>(dy, h, weight, rop, token, d_h, d_weight, N, D, stream));
    default: return int(cudaErrorInvalidValue);
  }
}
