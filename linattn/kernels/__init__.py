"""Kernel code that is not C++: the Triton kernels (linattn/kernels/triton).

The native C++ kernels live in csrc/ and are reached through linattn._C; the op layer reaches
every kernel through a backend (linattn/backends), never by importing these modules directly.
"""
