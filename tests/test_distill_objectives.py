"""DMD2's pieces against known answers: the distribution-matching gradient's sign on Gaussians
with exact scores (a step along −gradient lowers the reverse KL), DMD's normaliser (the push
shrinks with the score gap instead of staying at full size), the fake score tracking the
generator (its flow loss on generator samples falls), the K-step sampler, and the draws'
independence of how a batch is split."""
import math

import pytest
import torch

from linattn.train.distill import (backward_simulation, dmd_generator_loss, dmd_push,
                                   flow_matching_loss, few_step_sample, generator_times,
                                   noised, score_times)
from linattn.train.distill.schedule import ConditioningOrder, StepDraws
from linattn.train.flow import FlowModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- Gaussian toy

def gaussian_velocity(mean: torch.Tensor, std: torch.Tensor):
    """The exact rectified-flow velocity of x_0 ~ N(mean, diag(std²)): with
    x_t = (1 − t) x_0 + t ε, E[x_0 | x_t] = mean + (1 − t) std² (x_t − (1 − t) mean) / var_t,
    var_t = (1 − t)² std² + t², and u = (x_t − E[x_0 | x_t]) / t."""
    def u(x, t, cond):
        tt = t.double().reshape(-1, *([1] * (x.ndim - 1)))
        var = (1 - tt) ** 2 * std.double() ** 2 + tt ** 2
        x0 = mean + (1 - tt) * std.double() ** 2 * (x.double() - (1 - tt) * mean) / var
        return ((x.double() - x0) / tt)
    return u


def diffused_kl(mq, sq, mp, sp, t: float) -> float:
    """KL(q_t ‖ p_t) of diagonal Gaussians diffused to time t (t = 0: the data's KL)."""
    vq = (1 - t) ** 2 * sq ** 2 + t ** 2
    vp = (1 - t) ** 2 * sp ** 2 + t ** 2
    dm = (1 - t) * (mq - mp)
    return float((0.5 * torch.log(vp / vq) + (vq + dm ** 2) / (2 * vp) - 0.5).sum())


@pytest.mark.parametrize("case", range(12))
def test_step_along_minus_dmd_gradient_lowers_reverse_kl(case):
    gen = torch.Generator().manual_seed(case)
    d, batch = 16, 8192
    mp = torch.randn(d, generator=gen, dtype=torch.float64)
    sp = 0.3 + torch.rand(d, generator=gen, dtype=torch.float64)
    mean = (mp + torch.randn(d, generator=gen, dtype=torch.float64)).requires_grad_()
    log_std = (sp.log() + 0.5 * torch.randn(d, generator=gen,
                                            dtype=torch.float64)).requires_grad_()
    t_value = 0.1 + 0.8 * float(torch.rand((), generator=gen))
    t = torch.full((batch,), t_value, dtype=torch.float64)
    z = torch.randn(batch, d, generator=gen, dtype=torch.float64)
    noise = torch.randn(batch, d, generator=gen, dtype=torch.float64)
    cond = torch.zeros(batch, 1)

    x = mean + log_std.exp() * z                      # the generator's samples, with gradient
    real = gaussian_velocity(mp, sp)
    fake = gaussian_velocity(mean.detach(), log_std.detach().exp())  # a perfectly tracked fake
    loss, info = dmd_generator_loss(x, real, fake, cond, t=t, noise=noise)
    loss.backward()
    assert info["dmd_push"] > 0
    grads = torch.cat([mean.grad, log_std.grad])
    step = 0.02 / float(grads.norm())

    def kls(sign):
        m = mean.detach() - sign * step * mean.grad
        s = (log_std.detach() - sign * step * log_std.grad).exp()
        return (diffused_kl(m, s, mp, sp, t_value), diffused_kl(m, s, mp, sp, 0.0))

    before = kls(0.0)
    descent, ascent = kls(1.0), kls(-1.0)
    # Lower at the time the scores were compared and for the data themselves; the opposite
    # step raises both (the sign is what is checked, not a lucky tie).
    assert descent[0] < before[0] < ascent[0]
    assert descent[1] < before[1] < ascent[1]


