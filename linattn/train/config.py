"""The training configuration: one YAML or TOML file, documented field by field here.

A file has up to five sections (model, convert, data, train, output); every key is optional
except the few marked *required*. An unknown key is an error that names it, so a typo never
silently falls back to a default. ``load_config(path, overrides)`` reads a file,
``TrainConfig.from_dict`` a mapping; overrides are "section.key=value" strings whose value is
parsed as YAML (``train.steps=10``, ``convert.layers=[0,2]``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

OBJECTIVES = ("adm", "velocity_mse")
ADM_WEIGHTINGS = ("dmd", "clip", "normalize")
FAKE_SCORES = ("student", "trained")
SAMPLERS = ("euler", "unipc")
MODES = ("hybrid", "linear")
STRATEGIES = ("auto", "none", "ddp", "fsdp")
PRECISIONS = ("bf16", "no")
DTYPES = ("float32", "bfloat16", "float16")
RESUME = ("auto", "never")
LR_SCHEDULES = ("constant", "cosine")
SELECTIONS = ("exact", "round")
LOADS = ("full", "sharded")
# model.pretrained and data.embeddings: the toy video DiT shipped with linattn (linattn.toy) and
# its class embeddings; a run on it logs the toy's fidelity metrics at every evaluation.
TOY_SOURCE = "linattn:toy"


@dataclass
class ModelConfig:
    """The frozen teacher: a diffusers transformer, loaded or built from a config."""

    # Hub id or local folder (a pipeline or a model), read with diffusers' from_pretrained; it
    # needs `accelerate` (in the [train] extra) for models that keep modules in float32 (Wan).
    # "linattn:toy": the toy teacher shipped with linattn (linattn.toy.load_teacher()).
    pretrained: Optional[str] = None
    subfolder: Optional[str] = "transformer"  # inside `pretrained`; null for a bare model folder
    revision: Optional[str] = None
    class_name: str = "WanTransformer3DModel"  # a diffusers model class
    config: Optional[dict] = None           # build class_name(**config) with random weights
    init_seed: int = 0                      # seed of those random weights
    teacher_dtype: str = "float32"          # dtype the frozen teacher is kept in
    # Options of the family's model call (linattn.train.families: CogVideoX snr_shift_scale,
    # HunyuanVideo guidance, LTX-Video frame_rate and VAE compressions).
    call_options: dict = field(default_factory=dict)
    # How the models are loaded (linattn/train/sharded_load.py): "full" (every process reads
    # the whole model, diffusers' from_pretrained) or "sharded" (strategy "fsdp" only, a local
    # safetensors folder: each model is built on the meta device, sharded, and each process
    # reads only its shard's rows, so its host memory at load is about its shard instead of
    # the whole model several times over, which Wan 14B needs: docs/scale.md). Both stages:
    # the distillation stage loads its generator.path the same way.
    load: str = "full"

    def check_source(self) -> None:
        """Raise ValueError unless the teacher comes from one source (shared by every stage)."""
        if self.pretrained is not None and self.config is not None:
            raise ValueError("model: give one of model.pretrained (load weights) and "
                             "model.config (build with random weights), not both")

    def check_load(self, strategy: str, strategy_field: str) -> None:
        """Raise ValueError unless model.load fits the source and the stage's strategy."""
        _one_of("model.load", self.load, LOADS)
        if self.load != "sharded":
            return
        if self.pretrained is None or self.pretrained == TOY_SOURCE:
            raise ValueError(f"model.load: 'sharded' reads the safetensors of a local "
                             f"model.pretrained folder, got pretrained={self.pretrained!r} "
                             f"(use 'full' for model.config or {TOY_SOURCE})")
        if strategy != "fsdp":
            raise ValueError(f"model.load: 'sharded' loads each process's FSDP2 shard; set "
                             f"{strategy_field} to 'fsdp' (got {strategy!r})")


