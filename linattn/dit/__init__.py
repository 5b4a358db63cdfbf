"""The DiT layer: convert a diffusers video transformer's self-attention to linear attention.

    linattn.convert(transformer, layers="all", feature_map="hedgehog", mode="linear" | "hybrid")
    linattn.revert(transformer)
    transformer.save_pretrained(path); linattn.load_converted(path)
    linattn.transfer.gates / constraint_loss / binarization_loss / alpha_at / clamp_gates_ / finalize
    linattn.summary(transformer)
    linattn.dit.widen_feature_maps(transformer, feature_dim)   # wider Hedgehog maps, same output
    linattn.dit.fit_feature_maps(transformer, run_forward, steps)  # maps fitted to softmax
    model.enable_parallelism(config=..., cp_plan=linattn.dit.context_parallel_plan(model))

Model families have selectors in families/ (selectors.py describes the interface, and how to
write one for a user's own DiT); processor.py is the module a converted layer runs.
"""
from . import map_fitting, transfer
from .context_parallel import context_parallel_plan, enable_context_parallel
from .convert import convert, revert
from .map_fitting import fit_feature_maps
from .processor import LinAttnProcessor, set_fuse_pre_attention
from .selectors import Projection, Selector
from .serialization import load_converted
from .summary import LayerReport, layer_report, summary
from .widen import widen_feature_maps

__all__ = ["convert", "revert", "load_converted", "summary", "layer_report", "LayerReport",
           "transfer", "Selector", "Projection", "LinAttnProcessor", "set_fuse_pre_attention",
           "context_parallel_plan", "enable_context_parallel", "widen_feature_maps",
           "fit_feature_maps", "map_fitting"]
