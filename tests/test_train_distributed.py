"""Training on two gloo processes (CPU): DDP matches one process on the same global batch, so
does context parallelism (each sample's sequence split over the two), FSDP2 runs and matches it
too, and an interrupted FSDP2 run resumed from its checkpoint ends
bit-identical to an uninterrupted one.

Every run has a selection phase of 2 of its 4 steps (train.select_steps): the gates are
all-reduced while they train (steps 1-2), then fixed at the selection, their gradients dropped
on every rank (steps 3-4); the FSDP2 run is resumed from its step-2 checkpoint, before the
switch, so the switch happens after the resume.

Tolerance for "matches one process", per tensor of the final checkpoint (every parameter, gate,
Adam first and second moment): max |a - b| <= 5e-3 * max |a|. Measured: 2.0e-3 for DDP and for
FSDP2 (4 steps, default ADM: DMD push + velocity anchor, bf16 teacher; 7.7e-4 under the former
"normalize" default with a float32 teacher). The processes reduce gradients in another order than one process sums them
(float32 rounding); where a gradient is a near-cancelling sum far below Adam's eps, that
rounding changes its sign-like update m / (sqrt(v) + eps) by a few percent of lr, and such
elements set the measured figure. A wrong reduction (a sum instead of a mean doubles Adam's moments; an
unreduced gate gradient) is off by O(1) and fails.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from linattn.train import train
from linattn.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=16, in_channels=4,
            out_channels=4, text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
            rope_max_seq_len=16)
STEPS = 4

# Tiny models: one intra-op thread (tests/conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def base_config(root, name, **train):
    cfg = {
        # A bf16 teacher (as Wan's config): the float32 student differs from it from step 0, so
        # every trained parameter gets a real gradient. With a float32 teacher the student
        # equals it at step 0 and ADM's push is exactly 0 there; gradients at rounding level,
        # which Adam turns into lr-sized steps, then differ between one process and two.
        "model": {"config": TINY, "init_seed": 3, "teacher_dtype": "bfloat16"},
        # n_linear = every layer: L_con (4 per gate) beats L_reg (2α <= 3) from step 0, so the
        # gates move at once and the model gradients are not zero.
        "convert": {"mode": "hybrid", "n_linear": 2, "options": {"backend": "reference"}},
        "data": {"dir": os.path.join(root, "data"), "latent_shape": [4, 1, 4, 4],
                 "num_trajectories": 4, "trajectories_per_shard": 2, "num_steps": 3,
                 "store_dtype": "float32", "embeddings": os.path.join(root, "emb.safetensors")},
        "train": {"steps": STEPS, "global_batch_size": 4, "lr": 1e-3, "gate_lr": 0.05,
                  "alpha_start": 1.5, "alpha_end": 1.0, "mixed_precision": "no",
                  "gradient_checkpointing": True, "seed": 5, "select_steps": 2},
        "output": {"dir": os.path.join(root, name), "checkpoint_every": 2},
    }
    cfg["train"].update(train)
    return cfg


def final_state(run_dir, step=STEPS):
    """{"model": ..., "optim": ...} of the run's checkpoint at `step` (default: the last),
    gathered into one dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt = os.path.join(run_dir, "checkpoints", f"step-{step:08d}")
    out = os.path.join(run_dir, f"gathered-{step}.pt")
    dcp_to_torch_save(os.path.join(ckpt, "state"), out)
    return torch.load(out, weights_only=False)


def flat(state, prefix=""):
    out = {}
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        elif isinstance(v, torch.Tensor):
            out[key] = v
        elif isinstance(v, (int, float)):
            out[key] = torch.tensor(v)
    return out


def assert_states(a, b, exact):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        if exact:
            assert torch.equal(fa[key], fb[key]), key
        else:
            scale = float(fb[key].double().abs().max())
            torch.testing.assert_close(fa[key].double(), fb[key].double(), rtol=0,
                                       atol=5e-3 * scale, msg=lambda m: f"{key}: {m}")


