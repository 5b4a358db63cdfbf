"""linattn.convert on every supported diffusers video DiT family (tiny random models, CPU).

Each family is built from a tiny config with random weights (every parameter perturbed, so no
zero-initialised layer or identity RoPE hides a wrong q/k/v path). The other test_dit_* files
import CASES and the helpers from here.
"""
from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from diffusers import (CogVideoXTransformer3DModel, HunyuanVideoTransformer3DModel,
                       LTXVideoTransformer3DModel, MochiTransformer3DModel, WanTransformer3DModel)

import linattn.dit as dit
from linattn.dit.processor import LinAttnProcessor
from linattn.dit.selectors import resolve_selector
from linattn.ops.reference import linear_attention_reference

pytestmark = pytest.mark.filterwarnings(
    # On a machine without the native module, backend="auto" runs the reference and says so.
    "ignore:linattn. backend='auto' uses the slow float64 reference:RuntimeWarning",
    # Mochi's RoPE asks for a float32 CPU autocast, which torch declines (diffusers' own code).
    "ignore:In CPU autocast, but the target dtype is not supported:UserWarning")

BATCH = 2


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def wan_model():
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16,
        out_channels=16, text_dim=64, freq_dim=32, ffn_dim=128, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)


def wan_inputs(gen):
    return dict(hidden_states=torch.randn(BATCH, 16, 3, 4, 6, generator=gen),
                timestep=torch.tensor([10, 700]),
                encoder_hidden_states=torch.randn(BATCH, 5, 64, generator=gen))


def cogvideox_model():
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        time_embed_dim=16, text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8,
        sample_frames=9, patch_size=2, max_text_seq_length=6, use_rotary_positional_embeddings=True)


def cogvideox_inputs(gen):
    # The pipeline computes CogVideoX's RoPE outside the model: random angles per video token.
    angles = 3 * torch.randn(3 * 4 * 4, 16, generator=gen)
    return dict(hidden_states=torch.randn(BATCH, 3, 4, 8, 8, generator=gen),
                encoder_hidden_states=torch.randn(BATCH, 6, 32, generator=gen),
                timestep=torch.tensor([3, 600]), image_rotary_emb=(angles.cos(), angles.sin()))


def hunyuan_model():
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
        pooled_projection_dim=16, rope_axes_dim=(4, 6, 6), guidance_embeds=False)


def hunyuan_inputs(gen, text_len: int = 7, valid=(4, 7)):
    mask = torch.zeros(BATCH, text_len, dtype=torch.long)
    for b, n in enumerate(valid):
        mask[b, :n] = 1
    return dict(hidden_states=torch.randn(BATCH, 4, 2, 8, 8, generator=gen),
                timestep=torch.tensor([5, 800]),
                encoder_hidden_states=torch.randn(BATCH, text_len, 32, generator=gen),
                encoder_attention_mask=mask, pooled_projections=torch.randn(BATCH, 16, generator=gen))


def ltx_model():
    return LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=16, cross_attention_dim=32, num_layers=2, caption_channels=16)


def ltx_inputs(gen):
    return dict(hidden_states=torch.randn(BATCH, 2 * 4 * 4, 8, generator=gen),
                encoder_hidden_states=torch.randn(BATCH, 5, 16, generator=gen),
                timestep=torch.tensor([1, 900]), encoder_attention_mask=torch.ones(BATCH, 5),
                num_frames=2, height=4, width=4)


def mochi_model():
    return MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        pooled_projection_dim=16, in_channels=4, text_embed_dim=32, time_embed_dim=16)


