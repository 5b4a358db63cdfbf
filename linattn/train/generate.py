"""Teacher-data generation driven by a training config (``linattn generate-data CONFIG``)."""
from __future__ import annotations

from torch import nn

from . import distributed as D
from .conditioning import build_conditioning
from .config import TrainConfig
from .families import model_call_for
from .flow import FlowModel
from .models import DTYPES, freeze, load_transformer
from .teacher_data import DataSpec, generate_teacher_data


def ensure_teacher_data(teacher: nn.Module, config: TrainConfig, ctx: D.DistContext,
                        progress: bool = True, lockstep: bool = False) -> list[int]:
    """Generate whatever shards of config.data are missing (every rank calls this); return
    the shards this rank wrote. The text encoder, if any, runs once, on rank 0. lockstep: the
    teacher is sharded (FSDP2), so every rank runs every shard (generate_teacher_data)."""
    dc, mc = config.data, config.model
    call = model_call_for(teacher, mc.call_options, mc.pretrained)
    model_config = dict(getattr(D.unwrap(teacher), "config", {}) or {})
    spec = DataSpec.from_config(dc)
    return generate_teacher_data(FlowModel(teacher, spec.num_train_timesteps, call=call),
                                 dc.dir, spec,
                                 lambda: build_conditioning(dc, ctx.device, call, model_config),
                                 device=ctx.device,
                                 batch_size=dc.generation_batch_size, rank=ctx.rank,
                                 world_size=ctx.world_size, progress=progress and ctx.is_main,
                                 barrier=ctx.barrier, lockstep=lockstep)


def generate_from_config(config: TrainConfig, progress: bool = True) -> int:
    """Load the teacher config.model describes and generate config.data; return the number of
    shards written by all processes."""
    ctx = D.setup(config.train.device)
    try:
        teacher = freeze(load_transformer(config.model, DTYPES[config.model.teacher_dtype]))
        made = ensure_teacher_data(teacher.to(ctx.device), config, ctx, progress)
        if ctx.distributed:
            import torch
            import torch.distributed as dist

            count = torch.tensor([len(made)], device=ctx.device)
            dist.all_reduce(count)
            return int(count)
        return len(made)
    finally:
        D.teardown(ctx)
