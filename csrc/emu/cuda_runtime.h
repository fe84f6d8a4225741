// csrc/emu/cuda_runtime.h — a CPU stand-in for the few CUDA runtime pieces csrc/*.cu use, so the kernels can be
// compiled with a host C++ compiler (g++ -std=c++20) and *executed* on a machine without a GPU.
//
// Only for testing (tests/test_csrc.py, csrc/emu/emu_build.py); never part of libmoe_ops.so. The .cu sources are
// used unchanged except that `kernel<<<grid, block, smem, stream>>>(args)` is rewritten to
// `moe_emu::launch(kernel, grid, block, smem, stream, args)` (emu_build.py does that textually).
//
// Model: a launch runs its blocks one after another; each block is blockDim.x*y*z OS threads (pooled std::threads)
// that share the kernel's `__shared__` arrays (mapped to function-local statics), meet at `__syncthreads()` (a
// block barrier) and exchange values in `__shfl_down_sync` / `__shfl_xor_sync` through a per-warp buffer and
// barrier (warp = 32 consecutive linear thread ids, as on the GPU). Launch limits are checked like the runtime
// does (block <= 1024 threads, grid.x in [1, 2^31-1], grid.y/z <= 65535) and reported through cudaGetLastError.
// Everything runs synchronously on the host; pointers are host pointers. What this cannot show: timing,
// coalescing, the real hardware's half/bfloat16 conversion instructions, real memory-model or scheduling effects.
#ifndef MOE_EMU_CUDA_RUNTIME_H_
#define MOE_EMU_CUDA_RUNTIME_H_

#include <barrier>
#include <cstddef>
#include <cstdint>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

typedef enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
} cudaError_t;

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace moe_emu {

struct Warp {
  explicit Warp(std::ptrdiff_t lanes) : size(int(lanes)), bar(lanes) {}
  int size;
  std::barrier<> bar;
  unsigned char buf[32][16];
};

struct Block {
  explicit Block(std::ptrdiff_t threads) : bar(threads) {}
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local Block* current_block = nullptr;
inline thread_local int linear_tid = 0;
inline thread_local cudaError_t last_error = cudaSuccess;
inline long long launches = 0;  // kernel launches so far (tests check that empty work launches nothing)

// Worker threads kept across launches: creating a block's threads anew for every launch dominated the run time
// (especially under ASan). Launches are serialised; worker i plays linear thread i of the current block.
class Pool {
 public:
  void run(unsigned n, const std::function<void(unsigned)>& job) {
    std::lock_guard<std::mutex> one_launch(launch_m_);
    std::unique_lock<std::mutex> lk(m_);
    while (workers_.size() < n) {
      const unsigned id = unsigned(workers_.size());
      workers_.emplace_back([this, id] { loop(id); });
    }
    job_ = &job;
    active_ = n;
    pending_ = n;
    ++gen_;
    wake_.notify_all();
    done_.wait(lk, [&] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  void loop(unsigned id) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(m_);
    for (;;) {
      wake_.wait(lk, [&] { return gen_ != seen; });
      seen = gen_;
      if (id >= active_) continue;  // not part of this launch's block
      const std::function<void(unsigned)>* job = job_;
      lk.unlock();
      (*job)(id);
      lk.lock();
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex launch_m_, m_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(unsigned)>* job_ = nullptr;
  uint64_t gen_ = 0;
  unsigned active_ = 0, pending_ = 0;
};

// Never destroyed: its workers stay blocked in wait() until the process exits.
inline Pool& pool() {
  static Pool* p = new Pool;
  return *p;
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t /*smem*/, cudaStream_t /*stream*/, A&&... args) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  ++launches;
  std::tuple<P...> params(std::forward<A>(args)...);  // converted once, as the runtime copies kernel arguments
  Block blk{std::ptrdiff_t(threads)};
  for (unsigned long long w = 0; w < threads; w += 32) {
    blk.warps.emplace_back(new Warp(std::ptrdiff_t(threads - w < 32 ? threads - w : 32)));
  }
  const std::function<void(unsigned)> job = [&](unsigned t) {
    current_block = &blk;
    linear_tid = int(t);
    blockDim = block;
    gridDim = grid;
    threadIdx = uint3{unsigned(t % block.x), unsigned(t / block.x % block.y), unsigned(t / block.x / block.y)};
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          blockIdx = uint3{bx, by, bz};
          std::apply(kernel, params);
          blk.bar.arrive_and_wait();  // the next block starts only when this one is done (shared memory reuse)
        }
  };
  pool().run(unsigned(threads), job);
}

}  // namespace moe_emu

inline void __syncthreads() { moe_emu::current_block->bar.arrive_and_wait(); }

template <typename V>
V __shfl_down_sync(unsigned int mask, V v, unsigned int delta) {
  static_assert(sizeof(V) <= 16, "shuffle of a value wider than 16 bytes");
  moe_emu::Warp& w = *moe_emu::current_block->warps[moe_emu::linear_tid / 32];
  const int lane = moe_emu::linear_tid % 32;
  (void)mask;  // every lane of the warp must arrive (the barrier deadlocks otherwise, as a bad mask would hang)
  std::memcpy(w.buf[lane], &v, sizeof(V));
  w.bar.arrive_and_wait();
  V out = v;
  if (lane + int(delta) < w.size) std::memcpy(&out, w.buf[lane + delta], sizeof(V));
  w.bar.arrive_and_wait();
  return out;
}

// Butterfly exchange: lane l gets lane (l ^ mask)'s value (its own when that lane is past a partial warp).
template <typename V>
V __shfl_xor_sync(unsigned int mask, V v, int lane_mask) {
  static_assert(sizeof(V) <= 16, "shuffle of a value wider than 16 bytes");
  moe_emu::Warp& w = *moe_emu::current_block->warps[moe_emu::linear_tid / 32];
  const int lane = moe_emu::linear_tid % 32;
  (void)mask;
  std::memcpy(w.buf[lane], &v, sizeof(V));
  w.bar.arrive_and_wait();
  V out = v;
  const int src = lane ^ lane_mask;
  if (src < w.size) std::memcpy(&out, w.buf[src], sizeof(V));
  w.bar.arrive_and_wait();
  return out;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = moe_emu::last_error;
  moe_emu::last_error = cudaSuccess;
  return e;
}

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unrecognized error code";
  }
}

inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  if (bytes != 0 && p == nullptr) return cudaErrorInvalidValue;
  std::memset(p, value, bytes);
  return cudaSuccess;
}

#endif  // MOE_EMU_CUDA_RUNTIME_H_
