"""Converted layers under diffusers' context parallelism, in 2 gloo processes against 1.

A tiny Wan (diffusers' own _cp_plan) and a tiny CogVideoX (linattn's plan) with one linear layer
and one hybrid layer (gate 0.5, so both branches count) run sharded over 2 processes with
Ulysses (and an all-linear Wan with ring, whose layers need no softmax backend); the gathered
output must equal one process's, and so must the gradients: each process's gradient is its
tokens' share, so the two processes' gradients sum to the single process's.

The processes are spawned once for the module and run every case.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel

import linattn
from linattn import dit
from linattn.ops import alloc

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def wan():
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
        out_channels=4, text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)


def wan_inputs(gen):
    # 3 x 2 x 3 = 18 video tokens: 9 per process.
    return dict(hidden_states=torch.randn(2, 4, 3, 4, 6, generator=gen),
                timestep=torch.tensor([10.0, 700.0]),
                encoder_hidden_states=torch.randn(2, 5, 32, generator=gen))


def cogvideox():
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        time_embed_dim=16, text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8,
        sample_frames=9, patch_size=2, max_text_seq_length=6,
        use_rotary_positional_embeddings=True)


def cogvideox_inputs(gen):
    # 48 video and 6 text tokens: 24 and 3 per process. RoPE angles per video token.
    angles = 3 * torch.randn(3 * 4 * 4, 16, generator=gen)
    return dict(hidden_states=torch.randn(2, 3, 4, 8, 8, generator=gen),
                encoder_hidden_states=torch.randn(2, 6, 32, generator=gen),
                timestep=torch.tensor([3, 600]), image_rotary_emb=(angles.cos(), angles.sin()))


CASES = {
    # name: (model, inputs, layer modes, ring degree, ulysses degree)
    "wan-ulysses": (wan, wan_inputs, ("linear", "hybrid"), 1, 2),
    "wan-ring": (wan, wan_inputs, ("linear", "linear"), 2, 1),
    "cogvideox-ulysses": (cogvideox, cogvideox_inputs, ("linear", "hybrid"), 1, 2),
}


def converted_model(name: str) -> torch.nn.Module:
    build, _, modes, _, _ = CASES[name]
    torch.manual_seed(0)
    model = build()
    for index, mode in enumerate(modes):
        dit.convert(model, layers=[index], mode=mode, feature_map="hedgehog", backend="cpu")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for g in dit.transfer.gates(model):
            g.fill_(0.5)
        for p in model.parameters():  # off the identity maps, and not a symmetric init
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def forward_backward(model, name: str) -> dict:
    inputs = CASES[name][1](torch.Generator().manual_seed(2))
    out = model(**inputs, return_dict=False)[0]
    out.square().mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return {"out": out.detach(), "grads": grads}


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    results = {}
    with alloc.poison_outputs(True):
        for name, (_, _, _, ring, ulysses) in CASES.items():
            model = converted_model(name)
            dit.enable_context_parallel(model, ring_degree=ring, ulysses_degree=ulysses)
            results[name] = forward_backward(model, name)
    torch.save(results, os.path.join(out_dir, f"rank-{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit_cp")
    mp.start_processes(worker, args=(2, str(root / "init"), str(root)), nprocs=2,
                       start_method="spawn", join=True)
    return [torch.load(root / f"rank-{r}.pt") for r in range(2)]


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    scale = float(b.abs().max())
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * max(scale, 1e-12),
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_processes_match_one(two, name):
    single = forward_backward(converted_model(name), name)
    for rank in range(2):
        close(two[rank][name]["out"], single["out"], f"{name} output on rank {rank}")
    grads = [two[r][name]["grads"] for r in range(2)]
    assert grads[0].keys() == grads[1].keys() == single["grads"].keys()
    for param in single["grads"]:
        close(grads[0][param] + grads[1][param], single["grads"][param], f"{name} d{param}")
    # Every converted layer's maps, and a hybrid layer's gate, did get gradients.
    modes = CASES[name][2]
    assert any(".processor.gate" in p for p in single["grads"]) == ("hybrid" in modes)
    assert sum(".processor.q_map" in p for p in single["grads"]) == len(modes)


def test_a_stock_cogvideox_layer_is_refused_under_context_parallelism():
    torch.manual_seed(0)
    model = cogvideox()
    dit.convert(model, layers=[0], mode="linear")
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.attn1.*convert them"):
        dit.context_parallel_plan(model)
    dit.convert(model, layers=[1], mode="hybrid")
    assert "transformer_blocks.0" in dit.context_parallel_plan(model)


def test_wan_keeps_its_stock_layers_and_diffusers_plan():
    model = wan()
    dit.convert(model, layers=[0], mode="linear")
    assert dit.context_parallel_plan(model) is WanTransformer3DModel._cp_plan


def test_a_layer_without_context_parallelism_runs_the_single_process_op():
    assert linattn.dit.context_parallel.context_parallel_group(None) is None
