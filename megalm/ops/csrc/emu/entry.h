// What every emulation library exports besides its kernels' entry points; included by exactly one
// translation unit per library (its csrc/emu/<name>.cpp).
#pragma once

#include "cuda_emu.h"

extern "C" {

// The first failure of the last call (alignment, shared memory, barriers), or "".
const char* megalm_emu_error() { return megalm::emu::failure().c_str(); }

// Run lanes and warps in decreasing order from now on (1) or increasing (0).
void megalm_emu_set_reverse(int reverse) { megalm::emu::reverse_order() = reverse != 0; }

}  // extern "C"
