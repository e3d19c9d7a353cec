// cuda_bf16.h for the CPU emulation: the subset the kernels use (../cuda_emu.h).
#pragma once
#include "../cuda_emu.h"