def torchrun(args, timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process reference run (it also generates the shared teacher data)."""
    root = str(tmp_path_factory.mktemp("dist"))
    gen = torch.Generator().manual_seed(0)
    save_file({"prompt_embeds": torch.randn(2, 3, 32, generator=gen)},
              os.path.join(root, "emb.safetensors"))
    result = train(base_config(root, "single"), progress=False)
    assert result.step == STEPS
    return root, final_state(os.path.join(root, "single"))


def test_ddp_two_processes_match_one(single):
    root, reference = single
    cfg = base_config(root, "ddp", strategy="ddp")
    path = os.path.join(root, "ddp.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    proc = torchrun(["-m", "linattn.train", "train", path, "--no-progress"])
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["step"] == STEPS
    ddp = final_state(os.path.join(root, "ddp"))
    assert_states(ddp, reference, exact=False)
    # The gates did move (the comparison is not of untouched values).
    gates = [v for k, v in flat(reference["model"]).items() if k.endswith("processor.gate")]
    assert len(gates) == 2 and all(float(g) < 1.0 for g in gates)
    records = read_metrics(os.path.join(root, "ddp", "metrics.jsonl"))
    assert [r["world_size"] for r in records[1:]] == [2] * STEPS
    # The selection (both layers linear, n_linear 2) was fixed at step 2 and held under DDP.
    assert [r["phase"] for r in records[1:]] == ["select", "select", "final", "final"]
    assert all(r["gates"] == [0.0, 0.0] for r in records[3:])



def test_ddp_fits_the_maps_alike_on_every_rank(single):
    # train.map_fit_steps runs on each rank's whole student before DDP wraps it; rank 0's maps
    # are broadcast, and the run matches one process fitted the same way.
    root, plain = single
    single_fit = train(base_config(root, "single_fit", map_fit_steps=3), progress=False)
    assert "map_fit" in read_metrics(single_fit.metrics_path)[0]
    reference = final_state(os.path.join(root, "single_fit"))
    cfg = base_config(root, "ddp_fit", strategy="ddp", map_fit_steps=3)
    path = os.path.join(root, "ddp_fit.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    torchrun(["-m", "linattn.train", "train", path, "--no-progress"])
    assert_states(final_state(os.path.join(root, "ddp_fit")), reference, exact=False)
    fitted, unfitted = flat(reference["model"]), flat(plain["model"])
    assert any(not torch.equal(fitted[k], unfitted[k]) for k in fitted if "_map." in k)


CP_STEPS = 2
CP_WORKER = """
import json, sys
import torch.distributed as dist
from linattn.train import train

dist.init_process_group("gloo")
# The 4-step schedule (lr, alpha) of the reference run, stopped after its step-2 checkpoint.
assert train(json.load(open(sys.argv[1])), stop_at_step=%d, progress=False).final_dir is None
dist.destroy_process_group()
""" % CP_STEPS


def test_context_parallel_two_processes_match_one(single, tmp_path):
    # One data replica of a 2-process Ulysses group: each process holds half of every sample's
    # tokens (the hybrid layers' softmax branch through diffusers' Ulysses all-to-all, the
    # linear branch through linattn's state all-reduce), DDP sums the shares. Compared at the
    # step-2 checkpoint of the same 4-step schedule: half the steps of the other runs, since
    # each step here makes many more collectives (4 steps took over 300 s on a loaded machine).
    root, reference = single
    cfg = base_config(root, "cp", strategy="ddp", context_parallel={"ring": 1, "ulysses": 2})
    path = os.path.join(root, "cp.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    script = tmp_path / "cp_worker.py"
    script.write_text(CP_WORKER)
    torchrun([str(script), path])
    assert_states(final_state(os.path.join(root, "cp"), CP_STEPS),
                  final_state(os.path.join(root, "single"), CP_STEPS), exact=False)


WORKER = """
import json, sys
import torch.distributed as dist
from linattn.train import train

dist.init_process_group("gloo")
full, interrupted = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
train(full, progress=False)
assert train(interrupted, stop_at_step=3, progress=False).final_dir is None
train(interrupted, progress=False)  # resumes from its step-2 checkpoint
dist.destroy_process_group()
"""


def test_fsdp2_runs_matches_one_process_and_resumes_bit_exact(single, tmp_path):
    root, reference = single
    paths = []
    for name in ("fsdp_full", "fsdp_resumed"):
        cfg = base_config(root, name, strategy="fsdp")
        cfg["output"]["eval_every"] = 2  # evaluation runs under FSDP2 too
        paths.append(str(tmp_path / f"{name}.json"))
        with open(paths[-1], "w") as f:
            json.dump(cfg, f)
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    torchrun([str(script), *paths])

    full = final_state(os.path.join(root, "fsdp_full"))
    resumed = final_state(os.path.join(root, "fsdp_resumed"))
    assert_states(resumed, full, exact=True)
    assert_states(full, reference, exact=False)

    def comparable(run):
        skip = ("step_time_s", "samples_per_s")
        return [{k: v for k, v in r.items() if k not in skip}
                for r in read_metrics(os.path.join(root, run, "metrics.jsonl"))]

    assert comparable("fsdp_resumed") == comparable("fsdp_full")
    assert [r.get("phase") for r in comparable("fsdp_full")] == [None, "select", "select",
                                                                 "final", "final"]
    assert comparable("fsdp_full")[3]["selected"]["step"] == 2
    assert any("eval_rel_mse_rounded" in r for r in comparable("fsdp_full"))
    # The finalized model was gathered and saved once, by rank 0.
    with open(os.path.join(root, "fsdp_full", "final", "selection.json")) as f:
        assert len(json.load(f)) == 2