@dataclass
class ConvertConfig:
    """Arguments of linattn.convert for the student (a copy of the teacher)."""

    layers: Union[str, list] = "all"        # "all" or self-attention layer indices
    feature_map: str = "hedgehog"
    mode: str = "hybrid"                    # "hybrid": selective transfer; "linear": fixed set
    n_linear: Optional[int] = None          # target count of linear layers (hybrid: required)
    options: dict = field(default_factory=dict)  # further keyword arguments of linattn.convert


@dataclass
class DataConfig:
    """Data-free training data: trajectories the teacher samples from noise (method.md §4)."""

    dir: Optional[str] = None               # *required*: shards + manifest.json live here
    latent_shape: Optional[list] = None     # *required*: (C, F, H, W) of one latent video
    num_trajectories: int = 64
    trajectories_per_shard: int = 4
    num_steps: int = 50                     # teacher sampler steps = points per trajectory
    # The teacher's sampler (linattn.train.flow): "euler" (FlowMatchEulerDiscreteScheduler) or
    # "unipc" (UniPCMultistepScheduler as WanPipeline configures it, Wan's own default).
    sampler: str = "euler"
    shift: float = 3.0                      # the scheduler's shift (flow_shift for "unipc")
    num_train_timesteps: int = 1000         # model timestep = t * num_train_timesteps
    # Classifier-free guidance of the teacher sampler (1 = none). With guidance the data hold
    # both branches' velocities, the student trains its guided velocity (both branches) and the
    # evaluation samples with the same guidance.
    guidance_scale: float = 1.0
    generation_batch_size: int = 1          # trajectories sampled together
    store_dtype: str = "bfloat16"
    seed: int = 0
    embeddings: Optional[str] = None        # safetensors: prompt_embeds (P, L, D); "linattn:toy"
    #                                         the toy teacher's class embeddings (row i: class i)
    random_conditioning: Optional[list] = None  # (P, L, D) N(0, 1) embeddings, seeded by seed
    prompts: Optional[Union[str, list]] = None  # a list, or a text file with one per line
    text_encoder: Optional[str] = None      # pipeline folder/hub id with tokenizer/, text_encoder/
    negative_prompt: str = ""
    max_sequence_length: int = 512


    def __post_init__(self):
        self.embeddings = embeddings_file(self.embeddings)


def embeddings_file(embeddings: Optional[str]) -> Optional[str]:
    """An embeddings setting as a path: "linattn:toy" is the toy teacher's class embeddings
    (row i: class i, the null row last), the file shipped with linattn.toy."""
    if embeddings == TOY_SOURCE:
        from ..toy.teacher import CLASS_EMBEDDINGS_FILE

        return str(CLASS_EMBEDDINGS_FILE)
    return embeddings


def check_conditioning_source(section: str, s, embeddings_what: str,
                              random_note: str = "") -> None:
    """The conditioning of a section (the first stage's data, the distillation's
    conditioning) comes from exactly one of embeddings, prompts with a text encoder, and
    random_conditioning (P, L, D); raise ValueError naming the field otherwise."""
    sources = [s.embeddings is not None, s.prompts is not None,
               s.random_conditioning is not None]
    if sum(sources) != 1:
        raise ValueError(f"{section}: give exactly one of {section}.embeddings "
                         f"({embeddings_what}), {section}.prompts (with {section}.text_encoder) "
                         f"and {section}.random_conditioning{random_note}")
    if s.random_conditioning is not None and (
            len(s.random_conditioning) != 3
            or not all(isinstance(n, int) and n > 0 for n in s.random_conditioning)):
        raise ValueError(f"{section}.random_conditioning: expected (P, L, D) positive ints, got "
                         f"{s.random_conditioning!r}")
    if s.prompts is not None and s.text_encoder is None:
        raise ValueError(f"{section}.text_encoder: {section}.prompts needs a text encoder (a "
                         f"diffusers pipeline folder or hub id holding tokenizer/ and "
                         f"text_encoder/)")


