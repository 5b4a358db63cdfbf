"""linattn.convert / revert / load_converted / summary: a user's own DiT through a selector,
feature-map choices, and the errors a user meets."""
from __future__ import annotations

import io
from typing import Sequence

import pytest
import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import Tensor, nn

import linattn.dit as dit
from linattn.dit.processor import LinAttnProcessor
from linattn.feature_maps import FeatureMap, Hedgehog
from linattn.ops.reference import linear_attention_reference
from test_dit_families import CASES, processors, randomize_linattn_, run

pytestmark = pytest.mark.filterwarnings(
    "ignore:linattn. backend='auto' uses the slow float64 reference:RuntimeWarning")


# ---- a user's own DiT: attention modules that follow diffusers' processor protocol ----------

class TinyAttnProcessor:
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        k = attn.to_k(context).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        v = attn.to_v(context).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)
        return attn.to_out(o.transpose(1, 2).flatten(2))


class TinyAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.inner_dim = heads, dim
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(dim, dim) for _ in range(4))
        self.processor = TinyAttnProcessor()

    def forward(self, hidden_states, encoder_hidden_states=None):
        return self.processor(self, hidden_states, encoder_hidden_states)


class TinyDiT(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, dim: int = 32, heads: int = 2, num_layers: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"self_attn": TinyAttention(dim, heads), "cross_attn": TinyAttention(dim, heads)})
            for _ in range(num_layers))

    def forward(self, x, context):
        for block in self.blocks:
            x = x + block["self_attn"](x)
            x = x + block["cross_attn"](x, context)
        return x


class TinySelector(dit.Selector):
    name = "tiny_dit"

    def layers(self, model):
        return [(f"blocks.{i}.self_attn", block["self_attn"]) for i, block in enumerate(model.blocks)]

    def project(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb):
        q, k, v = (f(hidden_states).unflatten(-1, (attn.heads, -1))
                   for f in (attn.to_q, attn.to_k, attn.to_v))
        return dit.Projection(q, k, v, layout="bnhd")

    def finish(self, attn, o, projection):
        return attn.to_out(o.flatten(2))


def tiny(num_layers: int = 2):
    torch.manual_seed(0)
    return TinyDiT(num_layers=num_layers).eval()


def tiny_inputs():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 10, 32, generator=gen), torch.randn(2, 4, 32, generator=gen)


def test_user_dit_needs_a_selector():
    with pytest.raises(ValueError, match="no built-in selector for TinyDiT"):
        dit.convert(tiny())

    class Nameless(TinySelector):
        name = ""

    with pytest.raises(ValueError, match="Nameless sets no `name`"):
        dit.convert(tiny(), selector=Nameless())


def test_user_dit_hybrid_equals_original_and_linear_matches_the_reference():
    model, (x, context) = tiny(), tiny_inputs()
    with torch.no_grad():
        original = model(x, context)
        dit.convert(model, mode="hybrid", selector=TinySelector())
        assert torch.equal(model(x, context), original)
        assert all(type(model.blocks[i]["cross_attn"].processor) is TinyAttnProcessor for i in range(2))

    model = tiny()
    dit.convert(model, layers=[0], mode="linear", selector=TinySelector())
    randomize_linattn_(model, seed=2)
    attn = model.blocks[0]["self_attn"]
    with torch.no_grad():
        q, k, v = (f(x).unflatten(-1, (2, -1)) for f in (attn.to_q, attn.to_k, attn.to_v))
        o = linear_attention_reference(q, k, v, attn.processor.q_map, attn.processor.k_map, 1e-6)
        # float32 tolerance: a kernel backend keeps S and z in fp32; a wrong path errs by O(1).
        torch.testing.assert_close(attn(x), attn.to_out(o.flatten(2)), rtol=1e-4, atol=1e-5)


def test_user_dit_round_trip_needs_its_selector(tmp_path):
    model, (x, context) = tiny(), tiny_inputs()
    dit.convert(model, mode="hybrid", selector=TinySelector())
    randomize_linattn_(model, seed=3)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a diffusers model; build the model yourself"):
        dit.load_converted(tmp_path)
    with pytest.raises(ValueError, match="'tiny_dit', which is not built in; pass selector="):
        dit.load_converted(tmp_path, model=tiny())
    with pytest.raises(ValueError, match=r"different config \(num_layers: checkpoint 2, model 3\)"):
        dit.load_converted(tmp_path, model=tiny(num_layers=3), selector=TinySelector())
    loaded = dit.load_converted(tmp_path, model=tiny(), selector=TinySelector())
    with torch.no_grad():
        assert torch.equal(loaded(x, context), model(x, context))


# ---- layer choice and feature maps ----------------------------------------------------------

def wan():
    return CASES["wan"].model()


def converted_names(model) -> list[str]:
    return [r.name for r in dit.layer_report(model) if r.kind != "softmax"]


def test_layers_by_predicate_and_by_index():
    model = wan()
    dit.convert(model, layers=lambda index, name: index % 2 == 1)
    assert converted_names(model) == ["blocks.1.attn1"]
    model = wan()
    dit.convert(model, layers=(1, 0))
    assert converted_names(model) == ["blocks.0.attn1", "blocks.1.attn1"]


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(layers=[2]), ValueError, "index 2 is out of range; the model has 2 self-attention layers"),
    (dict(layers=[0, 0]), ValueError, "duplicate"),
    (dict(layers=[True]), TypeError, "indices must be ints"),
    (dict(layers="some"), ValueError, "expected 'all'"),
    (dict(layers=3), TypeError, "expected 'all'"),
    (dict(mode="softmax"), ValueError, "mode: expected one of"),
    (dict(backend="gpu"), ValueError, "backend: expected 'auto'"),
    (dict(feature_map="cosine"), ValueError, "feature_map: unknown name 'cosine'"),
    (dict(feature_map=lambda h, d: torch.ones(1)), TypeError, "the factory returned Tensor"),
    (dict(feature_map=Hedgehog(4, 32)), ValueError, "built for 4 heads of dim 32"),
    (dict(selector="sana"), ValueError, "no built-in selector named 'sana'"),
])
def test_bad_convert_arguments_are_named(kwargs, error, message):
    model = wan()
    with pytest.raises(error, match=message):
        dit.convert(model, **kwargs)
    assert converted_names(model) == []


