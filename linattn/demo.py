"""The main job: `python -m linattn.demo`.

Shows, on whatever machine it runs on, that linattn's backends compute the same function as the
float64 reference and how fast they are beside the PyTorch einsum peer users have today:
  1. which backends can run here, and why the others cannot;
  2. every runnable kernel backend against the float64 reference (output and gradients);
  3. time of forward and forward + backward beside the peer, at a video-DiT-like shape;
  4. the LinVideo recipe on the toy video DiT shipped with linattn (linattn.toy: 8
     self-attention layers, 512 tokens, trained on procedural bouncing-object videos):
     teacher trajectories, ADM with selective transfer making 5 of the 8 layers linear (a
     selection phase of the toy config's train.select_steps, then the selected model trained),
     finalize; then the table teacher / untrained conversion of the same layers / LinVideo on
     the three kinds of fidelity metric (teacher-relative, class accuracy and Fréchet distance
     in a video classifier's features, temporal jitter; mean ± spread over 3 sampling seeds)
     and the sampling time, and a sample grid PNG (needs the `train` extra, i.e. diffusers).

Exit status 0 when every check passed and LinVideo beat the untrained conversion: a lower
Fréchet distance on every sampling seed and a class accuracy not lower on average
(linattn.toy.linvideo.beats says why not rel-MSE).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from typing import Optional

import torch

import linattn
from linattn.feature_maps import ReLU
from linattn.ops.reference import linear_attention_reference


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).norm() / want.norm()).item()


def check_against_reference(backend: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Relative errors of output and gradients on fresh inputs with awkward sizes and a mask."""
    B, Nq, Nk, H, D, Dv = 2, 333, 517, 3, 64, 48
    q = torch.randn(B, Nq, H, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Nk, H, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Nk, H, Dv, device=device, dtype=dtype, requires_grad=True)
    mask = torch.rand(B, Nk, device=device) < 0.8
    out = linattn.linear_attention(q, k, v, key_padding_mask=mask, backend=backend)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    relu = ReLU()
    ref = linear_attention_reference(q64, k64, v64, relu, relu, 1e-6, mask)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    errors = {"out": _relative_error(out, ref)}
    errors.update({name: _relative_error(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
    return errors


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def time_against_peer(backend: str, device: torch.device, shape, dtype, repeats: int) -> dict:
    B, N, H, D = shape
    q, k, v = (torch.randn(B, N, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad_out = torch.randn_like(q)
    relu = ReLU()
    impls = {
        f"linattn ({backend})": lambda: linattn.linear_attention(q, k, v, backend=backend),
        "PyTorch einsum fp32": lambda: linear_attention_reference(q, k, v, relu, relu, 1e-6,
                                                                  compute_dtype=torch.float32),
    }
    timings = {}
    for name, fn in impls.items():
        forward = _median_seconds(lambda: fn(), device, repeats)
        both = _median_seconds(lambda: torch.autograd.grad(fn(), (q, k, v), grad_out), device, repeats)
        timings[name] = (forward, both)
    return timings


def run_toy_linvideo(steps: int, n_linear: int, grid: str,
                     select_steps: Optional[int] = None) -> bool:
    """LinVideo on the shipped toy teacher, scored against the teacher and the untrained
    conversion of the same layers (linattn.toy.linvideo); True when LinVideo beat it.
    select_steps: train.select_steps (None: the toy config's; 0: select over the whole run)."""
    try:
        import diffusers  # noqa: F401
    except ImportError as error:
        print(f"   skipped: the DiT layer needs diffusers ({error}); pip install '.[train]'")
        return False
    from linattn.toy.linvideo import comparison_table, run_linvideo

    with tempfile.TemporaryDirectory(prefix="linattn-demo-") as tmp, \
            warnings.catch_warnings(record=True) as notices:
        warnings.simplefilter("always")
        # torch's distributed checkpointing announces that it saves in one process: true, and
        # not news (the run's checkpoint is written to the temporary folder and dropped).
        warnings.filterwarnings("ignore", message="torch.distributed is disabled",
                                category=UserWarning)
        overrides = ([] if select_steps is None
                     else [f"train.select_steps={select_steps or 'null'}"])
        result = run_linvideo(steps=steps, n_linear=n_linear, workdir=tmp, grid=grid,
                              overrides=overrides)
    print(f"   trained in {result.train_seconds:.0f} s; linear attention in layers "
          f"{result.linear_layers}, softmax in the rest")
    # What the recipe had to say (e.g. how many gates rounded to linear before the final
    # selection) is part of the demo's report, as a line of it rather than a warning trace.
    for notice in notices:
        print(f"   note ({notice.category.__name__}): {notice.message}")
    print()
    for line in comparison_table(result.rows).splitlines():
        print(f"   {line}")
    reference = result.reports[next(iter(result.reports))]
    print(f"   mean ± std over {len(reference.seeds)} sampling seeds x {reference.num_samples} "
          f"samples (one per class); same noise for every model; sampling: seconds for all "
          f"seeds, ratio to the teacher")
    print(f"   sample grid (per class: teacher, untrained conversion, LinVideo): {grid}")
    verdict = "beat" if result.linvideo_beats_untrained else "did NOT beat"
    print(f"   LinVideo {verdict} the untrained conversion (Fréchet distance lower on every "
          f"seed, class accuracy not lower)")
    return result.linvideo_beats_untrained


def toy_select_steps() -> Optional[int]:
    """train.select_steps of the toy config (linattn/train/configs/toy_wan_cpu.yaml)."""
    from linattn.toy.linvideo import TOY_CONFIG
    from linattn.train.config import load_config

    return load_config(TOY_CONFIG).train.select_steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=None, metavar=("B", "N", "H", "D"),
                        help="timing shape (default: (2, 4096, 12, 64) on CPU, Wan 1.3B on CUDA)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=60,
                        help="steps of the toy LinVideo run (0 skips it)")
    parser.add_argument("--n-linear", type=int, default=5,
                        help="how many of the toy's 8 self-attention layers end linear")
    parser.add_argument("--select-steps", type=int, default=None,
                        help="steps of selective transfer's selection phase, after which the "
                             "selected layers are fixed and trained for the rest (default: the "
                             "toy config's train.select_steps; 0: select over the whole run)")
    parser.add_argument("--grid", default="linattn_demo_samples.png",
                        help="where the sample grid PNG goes")
    args = parser.parse_args(argv)
    select = args.select_steps if args.select_steps is not None else toy_select_steps()
    if args.train_steps > 0 and select and not select < args.train_steps:
        parser.error(f"--select-steps: the selection phase ({select} steps) must end before "
                     f"--train-steps ({args.train_steps}); pass --select-steps 0 to select over "
                     f"the whole run")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = args.shape or ((1, 32760, 12, 128) if device.type == "cuda" else (2, 4096, 12, 64))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    print(f"linattn {linattn.__version__} on {device.type}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    print("\n1. Backends")
    for info in linattn.backends():
        print(f"   {'yes' if info.available else 'no ':4} {info.name:10} {info.reason}")

    runnable = []
    for info in linattn.backends():
        if not info.available or info.name == "reference":
            continue
        # Interpreted Triton is a correctness tool, not a fast path: check it, do not time it.
        interpreted = info.name == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
        try:
            linattn.linear_attention(torch.randn(1, 2, 1, 16, device=device),
                                     torch.randn(1, 2, 1, 16, device=device),
                                     torch.randn(1, 2, 1, 16, device=device), backend=info.name)
        except linattn.BackendUnavailableError as error:
            print(f"   ({info.name} cannot run {device.type} tensors: {error})")
            continue
        runnable.append((info.name, interpreted))

    print("\n2. Against the float64 reference (relative error; B=2, Nq=333, Nk=517, H=3, D=64, "
          "Dv=48, key mask)")
    check_dtypes = [torch.float32, torch.bfloat16]
    ok = True
    for name, _ in runnable:
        for check_dtype in check_dtypes:
            errors = check_against_reference(name, device, check_dtype)
            bound = 1e-4 if check_dtype == torch.float32 else 1e-2
            passed = all(e <= bound for e in errors.values())
            ok &= passed
            row = "  ".join(f"{k} {e:.1e}" for k, e in errors.items())
            print(f"   {name:8} {str(check_dtype).replace('torch.', ''):9} {row}  "
                  f"{'ok' if passed else 'FAILED'} (bound {bound:.0e})")

    print(f"\n3. Time, median of {args.repeats} (shape {tuple(shape)}, "
          f"{str(dtype).replace('torch.', '')}, relu)")
    for name, interpreted in runnable:
        if interpreted:
            print(f"   {name}: interpreted on the CPU (TRITON_INTERPRET=1); not timed")
            continue
        timings = time_against_peer(name, device, shape, dtype, args.repeats)
        (ours_f, ours_b), (peer_f, peer_b) = timings.values()
        for impl, (f, b) in timings.items():
            print(f"   {impl:22} forward {f * 1e3:8.2f} ms   forward+backward {b * 1e3:8.2f} ms")
        print(f"   speed-up over the peer: forward {peer_f / ours_f:.2f}x, "
              f"forward+backward {peer_b / ours_b:.2f}x")
    if not runnable:
        print("   no kernel backend can run here; see the reasons above")
    if args.train_steps > 0:
        phase = (f" (select {select} steps, then train the selected model)" if select
                 else " (selection over the whole run)")
        print(f"\n4. LinVideo on the toy video DiT shipped with linattn: {args.train_steps} "
              f"steps of ADM + selective transfer{phase}, {args.n_linear} of 8 layers linear")
        ok &= run_toy_linvideo(args.train_steps, args.n_linear, args.grid, args.select_steps)
    print("\nresult:", "all checks passed" if ok and runnable else "see above")
    return 0 if ok and runnable else 1


if __name__ == "__main__":
    raise SystemExit(main())
