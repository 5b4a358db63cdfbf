"""ADM's sign and scale on a toy with known scores, and the velocity-MSE baseline.

Toy: data x_0 ~ N(μ, diag(s²)) in D dimensions. Under the rectified flow x_t = (1 − t) x_0 + t ε
the marginal is N((1 − t) μ, (1 − t)² s² + t²) and the velocity is analytic:

    u(x, t) = −μ + (t − (1 − t) s²) (x − (1 − t) μ) / ((1 − t)² s² + t²).

The teacher is (μ_p, s_p), the student (μ_q, s_q) with θ = (μ_q, log s_q) learnable, so
KL(q_t ‖ p_t) has a closed form and its derivative a finite-difference estimate.
"""
import math

import pytest
import torch

from linattn.train.objectives import (adm_loss, adm_objective, adm_weight,
                                      velocity_mse_objective)

DTYPE = torch.float64

# Tiny models: one intra-op thread (tests/conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gaussian_velocity(x, t, mu, s):
    t = _col(t, x)
    var = (1 - t) ** 2 * s ** 2 + t ** 2
    return -mu + (t - (1 - t) * s ** 2) * (x - (1 - t) * mu) / var


def _col(t, x):
    return t.reshape(-1, *([1] * (x.ndim - 1))) if torch.is_tensor(t) else t


def kl_marginals(t, mu_q, s_q, mu_p, s_p):
    """KL(q_t ‖ p_t), summed over dimensions."""
    m1, m2 = (1 - t) * mu_q, (1 - t) * mu_p
    v1, v2 = (1 - t) ** 2 * s_q ** 2 + t ** 2, (1 - t) ** 2 * s_p ** 2 + t ** 2
    return 0.5 * (torch.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1).sum()


def finite_difference(f, theta, h=1e-5):
    grad = torch.zeros_like(theta)
    for i in range(theta.numel()):
        e = torch.zeros_like(theta).view(-1)
        e[i] = h
        e = e.view_as(theta)
        grad.view(-1)[i] = (f(theta + e) - f(theta - e)) / (2 * h)
    return grad


@pytest.fixture
def toy():
    gen = torch.Generator().manual_seed(1234)
    D = 3
    mu_p = torch.randn(D, generator=gen, dtype=DTYPE)
    s_p = 0.4 + torch.rand(D, generator=gen, dtype=DTYPE)
    # Student: a different Gaussian, θ = (μ_q, log s_q) as a (2, D) leaf.
    theta = torch.stack([mu_p + 0.7 * torch.randn(D, generator=gen, dtype=DTYPE),
                         torch.log(s_p) + 0.5 * torch.randn(D, generator=gen, dtype=DTYPE)])
    return gen, mu_p, s_p, theta


def adm_gradient(theta, mu_p, s_p, t, n, gen, weighting):
    """∇θ of the ADM loss on x̂_t ~ q_t drawn differentiably (reparameterised)."""
    theta = theta.clone().requires_grad_(True)
    mu_q, s_q = theta[0], theta[1].exp()
    z = torch.randn(n, mu_q.numel(), generator=gen, dtype=DTYPE)
    eps = torch.randn(n, mu_q.numel(), generator=gen, dtype=DTYPE)
    x_hat = (1 - t) * (mu_q + s_q * z) + t * eps
    tt = torch.full((n,), t, dtype=DTYPE)
    u_teacher = gaussian_velocity(x_hat.detach(), tt, mu_p, s_p)
    u_student = gaussian_velocity(x_hat.detach(), tt, mu_q.detach(), s_q.detach())
    adm_loss(x_hat, u_teacher, u_student, tt, weighting=weighting).backward()
    return theta.grad


@pytest.mark.parametrize("t", [0.3, 0.7])
def test_adm_gradient_matches_finite_difference_of_kl(toy, t):
    gen, mu_p, s_p, theta = toy
    D = mu_p.numel()
    got = adm_gradient(theta, mu_p, s_p, t, 400_000, gen, weighting="clip")
    # The loss averages over the D elements of a sample: its gradient is ∇KL / D.
    want = finite_difference(lambda th: kl_marginals(t, th[0], th[1].exp(), mu_p, s_p), theta) / D
    assert want.abs().max() > 1e-2  # the toy is away from its optimum
    torch.testing.assert_close(got, want, rtol=0.03, atol=2e-3)


def test_step_along_adm_update_lowers_kl(toy):
    gen, mu_p, s_p, theta = toy
    t = 0.5
    kl = lambda th: float(kl_marginals(t, th[0], th[1].exp(), mu_p, s_p))  # noqa: E731
    grad = adm_gradient(theta, mu_p, s_p, t, 100_000, gen, weighting="clip")
    before = kl(theta)
    assert kl(theta - 0.1 * grad) < before       # descent lowers the reverse KL ...
    assert kl(theta + 0.1 * grad) > before       # ... and ascent raises it: the sign matters


