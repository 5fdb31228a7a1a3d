"""The CPU backend: a decode step that reads every weight once, in place, on C++ kernels.

    decode.py    the weights as views of the stacked parameters, packed copies for the
                 kernels, a per-layer KV cache, XLA:CPU's compile options
    kernels.py   the kernels of csrc/cpu_moe.cc (XLA FFI): build, cache, packing, calls

docs/cpu-decode.md has what each does and what it measured.
"""
