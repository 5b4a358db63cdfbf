"""Lets triton's interpreter run loops with run-time bounds under numpy >= 2.4.

The interpreter (TRITON_INTERPRET=1) keeps every scalar as a one-element 1-d numpy array and
runs ``for i in range(start, end)`` as Python's range, which calls ``int()`` on those arrays.
numpy 2.4 made ``int()`` of a 1-d array an error, so any kernel loop whose bound is a kernel
argument or a program id fails with "only 0-dimensional arrays can be converted to Python
scalars" (triton-lang/triton#9171, fixed upstream after triton 3.6 by squeezing the array).

``install()`` applies that same fix to the interpreter in this process: after triton patches
``tl.tensor`` for an interpreted call, ``__index__`` is replaced by one that reads the single
element. It does nothing when the installed numpy still converts 1-d arrays, and it never runs
outside the interpreter (compiled kernels do not go through this code).
"""
from __future__ import annotations

import numpy as np


def _numpy_rejects_1d_int() -> bool:
    try:
        int(np.array([1]))
    except TypeError:
        return True
    return False


def install() -> None:
    """Idempotent; call only when TRITON_INTERPRET=1."""
    import triton.runtime.interpreter as interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        # Another triton layout: nothing to patch here. If it still had the bug, interpreted
        # loops would fail loudly with numpy's error, not silently.
        return
    if getattr(original, "_linattn_index_fix", False) or not _numpy_rejects_1d_int():
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._linattn_index_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor
