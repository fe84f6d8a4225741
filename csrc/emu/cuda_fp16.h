// csrc/emu/cuda_fp16.h — CPU stand-in for cuda_fp16.h (see cuda_runtime.h here): an IEEE binary16 storage type
// and the two conversions csrc/*.cu use, through the compiler's _Float16 (round to nearest even).
#ifndef MOE_EMU_CUDA_FP16_H_
#define MOE_EMU_CUDA_FP16_H_

#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, sizeof(f));
  return float(f);
}

inline __half __float2half_rn(float v) {
  const _Float16 f = _Float16(v);
  __half h;
  std::memcpy(&h.bits, &f, sizeof(f));
  return h;
}

#endif  // MOE_EMU_CUDA_FP16_H_
