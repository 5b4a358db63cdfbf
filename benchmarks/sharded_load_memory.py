"""Peak host memory per process: today's full load against model.load "sharded" (FSDP2).

For each model size and process count, torchrun starts gloo processes that each load one float32
Wan transformer from a local safetensors folder and shard it with FSDP2 as the trainer does
(every block, then the root):

* full: diffusers' from_pretrained on every process (the whole model in each), then fully_shard;
* sharded: linattn.train.sharded_load: built on the meta device, fully_shard, each process's
  shard allocated and filled from the rows it owns (safetensors lazy slices).

Each process reports its peak resident set (VmHWM of /proc/self/status: the high-water mark of
RSS, file-backed pages of the mapped safetensors included) once torch, diffusers and linattn are
imported (the baseline) and after the load, and the load's wall time. The models are written
once to --dir (random weights, float32): "tiny" (the tests' Wan) and "mid" (a Wan of 1536 wide,
8 blocks: about 0.35 B parameters, 1.4 GB).

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
import json, os, sys, time
import torch
import torch.distributed as dist
from types import SimpleNamespace
import diffusers
from linattn.train import distributed as D, sharded_load as SL


def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024


dist.init_process_group("gloo")
torch.set_num_threads(1)
folder, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
baseline = peak_mb()
start = time.perf_counter()
if mode == "full":
    model = diffusers.WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.float32)
    D.shard_frozen(model, "fsdp")
else:
    source = SimpleNamespace(pretrained=folder, subfolder=None,
                             class_name="WanTransformer3DModel")
    model = SL.build_empty(source, torch.float32)
    D.shard_frozen(model, "fsdp")
    SL.materialize_(model, torch.device("cpu"))
    SL.load_shards_(model, SL.checkpoint_files(SL.model_folder(source)))
dist.barrier()
seconds = time.perf_counter() - start
params = sum(p.numel() for p in model.parameters())
json.dump({"rank": dist.get_rank(), "baseline_mb": baseline, "peak_mb": peak_mb(),
           "seconds": seconds, "params": params},
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


def run(folder: str, mode: str, ranks: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        script = os.path.join(out, "worker.py")
        with open(script, "w") as f:
            f.write(WORKER)
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", str(ranks), script, folder, mode, out],
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

    jobs = [(size, ranks, mode, i) for size in args.sizes for ranks in args.ranks
            for mode in ("full", "sharded") for i in range(args.repeats)]
    results = []
    for size, ranks, mode, i in tqdm(jobs, desc="loads"):
        folder = ensure_model(args.dir, size)
        disk = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        for r in run(folder, mode, ranks):
            results.append(dict(size=size, ranks=ranks, mode=mode, repeat=i,
                                checkpoint_mb=disk / 2**20, **r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; peak host memory per "
          f"process (VmHWM), MB; max over ranks, median over repeats\n")
    print("| model | params | checkpoint MB | ranks | load | baseline MB | peak MB | "
          "peak − baseline MB | load s |")
    print("|---|---|---|---|---|---|---|---|---|")
    import statistics
    for size in args.sizes:
        for ranks in args.ranks:
            for mode in ("full", "sharded"):
                rows = [r for r in results if (r["size"], r["ranks"], r["mode"]) ==
                        (size, ranks, mode)]
                by_repeat = {}
                for r in rows:
                    by_repeat.setdefault(r["repeat"], []).append(r)
                peak = statistics.median(max(x["peak_mb"] for x in v) for v in by_repeat.values())
                base = statistics.median(max(x["baseline_mb"] for x in v)
                                         for v in by_repeat.values())
                extra = statistics.median(max(x["peak_mb"] - x["baseline_mb"] for x in v)
                                          for v in by_repeat.values())
                secs = statistics.median(max(x["seconds"] for x in v) for v in by_repeat.values())
                print(f"| {size} | {rows[0]['params'] / 1e6:.1f} M | "
                      f"{rows[0]['checkpoint_mb']:.1f} | {ranks} | {mode} | {base:.0f} | "
                      f"{peak:.0f} | {extra:.0f} | {secs:.1f} |")


if __name__ == "__main__":
    main()
