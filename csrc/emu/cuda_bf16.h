// csrc/emu/cuda_bf16.h — CPU stand-in for cuda_bf16.h (see cuda_runtime.h here): a bfloat16 storage type and the
// two conversions csrc/*.cu use (float -> bfloat16 rounds to nearest even, NaN stays NaN).
#ifndef MOE_EMU_CUDA_BF16_H_
#define MOE_EMU_CUDA_BF16_H_

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = uint32_t(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  __nv_bfloat16 h;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    h.bits = uint16_t((u >> 16) | 0x40u);  // quiet NaN
  } else {
    h.bits = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  return h;
}

#endif  // MOE_EMU_CUDA_BF16_H_
