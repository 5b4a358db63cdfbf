"""Launch planning for an sm_90 GPU this machine does not have (issue 10, item 6).

An H200-like property object (132 SMs, compute capability 9.0) goes through
plan.DeviceInfo.from_properties and plan.assume_device, so the planning functions run exactly
as they would on that GPU: grids fill whole waves of the resident-program capacity, short
sequences get enough splits (absolute scratch floor), long ones stay within the relative scratch
cap, the Hedgehog kernels plan for the one program per SM their registers allow, and the
device's properties are queried once, not per call.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")
from linattn.kernels.triton import plan  # noqa: E402
from linattn.kernels.triton.common import cdiv  # noqa: E402
from linattn.kernels.triton.hedgehog import plan as hedgehog_plan  # noqa: E402

H200_PROPERTIES = SimpleNamespace(name="H200-like", major=9, minor=0, multi_processor_count=132)
H200 = plan.DeviceInfo.from_properties(H200_PROPERTIES)
META = torch.device("meta")

# kernels.md's video shapes (B, N, H, D), bf16, D = Dv.
VIDEO_SHAPES = {
    "Wan 1.3B": (1, 32760, 12, 128),
    "Wan 14B": (1, 75600, 40, 128),
    "HunyuanVideo": (1, 119040, 24, 128),
    "CogVideoX-5B": (1, 17776, 48, 64),
    "CogVideoX-2B": (1, 17776, 30, 64),
    "CFG batch": (2, 4096, 12, 64),
    "SANA 4K": (1, 16384, 70, 32),
}
REDUCING = ("state", "dq")


def builtin_plan(kind: str, shape, itemsize: int = 2) -> plan.KernelPlan:
    B, N, H, D = shape
    with plan.assume_device(H200):
        return plan.plan_kernel(kind, META, N, B * H, D, D, itemsize, reduces=kind in REDUCING,
                                qkv_bytes=3 * B * N * H * D * itemsize)


def grid_facts(p: plan.KernelPlan, batch_heads: int) -> tuple[int, int, int, int]:
    """(programs per split, programs, resident slots, programs in the last wave)."""
    per_split = batch_heads * p.tiles
    programs = per_split * p.split.count
    slots = H200.sm_count * p.config.programs_per_sm
    waves = cdiv(programs, slots)
    return per_split, programs, slots, programs - (waves - 1) * slots


def test_device_info_from_properties():
    assert H200 == plan.DeviceInfo("sm90", 132)
    with plan.assume_device(H200):
        assert plan.device_info(META) == H200
        assert plan.arch_key(torch.device("cpu")) == "sm90" and plan.sm_count(META) == 132


def test_split_count_prefers_whole_waves():
    # HunyuanVideo's state kernel: 24 programs a split, 132 slots, 1860 blocks.
    assert plan.split_count(1860, 24, 132, max_count=465) == 11    # 264 programs: 2 waves
    # One wave that does not fill the GPU beats a second, nearly empty one.
    assert plan.split_count(64, 24, 132, max_count=16) == 5         # 120 programs, 1 wave
    # More programs per split than slots: never split further than the work needs.
    assert plan.split_count(1000, 256, 132, max_count=250) == 1
    # The caps hold.
    assert plan.split_count(1860, 24, 132, max_count=3) <= 3
    assert plan.split_count(2, 1, 132, max_count=100) <= 2


def old_rule_count(blocks: int, per_split: int, slots: int, max_count: int) -> int:
    """The rule this replaces: cdiv(target, programs_per_split), capped."""
    return max(1, min(cdiv(slots, per_split), max_count, blocks))


@pytest.mark.parametrize("name", list(VIDEO_SHAPES))
@pytest.mark.parametrize("kind", plan.KINDS)
def test_video_grids_fill_whole_waves(name, kind):
    """No tail wave of a few programs: the last wave is as full as the granularity of one
    split's programs allows, and the modelled time is never worse than the old rule's."""
    B, N, H, D = VIDEO_SHAPES[name]
    p = builtin_plan(kind, VIDEO_SHAPES[name])
    per_split, programs, slots, last_wave = grid_facts(p, B * H)
    assert programs <= slots or last_wave > slots - per_split, (
        f"{name} {kind}: {programs} programs on {slots} slots leave {last_wave} in the last wave")
    blocks = cdiv(N, p.config.block_n)

    def modelled(count: int) -> int:
        return cdiv(count * per_split, slots) * (cdiv(blocks, count) + plan.PROGRAM_OVERHEAD_BLOCKS)

    # The old rule under the same caps the planner has: a block floor per split and, for the
    # reducing kernels, the scratch budget of the fp32 partials (which binds at Wan 1.3B once a
    # state config runs 2 programs per SM: 21 splits, not 22).
    cap = max(1, blocks // plan.MIN_BLOCKS_PER_SPLIT)
    if kind in REDUCING:
        partial = 4 * B * H * D * (D + 1)
        cap = min(cap, max(1, plan.scratch_budget(3 * B * N * H * D * 2) // partial))
    old = old_rule_count(blocks, per_split, slots, cap)
    assert modelled(p.split.count) <= modelled(old)


def test_the_audits_tail_waves_are_gone():
    """The sm_90 audit's examples (issue 10, item 6)."""
    hunyuan = builtin_plan("state", VIDEO_SHAPES["HunyuanVideo"])
    assert grid_facts(hunyuan, 24)[1] == 264          # was 144: a 12-program second wave
    cogvideo = builtin_plan("state", VIDEO_SHAPES["CogVideoX-5B"])
    assert cogvideo.config.programs_per_sm == 2
    assert grid_facts(cogvideo, 48)[1] % 264 == 0     # was 288 on 264 slots
    for kind in ("output", "dkdv"):
        small = builtin_plan(kind, VIDEO_SHAPES["CFG batch"])
        assert grid_facts(small, 24)[1] == 120        # was 144 on 132 slots


