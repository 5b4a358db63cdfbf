"""DMD2's GAN head on the fake score (linattn.train.distill.gan): it reads the chosen block's
hidden states only inside a capture and leaves the model's output alone, gradient checkpointing
gives it the same gradients, a few discriminator steps separate real from fake and the
generator's gradient moves a fake sample toward "real"; in the stage it is trained, logged and
resumed bit-exact, and its settings' errors name the field."""
import math
import os

import pytest
import torch
from diffusers import WanTransformer3DModel

from linattn.train.distill import distill
from linattn.train.distill.gan import (DiscriminatorHead, FeatureDiscriminator, discriminator_loss,
                                       generator_gan_loss)
from linattn.train.flow import FlowModel
from linattn.train.metrics import read_metrics

from checkpoints import checkpoint_state, flat, without_timing
from test_distill_regression import config, pairs_dir  # noqa: F401 (a fixture)
from test_distill_stage import TINY

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GAN = dict(gan_weight=0.1, gan_discriminator_weight=1.0, gan_head_lr=3e-3, gan_t_max=0.5,
           gan_shift=1.0, fake_score_updates=2)


def tiny_model(seed=1):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**TINY)


def inputs(seed=0, batch=2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 1, 4, 4, generator=gen)
    t = torch.rand(batch, generator=gen)
    cond = torch.randn(batch, 3, 32, generator=gen)
    return x, t, cond


def test_head_reads_the_block_only_inside_a_capture_and_leaves_the_output_alone():
    model = tiny_model()
    x, t, cond = inputs()
    flow = FlowModel(model, input_dtype=torch.float32)
    with torch.no_grad():
        before = flow(x, t, cond)
    blocks = []
    model.blocks[1].register_forward_hook(lambda m, a, out: blocks.append(out))
    disc = FeatureDiscriminator(model)            # null block: the middle of 2 is block 1
    assert disc.block_index == 1
    with torch.no_grad():
        outside = flow(x, t, cond)
        with disc.capture() as logits:
            inside = flow(x, t, cond)
    torch.testing.assert_close(outside, before, rtol=0, atol=0)
    torch.testing.assert_close(inside, before, rtol=0, atol=0)
    assert len(logits) == 1 and logits[0].shape == (2, 4)       # 1 x 2 x 2 patches = 4 tokens
    # The head at the start is exactly neutral, and it is a function of block 1's output.
    assert torch.equal(logits[0], torch.zeros(2, 4))
    torch.nn.init.normal_(disc.head.out.weight)
    with torch.no_grad(), disc.capture() as logits:
        flow(x, t, cond)
    torch.testing.assert_close(logits[0], disc.head(blocks[-1]))
    with pytest.raises(ValueError, match="distill.gan_block"):
        FeatureDiscriminator(tiny_model(), block=2)


def test_gradient_checkpointing_gives_the_head_and_the_model_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_model()
        disc = FeatureDiscriminator(model, block=0)
        torch.nn.init.normal_(disc.head.out.weight, generator=torch.Generator().manual_seed(2))
        if checkpointing:
            model.enable_gradient_checkpointing()
        x, t, cond = inputs()
        with disc.capture() as logits:
            FlowModel(model, input_dtype=torch.float32)(x, t, cond)
        generator_gan_loss(logits[0]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any(n.startswith("gan_head.") for n in grads[0])
    assert any(n.startswith("blocks.0.") for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_discriminator_learns_and_the_generator_gradient_points_to_real():
    """A few Adam steps on L_D separate structured "real" latents from noise; one step of the
    fake samples along −∂L_G_gan/∂x then raises their logits (the generator's sign)."""
    model = tiny_model()
    disc = FeatureDiscriminator(model)
    flow = FlowModel(model, input_dtype=torch.float32)
    x, t, cond = inputs(batch=4)
    real = torch.linspace(-2, 2, 16).view(1, 1, 1, 4, 4).expand(4, 4, 1, 4, 4).contiguous()
    fake = x
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        with disc.capture() as logits:
            flow(torch.cat([real, fake]), torch.cat([t, t]), torch.cat([cond, cond]))
        loss = discriminator_loss(logits[0][:4], logits[0][4:])
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[0] == pytest.approx(2 * math.log(2), abs=1e-6)   # logit 0: log 4
    assert losses[-1] < 0.5 * losses[0]

    def fake_logit(samples):
        with disc.capture() as logits:
            flow(samples, t, cond)
        return logits[0]

    leaf = fake.clone().requires_grad_(True)
    loss = generator_gan_loss(fake_logit(leaf))
    grad, = torch.autograd.grad(loss, leaf)
    with torch.no_grad():
        before = float(fake_logit(fake).mean())
        after = float(fake_logit(fake - 0.05 * grad / grad.abs().max()).mean())
    assert after > before


def test_head_starts_neutral_and_its_losses_are_the_logistic_ones():
    head = DiscriminatorHead(8)
    assert torch.equal(head(torch.randn(2, 3, 8)), torch.zeros(2, 3))
    real, fake = torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5, 3.0]])
    expected = (torch.log1p(torch.exp(-real)).mean() + torch.log1p(torch.exp(fake)).mean())
    torch.testing.assert_close(discriminator_loss(real, fake), expected)
    torch.testing.assert_close(generator_gan_loss(fake), torch.log1p(torch.exp(-fake)).mean())


