"""model.load "sharded" and FSDP2 with context parallelism, on two gloo processes (CPU).

One torchrun of two processes (spawned once for the module) runs:

* the loader alone on a tiny Wan saved locally as a multi-file checkpoint (an index and several
  safetensors files): build on meta, fully_shard, materialise, read each process's rows; every
  parameter gathered back equals diffusers' from_pretrained's (dtype included: bf16, with the
  modules diffusers keeps in float32), so do the RoPE buffers it never saves, and each process
  read about half of the elements;
* the trainer, one step, FSDP2, from the same folder with model.load "sharded" and "full": the
  checkpoints (parameters, gates, Adam moments) are identical bit for bit; the sharded run
  generates the teacher data (every rank in each forward of the sharded teacher);
* the distillation stage, one step, FSDP2, with model.load "sharded" and "full" (real score and
  fake score from the saved Wan, the generator from a converted folder): identical bit for bit;
* then, in a torchrun of four processes, the trainer, one step, with the sharded load and
  context parallelism: two data replicas x Ulysses groups of 2 (each process holds half of its
  sample's tokens), FSDP2 over all four (the flattened mesh), against one process without
  either (the test process itself): the same tolerance as tests/test_train_distributed.py's
  (max |a - b| <= 5e-3 max |a| per tensor). (tests/test_train_distributed.py runs context
  parallelism under DDP.)
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from linattn.train import train

from checkpoints import flat
from test_distill_stage import config as distill_stage_config
from test_distill_stage import linear_generator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=16, in_channels=4,
            out_channels=4, text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
            rope_max_seq_len=16)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORKER = r"""
import json, sys
import torch
import torch.distributed as dist
from types import SimpleNamespace

from linattn.train import train
from linattn.train import distributed as D, sharded_load as SL

dist.init_process_group("gloo")
torch.set_num_threads(1)
root, configs = sys.argv[1], json.load(open(sys.argv[2]))
rank = dist.get_rank()

def run(entry):
    if entry["stage"] == "distill":
        from linattn.train.distill import distill
        distill(entry["config"], progress=False)
    else:
        train(entry["config"], progress=False)


if dist.get_world_size() != 2:  # the loader is checked by the 2-process run
    for entry in configs:
        run(entry)
    dist.destroy_process_group()
    sys.exit(0)

# The loader alone: the same parameters and buffers as diffusers' full load.
from diffusers import WanTransformer3DModel
source = SimpleNamespace(pretrained=root + "/wan", subfolder=None,
                         class_name="WanTransformer3DModel")
model = SL.build_empty(source, torch.bfloat16)
assert all(p.is_meta for p in model.parameters())
D.shard_frozen(model, "fsdp")
SL.materialize_(model, torch.device("cpu"))
read = SL.load_shards_(model, SL.checkpoint_files(SL.model_folder(source)))
full = WanTransformer3DModel.from_pretrained(root + "/wan", torch_dtype=torch.bfloat16)
whole = full.state_dict()
mine = model.state_dict()
assert mine.keys() == whole.keys()
mismatch = []
for name, tensor in mine.items():
    gathered = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    if gathered.dtype != whole[name].dtype or not torch.equal(gathered, whole[name]):
        mismatch.append(name)
buffers = dict(model.named_buffers())
for name, buf in full.named_buffers():
    if buf.dtype != buffers[name].dtype or not torch.equal(buf, buffers[name]):
        mismatch.append(name)
total = sum(t.numel() for t in whole.values())
summary = {"mismatch": mismatch, "read": read, "total": total,
           "fp32": sorted({str(t.dtype) for t in whole.values()})}
json.dump(summary, open(f"{root}/loader-{rank}.json", "w"))
del model, full

for entry in configs:
    run(entry)
