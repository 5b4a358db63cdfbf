"""The fused layer equals the unfused one: for every family, a converted model whose linear layers
hand q/k norms and RoPE to the kernels gives the outputs and every gradient (the projections',
the q/k norms' weights and biases, the feature maps') of the same model running the stock norm
and RoPE in PyTorch before the op, on the cpu backend and the Triton kernels (interpreted on a
CPU-only machine). Also: the linear half of hybrid layers is fused, and the stock norm and RoPE
(each family's own code) equal linattn's float64 definition of what the kernels apply.
"""
from __future__ import annotations

import pytest
import torch

import linattn.dit as dit
from linattn.dit.selectors import resolve_selector
from linattn.pre_attention import reference as pre_reference
from linattn.pre_attention import resolve

from numerics import assert_close_to_reference
from test_dit_families import CASES, randomize_linattn_, run

pytestmark = pytest.mark.filterwarnings(
    "ignore:In CPU autocast, but the target dtype is not supported:UserWarning")


def _model(case, backend: str, mode: str, layers="all", feature_map="hedgehog"):
    model = case.model()
    if case.name == "mochi":
        # Mochi builds its RoPE tables from a learnable parameter; the kernels give tables no
        # gradient, so while it trains the layer runs unfused (test_learnable_rope_...).
        model.pos_frequencies.requires_grad_(False)
    dit.convert(model, layers=layers, mode=mode, backend=backend, feature_map=feature_map)
    randomize_linattn_(model, seed=11)
    return model.train()


#: Per backend: which layers are converted, with which map. The Triton interpreter runs every
#: kernel operation in Python: one layer with elu + 1 there (Hedgehog's fused kernels with the
#: pre-attention work are checked against the reference in test_pre_attention.py).
SETUPS = {"cpu": ("all", "hedgehog"), "triton": ([0], "elu")}


def _outputs_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = run(model, inputs)
    out.square().mean().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()
             if p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("family", sorted(CASES))
def test_fused_layers_equal_unfused_layers(family, backend):
    case = CASES[family]
    layers, feature_map = SETUPS[backend]
    model, inputs = _model(case, backend, "linear", layers, feature_map), case.example()
    fused_out, fused_grads = _outputs_and_grads(model, inputs)
    dit.set_fuse_pre_attention(model, False)
    plain_out, plain_grads = _outputs_and_grads(model, inputs)

    assert_close_to_reference(fused_out, plain_out.double(), torch.float32, f"{family} output")
    assert fused_grads.keys() == plain_grads.keys()
    norms = [name for name in fused_grads if ".norm_q." in name or ".norm_k." in name]
    assert norms, f"{family}: no q/k norm parameter got a gradient"
    scale = max(g.abs().max().item() for g in plain_grads.values())
    for name, grad in fused_grads.items():
        want = plain_grads[name]
        if want.abs().max() < 1e-4 * scale:
            # Rounding noise around an exact zero (a key bias under softmax attention: adding a
            # constant to every score of a query changes nothing): compare on the model's scale.
            assert (grad - want).abs().max() <= 1e-5 * scale, f"{family} d {name}"
            continue
        assert_close_to_reference(grad, want.double(), torch.float32, f"{family} d {name}")


@pytest.mark.parametrize("family", sorted(CASES))
def test_hybrid_layers_fuse_their_linear_half(family, monkeypatch):
    """The linear half of a hybrid layer takes the fused path (the op sees q_norm and rope); the
    softmax half keeps the stock one; both agree with the unfused layer."""
    case = CASES[family]
    model, inputs = _model(case, "cpu", "hybrid"), case.example()
    import linattn.dit.processor as processor_module
    seen = []
    original = processor_module.linear_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("q_norm") is not None or kwargs.get("rope") is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(processor_module, "linear_attention", spy)
    with torch.no_grad():
        fused = run(model, inputs)
        assert seen and all(seen), f"{family}: a linear branch ran unfused"
        dit.set_fuse_pre_attention(model, False)
        plain = run(model, inputs)
    assert_close_to_reference(fused, plain.double(), torch.float32, f"{family} hybrid output")


def test_learnable_rope_tables_run_unfused_and_get_gradients():
    """Mochi's RoPE tables come from pos_frequencies: while it trains, the layer applies its
    norm and RoPE in PyTorch (the kernels give tables no gradient) and the parameter learns."""
    case = CASES["mochi"]
    model, inputs = case.model(), case.example()
    dit.convert(model, layers="all", mode="linear", backend="cpu")
    randomize_linattn_(model, seed=12)
    run(model, inputs).square().mean().backward()
    assert model.pos_frequencies.grad is not None
    assert model.pos_frequencies.grad.abs().sum() > 0


def _first_layer_projection(case):
    """A float64 copy of the family's tiny model, and the projection of its first converted
    layer's call (captured with a forward pre-hook)."""
    model = case.model().double()

    def double(t):
        if isinstance(t, tuple):
            return tuple(double(x) for x in t)
        return t.double() if torch.is_tensor(t) and t.is_floating_point() else t
    inputs = {name: double(t) for name, t in case.example().items()}
    selector = resolve_selector(model, None)
    name, attn = selector.layers(model)[0]
    seen = {}

    def hook(_, args, kwargs):
        names = ("hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb")
        call = dict(zip(names, args), **kwargs)
        rotary = call.get("image_rotary_emb", call.get("rotary_emb"))
        seen.setdefault("projection", selector.project(
            attn, call["hidden_states"], call.get("encoder_hidden_states"),
            call.get("attention_mask"), rotary))

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run(model, inputs)
    finally:
        handle.remove()
    return selector, attn, seen["projection"]


#: Stock code that computes in float32 whatever the input dtype: diffusers' apply_rotary_emb
#: (CogVideoX, HunyuanVideo), LTX-Video's and Mochi's RoPE (x.float()), diffusers' RMSNorm
#: variance. Wan's norm and RoPE keep float64.
_FLOAT32_STOCK = {"cogvideox", "hunyuan_video", "ltx_video", "mochi"}


@pytest.mark.parametrize("family", sorted(CASES))
def test_stock_norm_and_rope_equal_the_reference(family):
    """What each family's stock code does to q and k (its own norm modules and RoPE function,
    reproduced bit for bit by the selector) is what linattn's float64 definition applies with
    the specs the selector hands the op: the kernels are tested against that definition.
    Run in float64: the families whose stock RoPE computes in float32 agree to float32
    rounding, the others to float64 rounding."""
    selector, attn, p = _first_layer_projection(CASES[family])
    assert p.pre is not None
    stock_q, stock_k = selector.attention_qk(attn, p)
    B, N, H, D = p.q.shape
    call = resolve(p.pre.q_norm, p.pre.k_norm, p.pre.rope, batch=B, heads=H, head_dim=D,
                   q_len=N, kv_len=p.k.shape[1], dtype=p.q.dtype, device=p.q.device)
    for side, stock, raw, norm in (("q", stock_q, p.q, call.q_norm),
                                   ("k", stock_k, p.k, call.k_norm)):
        mine = pre_reference.apply(raw, norm, call.rope)
        tol = 1e-6 if family in _FLOAT32_STOCK else 1e-12
        torch.testing.assert_close(mine, stock, rtol=tol, atol=tol * stock.abs().max().item(),
                                   msg=lambda m: f"{family} {side}: {m}")
