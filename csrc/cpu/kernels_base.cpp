// The pointwise CPU kernels and the kernel table for any CPU (baseline ISA of the
// build); the depthwise ones are in kernels_base_dw.cpp. See isa.h.
#define MBX_ISA base
#include "kernels_impl.h"
