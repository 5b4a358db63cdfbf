"""linattn.train.distill: the second post-training stage, few-step distillation (DMD2) of the
linearised model (../docs/distill.md).

LinVideo's largest speed-ups come from distilling the finalized linear-attention model into a
K-step generator (K = 4: Wan 1.3B 97.3 s -> 6.11 s). It is a stage of its own, started from
the first stage's final/ model (running both at once collapsed in the paper):

    linattn train distill.yaml          # a config with a `distill` section runs this stage
    torchrun --nproc_per_node 8 -m linattn.train train distill.yaml
    linattn sample distill.yaml --num 8 --seed 0     # samples at the model's step count

From Python: ``linattn.train.distill.distill(config)``. Three networks: the generator (the
linearised student, its linear layers kept linear, run as a K-step sampler), the real score
(the frozen original with classifier-free guidance), the fake score (a trainable copy of the
original, fitted to the generator's samples with the flow-matching loss). Data-free: the
conditioning is all the data. Optional: DMD2's GAN head on the fake score's features
(distill.gan_weight; its "real" samples are the teacher's own, from a teacher-data folder).

Modules, one job each:

* config: the stage's YAML/TOML configuration (sections model, generator, conditioning,
  distill, output)
* sampler: the K-step sampler (shifted times, clean prediction, fresh re-noising) and
  backward simulation
* objectives: the distribution-matching push with DMD's normaliser, the generator loss, the
  fake score's flow-matching loss, the score times
* schedule: every random draw of a step as a function of (seed, step, update, sample), and the
  order of the conditioning rows
* conditioning: the run's conditioning rows, stored in output.dir
* models: generator, fake score, and reading a distilled model (save_pretrained + sampler.json)
* gan: DMD2's GAN head on the fake score's hidden states, and its two logistic losses
* trainer: the loop (linattn.train.loop's, shared with the first stage)
* sample: ``linattn sample``
"""
from .config import (ConditioningConfig, DistillConfig, DistillSection, GeneratorConfig,
                     is_distill_config, load_distill_config)
from .models import SamplerSpec, load_distilled
from .objectives import dmd_generator_loss, dmd_push, flow_matching_loss, noised, score_times
from .sample import sample_from_config
from .sampler import (backward_simulation, few_step_sample, generator_times, sample_step_noise,
                      seeded_sample, shift_times)
from .trainer import DistillResult, DistillTrainer, distill

__all__ = ["distill", "DistillTrainer", "DistillResult", "DistillConfig", "DistillSection",
           "GeneratorConfig", "ConditioningConfig", "load_distill_config", "is_distill_config",
           "SamplerSpec", "load_distilled", "dmd_push", "dmd_generator_loss",
           "flow_matching_loss", "noised", "score_times", "few_step_sample",
           "backward_simulation", "generator_times", "shift_times", "sample_step_noise",
           "seeded_sample", "sample_from_config"]