def test_push_shrinks_with_the_score_gap():
    """DMD's normaliser is the real score's error in recovering the sample, which does not
    vanish as the fake score approaches the real one: the push is proportional to the gap
    (a self-normalised push, g / mean|g|, would stay at full size)."""
    gen = torch.Generator().manual_seed(0)
    x, noise, u_real, direction = (torch.randn(4, 3, 8, generator=gen, dtype=torch.float64)
                                   for _ in range(4))
    t = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64)
    x_t = noised(x, t, noise)
    big = dmd_push(x, x_t, t, u_real, u_real + 1e-1 * direction)
    small = dmd_push(x, x_t, t, u_real, u_real + 1e-3 * direction)
    torch.testing.assert_close(small * 100, big, rtol=1e-9, atol=1e-12)
    assert float(dmd_push(x, x_t, t, u_real, u_real).abs().max()) == 0.0
    # Sign: the push points from the real score's clean prediction to the fake one's, so
    # −g moves samples toward the real prediction: x̂_0 = x_t − t u, so g ∝ −t (u_fake − u_real).
    assert float((big * -direction).sum()) > 0


# ---------------------------------------------------------------- fake score tracking

TINY = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=16, in_channels=4,
            out_channels=4, text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
            rope_max_seq_len=16)


def tiny_wan(seed):
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**TINY)


def test_fake_score_flow_loss_on_generator_samples_falls():
    shape, batch = (4, 1, 4, 4), 4
    generator = FlowModel(tiny_wan(1).eval().requires_grad_(False))
    fake_module = tiny_wan(2).train()
    fake = FlowModel(fake_module)
    times = generator_times([1.0, 0.75, 0.5, 0.25], 3.0)
    gen = torch.Generator().manual_seed(0)
    cond = torch.randn(3, 3, 32, generator=gen)

    def generator_samples(n):
        rows = torch.randint(3, (n,), generator=gen)
        noise = torch.randn(n, *shape, generator=gen)
        exit_step = int(torch.randint(4, (1,), generator=gen))
        fresh = lambda k: torch.randn(n, *shape, generator=gen)  # noqa: E731
        with torch.no_grad():
            x = backward_simulation(generator, generator, noise, cond[rows], times, fresh,
                                    exit_step, grad=False)
        return x, cond[rows]

    held_x, held_c = generator_samples(16)
    held_t = score_times(torch.rand(16, generator=gen), shift=3.0)
    held_noise = torch.randn(16, *shape, generator=gen)

    def held_out_loss():
        with torch.no_grad():
            return float(flow_matching_loss(fake, held_x, held_c, t=held_t, noise=held_noise))

    before = held_out_loss()
    optimizer = torch.optim.Adam(fake_module.parameters(), lr=3e-3, betas=(0.0, 0.999))
    for _ in range(30):
        x, c = generator_samples(batch)
        t = score_times(torch.rand(batch, generator=gen), shift=3.0)
        loss = flow_matching_loss(fake, x, c, t=t, noise=torch.randn(batch, *shape,
                                                                     generator=gen))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = held_out_loss()
    # Measured 2026-12-02: 2.44 -> 1.97 after 40 steps at lr 2e-3; a fake score that did not
    # follow the generator's samples would not move a fixed held-out loss by 10%.
    assert after < 0.9 * before, (before, after)


# ---------------------------------------------------------------- sampler and draws

def test_few_step_sampler_predicts_and_renoises():
    """With a model whose velocity makes x̂_0 = 0.5 x_t, the sampler's steps are checkable by
    hand: x̂_0 at each step, re-noised with the given fresh noise to the next time."""
    class Halving(torch.nn.Module):
        def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
            t = (timestep / 1000).reshape(-1, 1, 1, 1, 1)
            return (0.5 * hidden_states / t,)           # x − t u = 0.5 x

    model = FlowModel(Halving(), input_dtype=torch.float32)
    times = [1.0, 0.6, 0.2]
    noise = torch.randn(2, 1, 1, 2, 2)
    fresh = {1: torch.randn(2, 1, 1, 2, 2), 2: torch.randn(2, 1, 1, 2, 2)}
    out = few_step_sample(model, noise, torch.zeros(2, 1, 4), times, fresh.__getitem__)
    x0 = 0.5 * noise
    x1 = 0.4 * x0 + 0.6 * fresh[1]
    x0 = 0.5 * x1
    x2 = 0.8 * x0 + 0.2 * fresh[2]
    torch.testing.assert_close(out, 0.5 * x2)
    torch.testing.assert_close(torch.tensor(generator_times([1.0, 0.75, 0.5, 0.25], 3.0)),
                               torch.tensor([1.0, 0.9, 0.75, 0.5]))
    with pytest.raises(ValueError, match="exit_step"):
        backward_simulation(model, model, noise, torch.zeros(2, 1, 4), times, None, 3)


