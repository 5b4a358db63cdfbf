"""The op: public entry (linear_attention.py), validation, the float64 reference, the custom-op
registration with autograd (custom_op.py) and output allocation."""
from .linear_attention import linear_attention
from .reference import linear_attention_reference

__all__ = ["linear_attention", "linear_attention_reference"]
