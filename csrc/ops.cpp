// The op surface of mobilenet_ext, defined once. Implementations register per
// backend in cpu/*.cpp and cuda/*.cpp; fake kernels and autograd are registered
// in mobilenet_ext/ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `from mobilenet_ext import _C` loads this library (and so runs the
// registrations below); the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(mobilenet_ext, m) {
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
  // y = act(BN(conv1x1(x))) + residual. Same statistics outputs as dw_fwd.
  m.def(
      "pw_fwd(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, Tensor? running_mean, "
      "Tensor? running_var, Tensor? residual, bool training, float eps, str act) -> "
      "(Tensor, Tensor, Tensor)");
  // Gradients of pw_fwd's y w.r.t. (x, weight, bn_weight, bn_bias); the residual's
  // gradient is grad_y itself (added after the activation).
  m.def(
      "pw_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, "
      "Tensor mean, Tensor invstd, bool training, str act) -> (Tensor, Tensor, Tensor, Tensor)");
}
