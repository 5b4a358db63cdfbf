"""linattn.dit.widen: wider Hedgehog maps with the same output, carried by save/load, and the
`linattn widen` command."""
from __future__ import annotations

import json

import pytest
import torch

import linattn.dit as dit
from linattn.dit.processor import converted_layers
from linattn.dit.widen import widen_feature_maps, widen_hedgehog
from linattn.feature_maps import Hedgehog
from linattn.ops.reference import linear_attention_reference
from linattn.train.cli import main as cli_main
from test_dit_families import perturbed, randomize_linattn_, run, wan_inputs, wan_model

pytestmark = pytest.mark.filterwarnings(
    "ignore:linattn. backend='auto' uses the slow float64 reference:RuntimeWarning")


def trained_like_hedgehog(heads: int, head_dim: int, feature_dim: int, seed: int) -> Hedgehog:
    fmap = Hedgehog(heads, head_dim, feature_dim=feature_dim, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        fmap.weight.add_(0.5 * torch.randn(fmap.weight.shape, generator=gen, dtype=torch.float64))
    return fmap


@pytest.mark.parametrize("repeats", [2, 3])
def test_widened_maps_give_the_same_attention_output(repeats):
    gen = torch.Generator().manual_seed(1)
    B, N, H, D, F = 2, 37, 3, 8, 5
    q, k, v = (torch.randn(B, N, H, D, generator=gen, dtype=torch.float64) for _ in range(3))
    q_map, k_map = trained_like_hedgehog(H, D, F, 2), trained_like_hedgehog(H, D, F, 3)
    wide_q, wide_k = (widen_hedgehog(m, repeats * F) for m in (q_map, k_map))
    assert (wide_q.feature_dim, wide_q.output_dim(D)) == (repeats * F, 2 * repeats * F)
    narrow = linear_attention_reference(q, k, v, q_map, k_map, eps=0.0)
    wide = linear_attention_reference(q, k, v, wide_q, wide_k, eps=0.0)
    torch.testing.assert_close(wide, narrow, rtol=1e-12, atol=1e-12)
    # ...while the kernel itself is divided by the number of copies.
    phi = lambda m, x: m.apply(x, m.kernel_params())  # noqa: E731
    torch.testing.assert_close(phi(wide_q, q) @ phi(wide_k, k).transpose(-1, -2),
                               phi(q_map, q) @ phi(k_map, k).transpose(-1, -2) / repeats)


def test_noise_perturbs_only_the_copies_and_follows_the_seed():
    fmap = trained_like_hedgehog(2, 4, 3, 0)
    draw = lambda seed: widen_hedgehog(fmap, 9, noise=0.5,  # noqa: E731
                                       generator=torch.Generator().manual_seed(seed)).weight
    a, b, c = draw(7), draw(7), draw(8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    blocks = a.detach().reshape(2, 4, 3, 3)                   # (H, D, copy, F)
    assert torch.equal(blocks[:, :, 0], fmap.weight.detach())  # copy 0 exact
    for copy in (1, 2):
        delta = blocks[:, :, copy] - fmap.weight.detach()
        assert 0.05 < (delta.std() / fmap.weight.std()).item() < 2.0


@pytest.mark.parametrize("feature_dim, noise, error, message", [
    (7, 0.0, ValueError, "not a multiple of the map's width 3"),
    (0, 0.0, ValueError, "feature_dim: expected a positive int"),
    (6, -1.0, ValueError, "noise: expected a number >= 0"),
])
def test_bad_widen_arguments_are_named(feature_dim, noise, error, message):
    with pytest.raises(error, match=message):
        widen_hedgehog(Hedgehog(2, 4, feature_dim=3), feature_dim, noise=noise)


def converted_wan(seed: int = 0):
    torch.manual_seed(seed)
    model = perturbed(wan_model(), seed)
    dit.convert(model, layers="all", feature_map="hedgehog", mode="linear", backend="reference")
    randomize_linattn_(model, seed + 1)
    return model.eval()


def test_a_widened_model_computes_the_same_and_round_trips(tmp_path):
    model = converted_wan()
    inputs = wan_inputs(torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = run(model, inputs)
        assert widen_feature_maps(model, 64, noise=0.0) == 2
        after = run(model, inputs)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    for _, _, p in converted_layers(model):
        assert (p.q_map.feature_dim, p.k_map.feature_dim) == (64, 64)
        assert p.q_map.weight.requires_grad
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())["_linattn"]["layers"]
    assert {spec["q_map"]["feature_dim"] for spec in record.values()} == {64}
    loaded = dit.load_converted(tmp_path, backend="reference")
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, inputs), after, rtol=0, atol=0)


def test_a_model_without_hedgehog_maps_is_refused():
    with pytest.raises(ValueError, match="no linattn-converted layer"):
        widen_feature_maps(perturbed(wan_model(), 0), 64)
    model = perturbed(wan_model(), 0)
    dit.convert(model, layers="all", feature_map="relu", mode="linear", backend="reference")
    with pytest.raises(ValueError, match="only Hedgehog maps have a width"):
        widen_feature_maps(model, 64)
    model = converted_wan()
    with pytest.raises(ValueError, match="not a multiple of layer 'blocks.0.attn1'"):
        widen_feature_maps(model, 48)
    # nothing was changed by the refused call
    assert {p.q_map.feature_dim for _, _, p in converted_layers(model)} == {32}


def test_the_widen_command(tmp_path, capsys):
    source, out = tmp_path / "first", tmp_path / "wide"
    converted_wan().save_pretrained(source)
    assert cli_main(["widen", str(source), str(out), "--feature-dim", "64", "--seed", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["layers"], summary["feature_dim"], summary["noise"]) == (2, 64, 0.5)
    wide = dit.load_converted(out, backend="reference")
    assert {p.k_map.feature_dim for _, _, p in converted_layers(wide)} == {64}
    # an existing, non-empty out is refused rather than overwritten
    assert cli_main(["widen", str(source), str(out), "--feature-dim", "64"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert cli_main(["widen", str(source), str(tmp_path / "w2"), "--feature-dim", "50"]) == 2
    assert "not a multiple" in capsys.readouterr().err