def mochi_inputs(gen):
    mask = torch.ones(BATCH, 6, dtype=torch.bool)
    mask[0, 3:] = False
    return dict(hidden_states=torch.randn(BATCH, 4, 2, 8, 8, generator=gen),
                encoder_hidden_states=torch.randn(BATCH, 6, 32, generator=gen),
                timestep=torch.tensor([2, 500]), encoder_attention_mask=mask)


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.Generator], dict]
    # Where the stock processor finds its attention function, and the layout it calls it in:
    # patched with the linear-attention reference to get an independent expected output.
    attention_fn: tuple[str, str]
    layout: str

    def model(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return perturbed(self.build(), seed)

    def example(self, seed: int = 1) -> dict:
        return self.inputs(torch.Generator().manual_seed(seed))


CASES = {c.name: c for c in (
    Case("wan", wan_model, wan_inputs,
         ("diffusers.models.transformers.transformer_wan", "dispatch_attention_fn"), "bnhd"),
    Case("cogvideox", cogvideox_model, cogvideox_inputs,
         ("torch.nn.functional", "scaled_dot_product_attention"), "bhnd"),
    Case("hunyuan_video", hunyuan_model, hunyuan_inputs,
         ("diffusers.models.transformers.transformer_hunyuan_video", "dispatch_attention_fn"), "bnhd"),
    Case("ltx_video", ltx_model, ltx_inputs,
         ("diffusers.models.transformers.transformer_ltx", "dispatch_attention_fn"), "bnhd"),
    Case("mochi", mochi_model, mochi_inputs,
         ("torch.nn.functional", "scaled_dot_product_attention"), "bhnd"),
)}


def run(model, inputs) -> torch.Tensor:
    return model(**inputs).sample


def processors(model) -> dict[str, object]:
    """Every attention module's processor, by module name (cross- and text attention too)."""
    return {name: m.processor for name, m in model.named_modules()
            if hasattr(m, "processor") and not isinstance(m, LinAttnProcessor)}


def randomize_linattn_(model, seed: int, gates=(0.2, 0.8)) -> None:
    """Move every map off its identity init and every gate into (gates[0], gates[1])."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for g in dit.transfer.gates(model):
            g.fill_(gates[0] + (gates[1] - gates[0]) * torch.rand((), generator=gen).item())
        for name, p in model.named_parameters():
            if ".processor." in name and not name.endswith(".gate"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


@pytest.fixture(params=sorted(CASES))
def case(request) -> Case:
    return CASES[request.param]


def test_no_layers_and_hybrid_at_r1_equal_the_original(case):
    model, inputs = case.model(), case.example()
    with torch.no_grad():
        original = run(model, inputs)
        before = processors(model)
        dit.convert(model, layers=[])
        assert processors(model) == before
        assert torch.equal(run(model, inputs), original)

        dit.convert(model, layers="all", mode="hybrid")
        assert all(isinstance(p, LinAttnProcessor) for name, p in processors(model).items()
                   if name in dict(resolve_selector(model, None).layers(model)))
        assert [g.item() for g in dit.transfer.gates(model)] == [1.0] * len(dit.transfer.gates(model))
        assert torch.equal(run(model, inputs), original)


def test_converting_k_layers_changes_exactly_those_processors(case):
    model, inputs = case.model(), case.example()
    layers = resolve_selector(model, None).layers(model)
    assert len(layers) >= 2
    before = processors(model)
    with torch.no_grad():
        original = run(model, inputs)
        dit.convert(model, layers=[1], mode="linear")
        after = processors(model)
        changed = {name for name in before if after[name] is not before[name]}
        assert changed == {layers[1][0]}
        assert isinstance(after[layers[1][0]], LinAttnProcessor)
        assert after[layers[1][0]].mode == "linear"
        converted = run(model, inputs)
    assert torch.isfinite(converted).all()
    # The converted layer really computes something else than softmax attention.
    assert not torch.allclose(converted, original, rtol=1e-3, atol=1e-4)


def _reference_attention(q_map, k_map, layout: str):
    """A stand-in for the stock softmax call: the float64 linear-attention reference."""
    def attention(query, key, value, attn_mask=None, **_):
        q, k, v = (query, key, value) if layout == "bnhd" else (
            t.transpose(1, 2) for t in (query, key, value))
        mask = None if attn_mask is None else attn_mask.reshape(attn_mask.shape[0], attn_mask.shape[-1])
        o = linear_attention_reference(q, k, v, q_map, k_map, 1e-6, mask)
        return o if layout == "bnhd" else o.transpose(1, 2)
    return attention


def _capture_call(model, module, inputs):
    """The (args, kwargs) `module` is called with during a forward of `model`."""
    seen = {}

    def hook(_, args, kwargs):
        seen.setdefault("call", (args, kwargs))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run(model, inputs)
    finally:
        handle.remove()
    return seen["call"]


def test_linear_layer_is_the_stock_path_with_linear_attention(case, monkeypatch):
    """φ sees q and k exactly where the stock processor's softmax does (after q/k norm and RoPE):
    the converted layer must equal the stock processor whose attention call is replaced by the
    float64 linear-attention reference with the same maps."""
    model, inputs = case.model(), case.example()
    name, attn = resolve_selector(model, None).layers(model)[0]
    args, kwargs = _capture_call(model, attn, inputs)
    dit.convert(model, layers=[0], mode="linear")
    randomize_linattn_(model, seed=3)
    processor = attn.processor
    with torch.no_grad():
        converted = attn(*args, **kwargs)
        dit.revert(model)
        module, fn = case.attention_fn
        monkeypatch.setattr(importlib.import_module(module), fn,
                            _reference_attention(processor.q_map, processor.k_map, case.layout))
        expected = attn(*args, **kwargs)
    converted = converted if isinstance(converted, tuple) else (converted,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    if case.name == "mochi":
        # The stock processor zeroes the rows of padded text; only valid text rows are compared.
        valid = inputs["encoder_attention_mask"]
        converted, expected = (converted[0], converted[1][valid]), (expected[0], expected[1][valid])
    for got, want in zip(converted, expected, strict=True):
        # float32 tolerance: a kernel backend keeps S and z in fp32; a wrong path errs by O(1).
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_forward_and_backward_reach_maps_and_gates(case):
    model, inputs = case.model(), case.example()
    dit.convert(model, layers="all", mode="hybrid")
    randomize_linattn_(model, seed=4)
    run(model, inputs).square().mean().backward()
    converted = list(dit.transfer.gates(model))
    assert len(converted) == len(resolve_selector(model, None).layers(model))
    for name, p in model.named_parameters():
        if ".processor." in name:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, f"{name}: zero gradient"


def test_revert_restores_identical_outputs_and_processors(case):
    model, inputs = case.model(), case.example()
    before = processors(model)
    with torch.no_grad():
        original = run(model, inputs)
        dit.convert(model, layers="all", mode="linear")
        dit.revert(model)
        assert processors(model) == before
        assert not any(".processor." in k for k in model.state_dict())
        assert "_linattn" not in model.config
        assert torch.equal(run(model, inputs), original)


def test_save_and_load_round_trip_bit_exact(case, tmp_path):
    model, inputs = case.model(), case.example()
    dit.convert(model, layers=[0], mode="hybrid")
    dit.convert(model, layers=[1], mode="linear", feature_map="relu")
    randomize_linattn_(model, seed=5)
    model.save_pretrained(tmp_path)
    loaded = dit.load_converted(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    saved_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    for key, tensor in saved_state.items():
        assert loaded_state[key].dtype == tensor.dtype and torch.equal(loaded_state[key], tensor), key
    assert [r.kind for r in dit.layer_report(loaded)] == ["hybrid", "linear"]
    with torch.no_grad():
        assert torch.equal(run(loaded, inputs), run(model, inputs))


def test_gradient_checkpointing_gives_the_same_gradients():
    case = CASES["wan"]
    model, inputs = case.model(), case.example()
    dit.convert(model, layers="all", mode="hybrid")
    randomize_linattn_(model, seed=6)
    checkpointed = copy.deepcopy(model)
    checkpointed.enable_gradient_checkpointing()
    grads = []
    for m in (model, checkpointed):
        m.train()
        run(m, inputs).square().mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if ".processor." in n})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight:UserWarning")
def test_bf16_autocast_forward_and_backward():
    case = CASES["wan"]
    model, inputs = case.model(), case.example()
    dit.convert(model, layers="all", mode="hybrid")
    randomize_linattn_(model, seed=7)
    with torch.no_grad():
        reference = run(model, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model, inputs)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    # Relative RMS error: 0.006 measured for bf16 through two layers, while dropping the linear
    # branch (the unconverted model) moves the output by 0.044.
    assert ((out.float() - reference).norm() / reference.norm()).item() < 0.02
    for g in dit.transfer.gates(model):
        assert g.dtype == torch.float32 and g.grad is not None and g.grad.abs() > 0


def test_bf16_sharded_checkpoint_round_trips_with_its_dtypes(tmp_path):
    case = CASES["wan"]
    model, inputs = case.model(), case.example()
    # The dtypes from_pretrained(torch_dtype=torch.bfloat16) gives: parameters in bf16 except the
    # modules diffusers keeps in float32; buffers (the RoPE tables) as the constructor made them,
    # which is also what a loaded model gets, since buffers are not saved.
    keep = tuple(model._keep_in_fp32_modules)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(part in keep for part in name.split(".")):
                p.data = p.data.to(torch.bfloat16)
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"].to(torch.bfloat16)
    inputs["hidden_states"] = inputs["hidden_states"].to(torch.bfloat16)
    dit.convert(model, layers="all", mode="hybrid")      # maps and gates stay float32
    randomize_linattn_(model, seed=8)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = dit.load_converted(tmp_path)
    dtypes = {k: t.dtype for k, t in loaded.state_dict().items()}
    assert dtypes == {k: t.dtype for k, t in model.state_dict().items()}
    assert dtypes["blocks.0.attn1.processor.gate"] == torch.float32
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(run(loaded, inputs), run(model, inputs))