def test_stage_trains_the_head_logs_it_and_resumes_bit_exact(tmp_path, pairs_dir):  # noqa: F811
    root = str(tmp_path)
    full = distill(config(root, "full", pairs_dir, **GAN), progress=False)
    records = read_metrics(full.metrics_path)
    for key in ("gan_discriminator_loss", "gan_generator_loss", "gan_real_logit",
                "gan_fake_logit"):
        assert all(math.isfinite(r[key]) for r in records[1:]), key
    assert all(r["gan_head_lr"] == 3e-3 and r["fake_score_lr"] == 1e-3 for r in records[1:])
    # By the first generator update the head has taken two steps (its zero start would give
    # exactly log 2).
    assert records[1]["gan_generator_loss"] != pytest.approx(math.log(2), abs=1e-9)
    state = flat(checkpoint_state(os.path.join(root, "full"), 4))
    head = [k for k in state if ".gan_head." in k and k.endswith("out.weight")]
    assert head and all(state[k].abs().max() > 0 for k in head)   # trained off its zero start
    stopped = distill(config(root, "resumed", pairs_dir, **GAN), stop_at_step=3, progress=False)
    assert stopped.step == 3
    resumed = distill(config(root, "resumed", pairs_dir, **GAN), progress=False)
    assert resumed.step == 4
    other = flat(checkpoint_state(os.path.join(root, "resumed"), 4))
    assert other.keys() == state.keys()
    for key in state:
        assert torch.equal(state[key], other[key]), key
    assert without_timing(read_metrics(resumed.metrics_path)) == without_timing(records)


def test_the_gan_term_moves_the_generator(tmp_path, pairs_dir):  # noqa: F811
    """Everything else equal, a GAN weight changes the generator (the gradient reaches it)."""
    root = str(tmp_path)
    kw = dict(GAN, dmd_weight=1.0)
    with_gan = distill(config(root, "gan", pairs_dir, **kw), progress=False)
    kw["gan_weight"] = 1e-9 * GAN["gan_weight"]
    tiny = distill(config(root, "tiny", pairs_dir, **kw), progress=False)
    a = with_gan.model.state_dict()
    b = tiny.model.state_dict()
    assert any(not torch.allclose(a[n], b[n], rtol=0, atol=1e-7) for n in a)


@pytest.mark.parametrize("override, message", [
    (dict(gan_weight=0.1, regression_data=None, regression_weight=0.0), "distill.gan_data"),
    (dict(gan_weight=0.0, gan_block=1), "distill.gan_weight"),
    (dict(gan_weight=-1.0), "distill.gan_weight"),
    (dict(gan_weight=0.1, gan_discriminator_weight=0.0), "distill.gan_discriminator_weight"),
    (dict(gan_weight=0.1, gan_block="middle"), "distill.gan_block"),
    (dict(gan_weight=0.1, gan_block=5), "distill.gan_block"),
    (dict(gan_weight=0.1, gan_head_lr=0.0), "distill.gan_head_lr"),
    (dict(gan_weight=0.0, gan_head_lr=1e-3), "distill.gan_weight"),
    (dict(gan_weight=0.1, gan_t_max=0.01), "distill.gan_t_max"),
    (dict(gan_weight=0.1, gan_shift=0.0), "distill.gan_shift"),
])
def test_gan_settings_errors_name_the_field(tmp_path, pairs_dir, override, message):  # noqa: F811
    with pytest.raises(ValueError, match=message):
        distill(config(str(tmp_path), "bad", pairs_dir, **override), progress=False)


def assert_mostly_close(state, reference, tolerance=5e-3, share=0.99):
    """Every tensor within tolerance · max |tensor| of the reference in at least ``share`` of
    its elements. The processes sum gradients in another order, and Adam (β₁ = 0 here) turns
    the rounding of a near-zero gradient into a full lr-sized step of either sign in that one
    element; a process that trained on its own half of the batch, or a head left
    unsynchronised, moves every element."""
    a, b = flat(state), flat(reference)
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key].double(), b[key].double()
        scale = float(y.abs().max()) or 1.0
        close = float(((x - y).abs() <= tolerance * scale).double().mean())
        assert close >= share, (key, close)


GAN_WORKER = """
import json, sys
import torch.distributed as dist
from linattn.train.distill import distill

dist.init_process_group("gloo")
for path in sys.argv[1:]:
    distill(json.load(open(path)), progress=False)
dist.destroy_process_group()
"""


def test_ddp_and_fsdp2_with_the_head_match_one_process(tmp_path, pairs_dir):  # noqa: F811
    """The head is part of the fake score: DDP synchronises it, FSDP2 shards it, and the
    generator's GAN gradient (through the sharded fake score, to its input only) is the one
    process's."""
    import json
    import textwrap

    from test_distill_distributed import final_state
    from test_train_distributed import torchrun

    root = str(tmp_path)
    distill(config(root, "single", pairs_dir, **GAN), progress=False)
    paths = []
    for strategy in ("ddp", "fsdp"):
        paths.append(str(tmp_path / f"{strategy}.json"))
        with open(paths[-1], "w") as f:
            json.dump(config(root, strategy, pairs_dir, strategy=strategy, **GAN), f)
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(GAN_WORKER))
    torchrun([str(script), *paths], timeout=900)
    reference = final_state(os.path.join(root, "single"))
    assert any(".gan_head." in k for k in flat(reference))
    for strategy in ("ddp", "fsdp"):
        assert_mostly_close(final_state(os.path.join(root, strategy)), reference)
        records = read_metrics(os.path.join(root, strategy, "metrics.jsonl"))
        assert all(math.isfinite(r["gan_discriminator_loss"]) for r in records[1:])
