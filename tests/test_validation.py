"""Each bad input raises the documented error, naming the argument."""
import math

import pytest
import torch

import linattn
from linattn import feature_maps


def qkv(B=2, N=5, H=3, D=4, Dv=4, dtype=torch.float32):
    return (torch.randn(B, N, H, D, dtype=dtype), torch.randn(B, N, H, D, dtype=dtype),
            torch.randn(B, N, H, Dv, dtype=dtype))


def call(q, k, v, **kw):
    kw.setdefault("backend", "reference")
    return linattn.linear_attention(q, k, v, **kw)


def test_wrong_rank():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q: expected a rank-4 tensor \(B, N, H, D\)"):
        call(q[0], k, v)
    with pytest.raises(ValueError, match=r"v: expected a rank-4 tensor \(B, H, N, D\) for layout='bhnd'"):
        call(q, k, v[..., 0], layout="bhnd")


def test_not_a_tensor():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="k: expected a torch.Tensor"):
        call(q, k.numpy(), v)


@pytest.mark.parametrize("bad", [
    (dict(q=(3, 5, 3, 4)), r"q, k, v: batch sizes differ: q 3, k 2, v 2"),
    (dict(k=(2, 5, 2, 4)), r"q, k, v: numbers of heads differ: q 3, k 2, v 3"),
    (dict(k=(2, 5, 3, 6)), r"q, k: head dims differ: q 4, k 6"),
    (dict(v=(2, 6, 3, 4)), r"k, v: sequence lengths differ: k 5, v 6"),
])
def test_mismatched_shapes(bad):
    shapes, message = bad
    tensors = dict(zip("qkv", qkv()))
    for name, shape in shapes.items():
        tensors[name] = torch.randn(shape)
    with pytest.raises(ValueError, match=message):
        call(tensors["q"], tensors["k"], tensors["v"])


def test_dtypes():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"q, k, v: dtypes must be equal, got q float32, k float16"):
        call(q, k.half(), v)
    with pytest.raises(TypeError, match=r"q: dtype int64 is not supported"):
        call(q.long(), k.long(), v.long())


def test_mixed_devices():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="q, k, v: must be on one device"):
        call(q, k.to("meta"), v)


def test_empty_sequences():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q: the query sequence is empty"):
        call(q[:, :0], k, v)
    with pytest.raises(ValueError, match=r"k, v: the key/value sequence is empty"):
        call(q, k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match=r"batch is 0"):
        call(q[:0], k[:0], v[:0])


@pytest.mark.parametrize("eps", [0.0, -1e-6, math.nan, math.inf])
def test_eps_must_be_positive_and_finite(eps):
    with pytest.raises(ValueError, match="eps: must be a finite number > 0"):
        call(*qkv(), eps=eps)


def test_mask_checks():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="key_padding_mask: expected dtype bool"):
        call(q, k, v, key_padding_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"key_padding_mask: expected shape \(B, Nk\) = \(2, 5\), got \(2, 4\)"):
        call(q, k, v, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask: must be on cpu"):
        call(q, k, v, key_padding_mask=torch.ones(2, 5, dtype=torch.bool, device="meta"))


def test_layout_and_feature_map_names():
    with pytest.raises(ValueError, match="layout: expected 'bnhd'"):
        call(*qkv(), layout="nhd")
    with pytest.raises(ValueError, match=r"feature_map: unknown feature map 'gelu'"):
        call(*qkv(), feature_map="gelu")
    with pytest.raises(ValueError, match="feature_map: a sequence must be"):
        call(*qkv(), feature_map=("relu",))
    with pytest.raises(ValueError, match="φ\\(q\\) and φ\\(k\\) must have the same width"):
        call(*qkv(), feature_map=(feature_maps.Hedgehog(3, 4, 8), "relu"))
    with pytest.raises(ValueError, match="Hedgehog map was built for 2 heads of dim 4"):
        call(*qkv(), feature_map=feature_maps.Hedgehog(2, 4))


def test_backend_names():
    with pytest.raises(ValueError, match="backend: unknown backend 'fast'"):
        call(*qkv(), backend="fast")
    # There is no "cuda" backend (GPU kernels are the triton backend's): refused by name.
    with pytest.raises(ValueError, match=r"backend: unknown backend 'cuda'; expected 'auto' or one of "
                                         r"\['reference', 'cpu', 'triton'\]"):
        call(*qkv(), backend="cuda")


def test_a_repeated_call_is_checked_again_where_it_differs():
    """Validation remembers calls that passed (by shapes, dtypes, devices, layout, builtin
    maps): a later call that differs in any of them, or in eps, is still refused."""
    q, k, v = qkv()
    call(q, k, v, backend="cpu")
    call(q, k, v, backend="cpu")  # the remembered path
    with pytest.raises(ValueError, match="eps: must be a finite number > 0"):
        call(q, k, v, eps=-1.0, backend="cpu")
    with pytest.raises(ValueError, match="k, v: sequence lengths differ"):
        call(q, k, v[:, :4], backend="cpu")
    with pytest.raises(TypeError, match="q, k, v: dtypes must be equal"):
        call(q, k, v.double(), backend="cpu")
    mask = torch.ones(2, 5, dtype=torch.bool)
    call(q, k, v, key_padding_mask=mask, backend="cpu")
    with pytest.raises(TypeError, match="key_padding_mask: expected dtype bool"):
        call(q, k, v, key_padding_mask=mask.float(), backend="cpu")
    with pytest.raises(TypeError, match="key_padding_mask: expected a bool tensor"):
        call(q, k, v, key_padding_mask=[[True] * 5] * 2, backend="cpu")
