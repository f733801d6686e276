// The op surface of mobilenet_ext, defined once. Implementations register per
// backend in cpu/*.cpp and cuda/*.cpp; fake kernels and autograd are registered
// in mobilenet_ext/ops.py.
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "host.h"

extern "C" {
// `from mobilenet_ext import _C` loads this library (and so runs the
// registrations below); the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {

// How many threads at::parallel_for really ran on. Under torch's OpenMP backend its
// parallel region is a header template compiled into this extension: a build
// without -fopenmp runs every CPU kernel on one thread, silently (setup.py adds the
// flag; a test asks this function).
int64_t parallel_threads() {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, int64_t(64) * at::get_num_threads(), 1, [&](int64_t, int64_t) {
    seen |= uint64_t(1) << std::min(at::get_thread_num(), 63);
  });
  int64_t n = 0;  // no std::popcount: torch 2.11 builds extensions as C++17
  for (uint64_t bits = seen.load(); bits != 0; bits &= bits - 1) ++n;
  return n;
}

}  // namespace

TORCH_LIBRARY(mobilenet_ext, m) {
  m.def("_parallel_threads() -> int", &parallel_threads);
  // nn.BatchNorm2d's running-buffer update from the statistics a fused op returned
  // (mbx::update_running); ops.py calls it under no_grad.
  m.def(
      "_update_running(Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor mean, "
      "Tensor invstd, float eps, float unbias, float momentum) -> ()");
  m.impl("_update_running", c10::DispatchKey::CompositeExplicitAutograd, &mbx::update_running);
  // y = act(BN(depthwise_conv(x))). Returns (y, mean, invstd): the statistics
  // used to normalise (batch statistics when training, else the running ones),
  // in fp32 (fp64 for float64 x). Running buffers are updated by the caller.
  m.def(
      "dw_fwd(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, Tensor? running_mean, "
      "Tensor? running_var, int stride, int padding, int dilation, bool training, float eps, "
      "str act) -> (Tensor, Tensor, Tensor)");
  // Gradients of dw_fwd's y w.r.t. (x, weight, bn_weight, bn_bias). Recomputes
  // the conv output from x: only x, weight and the statistics are saved.
  m.def(
      "dw_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, "
      "Tensor mean, Tensor invstd, int stride, int padding, int dilation, bool training, "
      "str act) -> (Tensor, Tensor, Tensor, Tensor)");
  // y = act(BN(conv1x1(x))) + residual. Same statistics outputs as dw_fwd. The
  // fourth output is the conv output laid out like y when save_conv (for pw_bwd; in
  // the accumulation dtype on CPU, in x's dtype on CUDA), else an empty tensor.
  m.def(
      "pw_fwd(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, Tensor? running_mean, "
      "Tensor? running_var, Tensor? residual, bool training, float eps, str act, "
      "bool save_conv) -> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients of pw_fwd's y w.r.t. (x, weight, bn_weight, bn_bias); the residual's
  // gradient is grad_y itself (added after the activation). conv: pw_fwd's saved
  // conv output, or None to recompute it from x with one more GEMM.
  m.def(
      "pw_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, "
      "Tensor mean, Tensor invstd, Tensor? conv, bool training, str act) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
}
