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

from linattn.train.objectives import (adm_loss, adm_objective, adm_push, adm_weight, diffuse,
                                      fake_score_loss, velocity_mse_objective)

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


@pytest.mark.parametrize("weighting", ["dmd", "clip", "normalize"])
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
    lr = 2.0 if weighting == "clip" else 0.5  # "dmd" and "normalize" make g O(|u_T − u_S|)
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


def test_dmd_push_is_the_clean_prediction_difference_over_a_non_vanishing_normaliser():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, generator=gen, dtype=DTYPE)
    u_t, u_s = torch.randn(2, 3, 4, 6, generator=gen, dtype=DTYPE)
    t = torch.tensor([0.0, 0.3, 0.9], dtype=DTYPE)
    g = adm_push(u_t, u_s, t, weighting="dmd")
    x0_real, x0_fake = x - t[:, None, None] * u_t, x - t[:, None, None] * u_s
    norm = (x - x0_real).abs().flatten(1).mean(1)[:, None, None]
    torch.testing.assert_close(g[1:], ((x0_fake - x0_real) / norm)[1:])
    assert torch.equal(g[0], torch.zeros_like(g[0]))  # t = 0: both predictions are x itself
    # As the student nears the teacher the push shrinks with its error (the normaliser does
    # not); "normalize" keeps full size whatever the error.
    for scale in (1e-1, 1e-3):
        near = u_t + scale * (u_s - u_t)
        torch.testing.assert_close(adm_push(u_t, near, t, weighting="dmd"), scale * g)
        per_sample = adm_push(u_t, near, t, weighting="normalize").abs().flatten(1).mean(1)
        torch.testing.assert_close(per_sample, torch.ones(3, dtype=DTYPE), rtol=1e-4, atol=0)


def test_logged_push_falls_as_the_student_nears_the_teacher(toy):
    """adm_objective's adm_push (= 2 x the surrogate's value) and velocity_error fall with the
    student's distance to the teacher under "dmd"; under "normalize" the push does not."""
    gen, mu_p, s_p, _ = toy
    n, t_prev, t = 2000, 0.6, 0.45
    x0 = mu_p + s_p * torch.randn(n, mu_p.numel(), generator=gen, dtype=DTYPE)
    x_prev = (1 - t_prev) * x0 + t_prev * torch.randn(n, mu_p.numel(), generator=gen,
                                                       dtype=DTYPE)
    tt = torch.full((n,), t_prev, dtype=DTYPE)
    batch = {"x_t": x_prev, "t": tt, "t_next": torch.full((n,), t, dtype=DTYPE), "cond": None,
             "velocity": gaussian_velocity(x_prev, tt, mu_p, s_p)}

    def teacher(x, tt, cond):
        return gaussian_velocity(x, tt, mu_p, s_p)

    logged = {"dmd": [], "normalize": []}
    for offset in (0.3, 0.03, 0.003):
        def student(x, tt, cond):
            return gaussian_velocity(x, tt, mu_p + offset, s_p * (1 + offset))

        for weighting in logged:
            loss, info = adm_objective(student, teacher, batch, weighting=weighting)
            assert info["adm_push"] == pytest.approx(2 * float(loss))
            logged[weighting].append((info["adm_push"], info["velocity_error"]))
    pushes = [p for p, _ in logged["dmd"]]
    errors = [e for _, e in logged["dmd"]]
    assert pushes[1] < 0.02 * pushes[0] and pushes[2] < 0.02 * pushes[1]  # ~ error squared
    assert errors[1] < 0.02 * errors[0] and errors[2] < 0.02 * errors[1]
    assert min(p for p, _ in logged["normalize"]) > 0.5  # full-size pushes at any distance


def test_velocity_anchor_adds_its_gradient(toy):
    gen, mu_p, s_p, theta = toy
    n = 64
    x = torch.randn(n, mu_p.numel(), generator=gen, dtype=DTYPE)
    tt = torch.full((n,), 0.6, dtype=DTYPE)
    batch = {"x_t": x, "t": tt, "t_next": torch.full((n,), 0.45, dtype=DTYPE), "cond": None,
             "velocity": gaussian_velocity(x, tt, mu_p, s_p)}
    theta = theta.clone().requires_grad_(True)

    def student(x, t, cond):
        return gaussian_velocity(x, t, theta[0], theta[1].exp())

    def teacher(x, t, cond):
        return gaussian_velocity(x, t, mu_p, s_p)

    def grad(**kw):
        loss, info = adm_objective(student, teacher, batch, **kw)
        return torch.autograd.grad(loss, theta)[0], info

    plain, info = grad()
    anchored, _ = grad(velocity_weight=0.5)
    mse, _ = velocity_mse_objective(student, batch)
    assert info["velocity_error"] == pytest.approx(float(mse))
    torch.testing.assert_close(anchored - plain, 0.5 * torch.autograd.grad(mse, theta)[0])
    with pytest.raises(ValueError, match="velocity_weight > 0 needs"):
        adm_objective(student, teacher, {k: v for k, v in batch.items() if k != "velocity"},
                      velocity_weight=0.5)