dist.destroy_process_group()
"""


def run_config(root, name, **changes):
    cfg = {
        "model": {"pretrained": os.path.join(root, "wan"), "subfolder": None,
                  "teacher_dtype": "bfloat16"},
        "convert": {"mode": "hybrid", "n_linear": 2, "options": {"backend": "cpu"}},
        "data": {"dir": os.path.join(root, "data"), "latent_shape": [4, 1, 4, 4],
                 "num_trajectories": 4, "trajectories_per_shard": 1, "num_steps": 2,
                 "store_dtype": "float32", "embeddings": os.path.join(root, "emb.safetensors")},
        "train": {"steps": 1, "global_batch_size": 2, "lr": 1e-3, "gate_lr": 0.05,
                  "alpha_start": 1.5, "alpha_end": 1.0, "mixed_precision": "no",
                  "gradient_checkpointing": True, "seed": 5},
        "output": {"dir": os.path.join(root, name), "checkpoint_every": 1},
    }
    for section, values in changes.items():
        cfg[section].update(values)
    return cfg


def distill_config(root, name, load):
    """The distillation stage, one FSDP2 step: the real and fake scores from the saved Wan, the
    generator from a converted folder (layer 0 linear)."""
    cfg = distill_stage_config(root, name, strategy="fsdp", steps=1)
    cfg["model"] = {"pretrained": os.path.join(root, "wan"), "subfolder": None, "load": load}
    cfg["output"].update(checkpoint_every=1, eval_every=0)
    return cfg


def state(run_dir):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = os.path.join(run_dir, "gathered.pt")
    dcp_to_torch_save(os.path.join(run_dir, "checkpoints", "step-00000001", "state"), out)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from diffusers import WanTransformer3DModel

    root = str(tmp_path_factory.mktemp("sharded_load"))
    torch.manual_seed(7)
    # A multi-file checkpoint (index + several files): the form large models ship in.
    WanTransformer3DModel(**TINY).save_pretrained(os.path.join(root, "wan"),
                                                  max_shard_size="40KB")
    gen = torch.Generator().manual_seed(0)
    save_file({"prompt_embeds": torch.randn(2, 3, 32, generator=gen)},
              os.path.join(root, "emb.safetensors"))
    linear_generator(os.path.join(root, "stage1"))
    fsdp = {"strategy": "fsdp"}
    configs = [
        {"stage": "train", "config": run_config(root, "sharded", model={"load": "sharded"},
                                                train=fsdp)},
        {"stage": "train", "config": run_config(root, "full", train=fsdp)},
        {"stage": "distill", "config": distill_config(root, "distill_sharded", "sharded")},
        {"stage": "distill", "config": distill_config(root, "distill_full", "full")},
    ]
    # Four processes: two data replicas x Ulysses groups of two, FSDP2 over all four.
    four = [{"stage": "train", "config": run_config(
        root, "cp4_sharded", model={"load": "sharded"},
        train={**fsdp, "context_parallel": {"ring": 1, "ulysses": 2}})}]
    script = os.path.join(root, "worker.py")
    with open(script, "w") as f:
        f.write(WORKER)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for processes, runs in ((2, configs), (4, four)):
        path = os.path.join(root, f"configs-{processes}.json")
        with open(path, "w") as f:
            json.dump(runs, f)
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node", str(processes), script, root, path],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # The one-process reference of the context-parallel run: same data, full load, no wrapper.
    train(run_config(root, "single"), progress=False)
    return root


def test_sharded_checkpoint_has_an_index(runs):
    folder = os.path.join(runs, "wan")
    assert os.path.isfile(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"))
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 1


def test_each_process_reads_its_rows_into_the_same_parameters(runs):
    reports = [json.load(open(os.path.join(runs, f"loader-{r}.json"))) for r in range(2)]
    for report in reports:
        assert report["mismatch"] == []
        # Its half of every sharded tensor (rows split by torch.chunk), nothing more.
        assert report["read"] < 0.6 * report["total"]
    assert sum(r["read"] for r in reports) == reports[0]["total"]
    assert reports[0]["fp32"] == ["torch.bfloat16", "torch.float32"]


def test_a_training_step_after_a_sharded_load_is_identical(runs):
    sharded, full = flat(state(os.path.join(runs, "sharded"))), flat(state(os.path.join(runs, "full")))
    assert sharded.keys() == full.keys() and any("processor.gate" in k for k in sharded)
    for key in sharded:
        assert torch.equal(sharded[key], full[key]), key
    # The step changed the model (the comparison is not of untouched weights).
    from safetensors.torch import load_file
    from linattn.train.sharded_load import checkpoint_files

    name = "blocks.0.attn1.to_q.weight"
    original = load_file(str(checkpoint_files(__import__("pathlib").Path(runs, "wan"))[name]))
    assert not torch.equal(sharded[f"model.{name}"], original[name].float())


def test_a_distillation_step_after_a_sharded_load_is_identical(runs):
    sharded = flat(state(os.path.join(runs, "distill_sharded")))
    full = flat(state(os.path.join(runs, "distill_full")))
    assert sharded.keys() == full.keys()
    assert any("processor.q_map.weight" in k for k in sharded)  # the converted generator
    for key in sharded:
        assert torch.equal(sharded[key], full[key]), key


def test_fsdp2_with_context_parallelism_matches_one_process(runs):
    parallel, single = (flat(state(os.path.join(runs, n))) for n in ("cp4_sharded", "single"))
    assert parallel.keys() == single.keys()
    for key in parallel:
        scale = float(single[key].double().abs().max())
        torch.testing.assert_close(parallel[key].double(), single[key].double(), rtol=0,
                                   atol=5e-3 * scale, msg=lambda m: f"{key}: {m}")


def test_sharded_load_is_validated_by_name():
    from linattn.train.config import TrainConfig

    base = run_config("/nonexistent", "x")
    with pytest.raises(ValueError, match="^model.load: 'sharded' loads each process's FSDP2"):
        TrainConfig.from_dict({**base, "model": {**base["model"], "load": "sharded"}})
    with pytest.raises(ValueError, match="^model.load: expected one of"):
        TrainConfig.from_dict({**base, "model": {**base["model"], "load": "lazy"}})
    with pytest.raises(ValueError, match="^model.load: 'sharded' reads the safetensors"):
        TrainConfig.from_dict({**base, "model": {"config": TINY, "load": "sharded"},
                               "train": {**base["train"], "strategy": "fsdp"}})
