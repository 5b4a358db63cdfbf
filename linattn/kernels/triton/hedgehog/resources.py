"""Compile the Hedgehog kernels for a CUDA architecture without a GPU and report what each one
needs: shared memory, registers and spills (from ptxas -v). This is how the limits and configs
of plan.py were chosen and how a change to a kernel can be checked before it meets a
GPU: a program that needs more shared memory than the GPU has fails to launch.

    python -m linattn.kernels.triton.hedgehog.resources [--dtype bfloat16] [--dim 128] [--arch 90]
        [--pre none|wan|cogvideox|half]

--pre compiles the kernels with a family's q/k norm and RoPE fused (../pre_attention.py): "wan"
(RMSNorm over all heads, RoPE from one angle per pair), "cogvideox" (per-head LayerNorm with
bias, RoPE from one angle per dim on the tokens after the text), "hunyuan" (per-head RMSNorm,
RoPE from one angle per dim), "half" (per-head RMSNorm, half-rotation RoPE), with the smaller
blocks plan.config gives such kernels.

Integer arguments are specialised as Triton's JIT does for a contiguous (B, N, H, D) call of the
Wan 1.3B shape (== 1: constant; multiple of 16: known divisible), so the code matches what a
real launch compiles. Run it with TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import plan
from .backward_kernels import (hedgehog_key_grad_kernel, hedgehog_query_grad_kernel,
                                   hedgehog_state_grad_kernel)
from .forward_kernels import hedgehog_output_kernel, hedgehog_state_kernel

#: Shared memory one program may use on sm_90 (H100/H200): 227 KB.
SM90_SHARED_BYTES = 232448
_TRITON_TYPES = {torch.bfloat16: ("bf16", tl.bfloat16), torch.float16: ("fp16", tl.float16),
                 torch.float32: ("fp32", tl.float32)}
_KERNELS = {"state": hedgehog_state_kernel, "output": hedgehog_output_kernel,
            "query_grad": hedgehog_query_grad_kernel, "state_grad": hedgehog_state_grad_kernel,
            "key_grad": hedgehog_key_grad_kernel}
_TOKEN_POINTERS = ("k_ptr", "v_ptr", "q_ptr", "do_ptr", "o_ptr", "dq_ptr", "dk_ptr", "dv_ptr")
#: The constexprs of each pre-attention variant (NORM, NORM_HEADS, NORM_W, NORM_B, ROPE,
#: ROPE_PAIRS) and which of its pointers are present.
PRE_VARIANTS = {
    "none": dict(NORM=0, NORM_HEADS=False, NORM_W=False, NORM_B=False, ROPE=0, ROPE_PAIRS=False),
    "wan": dict(NORM=1, NORM_HEADS=True, NORM_W=True, NORM_B=False, ROPE=1, ROPE_PAIRS=True),
    "cogvideox": dict(NORM=2, NORM_HEADS=False, NORM_W=True, NORM_B=True, ROPE=1,
                      ROPE_PAIRS=False),
    "hunyuan": dict(NORM=1, NORM_HEADS=False, NORM_W=True, NORM_B=False, ROPE=1,
                    ROPE_PAIRS=False),
    "half": dict(NORM=1, NORM_HEADS=False, NORM_W=True, NORM_B=False, ROPE=2, ROPE_PAIRS=False),
}


def _absent_pointers(flags: dict) -> set[str]:
    """Pre-attention pointers a variant passes as None (constexpr None, as the launcher does)."""
    absent = set()
    if not flags["NORM_W"]:
        absent.add("pw_ptr")
    if not flags["NORM_B"]:
        absent.add("pb_ptr")
    if not flags["NORM_HEADS"]:
        absent |= {"pst_ptr", "psum_ptr"}
    if not flags["NORM"]:
        absent.add("pg_ptr")
    if not flags["ROPE"]:
        absent |= {"cos_ptr", "sin_ptr"}
    return absent


def _argument_values(dim: int, block_n: int, batch: int = 1, seq: int = 32760,
                     heads: int = 12) -> dict[str, int]:
    """The integer arguments of every kernel for D = F = Dv = dim, contiguous (B, N, H, D)."""
    values = dict(H=heads, D=dim, F=dim, Dv=dim, Nk=seq, Nq=seq, num_blocks=-(-seq // block_n),
                  blocks_per_split=57, s_mb=seq, s_mn=1, s_wh=dim * dim, s_wd=dim, s_wf=1,
                  s_tb=heads * 2 * seq, s_th=2 * seq, s_tsel=seq)
    state = dict(s=batch * heads * 2 * dim * dim, b=heads * 2 * dim * dim, h=2 * dim * dim,
                 f=dim, v=1)
    norm = dict(s=batch * heads * 2 * dim, b=heads * 2 * dim, h=2 * dim, f=1)
    values.update({f"s_s{k}": x for k, x in state.items()})
    values.update({f"s_z{k}": x for k, x in norm.items()})
    values.update(s_dws=heads * dim * dim, s_dwb=heads * dim * dim, s_dwh=dim * dim, s_dwd=dim,
                  s_dwf=1)
    # Pre-attention arguments: a (H, D) weight, (B, N, 2) statistics, (1, N, 1, W) tables,
    # (rows, 2·H·D) weight-gradient partials and (B, N, H, 2) row sums.
    values.update(s_pwh=dim, s_pwd=1, s_pbh=0, s_pbd=1, s_pstb=2 * seq, s_pstn=2, p_start=226,
                  p_stop=seq, s_rb=0, s_rn=dim, s_rh=0, s_rd=1, r_start=226, r_stop=seq,
                  s_pgr=2 * heads * dim, s_psb=seq * heads * 2, s_psn=heads * 2)
    for name in ("k", "v", "q", "do", "o", "dq", "dk", "dv"):
        values.update({f"s_{name}b": seq * heads * dim, f"s_{name}n": heads * dim,
                       f"s_{name}h": dim, f"s_{name}d": 1, f"s_{name}v": 1})
    return values


def compile_kernel(kind: str, dtype: torch.dtype, dim: int, arch: int = 90, pre: str = "none"):
    """(config, compiled kernel) of one kernel as plan.py configures it on a GPU."""
    kernel = _KERNELS[kind]
    type_name, token = _TRITON_TYPES[dtype]
    pad = max(16, triton.next_power_of_2(dim))
    flags = PRE_VARIANTS[pre]
    cfg = plan.config(kind, dtype, (pad, pad, pad), interpreted=False, block_n=None,
                      pre=pre != "none")
    constants = dict(BLOCK_N=cfg.block_n, D_PAD=pad, F_PAD=pad, V_PAD=pad, TOKEN=token,
                     EMULATE_BF16=False, EMULATE_DW=False, HAS_MASK=False, mask_ptr=None,
                     **flags, **dict.fromkeys(_absent_pointers(flags)))
    values = _argument_values(dim, cfg.block_n)
    signature, attrs, constexprs = {}, {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            constexprs[name] = constants[name]
        elif name.endswith("_ptr"):
            signature[name] = "*" + (type_name if name in _TOKEN_POINTERS else "fp32")
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in ("eps", "p_eps"):
            signature[name] = "fp32"
        elif values[name] == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if values[name] % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return cfg, compiled


def ptxas_report(compiled, arch: int = 90) -> str:
    """ptxas -v's register and spill lines for a compiled kernel."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        result = subprocess.run([triton.knobs.nvidia.ptxas.path, "-v", f"--gpu-name=sm_{arch}a",
                                 "-o", os.devnull, f.name], capture_output=True, text=True,
                                check=True)
    finally:
        os.unlink(f.name)
    lines = [line.split("info    : ")[-1].strip() for line in result.stderr.splitlines()
             if "registers" in line or "spill" in line]
    return "; ".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--dim", type=int, default=128, help="D = F = Dv")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--pre", default="none", choices=sorted(PRE_VARIANTS))
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels are not compiled")
    dtype = getattr(torch, args.dtype)
    why_not = plan.unsupported(dtype, args.dim, args.dim, 2 * args.dim)
    if why_not is not None:
        print(f"note: plan.unsupported rejects this size ({why_not}); compiling anyway")
    for kind in _KERNELS:
        cfg, compiled = compile_kernel(kind, dtype, args.dim, args.arch, args.pre)
        shared = compiled.metadata.shared
        verdict = "fits" if shared <= SM90_SHARED_BYTES else "DOES NOT FIT"
        print(f"{kind:10s} block_n={cfg.block_n:3d} warps={cfg.num_warps} shared={shared:7d} B "
              f"({verdict}) | {ptxas_report(compiled, args.arch)}")


if __name__ == "__main__":
    main()
