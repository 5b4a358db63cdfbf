"""Loading a diffusers transformer under FSDP2 without the whole model on any process.

The full load (``model.load: full``) has every process build the whole teacher (bf16), a whole
float32 source and the student copied from it on the host before FSDP2 keeps 1/world of them:
143 GB of tensors per process for Wan 14B, ×8 processes on one node (measured at 0.4 B
parameters: a peak of 3.6x the float32 checkpoint per process, whatever the process count;
benchmarks/RESULTS.md). ``model.load: sharded`` instead:

1. builds the model with its parameters on the meta device (no storage; ``empty_parameters``):
   the buffers it computes in ``__init__`` (RoPE tables, which are not in the checkpoint) are
   built for real, since they are small and nothing else would fill them;
2. converts the student as usual (linattn.convert): the new parameters (Hedgehog maps, gates)
   are created for real, with the same initial values on every process;
3. shards it (fully_shard, linattn.train.distributed.wrap): meta parameters become meta
   shards, the real ones are split;
4. ``materialize_``: allocates every meta shard on the training device (only this process's
   rows);
5. ``load_shards_``: reads, for each parameter in the checkpoint, only the rows this process's
   shard owns, through safetensors' lazy slices (``safe_open(...).get_slice(name)[a:b]``), from
   the single file or the sharded checkpoint its index names; a parameter the checkpoint lacks
   must be one that step 1-2 created for real (else: an error naming it).

Dtypes follow diffusers' from_pretrained(torch_dtype=...): floating parameters take the
requested dtype except in the modules the class keeps in float32 (``_keep_in_fp32_modules``,
matched as diffusers does, as a component of the dotted name).

Only local folders are read (a hub id: download it first, e.g. ``huggingface-cli download``);
the checkpoint must be safetensors (diffusers' default).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

SINGLE_FILE = "diffusion_pytorch_model.safetensors"
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"


def model_folder(model_config) -> Path:
    """The folder model.pretrained (+ subfolder) names; a ValueError unless it is a local
    diffusers model folder."""
    if model_config.pretrained is None:
        raise ValueError("model.load: 'sharded' reads the weights of model.pretrained; with "
                         "model.config (random weights) use 'full'")
    folder = Path(model_config.pretrained)
    if model_config.subfolder and not (folder / "config.json").is_file():
        folder = folder / model_config.subfolder
    if not (folder / "config.json").is_file():
        raise ValueError(f"model.load: 'sharded' reads a local folder; {folder} has no "
                         f"config.json (download the model first, e.g. huggingface-cli "
                         f"download, and point model.pretrained at it)")
    return folder


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """{tensor name: safetensors file holding it}: from the index of a sharded checkpoint, or
    the single file's own header."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / SINGLE_FILE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    raise ValueError(f"model.load: 'sharded' reads safetensors; {folder} has neither "
                     f"{SINGLE_FILE} nor {INDEX_FILE}")


@contextlib.contextmanager
def empty_parameters():
    """Modules built inside get their parameters on the meta device (registered parameters are
    replaced by meta ones as they are set, so a layer's own init then runs on meta, costing
    nothing); buffers are built for real."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def keeps_float32(model: nn.Module, name: str) -> bool:
    """Whether diffusers' from_pretrained keeps parameter `name` in float32."""
    keep = getattr(type(model), "_keep_in_fp32_modules", None) or ()
    parts = name.split(".")
    return any(module in parts for module in keep)


def build_empty(model_config, dtype: torch.dtype) -> nn.Module:
    """The model model.pretrained describes, parameters on the meta device in their load
    dtype (keeps_float32), buffers real."""
    from .models import diffusers_class

    folder = model_folder(model_config)
    cls = diffusers_class(model_config.class_name)
    with empty_parameters():
        model = cls.from_config(cls.load_config(str(folder)))
    for name, param in model.named_parameters():
        if param.is_floating_point():
            target = torch.float32 if keeps_float32(model, name) else dtype
            if param.dtype != target:
                param.data = param.data.to(target)
    return model


def _owned_rows(param) -> tuple[torch.Tensor, int]:
    """(this process's tensor of the parameter, index of its first row in the whole one):
    a plain tensor is whole (row 0); a DTensor of FSDP2 is sharded on dim 0 over a 1-D mesh,
    in torch.chunk's split (ceil(rows / world) rows each, the last ones fewer or none)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(param, DTensor):
        return param, 0
    local = param.to_local()
    placements = tuple(param.placements)
    if all(isinstance(p, Replicate) for p in placements):
        return local, 0
    if len(placements) != 1 or placements[0] != Shard(0):
        raise ValueError(f"model.load 'sharded': a parameter placed {placements} on a "
                         f"{param.device_mesh.ndim}-D mesh; only FSDP2's Shard(0) over one "
                         f"mesh dimension is read by rows")
    rows = param.shape[0]
    size = param.device_mesh.size()
    chunk = -(-rows // size)
    first = min(param.device_mesh.get_local_rank() * chunk, rows)
    if local.shape[0] != max(0, min(chunk, rows - first)):
        raise ValueError(f"model.load 'sharded': a shard of {local.shape[0]} rows where "
                         f"torch.chunk's split gives {min(chunk, rows - first)}")
    return local, first


def materialize_(model: nn.Module, device: torch.device) -> int:
    """Allocate every meta parameter and buffer (an FSDP2 shard: only this process's rows)
    on `device`, uninitialised (load_shards_ fills them); the real ones are left as they are.
    Returns how many tensors were allocated."""
    count = 0

    def empty_if_meta(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        if t.is_meta:
            count += 1
            return torch.empty_like(t, device=device)
        return t

    model._apply(empty_if_meta)
    for module in model.modules():  # buffers FSDP2 did not move (the root's, on the CPU)
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)
    return count


def load_shards_(model: nn.Module, files: dict[str, Path],
                 created: Optional[set[str]] = None) -> int:
    """Fill each parameter and persistent buffer of `model` that the checkpoint holds with the
    rows this process owns, read lazily from `files` (checkpoint_files); returns how many
    elements were read. Raises, naming them, on checkpoint tensors the model lacks, shapes that
    disagree, and model parameters the checkpoint lacks that are not real already (`created`:
    names of parameters made after the load, such as a converted layer's maps and gates)."""
    from safetensors import safe_open

    targets = dict(model.named_parameters())
    persistent = model.state_dict(keep_vars=True).keys()
    targets.update((n, b) for n, b in model.named_buffers() if n in persistent)
    unknown = sorted(set(files) - set(targets))
    if unknown:
        raise ValueError(f"model.load 'sharded': the checkpoint holds tensors the model has no "
                         f"parameter for: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    missing = sorted(name for name, t in targets.items() if name not in files
                     and (getattr(t, "is_meta", False) or name not in (created or set())))
    if missing:
        raise ValueError(f"model.load 'sharded': the checkpoint lacks {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, which the model does not "
                         f"create itself")
    by_file: dict[Path, list[str]] = {}
    for name in files:
        by_file.setdefault(files[name], []).append(name)
    read = 0
    with torch.no_grad():
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in names:
                    target = targets[name]
                    local, first = _owned_rows(target)
                    lazy = f.get_slice(name)
                    shape = tuple(lazy.get_shape())
                    if shape != tuple(target.shape):
                        raise ValueError(f"model.load 'sharded': {name} is {shape} in the "
                                         f"checkpoint, {tuple(target.shape)} in the model")
                    if not shape:
                        rows = f.get_tensor(name)
                    else:
                        rows = lazy[first:first + local.shape[0]]
                    local.copy_(rows)
                    read += rows.numel()
    return read
