"""Loads the compiled module linattn._C, keeping the reason when it is missing.

The package must import and work (reference backend) where the native build failed, so the
import error is kept and reported by linattn.backends() instead of being raised here.
"""
from __future__ import annotations

import importlib

try:
    native = importlib.import_module("linattn._C")
    load_error: str | None = None
except ImportError as error:  # not built, or built for another Python
    native = None
    load_error = (f"the native module linattn._C is not importable ({error}); "
                  f"reinstall with `pip install .` and read the build log")
