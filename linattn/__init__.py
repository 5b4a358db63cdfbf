"""linattn: fast non-causal linear attention for video diffusion transformers."""
from . import feature_maps
from .backends import BackendUnavailableError, backends
from .dit import convert, load_converted, revert, summary, transfer
from .modules import LinearAttention
from .ops import linear_attention, linear_attention_reference
from .pre_attention import PreAttention, QKNorm, RoPE

__version__ = "0.1.0"

__all__ = ["linear_attention", "QKNorm", "RoPE", "PreAttention",
           "LinearAttention", "linear_attention_reference", "backends", "feature_maps",
           "BackendUnavailableError", "convert", "revert", "load_converted", "summary",
           "transfer", "__version__"]
