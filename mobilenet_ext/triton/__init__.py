"""Triton implementations of the fused ops (one file per op family).

Imported lazily by mobilenet_ext.ops: Triton is optional. On CPU tensors the
kernels run under the Triton interpreter (TRITON_INTERPRET=1 set before triton is
imported), which is how CI executes them.
"""
