"""Fused conv + BatchNorm + activation kernels for MobileNet-style networks."""
from ._backend import BACKENDS, backends, compiled_with_cuda, get_backend, set_backend
from .ops import dw_conv_bn_act, pw_conv_bn_act
from . import cost, models, nn
from .convert import ConvertReport, convert, revert

__version__ = "0.1.0"

__all__ = ["BACKENDS", "backends", "compiled_with_cuda", "get_backend", "set_backend",
           "dw_conv_bn_act", "pw_conv_bn_act", "convert", "revert", "ConvertReport", "cost",
           "models", "nn"]
