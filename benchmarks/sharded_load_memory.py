"""Peak host memory per process: today's full load against model.load "sharded" (FSDP2).

For each model size and process count, torchrun starts gloo processes that load a Wan
transformer from a local safetensors folder and shard it with FSDP2 as the trainer does (every
block, then the root):

* full: diffusers' from_pretrained on every process, then fully_shard;
* sharded: linattn.train.sharded_load: built on the meta device, fully_shard, each process's
  shard allocated and filled from the rows it owns (safetensors lazy slices).

Two things are loaded: one float32 model (from_pretrained then fully_shard, against the meta
build and the shard reads), and what the trainer loads (linattn/train/trainer.py: a bf16 teacher
and a float32 student converted to hybrid Hedgehog layers, both sharded), with model.load "full"
and "sharded".

Each process reports its peak resident set (VmHWM of /proc/self/status: the high-water mark of
RSS, which counts the pages of the memory-mapped safetensors a process touches while they are
mapped) after the imports (the baseline) and after the load, its anonymous RSS after the load
(what stays: its shards on this CPU-only run), and the load's wall time. The models are written
once to --dir (random weights, float32): "tiny" (the tests' Wan) and "mid" (a Wan of 1536 wide,
8 blocks: 0.40 B parameters, 1.5 GB).

    python benchmarks/sharded_load_memory.py --dir /tmp/linattn_scale --ranks 2 4
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIZES = {
    "tiny": dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=16,
                 in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=64,
                 num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                 rope_max_seq_len=16),
    "mid": dict(patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128,
                in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                num_layers=8, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                rope_max_seq_len=1024),
}

WORKER = r"""
import gc, json, os, sys, time
import torch
import torch.distributed as dist
from linattn.train import distributed as D, sharded_load as SL
from linattn.train.config import ConvertConfig, ModelConfig
from linattn.train.models import freeze, load_transformer, make_student, student_gates


def status():
    out = {}
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in ("VmHWM", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) / 1024
    return out


dist.init_process_group("gloo")
torch.set_num_threads(1)
folder, mode, what, out = sys.argv[1:5]
model_cfg = ModelConfig(pretrained=folder, subfolder=None, teacher_dtype="bfloat16", load=mode)
convert_cfg = ConvertConfig(layers="all", feature_map="hedgehog", mode="hybrid", n_linear=1)
baseline = status()["VmHWM"]
start = time.perf_counter()
if what == "model" and mode == "full":  # one float32 model: from_pretrained, then fully_shard
    model = load_transformer(model_cfg, torch.float32)
    D.shard_frozen(model, "fsdp")
elif what == "model":
    model = SL.build_empty(model_cfg, torch.float32)
    D.shard_frozen(model, "fsdp")
    SL.materialize_(model, torch.device("cpu"))
    SL.load_shards_(model, SL.checkpoint_files(SL.model_folder(model_cfg)))
elif mode == "full":  # the trainer's loads (linattn/train/trainer.py), model.load "full"
    teacher = freeze(load_transformer(model_cfg, torch.bfloat16))
    source = load_transformer(model_cfg, torch.float32)
    student = make_student(source, convert_cfg)
    del source
    D.wrap(student, "fsdp", None, ignored_params=student_gates(student, "hybrid"))
    D.shard_frozen(teacher, "fsdp")
else:  # model.load "sharded"
    files = SL.checkpoint_files(SL.model_folder(model_cfg))
    teacher = freeze(SL.build_empty(model_cfg, torch.bfloat16))
    D.shard_frozen(teacher, "fsdp")
    SL.materialize_(teacher, torch.device("cpu"))
    SL.load_shards_(teacher, files)
    student = make_student(SL.build_empty(model_cfg, torch.float32), convert_cfg)
    created = {n for n, p in student.named_parameters() if not p.is_meta}
    D.wrap(student, "fsdp", None, ignored_params=student_gates(student, "hybrid"))
    SL.materialize_(student, torch.device("cpu"))
    SL.load_shards_(student, files, created)
gc.collect()
dist.barrier()
seconds = time.perf_counter() - start
end = status()
json.dump({"rank": dist.get_rank(), "baseline_mb": baseline, "peak_mb": end["VmHWM"],
           "anon_after_mb": end["RssAnon"], "seconds": seconds},
          open(os.path.join(out, f"rank-{dist.get_rank()}.json"), "w"))
dist.destroy_process_group()
"""


def ensure_model(directory: str, size: str) -> str:
    folder = os.path.join(directory, size)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        import torch
        from diffusers import WanTransformer3DModel

        torch.manual_seed(0)
        WanTransformer3DModel(**SIZES[size]).save_pretrained(folder)
    return folder


def run(folder: str, mode: str, what: str, ranks: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        script = os.path.join(out, "worker.py")
        with open(script, "w") as f:
            f.write(WORKER)
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", str(ranks), script, folder, mode, what, out],
                       env=env, check=True, capture_output=True, text=True)
        return [json.load(open(os.path.join(out, f"rank-{r}.json"))) for r in range(ranks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "linattn_scale"))
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=list(SIZES))
    parser.add_argument("--ranks", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write every measurement here")
    args = parser.parse_args()
    from tqdm import tqdm

    jobs = [(size, what, ranks, mode, i) for size in args.sizes for what in ("model", "trainer")
            for ranks in args.ranks for mode in ("full", "sharded") for i in range(args.repeats)]
    results = []
    for size, what, ranks, mode, i in tqdm(jobs, desc="loads"):
        folder = ensure_model(args.dir, size)
        disk = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        for r in run(folder, mode, what, ranks):
            results.append(dict(size=size, what=what, ranks=ranks, mode=mode, repeat=i,
                                checkpoint_mb=disk / 2**20, **r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    import statistics

    def median_of_max(rows, key):
        by_repeat = {}
        for r in rows:
            by_repeat.setdefault(r["repeat"], []).append(r[key])
        return statistics.median(max(v) for v in by_repeat.values())

    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; MB per process: the "
          f"largest over ranks, median over {args.repeats} repeats\n")
    print("| model (checkpoint MB) | what is loaded | ranks | model.load | peak (VmHWM) | "
          "peak − baseline | anonymous RSS after | load s |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for what in ("model", "trainer"):
            for ranks in args.ranks:
                for mode in ("full", "sharded"):
                    rows = [r for r in results if (r["size"], r["what"], r["ranks"], r["mode"])
                            == (size, what, ranks, mode)]
                    for r in rows:
                        r["extra_mb"] = r["peak_mb"] - r["baseline_mb"]
                    label = ("one float32 model" if what == "model"
                             else "trainer: bf16 teacher + float32 student")
                    print(f"| {size} ({rows[0]['checkpoint_mb']:.0f}) | {label} | {ranks} | "
                          f"{mode} | {median_of_max(rows, 'peak_mb'):.0f} | "
                          f"{median_of_max(rows, 'extra_mb'):.0f} | "
                          f"{median_of_max(rows, 'anon_after_mb'):.0f} | "
                          f"{median_of_max(rows, 'seconds'):.1f} |")


if __name__ == "__main__":
    main()
