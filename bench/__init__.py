"""`python -m bench`: mobilenet_ext's fused kernels against eager PyTorch.

Every row is checked before it is timed: both providers are compared with the eager
composition run in higher precision, and a row whose outputs (or gradients) are off is
reported FAILED and never timed. See `python -m bench --help`.

Modules: shapes (layer table read off torchvision), dw (the depthwise problem and its
providers), core (checking and timing, op-agnostic), report (table, totals, JSON), cli.
"""
