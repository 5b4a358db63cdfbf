"""linattn.dit.local_mixing: the depthwise convolution of V over the token grid added to the
linear branch (convert(local_mixing=...)), against a float64 reference, through conversion,
save/load, finalize, revert, map fitting and the trainer."""
from __future__ import annotations

import copy

import pytest
import torch

import linattn.dit as dit
from linattn.dit import transfer
from linattn.dit.local_mixing import LocalMixing, kernel_size
from linattn.dit.map_fitting import map_parameters
from linattn.dit.processor import converted_layers
from linattn.train import train
from linattn.train.metrics import read_metrics
from test_dit_families import (ltx_inputs, ltx_model, mochi_model, perturbed, run,
                               wan_inputs, wan_model)
from test_train_trainer import config, root  # noqa: F401  (root: the module's tiny-run fixture)

pytestmark = [pytest.mark.filterwarnings(
    "ignore:linattn. backend='auto' uses the slow float64 reference:RuntimeWarning"),
    pytest.mark.usefixtures("one_torch_thread")]


def depthwise_reference(v: torch.Tensor, weight: torch.Tensor, grid) -> torch.Tensor:
    """out[b, (f, y, x), c] = Σ over the kernel's offsets of w[c, df, dy, dx] · v at the
    neighbouring token, zero outside the grid; (B, N, H, D) in and out, float64, one offset at
    a time so that the token order (frame-major) is spelled out."""
    B, N, H, D = v.shape
    F_, Y, X = grid
    kt, kh, kw = weight.shape[2:]
    x = v.double().reshape(B, F_, Y, X, H * D)
    w = weight.double()[:, 0]                                        # (C, kt, kh, kw)
    out = torch.zeros_like(x)
    for df in range(kt):
        for dy in range(kh):
            for dx in range(kw):
                sf, sy, sx = df - kt // 2, dy - kh // 2, dx - kw // 2
                shifted = torch.zeros_like(x)
                # shifted[f, y, x] = x[f + sf, y + sy, x + sx] where that lies inside the grid
                src = x[:, max(sf, 0):F_ + min(sf, 0), max(sy, 0):Y + min(sy, 0),
                        max(sx, 0):X + min(sx, 0)]
                shifted[:, max(-sf, 0):F_ + min(-sf, 0), max(-sy, 0):Y + min(-sy, 0),
                        max(-sx, 0):X + min(-sx, 0)] = src
                out += shifted * w[:, df, dy, dx]
    return out.reshape(B, N, H, D)


@pytest.mark.parametrize("kernel, grid, layout", [
    (3, (3, 4, 5), "bnhd"), ((1, 3, 5), (2, 5, 3), "bhnd"), ((5, 1, 3), (4, 3, 3), "bnhd")])
def test_mixing_matches_the_float64_reference(kernel, grid, layout):
    gen = torch.Generator().manual_seed(3)
    B, H, D = 2, 3, 4
    N = grid[0] * grid[1] * grid[2]
    mixing = LocalMixing(H * D, kernel)
    assert torch.count_nonzero(mixing.weight) == 0  # zero-initialised: adds nothing at first
    with torch.no_grad():
        mixing.weight.normal_(generator=gen)
    # A non-contiguous v: every other head of a wider tensor.
    wide = torch.randn(B, N, 2 * H, D, generator=gen)
    v = wide[:, :, ::2]
    given = v if layout == "bnhd" else v.transpose(1, 2)
    out = torch.full_like(given, float("nan"))
    out.copy_(mixing(given, layout, grid))
    out = out if layout == "bnhd" else out.transpose(1, 2)
    expected = depthwise_reference(v, mixing.weight.detach(), grid)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value, error, message", [
    (2, ValueError, "odd int"), ((3, 3), ValueError, "three of them"), (True, TypeError, "odd int"),
    ("3", ValueError, "odd int"), (0, ValueError, "odd int")])
def test_kernel_size_errors(value, error, message):
    with pytest.raises(error, match=message):
        kernel_size(value)


