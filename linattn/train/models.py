"""Teacher and student: loading the diffusers transformer, converting the student copy.

The teacher is the original model, frozen (eval mode, no gradients), optionally kept in bf16.
The student is a float32 copy of the same weights (the optimiser's master weights) converted
with linattn.convert (linattn.dit); in "hybrid" mode every converted layer carries a gate
r_l = 1, so the student starts equal to the teacher (method.md §3 [choice]).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dit_api(name: str):
    """linattn.dit.convert / linattn.dit.transfer (the DiT conversion layer), imported when
    first needed: it imports diffusers' model families."""
    from .. import dit

    return getattr(dit, name)


def diffusers_class(class_name: str):
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"model.class_name: {class_name!r} is not a diffusers model class")
    return cls


def load_transformer(model_config, dtype: torch.dtype) -> nn.Module:
    """The model model_config describes, on the CPU, in ``dtype``."""
    from .config import TOY_SOURCE

    if model_config.pretrained == TOY_SOURCE:
        from ..toy import load_teacher

        return cast_like_from_pretrained(load_teacher(), dtype)
    cls = diffusers_class(model_config.class_name)
    if model_config.pretrained is not None:
        kwargs = {"torch_dtype": dtype}
        if model_config.subfolder:
            kwargs["subfolder"] = model_config.subfolder
        if model_config.revision:
            kwargs["revision"] = model_config.revision
        return cls.from_pretrained(model_config.pretrained, **kwargs)
    if model_config.config is None:
        raise ValueError("model: give model.pretrained or model.config (or pass teacher= to "
                         "linattn.train.train)")
    # Random weights from a private generator state: the same init_seed builds the same model
    # in every process, without disturbing the caller's random streams.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_config.init_seed)
        model = cls(**model_config.config)
    return cast_like_from_pretrained(model, dtype)


def cast_like_from_pretrained(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` with its floating parameters and buffers in ``dtype``, except those of the
    modules its class keeps in float32 (``_keep_in_fp32_modules``): the dtypes diffusers'
    from_pretrained(torch_dtype=dtype) gives, so that a model built from a config or the toy
    teacher runs like a loaded one. (ModelMixin.to(dtype) casts everything and warns.)"""
    from .sharded_load import keeps_float32

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            target = torch.float32 if keeps_float32(model, name) else dtype
            if tensor.dtype != target:
                tensor.data = tensor.data.to(target)
    return model


def freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


def make_student(teacher_source: nn.Module, convert_config) -> nn.Module:
    """A float32 copy of ``teacher_source`` converted as convert_config says (in place)."""
    student = copy.deepcopy(teacher_source).float()
    student.requires_grad_(True)
    convert = dit_api("convert")
    converted = convert(student, layers=convert_config.layers,
                        feature_map=convert_config.feature_map, mode=convert_config.mode,
                        **convert_config.options)
    student = converted if converted is not None else student
    return student.train()


def student_gates(student: nn.Module, mode: str) -> list[nn.Parameter]:
    if mode != "hybrid":
        return []
    gates = list(dit_api("transfer").gates(student))
    if not gates:
        raise ValueError("convert.mode: 'hybrid' converted no layer, so there is no gate to "
                         "train; check convert.layers")
    return gates


def set_trainable(student: nn.Module, trainable, gates: list[nn.Parameter],
                  field: str = "train.trainable") -> list[str]:
    """requires_grad per train.trainable ("all", or name substrings); gates always train.
    Returns the names of the trainable parameters; `field` is the config field an error names
    (the distillation stage's are distill.trainable and distill.fake_score_trainable)."""
    gate_ids = {id(g) for g in gates}
    names = []
    for name, p in student.named_parameters():
        on = (trainable == "all" or id(p) in gate_ids
              or any(pattern in name for pattern in trainable))
        p.requires_grad_(on)
        if on:
            names.append(name)
    if len(names) == len(gates):
        raise ValueError(f"{field}: {trainable!r} matches no model parameter")
    return names


def layer_names(student: nn.Module, gates: list[nn.Parameter]) -> Optional[list[str]]:
    """The attention module name of each gate (for the plot legend), when it can be told."""
    by_id = {id(p): name for name, p in student.named_parameters()}
    names = [by_id.get(id(g)) for g in gates]
    if any(n is None for n in names):
        return None
    # "blocks.3.attn1.processor.gate" -> "blocks.3.attn1"
    return [n.rsplit(".processor.", 1)[0] if ".processor." in n else n for n in names]
