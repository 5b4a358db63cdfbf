"""The distillation loop: DMD2 with backward simulation, data-free (../docs/distill.md).

One optimiser step (``distill.steps`` of them) is fake_score_updates fake-score updates, then
one generator update (the two time-scale rule):

* fake-score update u: the generator produces samples without gradient (backward simulation
  from noise to a random exit step, the same on every process), and the fake score takes an
  Adam step on the flow-matching loss at random shifted times;
* generator update: the same, with gradient through the exit step, and an Adam step on the
  distribution-matching loss (real score with classifier-free guidance against the fake
  score, DMD's normaliser; linattn.train.distill.objectives), plus, with
  distill.regression_weight > 0, DMD's regression anchor on teacher (noise, sample) pairs at
  the same exit step (linattn.train.distill.regression);
* with distill.fake_score_updates 0 (and dmd_weight 0) the step is the generator's anchor
  alone: with distill.regression_inputs "trajectory", the ODE initialisation that DMD can
  start from (linattn.train.distill.regression);
* with distill.gan_weight, DMD2's GAN head (linattn.train.distill.gan) is trained in every
  fake-score update on the teacher's samples against the generator's, and the generator update
  adds its non-saturating loss, whose gradient reaches the generator through its samples;
* with distill.ema_decay, the generator's weight average folds in the update
  (linattn.train.distill.ema); it is evaluated beside the live weights and saved as final/.

The loop, logging, checkpoints, bit-exact resume, DDP / FSDP2 and bf16 autocast are the first
stage's (linattn.train.loop, linattn.train.distributed, linattn.train.checkpoint). Every random
draw is a function of (seed, step, update, sample) (linattn.train.distill.schedule), so a
checkpoint's step resumes the same draws and one process computes what several do.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .. import distributed as D
from .. import sharded_load as SL
from ..evaluate import EvalMetric, EvalSet, default_eval_metrics, run_metrics
from ..flow import FlowModel
from ..loop import StageLoop, clip_grad, save_model
from ..metrics import plot_series
from ..models import DTYPES, freeze, load_transformer, set_trainable
from . import conditioning as conditioning_store
from .config import DistillConfig, load_distill_config
from .ema import GeneratorEMA
from .gan import FeatureDiscriminator, discriminator_loss, generator_gan_loss
from .models import SamplerSpec, empty_generator, load_generator, make_fake_score
from .objectives import (dmd_generator_loss, flow_matching_error, flow_matching_loss, noised,
                         score_times)
from .regression import RegressionPairs, regression_loss
from .sampler import (backward_simulation, clean_prediction, generator_input, generator_times,
                      seeded_sample)
from .schedule import (GAN_FAKE_NOISE, GAN_FAKE_TIME, GAN_REAL_NOISE, GAN_REAL_PAIR,
                       GAN_REAL_TIME, GENERATOR_NOISE, REGRESSION_NOISE, REGRESSION_PAIR,
                       REGRESSION_STEP_NOISE, SCORE_NOISE, SCORE_TIME, ConditioningOrder,
                       StepDraws)

EVAL_SEED = 1_000_003           # sampling seed of the evaluation's held-out noise
DEFAULT_TEACHER_STEPS = 50      # the reference teacher sampler's steps (output.eval_num_steps)
PLOTTED = ("dmd_push", "fake_score_loss", "score_gap", "generator_grad_norm", "regression_loss",
           "gan_discriminator_loss", "gan_generator_loss")


@dataclass
class DistillResult:
    step: int                               # generator updates completed
    output_dir: str
    final_dir: Optional[str]                # the distilled generator (save_pretrained + sampler.json)
    #                                         (the weight average, with distill.ema_decay)
    metrics_path: str
    model: Optional[nn.Module]              # final_dir's model (rank 0), None if stopped
    sampler: Optional[SamplerSpec]          # the K-step sampler it was trained for


def distill(config: Union[str, os.PathLike, dict, DistillConfig], *, overrides=None,
            teacher: Optional[nn.Module] = None, stop_at_step: Optional[int] = None,
            progress: bool = True,
            eval_metrics: Optional[Sequence[EvalMetric]] = None) -> DistillResult:
    """Distil the generator into a K-step sampler and save it; the Python form of
    ``linattn train CONFIG`` with a distillation config.

    Args:
        config: a YAML/TOML file, a dict or a DistillConfig (linattn.train.distill.config).
        overrides: "section.key=value" strings applied on top of the file.
        teacher: use this module as the real score instead of loading model.*; it is frozen
            and moved to the device in place. The fake score (and, with generator.path null,
            the generator) is a float32 copy of it.
        stop_at_step: stop once this many steps are done, without a checkpoint or saving, as a
            preempted job would (resume continues from the last checkpoint).
        progress: show progress bars (rank 0).
        eval_metrics: functions (generator samples, EvalSet) -> {name: value} logged as
            eval_<name> at every evaluation (linattn.train.evaluate); default: rel_mse against
            the teacher's many-step samples from the same noise, and on the toy teacher
            (model.pretrained "linattn:toy") every toy fidelity figure with its spread and the
            teacher's own (linattn.toy.TrainerMetrics), as in the first stage.
    """
    cfg = load_distill_config(config, overrides)
    trainer = DistillTrainer(cfg, teacher=teacher, progress=progress, eval_metrics=eval_metrics)
    try:
        return trainer.run(stop_at_step=stop_at_step)
    finally:
        trainer.close()


class DistillTrainer(StageLoop):
    desc = "linattn distill"

    def __init__(self, config: DistillConfig, *, teacher: Optional[nn.Module] = None,
                 progress: bool = True,
                 eval_metrics: Optional[Sequence[EvalMetric]] = None):
        super().__init__(config.distill, config.output, section_name="distill",
                         progress=progress)
        self.cfg = config
        self.eval_metrics = (list(eval_metrics) if eval_metrics is not None
                             else default_eval_metrics(config))
        dc = config.distill

        # Real score: the original, loaded (or given), frozen, on the device. model.load
        # "sharded": all three networks are built on the meta device, sharded, and each process
        # reads only its shards' rows (linattn/train/sharded_load.py).
        self.sharded_load = teacher is None and config.model.load == "sharded"
        if self.sharded_load:
            files = SL.checkpoint_files(SL.model_folder(config.model))
            teacher = freeze(SL.build_empty(config.model, DTYPES[config.model.teacher_dtype]))
            D.shard_frozen(teacher, self.strategy)
            SL.materialize_(teacher, self.ctx.device)
            SL.load_shards_(teacher, files)
            source = None
        elif teacher is None:
            teacher = load_transformer(config.model, DTYPES[config.model.teacher_dtype])
            source = (teacher if config.model.teacher_dtype == "float32"
                      else load_transformer(config.model, torch.float32))
        elif self.strategy == "fsdp" and config.generator.path is None \
                and config.model.pretrained is None and config.model.config is None:
            raise ValueError("distill.strategy 'fsdp': the unsharded generator is rebuilt from "
                             "generator.path, or with path null from model.pretrained or "
                             "model.config, at the end; give one of them")
        else:
            source = teacher
        self.teacher_module = (teacher if self.sharded_load
                               else freeze(teacher).to(self.ctx.device))

        self.conditioning = conditioning_store.prepare(
            config.conditioning, dc.guidance_scale, self.out_dir, self.ctx,
            resuming=self.resume_path() is not None)

        # Generator and fake score: float32, trained, checkpointed, wrapped.
        if self.sharded_load:
            generator, generator_folder = empty_generator(config.generator, config.model)
            fake = make_fake_score(SL.build_empty(config.model, torch.float32))
        else:
            generator = load_generator(config.generator, source).to(self.ctx.device)
            fake = make_fake_score(source).to(self.ctx.device)
        del source
        set_trainable(generator, dc.trainable, [], field="distill.trainable")
        set_trainable(fake, dc.fake_score_trainable, [], field="distill.fake_score_trainable")
        if dc.gradient_checkpointing:
            for name, model in (("generator", generator), ("fake score", fake)):
                if not hasattr(model, "enable_gradient_checkpointing"):
                    raise ValueError(f"distill.gradient_checkpointing: the {name} "
                                     f"({type(model).__name__}) has no "
                                     f"enable_gradient_checkpointing(); set it to false")
                model.enable_gradient_checkpointing()
        # DMD2's GAN head: a submodule of the fake score, so that it is wrapped, checkpointed
        # and optimised with it (linattn.train.distill.gan).
        self.discriminator = None
        if dc.gan_weight > 0:
            if self.sharded_load:
                raise ValueError("distill.gan_weight: the GAN head is not built under "
                                 "model.load 'sharded' (its weights are in no checkpoint); "
                                 "use model.load 'full' or gan_weight 0")
            self.discriminator = FeatureDiscriminator(fake, dc.gan_block, seed=dc.seed)
        self.generator, self.fake = generator, fake
        self.generator_module = D.wrap(generator, self.strategy, self.ctx)
        self.fake_module = D.wrap(fake, self.strategy, self.ctx)
        if self.sharded_load:
            for model, folder in ((generator, generator_folder),
                                  (fake, SL.model_folder(config.model))):
                SL.materialize_(model, self.ctx.device)
                SL.load_shards_(model, SL.checkpoint_files(folder))
        else:
            D.shard_frozen(self.teacher_module, self.strategy)

        num_t = dc.num_train_timesteps
        self.real = FlowModel(self.teacher_module, num_t)
        self.generator_fn = FlowModel(self.generator_module, num_t, input_dtype=torch.float32)
        self.generator_eval = FlowModel(D.unwrap(self.generator_module), num_t,
                                        input_dtype=torch.float32)
        self.fake_fn = FlowModel(self.fake_module, num_t, input_dtype=torch.float32)
        self.fake_eval = FlowModel(D.unwrap(self.fake_module), num_t, input_dtype=torch.float32)

        self.generator_params = [p for p in generator.parameters() if p.requires_grad]
        self.fake_params = [p for p in fake.parameters() if p.requires_grad]
        self.ema = (GeneratorEMA([(n, p) for n, p in generator.named_parameters()
                                  if p.requires_grad], dc.ema_decay, dc.ema_start_step)
                    if dc.ema_decay is not None else None)
        adam = dict(betas=tuple(dc.betas), eps=dc.adam_eps, weight_decay=dc.weight_decay)
        groups = self._generator_groups(generator)
        # Each group's rate before the schedule's factor (train_step scales it every step).
        self.generator_base_lrs = [group["lr"] for group in groups]
        self.optimizer = torch.optim.AdamW(groups, lr=dc.lr, **adam)
        fake_groups = self._fake_score_groups(fake)
        self.fake_base_lrs = [group["lr"] for group in fake_groups]
        self.fake_optimizer = torch.optim.AdamW(fake_groups, lr=dc.fake_score_lr, **adam)

        self.sampler = SamplerSpec(times=tuple(generator_times(config.generator_times,
                                                               dc.shift)),
                                   unshifted_times=tuple(config.generator_times),
                                   shift=dc.shift, num_train_timesteps=num_t,
                                   renoise=dc.renoise)
        self.score_shift = dc.score_shift if dc.score_shift is not None else dc.shift
        self.order = ConditioningOrder(self.conditioning.embeds.shape[0], dc.global_batch_size,
                                       dc.fake_score_updates + 1, dc.seed)
        self._eval_cache: Optional[EvalSet] = None
        self.regression = (RegressionPairs(dc.regression_data, latent_shape=dc.latent_shape,
                                           guidance_scale=dc.guidance_scale,
                                           inputs=dc.regression_inputs,
                                           times=self.sampler.times)
                           if dc.regression_weight > 0 else None)
        # The discriminator's real data: the teacher's final samples and their conditioning.
        self.gan_real = (RegressionPairs(dc.gan_data or dc.regression_data,
                                         latent_shape=dc.latent_shape,
                                         guidance_scale=dc.guidance_scale,
                                         field="distill.gan_data" if dc.gan_data
                                         else "distill.regression_data")
                         if self.discriminator is not None else None)

    # ------------------------------------------------------------------ one step

    def _micro_batches(self, update: int):
        """This rank's micro-batches of an update: (global sample indices, conditioning,
        negative conditioning or None), on the device."""
        dc, ctx = self.cfg.distill, self.ctx
        rows = self.order.global_rows(self.step, update)
        per_rank = dc.global_batch_size // ctx.world_size
        first = ctx.rank * per_rank
        for i in range(self.accumulation):
            indices = list(range(first + i * self.micro_batch,
                                 first + (i + 1) * self.micro_batch))
            cond, negative = self.conditioning.rows([rows[j] for j in indices])
            yield (indices, cond.to(ctx.device),
                   None if negative is None else negative.to(ctx.device))

    def _generate(self, draws: StepDraws, indices: list, cond: torch.Tensor, exit_step: int,
                  grad: bool) -> torch.Tensor:
        """The generator's samples at exit_step, by backward simulation from this update's
        noise (gradient through the exit step only, and only if ``grad``)."""
        shape = self.cfg.distill.latent_shape
        noise = draws.normal(GENERATOR_NOISE, indices, shape)
        return backward_simulation(
            self.generator_eval, self.generator_fn if grad else self.generator_eval, noise, cond,
            self.sampler.times, lambda k: draws.normal(GENERATOR_NOISE + k, indices, shape),
            exit_step, grad=grad, step_rule=self.sampler.renoise)

    def _time_draws(self, draws: StepDraws, indices: list, time_purpose: int,
                    noise_purpose: int, t_max: Optional[float] = None,
                    shift: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Times U(score_t_min, t_max) shifted by shift (null: the score times' own), and
        noise, one per sample."""
        dc = self.cfg.distill
        t = score_times(draws.uniform(time_purpose, indices), t_min=dc.score_t_min,
                        t_max=t_max if t_max is not None else dc.score_t_max,
                        shift=shift if shift is not None else self.score_shift)
        return t, draws.normal(noise_purpose, indices, dc.latent_shape)

    def _score_draws(self, draws: StepDraws, indices: list) -> tuple[torch.Tensor, torch.Tensor]:
        return self._time_draws(draws, indices, SCORE_TIME, SCORE_NOISE)

    def _gan_draws(self, draws: StepDraws, indices: list, time_purpose: int,
                   noise_purpose: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The GAN head's times, U(score_t_min, gan_t_max) shifted by gan_shift, and noise."""
        dc = self.cfg.distill
        return self._time_draws(draws, indices, time_purpose, noise_purpose, dc.gan_t_max,
                                dc.gan_shift)

    def _regression_loss(self, draws: StepDraws, indices: list, exit_step: int) -> torch.Tensor:
        """DMD's regression anchor at the generator's step exit_step, for this micro-batch's
        samples: each draws a teacher pair, and step exit_step's x̂_0 from the pair's input
        regresses onto the pair's sample (linattn.train.distill.regression)."""
        shape = self.cfg.distill.latent_shape
        pairs = draws.integers(REGRESSION_PAIR, indices, len(self.regression))
        noise, sample, cond = self.regression.batch(pairs, self.ctx.device)
        t = float(self.sampler.times[exit_step])
        x = self.regression.inputs_at(
            pairs, noise, sample, t, lambda: draws.normal(REGRESSION_NOISE, indices, shape),
            generated=lambda: generator_input(
                self.generator_eval, noise, cond, self.sampler.times,
                lambda k: draws.normal(REGRESSION_STEP_NOISE + k, indices, shape), exit_step,
                step_rule=self.sampler.renoise))
        return regression_loss(clean_prediction(self.generator_fn, x, t, cond), sample)

    def _fake_score_update(self, update: int) -> tuple[float, Optional[float], dict]:
        """One Adam step of the fake score (and its GAN head) on the generator's current
        samples; returns (flow-matching loss, gradient norm before clipping, the GAN head's
        figures)."""
        dc = self.cfg.distill
        draws = StepDraws(dc.seed, self.step, update, self.ctx.device)
        exit_step = draws.exit_step(dc.num_steps)
        total, extras = 0.0, {}
        for i, (indices, cond, _) in enumerate(self._micro_batches(update)):
            last = i == self.accumulation - 1
            with torch.no_grad(), self.autocast():
                x = self._generate(draws, indices, cond, exit_step, grad=False)
            t, noise = self._score_draws(draws, indices)
            with D.maybe_no_sync(self.fake_module, self.strategy, sync=last):
                with self.autocast():
                    if self.discriminator is None:
                        loss = flow_matching_loss(self.fake_fn, x, cond, t=t, noise=noise)
                        objective = loss
                    else:
                        loss, d_loss, info = self._fake_score_gan_losses(
                            draws, indices, x, cond, t, noise)
                        objective = loss + dc.gan_discriminator_weight * d_loss
                (objective / self.accumulation).backward()
            total += float(loss.detach()) / self.accumulation
            if self.discriminator is not None:
                for key, value in {"gan_discriminator_loss": float(d_loss.detach()),
                                   **info}.items():
                    extras[key] = extras.get(key, 0.0) + value / self.accumulation
        norm = (clip_grad(self.fake_params, dc.max_grad_norm)
                if dc.max_grad_norm is not None else None)
        self.fake_optimizer.step()
        self.fake_optimizer.zero_grad(set_to_none=True)
        return total, norm, extras

    def _fake_score_gan_losses(self, draws: StepDraws, indices: list, x: torch.Tensor,
                               cond: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
        """The fake score's flow-matching loss on the generator's samples and its GAN head's
        loss on them against the teacher's samples, from one forward of three parts (one
        forward per backward keeps DDP's and FSDP2's hooks simple): the generator's samples at
        the score times (the flow loss), and the generator's and the teacher's at the GAN
        times (the head): (flow loss, L_D, logged mean logits)."""
        dc = self.cfg.distill
        pairs = draws.integers(GAN_REAL_PAIR, indices, len(self.gan_real))
        _, real, real_cond = self.gan_real.batch(pairs, self.ctx.device)
        if not isinstance(cond, torch.Tensor):
            raise ValueError(f"distill.gan_weight: the GAN head batches the stage's "
                             f"conditioning with the teacher data's, which needs embedding "
                             f"tensors; this model's conditioning is a {type(cond).__name__}")
        if tuple(real_cond.shape[1:]) != tuple(cond.shape[1:]):
            raise ValueError(f"distill.gan_data: its conditioning rows have shape "
                             f"{tuple(real_cond.shape[1:])}, the stage's conditioning "
                             f"{tuple(cond.shape[1:])}; the discriminator sees both in one "
                             f"batch")
        real_t, real_noise = self._gan_draws(draws, indices, GAN_REAL_TIME, GAN_REAL_NOISE)
        fake_t, fake_noise = self._gan_draws(draws, indices, GAN_FAKE_TIME, GAN_FAKE_NOISE)
        x = x.detach()
        inputs = torch.cat([noised(x, t, noise), noised(x, fake_t, fake_noise),
                            noised(real, real_t, real_noise)])
        times = torch.cat([t, fake_t, real_t]).float()
        with self.discriminator.capture() as logits:
            u = self.fake_fn(inputs, times, torch.cat([cond, cond, real_cond.to(cond.dtype)]))
        n = x.shape[0]
        fake_logits, real_logits = logits[0][n:2 * n], logits[0][2 * n:]
        flow = flow_matching_error(u[:n], x, noise)
        info = {"gan_real_logit": float(real_logits.detach().float().mean()),
                "gan_fake_logit": float(fake_logits.detach().float().mean())}
        return flow, discriminator_loss(real_logits, fake_logits), info

    def _generator_gan_gradient(self, draws: StepDraws, indices: list, x: torch.Tensor,
                                cond: torch.Tensor) -> tuple[float, torch.Tensor]:
        """(L_G_gan, its gradient with respect to the generator's samples x): the fake score and
        its head run with gradient to their input only (torch.autograd.grad accumulates
        nothing into their parameters), so the generator's backward takes the gradient as it
        takes DMD's push."""
        t, noise = self._gan_draws(draws, indices, GAN_FAKE_TIME, GAN_FAKE_NOISE)
        x_leaf = x.detach().requires_grad_(True)
        with torch.enable_grad():
            with self.discriminator.capture() as logits:
                self.fake_eval(noised(x_leaf, t, noise), t.float(), cond)
            loss = generator_gan_loss(logits[0])
            grad, = torch.autograd.grad(loss, x_leaf)
        return float(loss.detach()), grad

    def _generator_update(self, update: int) -> dict:
        """One Adam step of the generator on the distribution-matching loss (and the anchor,
        and the GAN head's term), or on the anchor alone (distill.fake_score_updates 0)."""
        dc = self.cfg.distill
        draws = StepDraws(dc.seed, self.step, update, self.ctx.device)
        exit_step = draws.exit_step(dc.num_steps)
        if dc.fake_score_updates == 0:
            sums = self._regression_only_update(draws, exit_step)
        else:
            sums = self._matching_update(draws, update, exit_step)
        if dc.max_grad_norm is not None:
            sums["generator_grad_norm"] = clip_grad(self.generator_params, dc.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.step + 1)
        sums["exit_step"] = float(exit_step)
        return sums

    def _regression_only_update(self, draws: StepDraws, exit_step: int) -> dict:
        """The generator's gradients from the anchor alone: no fake score to compare with
        (it is never trained), so no push is computed (config: dmd_weight 0)."""
        dc = self.cfg.distill
        total = 0.0
        for i, (indices, _, _) in enumerate(self._micro_batches(dc.fake_score_updates)):
            last = i == self.accumulation - 1
            with D.maybe_no_sync(self.generator_module, self.strategy, sync=last):
                with self.autocast():
                    reg = self._regression_loss(draws, indices, exit_step)
                (dc.regression_weight * reg / self.accumulation).backward()
            total += float(reg.detach()) / self.accumulation
        return {"generator_loss": dc.regression_weight * total, "regression_loss": total}

    def _matching_update(self, draws: StepDraws, update: int, exit_step: int) -> dict:
        """The generator's gradients from the distribution-matching loss (and the anchor, and
        the GAN head's non-saturating loss)."""
        dc = self.cfg.distill
        sums: dict[str, float] = {}
        for i, (indices, cond, negative) in enumerate(self._micro_batches(update)):
            last = i == self.accumulation - 1
            t, noise = self._score_draws(draws, indices)
            # With the anchor, the regression term takes a backward of its own after DMD's
            # (one forward per backward keeps DDP's and FSDP2's hooks simple); gradients are
            # synchronised on the micro-batch's last backward only.
            anchored = self.regression is not None
            # dmd_weight 0 (the regression-only control): the push is still measured, on
            # samples drawn without gradient, so the log shows what DMD would have done.
            matching = dc.dmd_weight > 0
            gan = self.discriminator is not None
            with D.maybe_no_sync(self.generator_module, self.strategy, sync=last and not anchored):
                with self.autocast():
                    x = self._generate(draws, indices, cond, exit_step, grad=matching or gan)
                    loss, info = dmd_generator_loss(
                        x, self.real, self.fake_eval, cond, t=t, noise=noise,
                        negative_cond=negative, guidance_scale=dc.guidance_scale)
                    objective = dc.dmd_weight * loss if matching else None
                    if gan:
                        gan_loss, gan_grad = self._generator_gan_gradient(draws, indices, x,
                                                                          cond)
                        info["gan_generator_loss"] = gan_loss
                        # gradient with respect to x: gan_weight · ∂L_G_gan/∂x
                        surrogate = dc.gan_weight * (x.float() * gan_grad).sum()
                        objective = surrogate if objective is None else objective + surrogate
                if objective is not None:
                    (objective / self.accumulation).backward()
            if anchored:
                with D.maybe_no_sync(self.generator_module, self.strategy, sync=last):
                    with self.autocast():
                        reg = self._regression_loss(draws, indices, exit_step)
                    (dc.regression_weight * reg / self.accumulation).backward()
                info["regression_loss"] = float(reg.detach())
            for key, value in {"generator_loss": float(loss.detach()), **info}.items():
                sums[key] = sums.get(key, 0.0) + value / self.accumulation
        return sums

    def train_step(self) -> dict:
        dc = self.cfg.distill
        start = time.perf_counter()
        scale = self.lr_scale(self.step)
        for group, base in zip(self.optimizer.param_groups, self.generator_base_lrs):
            group["lr"] = base * scale
        for group, base in zip(self.fake_optimizer.param_groups, self.fake_base_lrs):
            group["lr"] = base * scale
        fake_losses, fake_norms, gan_sums = [], [], {}
        for update in range(dc.fake_score_updates):
            loss, norm, extras = self._fake_score_update(update)
            fake_losses.append(loss)
            if norm is not None:
                fake_norms.append(norm)
            for key, value in extras.items():
                gan_sums[key] = gan_sums.get(key, 0.0) + value / dc.fake_score_updates
        stats = self._generator_update(dc.fake_score_updates)
        stats.update(gan_sums)
        # Logged values are the global batch's: the ranks' means, averaged (norms are global).
        if fake_losses:
            stats["fake_score_loss"] = sum(fake_losses) / len(fake_losses)
            stats["fake_score_loss_first"] = fake_losses[0]
            stats["fake_score_loss_last"] = fake_losses[-1]
        local = [k for k in sorted(stats) if k not in ("generator_grad_norm", "exit_step")]
        if self.ctx.distributed:
            values = torch.tensor([stats[k] for k in local], device=self.ctx.device,
                                  dtype=torch.float64)
            torch.distributed.all_reduce(values)
            values /= self.ctx.world_size
            stats.update(zip(local, values.tolist()))
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)
        elapsed = time.perf_counter() - start
        record = {"step": self.step + 1, "loss": stats["generator_loss"], **stats,
                  "lr": dc.lr * scale, "fake_score_lr": dc.fake_score_lr * scale}
        if dc.feature_map_lr is not None:
            record["feature_map_lr"] = dc.feature_map_lr * scale
        if self.discriminator is not None:
            record["gan_head_lr"] = self.fake_base_lrs[-1] * scale
        if fake_norms:
            record["fake_score_grad_norm"] = sum(fake_norms) / len(fake_norms)
        record.update(step_time_s=elapsed, samples_per_s=dc.global_batch_size / elapsed,
                      world_size=self.ctx.world_size)
        return record

    def progress_postfix(self, record: dict) -> dict:
        postfix = {}
        if "dmd_push" in record:
            postfix["push"] = f"{record['dmd_push']:.3g}"
        if "fake_score_loss" in record:
            postfix["fake"] = f"{record['fake_score_loss']:.3g}"
        if "regression_loss" in record:
            postfix["reg"] = f"{record['regression_loss']:.3g}"
        if "gan_discriminator_loss" in record:
            postfix["D"] = f"{record['gan_discriminator_loss']:.3g}"
        return postfix

    # ------------------------------------------------------------------ evaluation

    def eval_set(self) -> EvalSet:
        """Held-out conditioning rows (0, 1, ... mod P) and noise, with the teacher's samples
        from that noise (its many-step guided sampler), built once per run."""
        if self._eval_cache is None:
            dc, oc = self.cfg.distill, self.output
            ids = list(range(oc.eval_num_samples))
            cond, negative = self.conditioning.rows(ids)
            noise = seeded_noise(ids, dc.latent_shape, self.ctx.device)
            device = self.ctx.device
            eval_set = EvalSet(noise=noise, cond=cond.to(device),
                               negative_cond=None if negative is None else negative.to(device),
                               guidance_scale=dc.guidance_scale, sampler=dc.teacher_sampler,
                               num_steps=oc.eval_num_steps or DEFAULT_TEACHER_STEPS,
                               shift=dc.shift, trajectories=ids)
            with torch.no_grad(), self.autocast():
                eval_set.teacher_samples = eval_set.sample(self.real)
            self._eval_cache = eval_set
        return self._eval_cache

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Every eval metric of the generator's K-step samples (seed EVAL_SEED: the noise the
        teacher's reference samples start from); every rank runs it (FSDP2). With a weight
        average: eval_<name> is the average's (the model final/ saves), eval_<name>_raw the
        live weights', once the two differ."""
        eval_set = self.eval_set()
        was_training = self.generator.training
        self.generator.eval()
        try:
            if self.ema is None or not self.ema.averaging(self.step):
                return self._evaluate_weights(eval_set)
            out = self._evaluate_weights(eval_set, suffix="_raw")
            with self.ema.applied():
                out.update(self._evaluate_weights(eval_set))
            return out
        finally:
            self.generator.train(was_training)

    def _evaluate_weights(self, eval_set: EvalSet, suffix: str = "") -> dict:
        with self.autocast():
            samples = seeded_sample(self.generator_eval, eval_set.cond, self.sampler.times,
                                    seed=EVAL_SEED, indices=eval_set.trajectories,
                                    shape=self.cfg.distill.latent_shape,
                                    step_rule=self.sampler.renoise)
        return run_metrics(self.eval_metrics, samples, eval_set, suffix=suffix)

    # ------------------------------------------------------------------ checkpoints, end

    def checkpoint_models(self):
        return (self.generator_module, self.optimizer,
                {"fake_score": (self.fake_module, self.fake_optimizer)})

    def checkpoint_tensors(self) -> dict:
        return {"generator_ema": self.ema.state_dict()} if self.ema is not None else {}

    def resume_keys(self) -> dict:
        dc = self.cfg.distill
        keys = {**super().resume_keys(), "fake_score_updates": dc.fake_score_updates,
                "num_steps": dc.num_steps, "num_rows": self.order.num_rows,
                "ema_decay": dc.ema_decay, "ema_start_step": dc.ema_start_step,
                # one optimiser group or two: a checkpoint of the other kind cannot load
                # (None for checkpoints written before the setting, which had one group)
                "feature_map_lr": dc.feature_map_lr,
                # the fake score's GAN head and the block it reads (None: no head, as in
                # checkpoints written before it existed)
                "gan_block": (self.discriminator.block_index
                              if self.discriminator is not None else None)}
        if dc.lr_schedule == "constant":
            # Nothing a step does depends on the step count then (the draws are functions of
            # the step number, the learning rate is constant after warmup), so a run asked for
            # more steps continues a shorter one where it stopped, as the same longer run.
            del keys["steps"]
        return keys

    def checkpoint_state(self) -> dict:
        return {"conditioning_position": self.order.position(self.step)}

    def plot(self) -> bool:
        return plot_series(self.metrics.path, os.path.join(self.out_dir, "distill.png"),
                           PLOTTED, title="DMD2 distillation", eval_prefix="eval_")

    def stopped(self) -> DistillResult:
        return DistillResult(self.step, self.out_dir, None, self.metrics.path, None, None)

    def finish(self) -> DistillResult:
        """Save the generator (save_pretrained: load it with linattn.train.distill
        .load_distilled or linattn.load_converted) and its sampler.json (rank 0): with a
        weight average, the average as final/ and the live weights as final_raw/."""
        final_dir = os.path.join(self.out_dir, "final")
        if self.ema is not None:
            self._save_generator(os.path.join(self.out_dir, "final_raw"))
            # Training is over: the live weights become the average, so that the returned
            # model is the one final/ holds.
            self.ema.copy_to_model()
        model = self._save_generator(final_dir)
        if self.ctx.is_main:
            self.plot()
        self.ctx.barrier()
        return DistillResult(self.step, self.out_dir, final_dir, self.metrics.path,
                             model if self.ctx.is_main else None, self.sampler)

    def _save_generator(self, directory: str) -> Optional[nn.Module]:
        """The generator's current weights as one module, saved with its sampler.json
        (rank 0; None elsewhere)."""
        model = self._full_generator()
        if self.ctx.is_main:
            save_model(model, directory)
            self.sampler.save(directory)
        return model

    def _generator_groups(self, generator: nn.Module) -> list:
        """The generator optimiser's parameter groups: one at distill.lr, or with
        distill.feature_map_lr a second one for the feature maps of its linear layers (one group
        without it, so checkpoints written before the setting existed still resume)."""
        dc = self.cfg.distill
        named = [(n, p) for n, p in generator.named_parameters() if p.requires_grad]
        if dc.feature_map_lr is None:
            return [{"params": [p for _, p in named], "lr": dc.lr}]
        maps = [p for n, p in named if _is_feature_map(n)]
        if not maps:
            raise ValueError("distill.feature_map_lr: the generator has no trainable "
                             "feature-map parameters (no converted layer with a learnable map, "
                             "or distill.trainable leaves them out); set it to null")
        rest = [p for n, p in named if not _is_feature_map(n)]
        return [{"params": rest, "lr": dc.lr}, {"params": maps, "lr": dc.feature_map_lr}]

    def _fake_score_groups(self, fake: nn.Module) -> list:
        """The fake score optimiser's parameter groups: one at distill.fake_score_lr, and with
        the GAN head a second for the head at distill.gan_head_lr (default the same rate)."""
        dc = self.cfg.distill
        if self.discriminator is None:
            return [{"params": list(self.fake_params), "lr": dc.fake_score_lr}]
        head = {id(p) for p in self.discriminator.head.parameters()}
        return [{"params": [p for p in self.fake_params if id(p) not in head],
                 "lr": dc.fake_score_lr},
                {"params": [p for p in self.fake_params if id(p) in head],
                 "lr": dc.gan_head_lr if dc.gan_head_lr is not None else dc.fake_score_lr}]

    def _full_generator(self) -> Optional[nn.Module]:
        """The trained generator as one unsharded module on rank 0 (None elsewhere)."""
        if self.strategy != "fsdp":
            return self.generator
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)

        full = get_model_state_dict(self.generator_module, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        if not self.ctx.is_main:
            return None
        if self.sharded_load:
            # Rank 0 holds the gathered state: take its tensors into a meta-built structure.
            model, _ = empty_generator(self.cfg.generator, self.cfg.model)
            model.load_state_dict(full, strict=True, assign=True)
            return model.to(self.ctx.device)
        source = (load_transformer(self.cfg.model, torch.float32)
                  if self.cfg.generator.path is None else None)
        model = load_generator(self.cfg.generator, source)
        model.load_state_dict(full, strict=True)
        return model.to(self.ctx.device)


def _is_feature_map(name: str) -> bool:
    """Whether a generator parameter belongs to a converted layer's q or k feature map
    (linattn.dit.processor registers them as processor.q_map / processor.k_map)."""
    return ".processor.q_map." in name or ".processor.k_map." in name


def seeded_noise(indices: list, shape, device: torch.device) -> torch.Tensor:
    """The starting noise of EVAL_SEED's samples (linattn.train.distill.sampler)."""
    from .sampler import sample_step_noise

    return sample_step_noise(EVAL_SEED, indices, 0, shape, device)
