"""`python -m bench`: mobilenet_ext's fused kernels against eager PyTorch.

Every row is checked before it is timed: both providers are compared with the eager
composition run in higher precision, and a row whose outputs (or gradients) are off is
reported FAILED and never timed. See `python -m bench --help`.

Modules: shapes (layer tables read off torchvision), problem (what every op shares:
inputs, the timed step, its outputs, byte and flop counts), dw and pw (each op's eager
template and providers), core (checking and timing), report (table, totals, JSON), cli.
"""