@dataclass
class TrainSection:
    """The optimisation."""

    objective: str = "adm"                  # "adm" or "velocity_mse"
    steps: int = 3000
    global_batch_size: int = 8              # samples per optimiser step over all processes
    micro_batch_size: Optional[int] = None  # per process per forward; default global/world
    lr: float = 1e-5
    gate_lr: float = 1e-3                   # learning rate of the selective-transfer gates r_l
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: str = "constant"           # model lr after warmup: "constant" or "cosine" (to 0)
    max_grad_norm: Optional[float] = 1.0    # clips the model's gradients (gates excluded)
    transfer_lambda: float = 0.01           # λ in L = L_obj + λ (L_con + L_reg)
    final_selection: str = "exact"          # "exact": the n_linear lowest gates; "round": r < 0.5
    # Selection phase, then training of the final model (mode hybrid): after this many steps the
    # trainer applies final_selection to the gates, fixes them at exactly 0 / 1 (no gate updates,
    # no L_con / L_reg) and trains the fixed model for the remaining steps, so that finalize()
    # saves the function phase 2 trained (a gate of exactly 0 or 1 runs exactly one branch's
    # value). α anneals over these steps. null: select over the whole run (the paper's recipe).
    select_steps: Optional[int] = None
    alpha_start: float = 20.0
    alpha_end: float = 2.0
    # false drops L_reg from the loss (still logged): the paper's "without the binarisation loss"
    # ablation, where gates stay near 0.5 and the rounded model collapses (method.md §3).
    binarization: bool = True
    # ADM's push g (linattn.train.objectives): "dmd": DMD's normaliser, the score difference
    # over the size of the teacher's clean-sample correction (does not vanish, so the push
    # shrinks as the student converges); "clip": the exact weight (1 - t) / max(t, adm_t_min);
    # "normalize": g / mean|g| per sample (full-size pushes at any fidelity; drifts).
    adm_weighting: str = "dmd"
    adm_t_min: float = 0.05
    # λ_v of the velocity anchor λ_v · ‖û(x_t') − u_teacher(x_t')‖² at the stored points, added
    # to ADM (0: the paper's ADM alone, which drifts on the tiny config and the per-time-step
    # Gaussian toy; 1.0 held both for 10x their steps, 0.1 did not: linattn.train.objectives).
    adm_velocity_weight: float = 1.0
    # ADM's fake score: "student" (the student's own velocity, the paper's construction) or
    # "trained" (a separately trained score model, a float32 copy of the teacher trained on the
    # student's samples: the paper's ablated variant; costs a model copy and its optimiser).
    adm_fake_score: str = "student"
    fake_score_lr: Optional[float] = None   # its learning rate (default: lr)
    fake_score_updates: int = 1             # its optimiser steps per student step
    trainable: Union[str, list] = "all"     # "all" or parameter-name substrings
    # Before step 0 of a fresh run: this many Adam steps (lr map_fit_lr) of the converted layers'
    # feature maps alone, each fitted to its own layer's softmax output on the teacher's
    # trajectory points (linattn.dit.map_fitting; LoLCATs' attention transfer). 0: start from
    # the maps as converted (identity Hedgehog), as LinVideo does.
    map_fit_steps: int = 0
    map_fit_lr: float = 1e-2
    mixed_precision: str = "bf16"           # "bf16" autocast or "no"
    gradient_checkpointing: bool = True
    strategy: str = "auto"                  # "auto" (ddp when world > 1), "none", "ddp", "fsdp"
    # Context parallelism: {ring: R, ulysses: U} shards each sample's sequence over groups of
    # R x U processes (diffusers' ring / Ulysses for softmax layers, linattn's state all-reduce
    # for linear ones); the world is (world / (R·U)) data replicas x those groups.
    context_parallel: dict = field(default_factory=lambda: {"ring": 1, "ulysses": 1})
    seed: int = 0
    device: str = "auto"                    # "auto": cuda:LOCAL_RANK if CUDA, else cpu


