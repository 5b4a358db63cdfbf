"""The model call of each diffusers video DiT family in the trainer's flow convention
(base.py says what that is): one module per family.

    call = model_call("CogVideoXTransformer3DModel", options)   # or model_call_for(module)
    u = call.velocity(module, x, t, cond, dtype, num_train_timesteps)

linattn.train.flow.FlowModel holds one; the trainer builds it from model.class_name and
model.call_options.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from .base import (Conditioning, ModelCall, Prompts, cat_conditioning, conditioning_batch,
                   expand_conditioning)
from .cogvideox import CogVideoXCall
from .hunyuan_video import HunyuanVideoCall
from .ltx_video import LTXVideoCall
from .mochi import MochiCall
from .wan import WanCall

CALLS: tuple[type[ModelCall], ...] = (WanCall, CogVideoXCall, HunyuanVideoCall, LTXVideoCall,
                                      MochiCall)
_BY_CLASS = {name: call for call in CALLS for name in call.model_classes}


def call_class(class_name: str) -> type[ModelCall]:
    """The ModelCall class of a diffusers model class name."""
    try:
        return _BY_CLASS[class_name]
    except KeyError:
        raise ValueError(f"model.class_name: training knows the model call of "
                         f"{sorted(_BY_CLASS)}, not {class_name!r}") from None


def model_call(class_name: str, options: Optional[dict] = None,
               pretrained: Optional[str] = None) -> ModelCall:
    return call_class(class_name)(options, pretrained)


def model_call_for(module: nn.Module, options: Optional[dict] = None,
                   pretrained: Optional[str] = None) -> ModelCall:
    """The call of `module`'s class (or its base classes'; a DDP wrapper is looked through).
    A module of no family here (a user's own flow transformer, a toy model) gets the trainer's
    generic call, which is Wan's: module(hidden_states=x, timestep=t · T,
    encoder_hidden_states=cond) returning the velocity, as FlowModel always called models."""
    inner = getattr(module, "module", module)
    for cls in type(inner).__mro__:
        if cls.__name__ in _BY_CLASS:
            return _BY_CLASS[cls.__name__](options, pretrained)
    return WanCall(options, pretrained)


__all__ = ["ModelCall", "Prompts", "Conditioning", "model_call", "model_call_for", "call_class",
           "cat_conditioning", "expand_conditioning", "conditioning_batch", "CALLS"]
