"""How close a backend must come to the float64 reference, per input dtype.

Criterion (fla's relative RMS plus a max-error guard): with err = actual − reference,
    rms(err) / rms(reference) <= RMS_TOL[dtype]   and   max|err| <= MAX_TOL[dtype] · max|reference|.
The RMS bound checks the bulk; the max bound catches a few wrong rows that the RMS would average
away (one wrong row of 4096 moves the RMS by only ~1.6%).

Why these numbers:
* float64: kernels accumulate in float64; only reduction order differs (~1e-15).
* float32: S and z are sums of up to 1e5 products in fp32 (unit roundoff 6e-8); with random-walk
  growth the relative error stays below ~1e-5. 1e-4 leaves room for reordered reductions (split
  sequences) and still fails on any real bug, whose errors are O(1).
* bfloat16: inputs are exact, but the output is rounded to bf16 (relative 2^-9 ≈ 2e-3 per element)
  and tensor-core kernels round φ(q), φ(k) and S operands to bf16 too: a few 1e-3 in RMS. 1e-2 in
  RMS, 4e-2 of the largest value in max error.
* float16: 3 more mantissa bits than bf16, so 8x tighter: 2.5e-3 and 1e-2.

Some quantities are ill-conditioned in any precision below float64: with a single key, for
example, dq is an eps-sized difference of two nearly equal terms, and PyTorch's own fp32 autograd
misses it by tens of percent. For those, FlashAttention's criterion applies: pass a `peer`, the
same reference computed in the kernel's dtype, and the kernel is accepted when its RMS and max
errors are at most twice the peer's. ``assert_within_twice_peer`` applies that criterion alone
(no tolerance shortcut), for the long-sequence tests whose peer is fp32 PyTorch autograd.
"""
from __future__ import annotations

import torch

RMS_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2.5e-3, torch.bfloat16: 1e-2}
MAX_TOL = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def _errors(actual: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(RMS error, max error) of actual against reference, in float64."""
    err = actual.detach().to(torch.float64).cpu() - reference
    return err.pow(2).mean().sqrt().item(), err.abs().max().item()


def assert_close_to_reference(actual: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype,
                              what: str, peer: torch.Tensor | None = None) -> None:
    assert actual.shape == reference.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    a, r = actual.detach().to(torch.float64).cpu(), reference.detach().to(torch.float64).cpu()
    assert torch.isfinite(a).all(), f"{what}: {(~torch.isfinite(a)).sum().item()} non-finite values (unwritten output?)"
    err = a - r
    scale_rms = r.pow(2).mean().sqrt().item()
    scale_max = r.abs().max().item()
    if scale_max == 0.0:
        assert err.abs().max().item() == 0.0, f"{what}: reference is zero, got max |x| {err.abs().max().item():.3e}"
        return
    rel_rms = err.pow(2).mean().sqrt().item() / max(scale_rms, 1e-300)
    rel_max = err.abs().max().item() / scale_max
    if rel_rms <= RMS_TOL[dtype] and rel_max <= MAX_TOL[dtype]:
        return
    if peer is not None:
        (rms, worst), (peer_rms, peer_worst) = _errors(a, r), _errors(peer, r)
        assert rms <= 2 * peer_rms and worst <= 2 * peer_worst, (
            f"{what} ({dtype}): relative RMS error {rel_rms:.3e} is over {RMS_TOL[dtype]:.1e} and "
            f"errors (RMS {rms:.3e}, max {worst:.3e}) exceed twice the {dtype} reference's "
            f"(RMS {peer_rms:.3e}, max {peer_worst:.3e})")
        return
    raise AssertionError(
        f"{what} ({dtype}): relative RMS error {rel_rms:.3e} (tol {RMS_TOL[dtype]:.1e}), "
        f"max error {rel_max:.3e} of max |ref| (tol {MAX_TOL[dtype]:.1e})")


def assert_within_twice_peer(actual: torch.Tensor, reference: torch.Tensor, peer: torch.Tensor,
                             what: str) -> None:
    """RMS and max error of `actual` at most twice those of `peer`, both against `reference`
    (FlashAttention's criterion, with no absolute tolerance to fall back on)."""
    a = actual.detach().to(torch.float64).cpu()
    assert torch.isfinite(a).all(), f"{what}: {(~torch.isfinite(a)).sum().item()} non-finite values"
    r = reference.detach().to(torch.float64).cpu()
    (rms, worst), (peer_rms, peer_worst) = _errors(a, r), _errors(peer, r)
    scale, top = r.pow(2).mean().sqrt().item(), r.abs().max().item()
    assert rms <= 2 * peer_rms and worst <= 2 * peer_worst, (
        f"{what}: relative RMS error {rms / scale:.3e} (max {worst / top:.3e} of max |ref|), "
        f"the peer's {peer_rms / scale:.3e} (max {peer_worst / top:.3e}): more than twice")
