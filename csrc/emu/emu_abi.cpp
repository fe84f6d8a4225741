// csrc/emu/emu_abi.cpp — emulator-only export: kernel launches so far (tests check empty work launches nothing).
#include "cuda_runtime.h"

extern "C" long long moe_emu_launches() { return moe_emu::launches; }
