// acc_types.cuh — the accumulate type of each data type (float; double for double) and the conversion into it,
// shared by the kernels that load -> convert -> compute -> store.
#ifndef MOE_ACC_TYPES_CUH_
#define MOE_ACC_TYPES_CUH_

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ double to_acc(double v) { return v; }

#endif  // MOE_ACC_TYPES_CUH_
