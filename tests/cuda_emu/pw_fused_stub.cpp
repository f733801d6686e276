// The tensor-core pointwise kernel (pw_fused.cu) is not emulated: unsupported here,
// so the pointwise op takes the GEMM + epilogue path (pw_conv_cuda.cpp: use_pw_fused).
#include "cuda/pw_fused.h"

namespace mbx {
bool pw_fused_supported() { return false; }
void pw_fused_launch(const PwFusedArgs&, bool, cudaStream_t) {}
}  // namespace mbx