def test_implied_step_rule_is_a_deterministic_euler_step():
    """Step rule "implied": the next input is x̂_0 noised with the noise its own input implies,
    (1 − t') x̂_0 + t' (x − (1 − t) x̂_0) / t, which is the Euler step x + (t' − t) u along
    the model's velocity; no step noise is drawn, so the sample is a function of the
    starting noise alone."""
    class Affine(torch.nn.Module):
        def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
            t = (timestep / 1000).reshape(-1, 1, 1, 1, 1)
            return ((hidden_states - (0.3 * hidden_states + 0.1)) / t,)   # x̂_0 = 0.3 x + 0.1

    model = FlowModel(Affine(), input_dtype=torch.float32)
    times = [1.0, 0.6, 0.2]
    noise = torch.randn(2, 1, 1, 2, 2)
    cond = torch.zeros(2, 1, 4)

    def no_draws(k):
        raise AssertionError("the implied rule drew step noise")

    out = few_step_sample(model, noise, cond, times, no_draws, step_rule="implied")
    x = noise
    for t, t_next in ((1.0, 0.6), (0.6, 0.2)):
        x0 = 0.3 * x + 0.1
        eps = (x - (1 - t) * x0) / t
        by_noise = (1 - t_next) * x0 + t_next * eps
        euler = x + (t_next - t) * (x - x0) / t
        torch.testing.assert_close(by_noise, euler)
        x = by_noise
    torch.testing.assert_close(out, 0.3 * x + 0.1)
    with pytest.raises(ValueError, match="step_rule: expected one of"):
        few_step_sample(model, noise, cond, times, step_rule="ddim")


def test_backward_simulation_gradient_only_through_the_exit_step():
    module = torch.nn.Module()
    module.scale = torch.nn.Parameter(torch.tensor(0.5))

    calls = []

    def forward(hidden_states, timestep, encoder_hidden_states, return_dict=False):
        calls.append(torch.is_grad_enabled())
        t = (timestep / 1000).reshape(-1, 1)
        return ((1 - module.scale) * hidden_states / t,)   # x̂_0 = scale · x

    module.forward = forward
    model = FlowModel(module, input_dtype=torch.float32)
    x = backward_simulation(model, model, torch.ones(1, 3), torch.zeros(1, 1, 1),
                            [1.0, 0.5], lambda k: torch.zeros(1, 3), exit_step=1)
    assert calls == [False, True]
    x.sum().backward()
    # x = scale · (0.5 · scale · 1): only the exit step's factor is differentiated.
    assert math.isclose(float(module.scale.grad), 3 * 0.5 * 0.5, rel_tol=1e-6)


def test_draws_do_not_depend_on_the_split():
    a = StepDraws(seed=3, step=5, update=1, device=torch.device("cpu"))
    whole = a.normal(16, [0, 1, 2, 3], (2, 3))
    torch.testing.assert_close(a.normal(16, [2, 3], (2, 3)), whole[2:], rtol=0, atol=0)
    assert not torch.equal(a.normal(17, [0], (2, 3)), whole[:1])
    assert not torch.equal(StepDraws(3, 6, 1, torch.device("cpu")).normal(16, [0], (2, 3)),
                           whole[:1])
    assert 0 <= a.exit_step(4) < 4
    order = ConditioningOrder(num_rows=5, global_batch_size=3, updates_per_step=2, seed=0)
    seen = [r for step in range(5) for u in range(2) for r in order.global_rows(step, u)]
    assert sorted(seen) == sorted(list(range(5)) * 6)   # every row equally often