def test_a_converted_layer_is_not_converted_twice():
    model = wan()
    dit.convert(model, layers=[0])
    with pytest.raises(ValueError, match="'blocks.0.attn1' is already converted"):
        dit.convert(model, layers=[0, 1], mode="hybrid")
    assert [r.kind for r in dit.layer_report(model)] == ["linear", "softmax"]


def test_a_fused_processor_is_refused():
    model = CASES["cogvideox"].model()
    model.fuse_qkv_projections()
    with pytest.raises(ValueError, match="runs processor FusedCogVideoXAttnProcessor2_0"):
        dit.convert(model)


class Squared(FeatureMap):
    """A user's map, unknown to the kernels (applied in PyTorch by the op)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def kernel_params(self) -> tuple[Tensor, ...]:
        return (self.scale,)

    def apply(self, x: Tensor, params: Sequence[Tensor]) -> Tensor:
        return (params[0] * x) ** 2


def test_feature_map_choices_round_trip(tmp_path):
    case = CASES["wan"]
    model, inputs = case.model(), case.example()
    dit.convert(model, layers=[0], feature_map=Hedgehog(2, 32, feature_dim=8), mode="hybrid")
    dit.convert(model, layers=[1], feature_map=lambda heads, dim: Squared(0.5))
    randomize_linattn_(model, seed=4)
    assert [r.feature_map for r in dit.layer_report(model)] == ["hedgehog(F=8)", "Squared"]
    q0, k0 = model.blocks[0].attn1.processor.q_map, model.blocks[0].attn1.processor.k_map
    assert q0 is not k0 and not torch.equal(q0.weight, k0.weight)   # separate maps per role
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="custom feature map .*Squared; pass feature_map="):
        dit.load_converted(tmp_path)
    with pytest.raises(ValueError, match="but feature_map= builds .*Hedgehog"):
        dit.load_converted(tmp_path, feature_map=lambda heads, dim: Hedgehog(heads, dim))
    loaded = dit.load_converted(tmp_path, feature_map=lambda heads, dim: Squared())
    with torch.no_grad():
        assert torch.equal(run(loaded, inputs), run(model, inputs))


# ---- checkpoints that do not match ---------------------------------------------------------

def test_load_errors_name_the_mismatch(tmp_path):
    from diffusers import WanTransformer3DModel

    plain = tmp_path / "plain"
    wan().save_pretrained(plain)
    with pytest.raises(ValueError, match="no '_linattn' record"):
        dit.load_converted(plain)
    with pytest.raises(FileNotFoundError, match="pass subfolder='transformer'"):
        dit.load_converted(tmp_path)

    converted = tmp_path / "converted"
    model = dit.convert(wan(), mode="hybrid")
    model.save_pretrained(converted)
    with pytest.raises(ValueError, match="is a WanTransformer3DModel, but model= is a TinyDiT"):
        dit.load_converted(converted, model=tiny())
    with pytest.raises(ValueError, match="already has converted layers"):
        dit.load_converted(converted, model=dit.convert(wan(), layers=[0]))
    with pytest.raises(ValueError, match="selector 'wan', but selector= is 'tiny_dit'"):
        dit.load_converted(converted, selector=TinySelector())

    # diffusers builds a model from a config with the record kept (a private config key) but
    # without linattn's layers, as its from_pretrained does; saving that model again gives a
    # checkpoint whose record and weights disagree.
    stale = tmp_path / "stale"
    WanTransformer3DModel.from_config(model.config).save_pretrained(stale)
    with pytest.raises(ValueError, match="missing from the checkpoint: .*processor.gate"
                                         ".*was it saved from a model loaded with plain"):
        dit.load_converted(stale)


# ---- report and diffusers integration --------------------------------------------------------

def test_summary_prints_every_self_attention_layer():
    model = wan()
    dit.convert(model, layers=[1], mode="hybrid")
    with torch.no_grad():
        model.blocks[1].attn1.processor.gate.fill_(0.25)
    out = io.StringIO()
    dit.summary(model, file=out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "WanTransformer3DModel: 2 self-attention layers, 1 softmax, 0 linear, 1 hybrid"
    assert lines[2].split() == ["0", "blocks.0.attn1", "softmax", "-", "-", "0"]
    # Hedgehog: two maps of 2 × 32 × 32, plus the gate.
    assert lines[3].split() == ["1", "blocks.1.attn1", "hybrid", "0.2500", "hedgehog(F=32)", "4,097"]
    assert lines[4] == "parameters added by linattn: 4,097"


def test_attention_backend_set_while_converted_survives_revert():
    model = dit.convert(wan(), layers=[0], mode="hybrid")
    model.set_attention_backend("native")
    assert model.blocks[0].attn1.processor._attention_backend.value == "native"
    dit.revert(model)
    assert model.blocks[0].attn1.processor._attention_backend.value == "native"
    assert isinstance(processors(model)["blocks.0.attn2"], type(model.blocks[0].attn1.processor))
    assert not isinstance(model.blocks[0].attn1.processor, LinAttnProcessor)
