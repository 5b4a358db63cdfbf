"""The op is a torch.library custom op: its fake and autograd registrations are consistent
(opcheck), and a model calling it compiles with fullgraph=True (no graph break)."""
import pytest
import torch

import linattn
from linattn.ops.custom_op import forward_op

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
    torch.library.opcheck(forward_op, (q, k, v, mask, [], [], "relu", "relu", 1e-6, bhnd, "cpu"))


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
