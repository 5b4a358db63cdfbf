"""The distillation stage's configuration: one YAML or TOML file, documented field by field.

A distillation config has the sections model (the real score: the original model, frozen),
generator (the linearised student to distil), conditioning (the only data: prompt embeddings,
prompts + text encoder, or class embeddings), distill (the optimisation) and output. Its
``distill`` section is what tells ``linattn train`` to run this stage rather than
linearisation. Loading, overrides ("distill.steps=10") and error messages are the first
stage's (linattn.train.config): an unknown key is an error that names it.

Defaults are the published Wan 2.1 DMD recipes' (ModelTC/LightX2V lightx2v_train dmd configs,
Self-Forcing's model/dmd.py; ../docs/distill.md): 4 steps at t = 1, 0.75, 0.5, 0.25 before the
shift, 5 fake-score updates per generator update, learning rates 2e-6 and 4e-7 with Adam
β = (0, 0.999), weight decay 0.01, gradient clip 10, teacher guidance 3.0, score times
U(0.02, 0.98) shifted.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional, Union

from ..config import (DTYPES, LR_SCHEDULES, PRECISIONS, SAMPLERS, STRATEGIES, ModelConfig,
                      OutputSection, _one_of, _positive, check_conditioning_source,
                      embeddings_file, load_sections, read_sections)

STAGE_SECTION = "distill"   # a config with this section is a distillation config
REGRESSION_INPUTS = ("renoised", "trajectory", "generated")   # distill.regression_inputs (regression.py)
RENOISE = ("fresh", "implied")                   # distill.renoise, the step rule (sampler.py)


@dataclass
class GeneratorConfig:
    """The generator G: the finalized linearised student, run as a K-step sampler."""

    # A linattn.load_converted folder (the first stage's output.dir/final), the first stage's
    # output.dir itself (its final/ is used), or any diffusers save_pretrained folder; null: a
    # float32 copy of the teacher (a softmax generator: the reference distillation).
    path: Optional[str] = None
    subfolder: Optional[str] = None
    backend: str = "auto"                   # linattn.linear_attention backend of linear layers


@dataclass
class ConditioningConfig:
    """The only data of data-free distillation: one of embeddings, prompts + text_encoder,
    random_conditioning (as the first stage's data section, linattn.train.conditioning). The
    negative conditioning (a negative_prompt_embeds tensor, or the encoded negative_prompt) is
    the real score's unconditional branch."""

    embeddings: Optional[str] = None        # safetensors: prompt_embeds (P, L, D) [+ negative];
    #                                         "linattn:toy" the toy teacher's class embeddings
    random_conditioning: Optional[list] = None  # (P, L, D) N(0, 1) embeddings, seeded by seed
    prompts: Optional[Union[str, list]] = None  # a list, or a text file with one per line
    text_encoder: Optional[str] = None      # pipeline folder/hub id with tokenizer/, text_encoder/
    negative_prompt: str = ""
    max_sequence_length: int = 512
    seed: int = 0                           # seed of random_conditioning

    def __post_init__(self):
        # As the first stage's data.embeddings: the toy's classes (the null row is the
        # negative), so that a run on the toy teacher names it the way model.pretrained does.
        self.embeddings = embeddings_file(self.embeddings)


@dataclass
class DistillSection:
    """The optimisation: DMD2 with backward simulation (linattn.train.distill)."""

    latent_shape: Optional[list] = None     # *required*: (C, F, H, W) of one generated latent
    num_steps: int = 4                      # K, the generator's sampling steps
    # The generator's times before the shift (default: 1, 1 − 1/K, ..., 1/K, e.g. 1, 0.75,
    # 0.5, 0.25), strictly decreasing in (0, 1], the first 1.
    times: Optional[list] = None
    shift: float = 3.0                      # the pipeline's shift: t -> s t / (1 + (s − 1) t)
    # The generator's step rule, in training (backward simulation) and at inference: "fresh"
    # (DMD2: the next input is x̂_0 noised again with new noise) or "implied" (a deterministic
    # step: x̂_0 noised again with the noise its own input implies). sampler.json records it.
    renoise: str = "fresh"
    num_train_timesteps: int = 1000         # model timestep = t * num_train_timesteps
    guidance_scale: float = 3.0             # the real score's classifier-free guidance
    # Times at which the real and fake scores are compared, and the fake score is trained:
    # U(score_t_min, score_t_max), shifted by score_shift (default: shift), clamped to the range.
    score_t_min: float = 0.02
    score_t_max: float = 0.98
    score_shift: Optional[float] = None
    steps: int = 1000                       # generator updates
    fake_score_updates: int = 5             # fake-score updates before each generator update
    global_batch_size: int = 8              # samples per update over all processes
    micro_batch_size: Optional[int] = None  # per process per forward; default global/world
    lr: float = 2.0e-6                      # the generator's learning rate
    fake_score_lr: float = 4.0e-7
    # The generator's linear-attention feature maps (a converted layer's processor.q_map and
    # processor.k_map, e.g. Hedgehog W): null = lr. Set higher when they should move: at lr
    # 1e-4 a toy generator's Hedgehog weights moved by 0.008 (4 % of their std) in 3000 updates.
    feature_map_lr: Optional[float] = None
    betas: list = field(default_factory=lambda: [0.0, 0.999])
    weight_decay: float = 0.01
    adam_eps: float = 1e-8
    warmup_steps: int = 0                   # both learning rates
    lr_schedule: str = "constant"           # after warmup: "constant" or "cosine" (to 0)
    max_grad_norm: Optional[float] = 10.0   # clips each model's gradients
    trainable: Union[str, list] = "all"     # the generator's: "all" or parameter-name substrings
    fake_score_trainable: Union[str, list] = "all"
    # The teacher's sampler for the evaluation's reference samples (output.eval_num_steps
    # steps, default 50): "euler" or "unipc" (linattn.train.flow).
    teacher_sampler: str = "euler"
    # DMD's regression anchor (linattn.train.distill.regression): the generator's x̂_0 also
    # regresses onto the teacher's own samples, L_G = L_DMD + regression_weight · L_reg, on the
    # (noise, guided sample) pairs of a teacher-data folder (the first stage's data.dir, or
    # `linattn generate-data`), sampled at distill.guidance_scale and distill.latent_shape.
    # null / 0: the published DMD2 recipe, no anchor.
    regression_data: Optional[str] = None
    regression_weight: float = 0.0
    # The generator's input at its steps k >= 1 for a pair: "renoised" (the teacher's sample
    # noised again with fresh noise, what inference sees) or "trajectory" (the teacher's own
    # sampling trajectory at t_k, whose endpoint is then a function of the input: the ODE
    # initialisation of CausVid / Self-Forcing) or "generated" (the generator's own steps from
    # the pair's noise, as at inference: its K-step sample is regressed onto the teacher's).
    # linattn.train.distill.regression.
    regression_inputs: str = "renoised"
    # The distribution-matching term's weight: L_G = dmd_weight · L_DMD + regression_weight ·
    # L_reg. 1: DMD. 0: the regression-only control (needs the anchor; the push is still
    # computed and logged, but no gradient flows from it). With dmd_weight 0,
    # fake_score_updates may be 0: regression alone, no fake score trained and no push computed
    # (with regression_inputs "trajectory": the ODE initialisation, a generator for DMD to
    # start from).
    dmd_weight: float = 1.0
    # DMD2's GAN head (linattn.train.distill.gan): a per-token classifier on the fake score's
    # hidden states after block gan_block (null: the middle one), trained beside the fake
    # score's flow loss to tell the teacher's samples (the final samples of the teacher-data
    # folder gan_data, default regression_data, sampled at distill.guidance_scale and
    # distill.latent_shape) from the generator's, both noised at the head's times (below);
    # L_G = dmd_weight · L_DMD + regression_weight · L_reg + gan_weight · L_G_gan and the fake
    # score's loss + gan_discriminator_weight · L_D. DMD2's weights: 3e-3 and 1e-2. 0: no head
    # (the default, and the published Wan DMD recipes').
    gan_weight: float = 0.0
    gan_discriminator_weight: float = 1.0e-2
    gan_data: Optional[str] = None
    gan_block: Optional[int] = None
    # The head's own learning rate (null: fake_score_lr). The head starts from scratch where
    # the fake score starts from the teacher, so it may want a larger rate (the toy runs of
    # docs/distill.md: 3e-3 beside the fake score's 1e-4).
    gan_head_lr: Optional[float] = None
    # The times at which the head compares real and generated samples: U(score_t_min,
    # gan_t_max) shifted by gan_shift (null: score_t_max and the score shift). Measured on the
    # toy (docs/distill.md): a head trained at the score times (shift 3, mostly high noise)
    # stayed at chance; at U(0.02, 0.3) unshifted it told the teacher's samples from the
    # 4-step generator's with 85 % held-out accuracy at t = 0.1.
    gan_t_max: Optional[float] = None
    gan_shift: Optional[float] = None
    # An exponential moving average of the generator's weights (linattn.train.distill.ema):
    # ema ← decay · ema + (1 − decay) · weights after every update once ema_start_step updates
    # are done (the live weights until then); the average is evaluated beside the live
    # weights and saved as final/ (the live weights as final_raw/). null: no average, final/
    # is the live weights. Self-Forcing's Wan DMD configs: 0.99 from step 200.
    ema_decay: Optional[float] = None
    ema_start_step: int = 0
    mixed_precision: str = "bf16"           # "bf16" autocast or "no"
    gradient_checkpointing: bool = True
    strategy: str = "auto"                  # "auto" (ddp when world > 1), "none", "ddp", "fsdp"
    seed: int = 0
    device: str = "auto"                    # "auto": cuda:LOCAL_RANK if CUDA, else cpu


@dataclass
class DistillConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    distill: DistillSection = field(default_factory=DistillSection)
    output: OutputSection = field(default_factory=OutputSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise ValueError naming the first field that is missing, out of range or unknown."""
        m, g, c, d, o = self.model, self.generator, self.conditioning, self.distill, self.output
        m.check_source()
        m.check_load(d.strategy, "distill.strategy")
        _one_of("model.teacher_dtype", m.teacher_dtype, tuple(DTYPES))
        if g.path is not None and not isinstance(g.path, str):
            raise ValueError(f"generator.path: expected a folder or null, got {g.path!r}")

        check_conditioning_source(
            "conditioning", c, "a safetensors file of prompt_embeds and negative_prompt_embeds")
        _positive("conditioning.max_sequence_length", c.max_sequence_length)

        if (not isinstance(d.latent_shape, list) or len(d.latent_shape) != 4
                or not all(isinstance(s, int) and s > 0 for s in d.latent_shape)):
            raise ValueError(f"distill.latent_shape: required, (C, F, H, W) positive ints, got "
                             f"{d.latent_shape!r}")
        _positive("distill.num_steps", d.num_steps)
        if d.times is not None:
            times = d.times
            if (len(times) != d.num_steps or not all(isinstance(t, (int, float)) for t in times)
                    or float(times[0]) != 1.0
                    or any(not 0.0 < float(b) < float(a) for a, b in zip(times, times[1:]))):
                raise ValueError(f"distill.times: expected {d.num_steps} (distill.num_steps) "
                                 f"strictly decreasing times in (0, 1] starting at 1, got "
                                 f"{times!r}")
        for name in ("shift", "score_shift"):
            value = getattr(d, name)
            if value is not None and value <= 0:
                raise ValueError(f"distill.{name}: must be > 0, got {value}")
        _positive("distill.num_train_timesteps", d.num_train_timesteps)
        if d.guidance_scale < 1.0:
            raise ValueError(f"distill.guidance_scale: must be >= 1 (1 = no guidance), got "
                             f"{d.guidance_scale}")
        if not 0.0 < d.score_t_min < d.score_t_max < 1.0:
            raise ValueError(f"distill.score_t_min, distill.score_t_max: need 0 < min < max < 1, "
                             f"got {d.score_t_min}, {d.score_t_max}")
        for name in ("steps", "global_batch_size"):
            _positive(f"distill.{name}", getattr(d, name))
        if (not isinstance(d.fake_score_updates, int) or isinstance(d.fake_score_updates, bool)
                or d.fake_score_updates < 0):
            raise ValueError(f"distill.fake_score_updates: expected an integer >= 0, got "
                             f"{d.fake_score_updates!r}")
        if d.micro_batch_size is not None:
            _positive("distill.micro_batch_size", d.micro_batch_size)
        for name in ("lr", "fake_score_lr", "adam_eps"):
            if getattr(d, name) <= 0:
                raise ValueError(f"distill.{name}: must be > 0, got {getattr(d, name)}")
        if d.gan_t_max is not None and not (isinstance(d.gan_t_max, (int, float))
                                            and d.score_t_min < d.gan_t_max < 1.0):
            raise ValueError(f"distill.gan_t_max: expected a time in (distill.score_t_min "
                             f"{d.score_t_min}, 1) or null (= score_t_max), got "
                             f"{d.gan_t_max!r}")
        if d.gan_shift is not None and not (isinstance(d.gan_shift, (int, float))
                                            and d.gan_shift > 0):
            raise ValueError(f"distill.gan_shift: must be > 0 or null (the score shift), got "
                             f"{d.gan_shift!r}")
        if d.gan_head_lr is not None and not (isinstance(d.gan_head_lr, (int, float))
                                              and d.gan_head_lr > 0):
            raise ValueError(f"distill.gan_head_lr: must be > 0 or null (= "
                             f"distill.fake_score_lr), got {d.gan_head_lr!r}")
        if d.feature_map_lr is not None and not d.feature_map_lr > 0:
            raise ValueError(f"distill.feature_map_lr: must be > 0 or null (= distill.lr), got "
                             f"{d.feature_map_lr!r}")
        if d.weight_decay < 0 or d.warmup_steps < 0:
            raise ValueError("distill.weight_decay and distill.warmup_steps must be >= 0")
        if len(d.betas) != 2 or not all(0 <= b < 1 for b in d.betas):
            raise ValueError(f"distill.betas: expected two numbers in [0, 1), got {d.betas!r}")
        if d.max_grad_norm is not None and d.max_grad_norm <= 0:
            raise ValueError(f"distill.max_grad_norm: must be > 0 or null, got "
                             f"{d.max_grad_norm}")
        for name in ("trainable", "fake_score_trainable"):
            value = getattr(d, name)
            if isinstance(value, str) and value != "all":
                raise ValueError(f"distill.{name}: expected 'all' or a list of parameter-name "
                                 f"substrings, got {value!r}")
        if not isinstance(d.regression_weight, (int, float)) or d.regression_weight < 0:
            raise ValueError(f"distill.regression_weight: must be a number >= 0, got "
                             f"{d.regression_weight!r}")
        if d.regression_weight > 0 and not d.regression_data:
            raise ValueError("distill.regression_data: distill.regression_weight > 0 needs a "
                             "teacher-data folder of (noise, sample) pairs")
        if d.regression_data and d.regression_weight == 0:
            raise ValueError("distill.regression_weight: distill.regression_data is given but "
                             "its weight is 0, so the anchor would do nothing; set a weight "
                             "> 0 or drop the folder")
        if d.ema_decay is not None and not (isinstance(d.ema_decay, (int, float))
                                            and 0.0 < d.ema_decay < 1.0):
            raise ValueError(f"distill.ema_decay: expected a number in (0, 1) or null (no "
                             f"average), got {d.ema_decay!r}")
        if not isinstance(d.ema_start_step, int) or d.ema_start_step < 0:
            raise ValueError(f"distill.ema_start_step: expected an integer >= 0, got "
                             f"{d.ema_start_step!r}")
        if d.ema_decay is None and d.ema_start_step:
            raise ValueError("distill.ema_start_step: set, but distill.ema_decay is null, so no "
                             "average is kept; set a decay (for example 0.99) or drop the start")
        if not isinstance(d.dmd_weight, (int, float)) or d.dmd_weight < 0:
            raise ValueError(f"distill.dmd_weight: must be a number >= 0, got "
                             f"{d.dmd_weight!r}")
        if d.dmd_weight == 0 and d.regression_weight == 0:
            raise ValueError("distill.dmd_weight: 0 with no regression anchor "
                             "(distill.regression_weight 0) leaves the generator nothing to "
                             "learn from")
        for name in ("gan_weight", "gan_discriminator_weight"):
            value = getattr(d, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"distill.{name}: must be a number >= 0, got {value!r}")
        if d.gan_weight > 0:
            if not (d.gan_data or d.regression_data):
                raise ValueError("distill.gan_data: distill.gan_weight > 0 needs the teacher's "
                                 "samples as the discriminator's real data (a teacher-data "
                                 "folder; default distill.regression_data, which is not set "
                                 "either)")
            if d.fake_score_updates == 0:
                raise ValueError("distill.fake_score_updates: 0 never trains the GAN head "
                                 "(distill.gan_weight > 0); give at least one")
            if d.gan_discriminator_weight == 0:
                raise ValueError("distill.gan_discriminator_weight: 0 leaves the GAN head "
                                 "untrained, so distill.gan_weight would push the generator "
                                 "along a fixed random classifier")
        elif any(getattr(d, name) is not None for name in ("gan_data", "gan_block",
                                                             "gan_head_lr", "gan_t_max",
                                                             "gan_shift")):
            raise ValueError("distill.gan_weight: a distill.gan_* setting is set "
                             "but the weight is 0, so there is no GAN head; set a weight > 0 "
                             "(DMD2: 3e-3) or drop them")
        if d.gan_block is not None and (not isinstance(d.gan_block, int)
                                        or isinstance(d.gan_block, bool)):
            raise ValueError(f"distill.gan_block: expected a block index or null (the middle "
                             f"block), got {d.gan_block!r}")
        if d.fake_score_updates == 0 and d.dmd_weight != 0:
            raise ValueError(f"distill.fake_score_updates: 0 leaves the fake score untrained, so "
                             f"the distribution-matching push (distill.dmd_weight "
                             f"{d.dmd_weight}) would compare the teacher with itself; 0 is for "
                             f"regression alone (distill.dmd_weight 0)")
        _one_of("distill.regression_inputs", d.regression_inputs, REGRESSION_INPUTS)
        _one_of("distill.renoise", d.renoise, RENOISE)
        _one_of("distill.lr_schedule", d.lr_schedule, LR_SCHEDULES)
        _one_of("distill.teacher_sampler", d.teacher_sampler, SAMPLERS)
        _one_of("distill.mixed_precision", d.mixed_precision, PRECISIONS)
        _one_of("distill.strategy", d.strategy, STRATEGIES)

        if o.dir is None:
            raise ValueError("output.dir: required (checkpoints, metrics and the final model)")
        for name in ("log_every", "checkpoint_every", "keep_checkpoints", "eval_num_samples"):
            _positive(f"output.{name}", getattr(o, name))
        if o.eval_every < 0:
            raise ValueError(f"output.eval_every: must be >= 0, got {o.eval_every}")
        if o.eval_num_steps is not None:
            _positive("output.eval_num_steps", o.eval_num_steps)

    @property
    def generator_times(self) -> list:
        """The K unshifted times (distill.times or the default grid)."""
        d = self.distill
        if d.times is not None:
            return [float(t) for t in d.times]
        return [1.0 - k / d.num_steps for k in range(d.num_steps)]


def load_distill_config(source: Union[str, os.PathLike, dict, DistillConfig],
                        overrides: Optional[list[str]] = None) -> DistillConfig:
    """A DistillConfig from a .yaml/.yml/.toml/.json file, a dict or a DistillConfig (relative
    paths are relative to the working directory)."""
    return load_sections(DistillConfig, source, overrides)


def is_distill_config(source, overrides: Optional[list[str]] = None) -> bool:
    """Whether ``source`` (a file, dict or config) is a distillation config: it has a
    ``distill`` section."""
    if isinstance(source, DistillConfig):
        return True
    if hasattr(source, "to_dict"):
        return False
    return STAGE_SECTION in read_sections(source, overrides)
