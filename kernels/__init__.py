"""Triton kernels of skipdit_fast (installed as skipdit_fast.kernels).

One module per op: the @triton.jit kernels, a launcher that checks, allocates and
computes the grid, and AOT_SPECS, the real launch configurations that tests compile
ahead of time for sm_80 and sm_90 (see aot.py). Importing this package does not
import triton; each op module does.
"""