@dataclass
class OutputSection:
    """Where results go and how often."""

    dir: Optional[str] = None               # *required*
    log_every: int = 1
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 0                     # 0: no periodic sample-distance evaluation
    eval_num_samples: int = 2
    eval_num_steps: Optional[int] = None    # default data.num_steps
    resume: str = "auto"                    # "auto", "never", or a checkpoint folder


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)
    output: OutputSection = field(default_factory=OutputSection)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        config = _build(cls, data, "config")
        config.validate()
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise ValueError naming the first field that is missing, out of range or unknown."""
        m, c, d, t, o = self.model, self.convert, self.data, self.train, self.output
        m.check_source()
        m.check_load(t.strategy, "train.strategy")
        if m.pretrained == TOY_SOURCE and m.class_name != "WanTransformer3DModel":
            raise ValueError(f"model.class_name: the toy teacher ({TOY_SOURCE}) is a "
                             f"WanTransformer3DModel, got {m.class_name!r}")
        _one_of("model.teacher_dtype", m.teacher_dtype, DTYPES)
        from .families import call_class
        call_class(m.class_name)(m.call_options)  # a known family, known options
        _one_of("convert.mode", c.mode, MODES)
        if isinstance(c.layers, str) and c.layers != "all":
            raise ValueError(f"convert.layers: expected 'all' or a list of layer indices, "
                             f"got {c.layers!r}")
        if isinstance(c.layers, list) and not all(isinstance(i, int) for i in c.layers):
            raise ValueError(f"convert.layers: every entry must be an int, got {c.layers!r}")
        if c.mode == "hybrid":
            if c.n_linear is None or c.n_linear < 0:
                raise ValueError("convert.n_linear: mode 'hybrid' needs the target count of "
                                 "linear layers (an int >= 0)")
            if isinstance(c.layers, list) and c.n_linear > len(c.layers):
                raise ValueError(f"convert.n_linear: {c.n_linear} exceeds the {len(c.layers)} "
                                 f"converted layers")
        elif c.n_linear is not None:
            raise ValueError("convert.n_linear: only mode 'hybrid' selects layers; with mode "
                             "'linear' every listed layer is linear, so leave n_linear unset")
        for key in ("layers", "feature_map", "mode"):
            if key in c.options:
                raise ValueError(f"convert.options.{key}: set convert.{key} instead")

        if d.dir is None:
            raise ValueError("data.dir: required (where teacher trajectories are stored)")
        if (not isinstance(d.latent_shape, list) or len(d.latent_shape) != 4
                or not all(isinstance(s, int) and s > 0 for s in d.latent_shape)):
            raise ValueError(f"data.latent_shape: required, (C, F, H, W) positive ints, got "
                             f"{d.latent_shape!r}")
        for name in ("num_trajectories", "trajectories_per_shard", "num_steps",
                     "num_train_timesteps", "generation_batch_size", "max_sequence_length"):
            _positive(f"data.{name}", getattr(d, name))
        _one_of("data.sampler", d.sampler, SAMPLERS)
        if d.shift <= 0:
            raise ValueError(f"data.shift: must be > 0, got {d.shift}")
        if d.guidance_scale < 1.0:
            raise ValueError(f"data.guidance_scale: must be >= 1 (1 = no guidance), got "
                             f"{d.guidance_scale}")
        _one_of("data.store_dtype", d.store_dtype, DTYPES)
        check_conditioning_source("data", d, "a safetensors file of prompt_embeds",
                                  " (for a teacher with random weights)")

        _one_of("train.objective", t.objective, OBJECTIVES)
        _one_of("train.adm_weighting", t.adm_weighting, ADM_WEIGHTINGS)
        _one_of("train.adm_fake_score", t.adm_fake_score, FAKE_SCORES)
        if t.adm_velocity_weight < 0:
            raise ValueError(f"train.adm_velocity_weight: must be >= 0, got "
                             f"{t.adm_velocity_weight}")
        if t.fake_score_lr is not None and t.fake_score_lr <= 0:
            raise ValueError(f"train.fake_score_lr: must be > 0 or null, got {t.fake_score_lr}")
        _positive("train.fake_score_updates", t.fake_score_updates)
        if t.objective != "adm" and t.adm_fake_score != "student":
            raise ValueError(f"train.adm_fake_score: an ADM option, but train.objective is "
                             f"{t.objective!r}")
        _one_of("train.mixed_precision", t.mixed_precision, PRECISIONS)
        _one_of("train.strategy", t.strategy, STRATEGIES)
        unknown = sorted(set(t.context_parallel) - {"ring", "ulysses"})
        if unknown:
            raise ValueError(f"train.context_parallel: unknown keys {unknown} (ring, ulysses)")
        for key in ("ring", "ulysses"):
            _positive(f"train.context_parallel.{key}", t.context_parallel.get(key, 1))
        if (t.context_parallel.get("ring", 1) * t.context_parallel.get("ulysses", 1) > 1
                and t.objective == "adm" and t.adm_fake_score == "trained"):
            raise ValueError("train.context_parallel: the trained fake score (train."
                             "adm_fake_score 'trained') is a softmax copy of the teacher that "
                             "runs unsharded; use adm_fake_score 'student' with context "
                             "parallelism")
        _one_of("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
        _one_of("train.final_selection", t.final_selection, SELECTIONS)
        _positive("train.steps", t.steps)
        if t.select_steps is not None:
            if (isinstance(t.select_steps, bool) or not isinstance(t.select_steps, int)
                    or not 1 <= t.select_steps < t.steps):
                raise ValueError(f"train.select_steps: expected an int in [1, train.steps - 1] "
                                 f"= [1, {t.steps - 1}] (steps of the selection phase) or null, "
                                 f"got {t.select_steps!r}")
            if c.mode != "hybrid":
                raise ValueError(f"train.select_steps: selects among the gates of mode "
                                 f"'hybrid', but convert.mode is {c.mode!r}; leave it null")
        _positive("train.global_batch_size", t.global_batch_size)
        if t.micro_batch_size is not None:
            _positive("train.micro_batch_size", t.micro_batch_size)
        if not 0.0 < t.adm_t_min < 1.0:
            raise ValueError(f"train.adm_t_min: must be in (0, 1), got {t.adm_t_min}")
        for name in ("lr", "gate_lr"):
            if getattr(t, name) <= 0:
                raise ValueError(f"train.{name}: must be > 0, got {getattr(t, name)}")
        if t.weight_decay < 0 or t.transfer_lambda < 0 or t.warmup_steps < 0:
            raise ValueError("train.weight_decay, train.transfer_lambda and train.warmup_steps "
                             "must be >= 0")
        if t.adam_eps <= 0:
            raise ValueError(f"train.adam_eps: must be > 0, got {t.adam_eps}")
        if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
            raise ValueError(f"train.betas: expected two numbers in [0, 1), got {t.betas!r}")
        if t.max_grad_norm is not None and t.max_grad_norm <= 0:
            raise ValueError(f"train.max_grad_norm: must be > 0 or null, got {t.max_grad_norm}")
        if t.alpha_start < 1 or t.alpha_end < 1:
            # Below 1, |2r − 1|^α has no derivative at r = 1/2 (L_reg's gradient is NaN there).
            raise ValueError(f"train.alpha_start and train.alpha_end must be >= 1, got "
                             f"{t.alpha_start} and {t.alpha_end}")
        if isinstance(t.map_fit_steps, bool) or not isinstance(t.map_fit_steps, int) \
                or t.map_fit_steps < 0:
            raise ValueError(f"train.map_fit_steps: expected an int >= 0, got "
                             f"{t.map_fit_steps!r}")
        if not t.map_fit_lr > 0:
            raise ValueError(f"train.map_fit_lr: must be > 0, got {t.map_fit_lr!r}")
        if t.map_fit_steps and m.load == "sharded":
            raise ValueError("train.map_fit_steps: fits the maps on a whole student before it "
                             "is sharded; model.load 'sharded' builds it sharded (use model.load "
                             "'full' or map_fit_steps 0)")
        if isinstance(t.trainable, str) and t.trainable != "all":
            raise ValueError(f"train.trainable: expected 'all' or a list of parameter-name "
                             f"substrings, got {t.trainable!r}")

        if o.dir is None:
            raise ValueError("output.dir: required (checkpoints, metrics and the final model)")
        for name in ("log_every", "checkpoint_every", "keep_checkpoints", "eval_num_samples"):
            _positive(f"output.{name}", getattr(o, name))
        if o.eval_every < 0:
            raise ValueError(f"output.eval_every: must be >= 0, got {o.eval_every}")
        if o.eval_num_steps is not None:
            _positive("output.eval_num_steps", o.eval_num_steps)


def load_config(source: Union[str, os.PathLike, dict, TrainConfig],
                overrides: Optional[list[str]] = None) -> TrainConfig:
    """A TrainConfig from a .yaml/.yml/.toml/.json file, a dict or a TrainConfig.

    Relative paths (data.dir, output.dir, data.embeddings, ...) are relative to the working
    directory, as on the command line.
    """
    return load_sections(TrainConfig, source, overrides)


def load_sections(cls, source, overrides: Optional[list[str]] = None):
    """A config dataclass ``cls`` (sections as fields, from_dict/to_dict/validate, like
    TrainConfig) from a file, a dict or an instance, with "section.key=value" overrides; shared
    by every stage's configuration."""
    config = _build(cls, read_sections(source, overrides), "config")
    config.validate()
    return config


