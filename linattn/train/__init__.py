"""linattn.train: data-free LinVideo post-training (method.md §3-4) on one GPU or many.

    linattn train CONFIG                     # or: python -m linattn.train train CONFIG
    torchrun --nproc_per_node 8 -m linattn.train train CONFIG

From Python: ``linattn.train.train(config)``. Modules, one job each:

* config: the YAML/TOML configuration and its validation
* flow: rectified-flow conventions, the teacher's sampler (Euler or Wan's UniPC), guidance,
  timestep scaling
* conditioning: text embeddings or prompts + text encoder
* teacher_data / generate: trajectories of the frozen teacher into safetensors shards
* data: reading the shards, the deterministic per-step batch order
* objectives: ADM (its push weightings and anchors, the trained fake score) and velocity MSE
* selection: which layers end linear (train.final_selection)
* models: teacher loading, the converted float32 student
* distributed: process group, DDP / FSDP2 wrapping
* checkpoint: bit-exact resumable checkpoints
* metrics, evaluate: the JSON-lines log, the gate plot, the evaluation set and its metric
  functions (rel_mse by default; pass eval_metrics= for more)
* trainer, cli: the loop and the command line
"""
from .conditioning import Conditioning, encode_prompts
from .config import TrainConfig, load_config
from .data import BatchSchedule, TeacherDataset
from .evaluate import EvalSet, rel_mse_metric, relative_mse, sample_distance
from .flow import FlowModel, euler_sample, flow_sigmas, teacher_sample
from .objectives import (adm_loss, adm_objective, adm_push, adm_weight, fake_score_loss,
                         velocity_mse_objective)
from .teacher_data import DataSpec, conditioning_digest, generate_teacher_data
from .trainer import Trainer, TrainResult, train

__all__ = ["train", "Trainer", "TrainResult", "TrainConfig", "load_config", "Conditioning",
           "encode_prompts", "DataSpec", "conditioning_digest", "generate_teacher_data",
           "TeacherDataset", "BatchSchedule", "FlowModel", "flow_sigmas", "euler_sample",
           "teacher_sample", "adm_loss", "adm_push", "adm_weight", "adm_objective",
           "fake_score_loss", "velocity_mse_objective", "sample_distance", "relative_mse",
           "EvalSet", "rel_mse_metric"]