def test_mixing_errors_name_the_mismatch():
    mixing = LocalMixing(8, 3)
    v = torch.randn(1, 12, 2, 4)
    with pytest.raises(ValueError, match=r"token grid 2 × 2 × 2 = 8 tokens .* 12 tokens"):
        mixing(v, "bnhd", (2, 2, 2))
    with pytest.raises(ValueError, match="built for 8 channels"):
        mixing(torch.randn(1, 12, 3, 4), "bnhd", (1, 3, 4))
    with pytest.raises(ValueError, match="layout"):
        mixing(v, "nbhd", (1, 3, 4))


def wan_pair(seed=4):
    """A perturbed tiny Wan and its inputs (3 × 2 × 3 tokens after its (1, 2, 2) patches)."""
    model = perturbed(wan_model(), seed)
    return model, wan_inputs(torch.Generator().manual_seed(seed))


def test_wan_token_grid_is_the_patch_embeddings_grid():
    model, inputs = wan_pair()
    grid = dit.convert(model, local_mixing=3).blocks[0].attn1.processor.selector.token_grid(
        model, (), inputs)
    assert grid == tuple(model.patch_embedding(inputs["hidden_states"]).shape[2:]) == (3, 2, 3)


def test_zero_initialised_mixing_leaves_the_conversion_unchanged_and_then_trains():
    model, inputs = wan_pair()
    plain = dit.convert(copy.deepcopy(model), layers=[1])
    mixed = dit.convert(copy.deepcopy(model), layers=[1], local_mixing=(1, 3, 3))
    assert torch.equal(run(mixed, inputs), run(plain, inputs))
    # Gradients reach the convolution's weight through the model.
    out = mixed(**inputs, return_dict=False)[0]
    out.square().mean().backward()
    weight = mixed.blocks[1].attn1.processor.local_mixing.weight
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    with torch.no_grad():
        weight.normal_(std=0.1)
    assert not torch.allclose(run(mixed, inputs), run(plain, inputs))
    # Map fitting fits the convolution with the maps: it is part of the linear branch.
    assert any(p is weight for p in map_parameters(mixed))


def test_mixing_is_added_to_the_linear_branch_at_the_layer():
    """The layer's output with mixing = with the same maps and no mixing, plus to_out's linear
    map of the reference convolution of the layer's v."""
    model, inputs = wan_pair()
    mixed = dit.convert(copy.deepcopy(model), layers=[0], local_mixing=3)
    processor = mixed.blocks[0].attn1.processor
    with torch.no_grad():
        processor.local_mixing.weight.normal_(std=0.2, generator=torch.Generator().manual_seed(5))
    captured = {}
    attn = mixed.blocks[0].attn1
    hook = attn.register_forward_hook(
        lambda m, args, kwargs, out: captured.update(x=kwargs.get("hidden_states", args[0] if args
                                                                  else None), out=out),
        with_kwargs=True)
    run(mixed, inputs)
    hook.remove()
    x, with_mixing = captured["x"], captured["out"]
    v = attn.to_v(x).unflatten(2, (attn.heads, -1))
    conv = depthwise_reference(v, processor.local_mixing.weight.detach(), (3, 2, 3)).float()
    # The same layer without mixing: the processor's other parts, mixing removed.
    saved = processor.local_mixing
    processor.local_mixing = None
    with torch.no_grad():
        without = attn(x, None, None, rotary_emb=mixed.rope(inputs["hidden_states"]))
    processor.local_mixing = saved
    added = conv.flatten(2) @ attn.to_out[0].weight.T
    torch.testing.assert_close(with_mixing, without + added, rtol=1e-4, atol=1e-4)