def read_sections(source, overrides: Optional[list[str]] = None) -> dict:
    """The raw mapping of sections of a file, a dict or a config instance (anything with
    to_dict()), with overrides applied; nothing is validated yet."""
    if hasattr(source, "to_dict"):
        data = source.to_dict()
    elif isinstance(source, dict):
        data = json.loads(json.dumps(source))
    else:
        data = _read_file(os.fspath(source))
    for item in overrides or []:
        _apply_override(data, item)
    return data


def _read_file(path: str) -> dict:
    ext = os.path.splitext(path)[1].lower()
    with open(path, "rb") as f:
        raw = f.read()
    if ext in (".yaml", ".yml"):
        data = yaml.safe_load(raw.decode())
    elif ext == ".toml":
        data = tomllib.loads(raw.decode())
    elif ext == ".json":
        data = json.loads(raw)
    else:
        raise ValueError(f"config: {path!r} must end in .yaml, .yml, .toml or .json")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config: {path!r} must hold a mapping of sections, got "
                         f"{type(data).__name__}")
    return data


def _apply_override(data: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or "." not in key:
        raise ValueError(f"override {item!r}: expected section.key=value")
    section, _, name = key.strip().partition(".")
    target = data.setdefault(section, {})
    if not isinstance(target, dict):
        raise ValueError(f"override {item!r}: {section!r} is not a section")
    *parents, last = name.split(".")
    for p in parents:
        target = target.setdefault(p, {})
    target[last] = yaml.safe_load(value)


def _one_of(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {list(allowed)}, got {value!r}")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: must be an int >= 1, got {value!r}")


def _build(cls, data: Any, path: str):
    """cls(**data) for a (nested) dataclass, type-checking leaves and rejecting unknown keys."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; expected some of {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        key = name if path == "config" else f"{path}.{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key)
        else:
            kwargs[name] = _check_type(value, hint, key)
    return cls(**kwargs)


def _check_type(value: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Union:
        errors = []
        for option in typing.get_args(hint):
            try:
                return _check_type(value, option, path)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{path}: {value!r} matches none of the allowed types "
                         f"({', '.join(_type_name(a) for a in typing.get_args(hint))})")
    if hint is type(None):
        if value is None:
            return None
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-5" as a string; accept it as the number it plainly is.
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif hint is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    else:
        raise TypeError(f"{path}: unsupported config type {hint!r}")
    raise ValueError(f"{path}: expected {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))
