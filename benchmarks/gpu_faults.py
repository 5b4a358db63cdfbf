"""Localises the faults the first H200 run found (benchmarks/RESULTS.md, issue 11), in one call.

1. float32 + key mask + fused q/k norms or RoPE: the triton backend's output came out 150% off
   (HunyuanVideo- and Mochi-style cases of tests/test_pre_attention.py; Hedgehog's dW_k), and the
   backend now refuses the combination on CUDA. Here the refusal is lifted (the kernels are
   called the way the backend would) and one feature is toggled at a time, each case twice (a
   moving error is a race): the output's error against the float64 reference, split into the
   rows inside and outside the norm's token range, and against the cpu backend.
2. fp16 dk at N = 100003 was 9.0e-3 off (bar 2.5e-3): the same inputs at N = 4096, 16384 and
   100003, with and without the ×1000 values, say whether it is the length or the values.

    python3 benchmarks/gpu_faults.py [--only pre|fp16]     # on a GPU, about a minute
    python benchmarks/gpu_faults.py --dry-run               # CPU, interpreter, one tiny case

Prints one line per case; nothing is asserted (a diagnosis, not a test).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


@contextlib.contextmanager
def refusal_lifted():
    """The backend's refuse_measured_fault off, so the faulty path runs (diagnosis only)."""
    from linattn.backends import triton as triton_backend
    saved = triton_backend.refuse_measured_fault
    triton_backend.refuse_measured_fault = lambda *args: None
    try:
        yield
    finally:
        triton_backend.refuse_measured_fault = saved


def pre_cases(dry_run: bool) -> dict:
    import torch
    from test_pre_attention import BASE
    hunyuan = replace(BASE, over="head", norm_tokens=(0, 70), rope_len=70, masked=True,
                      table="full", feature_map="softmax")
    if dry_run:
        return {"hunyuan, tiny": replace(hunyuan, seq=20, norm_tokens=(0, 15), rope_len=15)}
    return {
        "hunyuan": hunyuan,
        "mochi": replace(BASE, over="head", norm_tokens=(0, 64), rope_len=64, table_dims=3,
                         masked=True, layout="bhnd"),
        "hunyuan unmasked": replace(hunyuan, masked=False),
        "hunyuan, norm on every token": replace(hunyuan, norm_tokens=None),
        "hunyuan, rope on every token": replace(hunyuan, rope_len=None),
        "hunyuan, no rope": replace(hunyuan, rope="none"),
        "hunyuan, no norm": replace(hunyuan, norm="none"),
        "hunyuan bf16": replace(hunyuan, dtype=torch.bfloat16),
        "masked, norm over heads, full rope": replace(BASE, masked=True),
        "masked, norm range only": replace(BASE, over="head", norm_tokens=(0, 70), rope="none",
                                           masked=True),
        "masked, rope range only": replace(BASE, norm="none", rope_len=70, masked=True),
    }


def diagnose_pre(device, dry_run: bool) -> None:
    import torch
    import linattn
    from linattn import QKNorm, RoPE
    from linattn.ops.validation import to_bnhd
    from test_pre_attention import make_inputs, reference_run

    def on_cpu(t):
        return None if t is None else t.detach().cpu()

    def norm_on_cpu(n):
        return None if n is None else QKNorm(n.kind, on_cpu(n.weight), on_cpu(n.bias), n.eps,
                                             n.over, n.tokens)

    for name, case in pre_cases(dry_run).items():
        for trial in range(2):
            q, k, v, q_norm, k_norm, rope, params, mask = inputs = make_inputs(case, device)
            kwargs = dict(feature_map=case.feature_map, layout=case.layout)
            with torch.no_grad(), refusal_lifted():
                out = linattn.linear_attention(q, k, v, key_padding_mask=mask, backend="triton",
                                               q_norm=q_norm, k_norm=k_norm, rope=rope, **kwargs)
                cpu = linattn.linear_attention(
                    on_cpu(q), on_cpu(k), on_cpu(v), key_padding_mask=on_cpu(mask),
                    backend="cpu", q_norm=norm_on_cpu(q_norm), k_norm=norm_on_cpu(k_norm),
                    rope=None if rope is None else RoPE(on_cpu(rope.cos), on_cpu(rope.sin),
                                                        rope.style, rope.start), **kwargs)
            grad = torch.randn(q.shape, device=device).to(case.dtype)
            ref = reference_run(case, inputs, case.feature_map, grad, [q, k, v, *params],
                                torch.float64)[0]
            got, want = to_bnhd(out.double(), case.layout), to_bnhd(ref, case.layout)
            rows = (got - want).norm(dim=(2, 3)) / want.norm(dim=(2, 3)).clamp_min(1e-30)
            stop = case.norm_tokens[1] if case.norm_tokens else case.seq
            outside = rows[:, stop:].max().item() if stop < case.seq else float("nan")
            vs_cpu = ((out.double().cpu() - cpu.double()).norm() / cpu.double().norm()).item()
            print(f"pre  {name:36s} #{trial}: vs float64 "
                  f"{((got - want).norm() / want.norm()).item():.2e} (rows < {stop}: "
                  f"{rows[:, :stop].max().item():.2e}, rows >= {stop}: {outside:.2e}); "
                  f"vs cpu backend {vs_cpu:.2e}; NaN {bool(torch.isnan(out).any())}", flush=True)


def diagnose_fp16(device, dry_run: bool) -> None:
    import torch
    from test_long_sequence_accuracy import compare
    lengths = (256,) if dry_run else (4096, 16384, 100_003)
    for scale in (1000.0, 1.0):
        for n in lengths:
            torch.manual_seed(n)
            q, k = (torch.randn(1, n, 2, 32, device=device).half() for _ in range(2))
            v = (torch.rand(1, n, 2, 32, device=device) * scale).half()
            do = torch.randn(1, n, 2, 32, device=device).half()
            parts = []
            for name, got, want, peer in compare("triton", q, k, v, do, "relu"):
                error = ((got.double() - want).norm() / want.norm()).item()
                peer_error = ((peer.double() - want).norm() / want.norm()).item()
                parts.append(f"{name} {error:.2e} (fp32 peer {peer_error:.2e})")
            print(f"fp16 v×{scale:g} N={n}: " + "; ".join(parts), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("pre", "fp16"))
    parser.add_argument("--dry-run", action="store_true")
    options = parser.parse_args(argv)
    if options.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    if not options.dry_run and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --dry-run)")
    device = torch.device("cpu" if options.dry_run else "cuda")
    if options.only in (None, "pre"):
        diagnose_pre(device, options.dry_run)
    if options.only in (None, "fp16"):
        diagnose_fp16(device, options.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