def test_short_sequences_are_not_starved_of_splits():
    """At (2, 4096, 12, 64) 4% of q, k, v is 0.75 MB: the absolute floor lets the reducing
    kernels fill the GPU (the audit saw 72 programs), for a few megabytes of scratch."""
    B, N, H, D = VIDEO_SHAPES["CFG batch"]
    qkv_bytes = 3 * B * N * H * D * 2
    assert plan.SCRATCH_FRACTION * qkv_bytes < plan.SCRATCH_FLOOR_BYTES
    for kind in REDUCING:
        p = builtin_plan(kind, VIDEO_SHAPES["CFG batch"])
        programs = grid_facts(p, B * H)[1]
        assert programs >= 120, f"{kind}: {programs} programs"
        assert p.split.count * 4 * B * H * D * (D + 1) <= plan.SCRATCH_FLOOR_BYTES
    # fp32 at D = 128, N = 4096 (the audit: 36 programs).
    fp32 = builtin_plan("state", (1, 4096, 12, 128), itemsize=4)
    assert grid_facts(fp32, 12)[1] >= 96


def test_long_sequences_keep_the_relative_scratch_cap():
    B, N, H, D = VIDEO_SHAPES["Wan 14B"]
    qkv_bytes = 3 * B * N * H * D * 2
    assert plan.scratch_budget(qkv_bytes) == int(plan.SCRATCH_FRACTION * qkv_bytes)
    per_split_bytes = 4 * B * H * D * (D + 1)
    for kind in REDUCING:
        p = builtin_plan(kind, VIDEO_SHAPES["Wan 14B"])
        assert p.split.count * per_split_bytes <= plan.SCRATCH_FRACTION * qkv_bytes
    # A budget that binds: the split count follows it.
    config = plan.KernelConfig(64, 128, 8, 3, programs_per_sm=1)
    with plan.assume_device(H200):
        capped = plan.sequence_split(N, B * H, config, META, partial_bytes=per_split_bytes,
                                     budget_bytes=3 * per_split_bytes)
    assert capped.count == 3


def test_hedgehog_plans_one_program_per_sm():
    """Its kernels use 144-255 registers at 8 warps (ptxas, sm_90): one program per SM, except
    the 16-bit state kernel at D <= 64 and the fp32 output kernel (128 registers)."""
    for kind in hedgehog_plan.KINDS:
        assert hedgehog_plan.config(kind, torch.bfloat16, (128, 128, 128), False,
                                    None).programs_per_sm == 1
        two = kind == "output"  # 128 registers, 108 KB of shared memory
        assert hedgehog_plan.config(kind, torch.float32, (64, 64, 64), False,
                                    None).programs_per_sm == (2 if two else 1)
    assert hedgehog_plan.config("state", torch.bfloat16, (64, 64, 64), False,
                                None).programs_per_sm == 2
    # Wan 1.3B, F = 128: the output kernel's 12 programs a split fill the 132 SMs once (the
    # old 2 programs per SM asked for 264, two waves of one-program SMs).
    B, N, H, D = VIDEO_SHAPES["Wan 1.3B"]
    cfg = hedgehog_plan.config("output", torch.bfloat16, (D, D, D), False, None)
    with plan.assume_device(H200):
        splits, _ = hedgehog_plan.splits(cdiv(N, cfg.block_n), B * H, META, None,
                                         cfg.programs_per_sm)
    assert splits * B * H == 132


def test_device_properties_are_queried_once(monkeypatch):
    calls = []

    def properties(index):
        calls.append(index)
        return H200_PROPERTIES

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    plan._cuda_device_info.cache_clear()
    try:
        cuda0 = torch.device("cuda", 0)
        for _ in range(5):
            assert plan.device_info(cuda0) == H200
        assert calls == [0]
    finally:
        plan._cuda_device_info.cache_clear()


def test_plans_are_cached_and_forced_plans_are_not():
    first = builtin_plan("state", VIDEO_SHAPES["Wan 1.3B"])
    assert builtin_plan("state", VIDEO_SHAPES["Wan 1.3B"]) is first
    with plan.forced(splits=2):
        forced = builtin_plan("state", VIDEO_SHAPES["Wan 1.3B"])
    assert forced.split.count == 2 and builtin_plan("state", VIDEO_SHAPES["Wan 1.3B"]) is first