def test_guided_objectives_train_both_branches():
    """With guidance the ADM step and scores use the guided velocity u_u + w (u_c − u_u), and
    the velocity terms pin each branch to the teacher's."""
    gen = torch.Generator().manual_seed(3)
    B, D, w = 6, 5, 4.0
    cond, negative = torch.randn(2, B, 1, generator=gen, dtype=DTYPE)
    weights = torch.randn(2, D, generator=gen, dtype=DTYPE)
    theta = torch.zeros(2, D, dtype=DTYPE, requires_grad=True)

    def model(params):
        # velocity = x * (params[0] + c * params[1]) with c the (scalar) conditioning
        return lambda x, t, c: x * (params[0] + c.reshape(-1, 1) * params[1])

    teacher, student = model(weights), model(weights + theta)
    x = torch.randn(B, D, generator=gen, dtype=DTYPE)
    t = torch.full((B,), 0.7, dtype=DTYPE)
    batch = {"x_t": x, "t": t, "t_next": torch.full((B,), 0.5, dtype=DTYPE), "cond": cond,
             "negative_cond": negative, "velocity": teacher(x, t, cond),
             "velocity_uncond": teacher(x, t, negative)}
    with torch.no_grad():
        theta[1].fill_(0.3)  # the student errs in the conditional dependence only
    loss, info = velocity_mse_objective(student, batch, guidance_scale=w)
    e_c = (student(x, t, cond) - batch["velocity"]).square().mean()
    e_u = (student(x, t, negative) - batch["velocity_uncond"]).square().mean()
    assert float(loss) == pytest.approx(0.5 * float(e_c + e_u))

    # ADM: x̂ is a step of the guided velocity, and g compares guided velocities at x̂.
    loss, info = adm_objective(student, teacher, batch, weighting="clip", guidance_scale=w)
    guided = lambda f, x, tt: f(x, tt, negative) + w * (f(x, tt, cond) - f(x, tt, negative))  # noqa: E731
    x_hat = x + (0.5 - 0.7) * guided(student, x, t)
    t_next = batch["t_next"]
    gap = guided(teacher, x_hat, t_next) - guided(student, x_hat, t_next)
    assert info["velocity_gap"] == pytest.approx(float(gap.square().mean()))
    with pytest.raises(ValueError, match="velocity_uncond"):
        adm_objective(student, teacher, {k: v for k, v in batch.items()
                                         if k != "velocity_uncond"}, guidance_scale=w)


def test_fake_score_loss_is_minimised_by_the_marginal_velocity(toy):
    """Diffusing samples of q_t = N((1 − t) μ, (1 − t)² s² + t²) forward to s gives q's own
    rectified-flow marginal at s, so the fake-score loss is lower for q's analytic velocity than
    for a wrong Gaussian's, and its gradient at q's velocity is ~0."""
    gen, mu_p, s_p, _ = toy
    n, t = 200_000, 0.3
    D = mu_p.numel()
    x_t = (1 - t) * (mu_p + s_p * torch.randn(n, D, generator=gen, dtype=DTYPE)) \
        + t * torch.randn(n, D, generator=gen, dtype=DTYPE)
    tt = torch.full((n,), t, dtype=DTYPE)
    # diffuse() keeps the rectified-flow marginal: variance (1 − s)² s_p² + s².
    s_vec = torch.full((n,), 0.8, dtype=DTYPE)
    x_s, _ = diffuse(x_t, tt, s_vec, torch.randn(n, D, generator=gen, dtype=DTYPE))
    torch.testing.assert_close(x_s.var(0), 0.04 * s_p ** 2 + 0.64, rtol=0.02, atol=0)

    shift = torch.zeros(D, dtype=DTYPE, requires_grad=True)

    def fake(mu):
        return lambda x, s, c: gaussian_velocity(x, s, mu + shift, s_p)

    gen_state = torch.Generator().manual_seed(9)
    right = fake_score_loss(fake(mu_p), x_t, tt, None, generator=gen_state)
    (grad,) = torch.autograd.grad(right, shift)
    gen_state = torch.Generator().manual_seed(9)
    wrong = fake_score_loss(fake(mu_p + 0.5), x_t, tt, None, generator=gen_state)
    assert float(wrong) > float(right) + 0.01
    assert grad.abs().max() < 3e-3