@pytest.mark.parametrize("weighting", ["clip", "normalize"])
def test_full_adm_objective_step_lowers_kl(toy, weighting):
    """adm_objective as the trainer runs it: the student takes one Euler step, with gradient,
    from teacher trajectory points at t' to t; a few SGD steps along it lower KL(q_t ‖ p_t)."""
    gen, mu_p, s_p, theta = toy
    n, t_prev, t = 40_000, 0.6, 0.45
    kl = lambda th: float(kl_marginals(t, th[0], th[1].exp(), mu_p, s_p))  # noqa: E731
    theta = theta.clone().requires_grad_(True)

    def student(x, tt, cond):
        return gaussian_velocity(x, tt, theta[0], theta[1].exp())

    def teacher(x, tt, cond):
        return gaussian_velocity(x, tt, mu_p, s_p)

    start = kl(theta.detach())
    lr = 2.0 if weighting == "clip" else 0.5  # "normalize" makes g O(1) per sample
    for _ in range(5):
        x0 = mu_p + s_p * torch.randn(n, mu_p.numel(), generator=gen, dtype=DTYPE)
        x_prev = (1 - t_prev) * x0 + t_prev * torch.randn(n, mu_p.numel(), generator=gen,
                                                           dtype=DTYPE)
        batch = {"x_t": x_prev, "t": torch.full((n,), t_prev, dtype=DTYPE),
                 "t_next": torch.full((n,), t, dtype=DTYPE), "cond": None}
        loss, info = adm_objective(student, teacher, batch, weighting=weighting)
        (grad,) = torch.autograd.grad(loss, theta)
        with torch.no_grad():
            theta -= lr * grad
        assert info["velocity_gap"] > 0
    assert kl(theta.detach()) < 0.8 * start


def test_weight_is_finite_at_t_zero_and_exact_elsewhere():
    t = torch.tensor([0.0, 0.01, 0.05, 0.5, 1.0], dtype=DTYPE)
    w = adm_weight(t, t_min=0.05)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w, torch.tensor([20.0, 19.8, 19.0, 1.0, 0.0], dtype=DTYPE))


def test_clip_weighting_scales_gradient_by_weight():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, generator=gen, dtype=DTYPE, requires_grad=True)
    u_t, u_s = torch.randn(2, 2, 5, generator=gen, dtype=DTYPE)
    t = torch.tensor([0.25, 0.0], dtype=DTYPE)
    adm_loss(x, u_t, u_s, t, weighting="clip", t_min=0.1).backward()
    # d/dx̂ of 0.5 mean((x̂ − sg(x̂ − g))²) = g / numel, g = w(t) (u_teacher − u_student).
    w = torch.tensor([3.0, 10.0], dtype=DTYPE)[:, None]
    torch.testing.assert_close(x.grad, w * (u_t - u_s) / x.numel())


def test_normalize_weighting_is_per_sample_scale_free():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, generator=gen, dtype=DTYPE, requires_grad=True)
    u_t, u_s = torch.randn(2, 3, 4, 6, generator=gen, dtype=DTYPE)
    t = torch.tensor([0.0, 0.3, 0.9], dtype=DTYPE)
    adm_loss(x, u_t, u_s, t, weighting="normalize").backward()
    g1 = x.grad.clone()
    x.grad = None
    scale = torch.tensor([0.1, 7.0, 1e3], dtype=DTYPE)[:, None, None]
    adm_loss(x, u_t * scale, u_s * scale, t, weighting="normalize").backward()
    torch.testing.assert_close(x.grad, g1, rtol=1e-6, atol=0)  # eps = 1e-8 in the scale
    # Each sample's g has mean |g| = 1.
    per_sample = (g1 * x.numel()).abs().flatten(1).mean(1)
    torch.testing.assert_close(per_sample, torch.ones(3, dtype=DTYPE), rtol=1e-6, atol=0)


def test_adm_loss_rejects_bad_shapes_and_weighting():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="u_teacher"):
        adm_loss(x, torch.zeros(2, 4), x, torch.zeros(2))
    with pytest.raises(ValueError, match="t: expected shape"):
        adm_loss(x, x, x, torch.zeros(3))
    with pytest.raises(ValueError, match="weighting"):
        adm_loss(x, x, x, torch.zeros(2), weighting="bogus")


def test_velocity_mse_gradient():
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(4, generator=gen, dtype=DTYPE, requires_grad=True)
    batch = {"x_t": torch.randn(8, 4, generator=gen, dtype=DTYPE),
             "t": torch.rand(8, generator=gen, dtype=DTYPE),
             "velocity": torch.randn(8, 4, generator=gen, dtype=DTYPE), "cond": None}
    student = lambda x, t, c: x * theta  # noqa: E731
    loss, _ = velocity_mse_objective(student, batch)
    loss.backward()
    want = 2 * ((batch["x_t"] * theta - batch["velocity"]) * batch["x_t"]).mean(0) / 4
    torch.testing.assert_close(theta.grad, want.detach())
    residual = batch["x_t"] * theta.detach() - batch["velocity"]
    assert math.isclose(float(loss.detach()), float(residual.square().mean()), rel_tol=1e-12)
