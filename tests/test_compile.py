"""The op is a torch.library custom op: its fake and autograd registrations are consistent
(opcheck), and a model calling it compiles with fullgraph=True (no graph break)."""
import pytest
import torch

import linattn
from linattn import pre_attention
from linattn.ops.custom_op import forward_op
from linattn.pre_attention import NO_PRE_ATTENTION

from conftest import backend_device
from numerics import assert_close_to_reference


class TinyAttentionBlock(torch.nn.Module):
    def __init__(self, dim=32, heads=2, feature_map="relu", layout="bnhd", backend="cpu"):
        super().__init__()
        self.heads, self.layout, self.backend = heads, layout, backend
        self.feature_map = feature_map
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).unbind(2)
        if self.layout == "bhnd":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        o = linattn.linear_attention(q, k, v, feature_map=self.feature_map, layout=self.layout,
                                     backend=self.backend)
        if self.layout == "bhnd":
            o = o.transpose(1, 2)
        return self.out(o.reshape(B, N, C))


@pytest.mark.parametrize("bhnd", [False, True])
def test_opcheck_forward(bhnd):
    q, k = torch.randn(2, 19, 2, 16), torch.randn(2, 23, 2, 16)
    v = torch.randn(2, 23, 2, 8)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = torch.rand(2, 23) < 0.8
    torch.library.opcheck(forward_op, (q, k, v, mask, [], [], "relu", "relu", 1e-6, bhnd, "cpu",
                                       None, None, None, None, None, None, NO_PRE_ATTENTION))


@pytest.mark.parametrize("over", ["head", "heads"])
def test_opcheck_forward_with_pre_attention(over):
    """The norm weight and bias get gradients through the op's autograd registration, and the
    statistics outputs of a norm over heads have the fake shapes."""
    B, N, H, D = 2, 19, 2, 16
    q, k, v = (torch.randn(B, N, H, D, requires_grad=True) for _ in range(3))
    shape = (D,) if over == "head" else (H * D,)
    weight, bias = (torch.randn(shape, requires_grad=True) for _ in range(2))
    angles = torch.randn(N - 3, D // 2)
    pre = pre_attention.resolve(linattn.QKNorm("layer", weight, bias, over=over),
                                linattn.QKNorm("rms", weight, over=over),
                                linattn.RoPE(angles.cos(), angles.sin(), start=3), batch=B,
                                heads=H, head_dim=D, q_len=N, kv_len=N, dtype=q.dtype,
                                device=q.device)
    torch.library.opcheck(forward_op, (q, k, v, None, [], [], "elu", "elu", 1e-6, False, "cpu",
                                       *pre.tensors(), pre.code()))


@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
def test_compiled_model_has_no_graph_break_and_matches_eager(layout):
    torch.manual_seed(0)
    model = TinyAttentionBlock(layout=layout)
    x = torch.randn(2, 37, 32, requires_grad=True)
    eager = model(x)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    assert_close_to_reference(out, eager, torch.float32, "compiled output")
    for got, want in zip((p.grad for p in model.parameters()), eager_grads):
        assert_close_to_reference(got, want, torch.float32, "compiled parameter gradient")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_dynamic_shapes_compile_once_with_fullgraph(backend):
    """torch.compile(fullgraph=True, dynamic=True): B and N change between calls without a
    recompile or graph break, eps arrives as a (symbolic) float argument, and outputs and
    gradients match eager, with a mask, a learnable map and the (B, H, N, D) layout."""
    from torch._dynamo.testing import CompileCounterWithBackend

    # On the backend's device: on a GPU machine triton refuses CPU tensors (and parameters).
    device = backend_device(backend)
    fmap = linattn.feature_maps.Hedgehog(2, 16, feature_dim=8, init="random").to(device)

    def attention(q, k, v, mask, eps):
        return linattn.linear_attention(q, k, v, feature_map=fmap, eps=eps, layout="bhnd",
                                        key_padding_mask=mask, backend=backend)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(attention, fullgraph=True, dynamic=True, backend=counter)
    first_frames = None
    # B never equals H = 2 here: dynamo gives equal sizes one symbol ("duck shaping"), and the
    # Hedgehog map's check of H, which must specialise, would then specialise B with it.
    for B, N in ((3, 37), (4, 50), (3, 91)):
        q, k, v = (torch.randn(B, 2, N, 16).to(device).requires_grad_() for _ in range(3))
        mask = (torch.rand(B, N) < 0.8).to(device)
        got = compiled(q, k, v, mask, 1e-5)
        got.square().sum().backward()
        got_grads = [t.grad.clone() for t in (q, k, v, fmap.weight)]
        for t in (q, k, v, fmap.weight):
            t.grad = None
        want = attention(q, k, v, mask, 1e-5)
        want.square().sum().backward()
        assert_close_to_reference(got, want.detach().double(), torch.float32, f"B={B} N={N}")
        for name, g, t in zip(("dq", "dk", "dv", "dW"), got_grads, (q, k, v, fmap.weight)):
            assert_close_to_reference(g, t.grad.double(), torch.float32, f"{name} B={B} N={N}")
        fmap.weight.grad = None
        first_frames = first_frames or counter.frame_count
    assert counter.frame_count == first_frames, "a new B or N recompiled"


def test_dynamic_shapes_with_norms_and_rope_compile_once():
    """q/k norms and RoPE under torch.compile(fullgraph=True, dynamic=True): the sequence
    length changes (and the RoPE tables with it) without a recompile, and the output and every
    gradient (q, k, v, norm weights and bias) match eager. A norm over all tokens keeps N out of
    the graph's constants (PreAttentionCall.code)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    H, D = 2, 16
    q_weight = torch.randn(H * D, requires_grad=True)
    k_weight, k_bias = (torch.randn(D, requires_grad=True) for _ in range(2))

    def attention(q, k, v, cos, sin):
        return linattn.linear_attention(
            q, k, v, feature_map="elu", backend="cpu",
            q_norm=linattn.QKNorm("rms", q_weight, over="heads"),
            k_norm=linattn.QKNorm("layer", k_weight, k_bias, over="head"),
            rope=linattn.RoPE(cos, sin, start=3))  # three "text" tokens stay unrotated

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(attention, fullgraph=True, dynamic=True, backend=counter)
    first_frames = None
    leaves = None
    for B, N in ((3, 37), (4, 50), (3, 91)):
        q, k, v = (torch.randn(B, N, H, D, requires_grad=True) for _ in range(3))
        angles = torch.randn(N - 3, D // 2)
        leaves = (q, k, v, q_weight, k_weight, k_bias)
        got = compiled(q, k, v, angles.cos(), angles.sin())
        got.square().sum().backward()
        got_grads = [t.grad.clone() for t in leaves]
        for t in leaves:
            t.grad = None
        want = attention(q, k, v, angles.cos(), angles.sin())
        want.square().sum().backward()
        assert_close_to_reference(got, want.detach().double(), torch.float32, f"B={B} N={N}")
        for name, g, t in zip(("dq", "dk", "dv", "dw_q", "dw_k", "db_k"), got_grads, leaves):
            assert_close_to_reference(g, t.grad.double(), torch.float32, f"{name} B={B} N={N}")
        for t in leaves:
            t.grad = None
        first_frames = first_frames or counter.frame_count
    assert counter.frame_count == first_frames, "a new B or N recompiled"
