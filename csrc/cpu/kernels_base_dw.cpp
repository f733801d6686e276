// The depthwise CPU kernels for any CPU (baseline ISA of the build). See isa.h and
// kernels_impl.h.
#define MBX_ISA base
#define MBX_PART_DW 1
#include "kernels_impl.h"