def test_save_load_finalize_revert_and_copies_keep_the_mixing(tmp_path):
    model, inputs = wan_pair()
    hybrid = dit.convert(copy.deepcopy(model), mode="hybrid", local_mixing=3)
    for _, _, p in converted_layers(hybrid):
        with torch.no_grad():
            p.local_mixing.weight.normal_(std=0.1)
    assert torch.equal(run(hybrid, inputs), run(model, inputs))  # r = 1: the original exactly
    for gate in transfer.gates(hybrid):
        with torch.no_grad():
            gate.fill_(0.0)
    expected = run(hybrid, inputs)
    assert transfer.finalize(hybrid) == {"blocks.0.attn1": "linear", "blocks.1.attn1": "linear"}
    assert all(p.local_mixing is not None for _, _, p in converted_layers(hybrid))
    torch.testing.assert_close(run(hybrid, inputs), expected, rtol=0, atol=0)
    assert torch.equal(run(copy.deepcopy(hybrid), inputs), expected)
    hybrid.save_pretrained(tmp_path)
    loaded = dit.load_converted(tmp_path)
    record = loaded.config["_linattn"]["layers"]["blocks.0.attn1"]
    assert record["local_mixing"] == {"kernel": [3, 3, 3]}
    row = dit.layer_report(loaded)[0]
    assert row.feature_map.endswith("+ local mixing 3x3x3")
    # Two Hedgehog maps of 2 heads x 32 x 32 and one 3x3x3 filter per channel of 2 x 32.
    assert row.params == 2 * (2 * 32 * 32) + (2 * 32) * 27
    assert torch.equal(run(loaded, inputs), expected)
    dit.revert(loaded)
    assert not loaded._forward_pre_hooks
    assert torch.equal(run(loaded, inputs), run(model, inputs))


def test_ltx_token_grid_is_its_rope_grid():
    model = perturbed(ltx_model(), 6)
    inputs = ltx_inputs(torch.Generator().manual_seed(6))
    plain = dit.convert(copy.deepcopy(model))
    mixed = dit.convert(copy.deepcopy(model), local_mixing=3)
    assert torch.equal(run(mixed, inputs), run(plain, inputs))
    selector = mixed.transformer_blocks[0].attn1.processor.selector
    assert selector.token_grid(mixed, (), inputs) == (2, 4, 4)
    positional = [inputs[k] for k in ("hidden_states", "encoder_hidden_states", "timestep",
                                      "encoder_attention_mask", "num_frames", "height", "width")]
    assert selector.token_grid(mixed, tuple(positional), {}) == (2, 4, 4)
    with torch.no_grad():
        for _, _, p in converted_layers(mixed):
            p.local_mixing.weight.normal_(std=0.1)
    assert not torch.allclose(run(mixed, inputs), run(plain, inputs))
    with pytest.raises(ValueError, match="video_coords"):
        selector.token_grid(mixed, (), dict(inputs, video_coords=torch.zeros(2, 3, 32)))


def test_conversion_refuses_what_it_cannot_mix():
    with pytest.raises(ValueError, match="local_mixing: selector 'mochi' does not give"):
        dit.convert(mochi_model(), local_mixing=3)
    with pytest.raises(ValueError, match="odd int"):
        dit.convert(wan_model(), local_mixing=4)
    model, inputs = wan_pair()
    dit.convert(model, layers=[0], local_mixing=3)
    attn = model.blocks[0].attn1
    x = torch.randn(2, 18, attn.inner_dim)
    with pytest.raises(RuntimeError, match="no token grid"):
        attn(x, None, None, rotary_emb=None)


def test_trainer_trains_the_mixing_and_resumes_bit_exact(root):  # noqa: F811
    cfg = config(root, "mixing", map_fit_steps=2, map_fit_lr=3e-2)
    cfg["convert"]["options"]["local_mixing"] = [1, 3, 3]
    result = train(cfg, progress=False)
    weights = [p.local_mixing.weight for _, _, p in converted_layers(result.model)]
    assert weights and all(torch.count_nonzero(w) > 0 for w in weights)
    stopped = copy.deepcopy(cfg)
    stopped["output"]["dir"] = f"{root}/mixing_resumed"
    train(stopped, stop_at_step=3, progress=False)
    resumed = train(stopped, progress=False)
    for a, b in zip(weights, [p.local_mixing.weight for _, _, p in
                              converted_layers(resumed.model)]):
        assert torch.equal(a, b)
    assert len(read_metrics(resumed.metrics_path)) == len(read_metrics(result.metrics_path))
