// CPU kernels for any CPU (baseline ISA of the build). See isa.h.
#define MBX_ISA base
#include "kernels_impl.h"
