"""The post-training loop: data-free ADM (or velocity MSE) with selective transfer.

One optimiser step (method.md §3-4):

    L = L_obj + λ (L_con + L_reg(α)),  α = alpha_at(step, steps, alpha_start, alpha_end)

then the gates are clamped to [0, 1]; after the last step finalize() rounds them and the model
is saved with save_pretrained (reload it with linattn.load_converted).

With train.select_steps = S the run has two phases: steps 0..S−1 select (the step above, α
annealed over S steps); before step S the final selection (train.final_selection) is applied
to the gates, which stay at exactly 0 / 1 from then on (their gradient is dropped before the
optimiser step, so AdamW leaves them alone; no L_con / L_reg), and steps S.. train that fixed
model with the same objective. A gate of exactly 0 makes a hybrid layer's output exactly its
linear branch (0 · softmax + 1 · linear) and 1 exactly the softmax branch, so finalize() at the
end saves exactly the function phase 2 trained. The switch is a function of the step number,
logged in metrics.jsonl ("phase", and "selected" on the first record of phase 2). Everything the step
depends on (learning rate, α, the data order) is a function of the step number, so a
checkpoint's step plus the model, optimiser and RNG states resume the run bit for bit.

Runs in one process or under torchrun (DDP or FSDP2), on the CPU (gloo) or CUDA (NCCL), with
bf16 autocast and gradient checkpointing of the transformer blocks. The loop itself (progress,
logging, checkpoint cadence, resume) is linattn.train.loop's, shared with the distillation
stage.
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from . import distributed as D
from . import sharded_load as SL
from .config import TrainConfig, load_config
from .data import BatchSchedule, TeacherDataset
from .evaluate import EvalMetric, EvalSet, default_eval_metrics, rounded_gates, run_metrics
from .families import model_call_for
from .flow import FlowModel
from .loop import StageLoop, clip_grad, save_model
from .metrics import plot_gates
from .models import (DTYPES, freeze, layer_names, dit_api, load_transformer, make_student,
                     set_trainable, student_gates)
from .objectives import (adm_objective, fake_score_loss, student_samples,
                         velocity_mse_objective)
from .selection import apply_final_selection_, warn_untrained_rounding
from .generate import ensure_teacher_data
from .teacher_data import trajectory_noise


@dataclass
class TrainResult:
    step: int                               # optimiser steps completed
    output_dir: str
    final_dir: Optional[str]                # save_pretrained folder of the finalized student
    selection: Optional[dict]               # layer name -> "softmax" | "linear" (hybrid mode)
    metrics_path: str
    model: Optional[nn.Module]              # the finalized student (rank 0), None if stopped early


def train(config: Union[str, os.PathLike, dict, TrainConfig], *, overrides=None,
          teacher: Optional[nn.Module] = None, stop_at_step: Optional[int] = None,
          progress: bool = True,
          eval_metrics: Optional[Sequence[EvalMetric]] = None) -> TrainResult:
    """Generate the teacher data if needed, train, finalize and save; the Python form of
    ``linattn train CONFIG``.

    Args:
        config: a YAML/TOML file, a dict or a TrainConfig (see linattn.train.config).
        overrides: "section.key=value" strings applied on top of the file.
        teacher: use this module as the teacher instead of loading model.*. It is frozen and
            moved to the device in place (and sharded under FSDP2); the student is a float32
            copy of it.
        stop_at_step: stop once this many steps are done, without a checkpoint or finalize, as
            a preempted job would (resume continues from the last checkpoint).
        progress: show progress bars (rank 0).
        eval_metrics: functions (student samples, EvalSet) -> {name: value} logged as
            eval_<name> at every evaluation (linattn.train.evaluate); default: rel_mse, and
            on the toy teacher every fidelity figure (linattn.toy.TrainerMetrics).
    """
    cfg = load_config(config, overrides)
    trainer = Trainer(cfg, teacher=teacher, progress=progress, eval_metrics=eval_metrics)
    try:
        return trainer.run(stop_at_step=stop_at_step)
    finally:
        trainer.close()


class Trainer(StageLoop):
    def __init__(self, config: TrainConfig, *, teacher: Optional[nn.Module] = None,
                 progress: bool = True,
                 eval_metrics: Optional[Sequence[EvalMetric]] = None):
        super().__init__(config.train, config.output, progress=progress,
                         context_parallel=config.train.context_parallel)
        self.cfg = config
        self.eval_metrics = (list(eval_metrics) if eval_metrics is not None
                             else default_eval_metrics(config))
        tc = config.train

        # Teacher: loaded (or given), frozen, on the device. model.load "sharded": built on the
        # meta device and sharded at once, each process reading only its shard
        # (sharded_load.py); the student likewise once it is converted and wrapped.
        self.sharded_load = teacher is None and config.model.load == "sharded"
        if self.sharded_load:
            self.checkpoint_files = SL.checkpoint_files(SL.model_folder(config.model))
            teacher = freeze(SL.build_empty(config.model, DTYPES[config.model.teacher_dtype]))
            D.shard_frozen(teacher, self.strategy)
            SL.materialize_(teacher, self.ctx.device)
            SL.load_shards_(teacher, self.checkpoint_files)
            student_source = SL.build_empty(config.model, torch.float32)
        elif teacher is None:
            teacher = load_transformer(config.model, DTYPES[config.model.teacher_dtype])
            student_source = (teacher if config.model.teacher_dtype == "float32"
                              else load_transformer(config.model, torch.float32))
        elif self.strategy == "fsdp" and config.model.pretrained is None \
                and config.model.config is None:
            raise ValueError("train.strategy 'fsdp': the unsharded student is rebuilt from "
                             "model.pretrained or model.config at the end; give one of them")
        else:
            student_source = teacher
        self.teacher_module = (teacher if self.sharded_load
                               else freeze(teacher).to(self.ctx.device))

        self.dataset = self._prepare_data()

        # ADM's trained fake score (train.adm_fake_score "trained"): a float32 copy of the
        # teacher, as DMD initialises its fake score, trained on the student's samples.
        fake = None
        if tc.objective == "adm" and tc.adm_fake_score == "trained":
            fake = copy.deepcopy(student_source).float().train()
            fake = fake if self.sharded_load else fake.to(self.ctx.device)
            set_trainable(fake, tc.trainable, [])
        # Student: a float32 converted copy, its gates, what trains, checkpointing, wrapper.
        student = make_student(student_source, config.convert)
        # Sharded load: the parameters the conversion made (maps, gates) are real already.
        created = {n for n, p in student.named_parameters() if not p.is_meta}
        if not self.sharded_load:
            student = student.to(self.ctx.device)
        del student_source
        num_t = self.dataset.spec.num_train_timesteps
        # The family's forward call (linattn.train.families), the same for every model here.
        call = model_call_for(self.teacher_module, config.model.call_options,
                              config.model.pretrained)
        # Fitted on the whole student, before it is wrapped or sharded; a resumed run takes its
        # maps from the checkpoint instead.
        self.map_fit = None
        if tc.map_fit_steps and self.resume_path() is None:
            self.map_fit = self._fit_feature_maps(student, FlowModel(
                student, num_t, input_dtype=torch.float32, call=call))
        self.gates = student_gates(student, config.convert.mode)
        self.layer_names = layer_names(student, self.gates)
        set_trainable(student, tc.trainable, self.gates)
        if self.mesh.context_parallel > 1:
            # The student's sequence is sharded over the group; the frozen teacher runs whole.
            dit_api("enable_context_parallel")(student, ring_degree=self.mesh.ring,
                                               ulysses_degree=self.mesh.ulysses,
                                               mesh=self.mesh.device_mesh)
        if tc.gradient_checkpointing:
            if not hasattr(student, "enable_gradient_checkpointing"):
                raise ValueError(f"train.gradient_checkpointing: {type(student).__name__} has no "
                                 f"enable_gradient_checkpointing() (not a diffusers model); set "
                                 f"it to false")
            student.enable_gradient_checkpointing()
            if fake is not None:
                fake.enable_gradient_checkpointing()
        self.student = student
        self.module = D.wrap(student, self.strategy, self.ctx, ignored_params=self.gates)
        if self.sharded_load:
            SL.materialize_(student, self.ctx.device)
            SL.load_shards_(student, self.checkpoint_files, created)
        else:
            D.shard_frozen(self.teacher_module, self.strategy)

        self.teacher = FlowModel(self.teacher_module, num_t, call=call)
        self.student_fn = FlowModel(self.module, num_t, input_dtype=torch.float32, call=call)
        self.student_eval = FlowModel(D.unwrap(self.module), num_t, input_dtype=torch.float32,
                                      call=call)
        self.guidance_scale = self.dataset.guidance_scale

        self.fake_module = self.fake_fn = self.fake_eval = self.fake_optimizer = None
        if fake is not None:
            self.fake_module = D.wrap(fake, self.strategy, self.ctx)
            if self.sharded_load:
                SL.materialize_(fake, self.ctx.device)
                SL.load_shards_(fake, self.checkpoint_files)
            self.fake_fn = FlowModel(self.fake_module, num_t, input_dtype=torch.float32,
                                     call=call)
            self.fake_eval = FlowModel(D.unwrap(self.fake_module), num_t, call=call,
                                       input_dtype=torch.float32)
            self.fake_params = [p for p in fake.parameters() if p.requires_grad]
            self.fake_optimizer = torch.optim.AdamW(
                self.fake_params, lr=tc.fake_score_lr or tc.lr, betas=tuple(tc.betas),
                eps=tc.adam_eps, weight_decay=tc.weight_decay)

        gate_ids = {id(g) for g in self.gates}
        model_params = [p for p in student.parameters()
                        if p.requires_grad and id(p) not in gate_ids]
        groups = [{"params": model_params, "lr": tc.lr, "base_lr": tc.lr,
                   "weight_decay": tc.weight_decay, "name": "model"}]
        if self.gates:
            groups.append({"params": self.gates, "lr": tc.gate_lr, "base_lr": tc.gate_lr,
                           "weight_decay": 0.0, "name": "gates"})
        self.model_params = model_params
        self.optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas),
                                           eps=tc.adam_eps)
        self.schedule = BatchSchedule(len(self.dataset), tc.global_batch_size,
                                      self.mesh.data_size, tc.seed)
        self._eval_cache = None
        self.select_steps = tc.select_steps if self.gates else None
        # train.binarization false: L_reg is logged but not trained on (the ablation).
        self._reg_weight = 1.0 if tc.binarization else 0.0

    # ------------------------------------------------------------------ data

    def _prepare_data(self) -> TeacherDataset:
        # A teacher sharded before the data exist (sharded load) needs every rank in each
        # forward: all ranks run every missing shard together.
        ensure_teacher_data(self.teacher_module, self.cfg, self.ctx, self.progress,
                            lockstep=self.sharded_load)
        return TeacherDataset(self.cfg.data.dir)

    def _fit_feature_maps(self, student: nn.Module, student_fn: FlowModel) -> dict:
        """train.map_fit_steps steps of feature-map fitting (linattn.dit.map_fitting), each on
        a global batch of random stored teacher points (both guidance branches), split over the
        data replicas and micro-batches as training splits its batches, seeded by train.seed;
        the maps' gradients are averaged over the processes, so every rank takes the same steps
        whatever the world size. Returns the fit's record (errors on one fixed micro-batch of
        stored points before and after, the loss of the first and last step)."""
        tc = self.cfg.train
        generator = torch.Generator().manual_seed(tc.seed)
        n = len(self.dataset)
        fixed = torch.randperm(n, generator=generator)[:min(self.micro_batch, n)].tolist()
        share = self.micro_batch * self.accumulation          # this replica's part of a batch

        def forward(indices) -> None:
            batch = self.to_device(self.dataset.batch(indices))
            with self.autocast():
                student_fn(batch["x_t"], batch["t"], batch["cond"])
                if self.dataset.guided:
                    student_fn(batch["x_t"], batch["t"], batch["negative_cond"])

        drawn = {}

        def step(step: int, micro: int = 0) -> None:
            if micro == 0:   # every rank draws the same global batch, then takes its share
                indices = torch.randint(n, (tc.global_batch_size,), generator=generator)
                drawn["mine"] = indices[self.mesh.data_rank * share:][:share].tolist()
            forward(drawn["mine"][micro * self.micro_batch:(micro + 1) * self.micro_batch])

        def average(params: list) -> None:
            for p in params:
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.ctx.world_size

        fit = dit_api("fit_feature_maps")(
            student, step, tc.map_fit_steps, lr=tc.map_fit_lr, accumulation=self.accumulation,
            reduce_gradients=average if self.ctx.distributed else None,
            progress=self.progress and self.ctx.is_main, evaluate=lambda: forward(fixed))
        return {"steps": tc.map_fit_steps, "lr": tc.map_fit_lr, "before": fit["before"],
                "after": fit["after"], "loss_first": fit["loss"][0],
                "loss_last": fit["loss"][-1]}

    # ------------------------------------------------------------------ loop hooks

    def stopped(self) -> TrainResult:
        return TrainResult(self.step, self.out_dir, None, None, self.metrics.path, None)

    def start_record(self) -> dict:
        record = {"step": 0, **self._gate_record()}
        if self.map_fit is not None:
            record["map_fit"] = self.map_fit
        return record

    def resume_keys(self) -> dict:
        # Another select_steps would switch at another step: not the same run.
        return {**super().resume_keys(), "num_points": len(self.dataset),
                "select_steps": self.cfg.train.select_steps}

    def progress_postfix(self, record: dict) -> dict:
        return {"loss": f"{record['loss']:.4g}", "linear": record.get("n_linear_rounded", "-")}

    def gates_fixed(self, step: int) -> bool:
        """Whether the gates are fixed at their final 0 / 1 selection during ``step``."""
        return self.select_steps is not None and step >= self.select_steps

    def _alpha(self, step: int) -> float:
        """L_reg's α at ``step``: annealed over the selection phase (the whole run without
        one), so that it reaches alpha_end when the gates are rounded."""
        tc = self.cfg.train
        return dit_api("transfer").alpha_at(step, self.select_steps or tc.steps,
                                            tc.alpha_start, tc.alpha_end)

    def _select_now(self) -> dict:
        """The switch to phase 2: the final selection applied to the gates (every rank: they
        are replicated), which are exactly 0 / 1 from now on. Returns its log entries."""
        before = [float(g.detach()) for g in self.gates]
        apply_final_selection_(self.gates, self.cfg.convert.n_linear,
                               self.cfg.train.final_selection)
        transfer = dit_api("transfer")
        with torch.no_grad():
            for g in self.gates:        # "round" leaves them unrounded: fix them at 0 / 1
                g.copy_(transfer.hard(g))
        linear = [name for name, g in zip(self._gate_names(), self.gates)
                  if float(g.detach()) == 0.0]
        return {"selected": {"step": self.step, "gates_before": before, "linear": linear}}

    def _gate_names(self) -> list[str]:
        return self.layer_names or [f"gate {i}" for i in range(len(self.gates))]

    def train_step(self) -> dict:
        """One optimiser step at self.step (not yet incremented); returns its log record."""
        tc = self.cfg.train
        switch = {}
        if self.select_steps is not None and self.step == self.select_steps:
            switch = self._select_now()
        fixed = self.gates_fixed(self.step)
        # Phase 2 (train.select_steps): the gates are fixed, nothing of selective transfer
        # is trained or logged as a loss.
        transfer = dit_api("transfer") if self.gates and not fixed else None
        start = time.perf_counter()
        # The gates keep gate_lr throughout: they must still move while α reaches alpha_end.
        scale = self.lr_scale(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * (scale if group["name"] == "model" else 1.0)
        alpha = self._alpha(self.step) if transfer else None

        indices = self.schedule.rank_indices(self.step, self.mesh.data_rank)
        micro_batches = [indices[i * self.micro_batch:(i + 1) * self.micro_batch]
                         for i in range(self.accumulation)]
        sums: dict[str, float] = {}
        if self.fake_module is not None:
            sums["fake_score_loss"] = self._fake_score_step(micro_batches)
        objective_sum = torch.zeros((), device=self.ctx.device)
        extras = {}
        for i, micro in enumerate(micro_batches):
            batch = self.to_device(self.dataset.batch(micro))
            last = i == self.accumulation - 1
            with D.maybe_no_sync(self.module, self.strategy, sync=last):
                with self.autocast():
                    objective, info = self._objective(batch)
                # Under context parallelism this rank's gradient is its tokens' share of its
                # group's; the wrapper averages over every process: scale by the group size.
                loss = objective * self.mesh.context_parallel / self.accumulation
                if last and transfer:
                    l_con = transfer.constraint_loss(self.gates, self.cfg.convert.n_linear)
                    l_reg = transfer.binarization_loss(self.gates, alpha)
                    loss = loss + tc.transfer_lambda * (l_con + self._reg_weight * l_reg)
                    extras = {"l_con": float(l_con.detach()), "l_reg": float(l_reg.detach())}
                loss.backward()
            objective_sum += objective.detach()
            for key, value in info.items():
                sums[key] = sums.get(key, 0.0) + value / self.accumulation

        if fixed:
            # Every rank drops them alike (so the FSDP2 all-reduce below has nothing to do on
            # every rank); AdamW skips a parameter without a gradient: the gates, and their
            # optimiser state, stay exactly as selected.
            for g in self.gates:
                g.grad = None
        if self.strategy == "fsdp":
            D.all_reduce_grads(self.gates, self.ctx)
        grad_norm = None
        if tc.max_grad_norm is not None and self.model_params:
            grad_norm = clip_grad(self.model_params, tc.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if transfer:
            transfer.clamp_gates_(self.student)

        # The logged values are the global batch's: every rank's mean, averaged.
        names = sorted(sums)
        stats = torch.tensor([float(objective_sum) / self.accumulation,
                              *(sums[k] for k in names)], device=self.ctx.device)
        if self.ctx.distributed:
            torch.distributed.all_reduce(stats)
            stats /= self.ctx.world_size
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)
        elapsed = time.perf_counter() - start
        objective_value = float(stats[0])
        record = {"step": self.step + 1, "objective": objective_value,
                  **{k: float(v) for k, v in zip(names, stats[1:])}, "lr": tc.lr * scale}
        if transfer:
            record.update(extras, alpha=alpha)
            record["loss"] = objective_value + tc.transfer_lambda * (
                extras["l_con"] + self._reg_weight * extras["l_reg"])
        else:
            record["loss"] = objective_value
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        if self.select_steps is not None:
            record["phase"] = "final" if fixed else "select"
        record.update(switch)
        record.update(self._gate_record())
        record.update(step_time_s=elapsed, samples_per_s=tc.global_batch_size / elapsed,
                      world_size=self.ctx.world_size)
        return record

    def _fake_score_step(self, micro_batches: list) -> float:
        """train.fake_score_updates optimiser steps of the trained fake score on the current
        student's samples of this step's batch; returns the mean fake-score loss."""
        tc = self.cfg.train
        total = 0.0
        for _ in range(tc.fake_score_updates):
            for i, micro in enumerate(micro_batches):
                batch = self.to_device(self.dataset.batch(micro))
                last = i == len(micro_batches) - 1
                with D.maybe_no_sync(self.fake_module, self.strategy, sync=last):
                    with self.autocast():
                        x_hat = student_samples(self.student_eval, batch,
                                                guidance_scale=self.guidance_scale)
                        loss = fake_score_loss(self.fake_fn, x_hat, batch["t_next"],
                                               batch["cond"])
                    (loss / len(micro_batches)).backward()
                total += float(loss.detach()) / len(micro_batches)
            if tc.max_grad_norm is not None:
                clip_grad(self.fake_params, tc.max_grad_norm)
            self.fake_optimizer.step()
            self.fake_optimizer.zero_grad(set_to_none=True)
        return total / tc.fake_score_updates

    def _objective(self, batch: dict):
        tc = self.cfg.train
        if tc.objective == "adm":
            return adm_objective(self.student_fn, self.teacher, batch,
                                 weighting=tc.adm_weighting, t_min=tc.adm_t_min,
                                 velocity_weight=tc.adm_velocity_weight,
                                 guidance_scale=self.guidance_scale, fake_score=self.fake_eval,
                                 student_no_grad=self.student_eval)
        return velocity_mse_objective(self.student_fn, batch,
                                      guidance_scale=self.guidance_scale)

    def _gate_record(self) -> dict:
        if not self.gates:
            return {}
        values = torch.stack([g.detach().reshape(()) for g in self.gates])
        # finalize()'s rounding (torch.round: 0.5 goes to 0, linear), counted the same way.
        linear = int((torch.round(values.clamp(0.0, 1.0)) == 0).sum())
        return {"gates": values.tolist(), "n_linear_rounded": linear}

    # ------------------------------------------------------------------ evaluation

    def eval_set(self) -> EvalSet:
        """The held-out evaluation set, with the teacher's samples (built once per run)."""
        if self._eval_cache is None:
            oc, spec = self.cfg.output, self.dataset.spec
            # Held-out noise: trajectory numbers after the generated ones were never trained on.
            ids = list(range(spec.num_trajectories,
                             spec.num_trajectories + oc.eval_num_samples))
            noise = torch.stack([trajectory_noise(spec.seed, i, spec.latent_shape) for i in ids])
            device = self.ctx.device
            negative = (self.dataset.negative_conditioning(ids).to(device)
                        if self.dataset.guided else None)
            eval_set = EvalSet(noise=noise.to(device),
                               cond=self.dataset.conditioning(ids).to(device),
                               negative_cond=negative, guidance_scale=spec.guidance_scale,
                               sampler=spec.sampler, num_steps=oc.eval_num_steps or spec.num_steps,
                               shift=spec.shift, trajectories=ids)
            with torch.no_grad(), self.autocast():
                eval_set.teacher_samples = eval_set.sample(self.teacher)
            self._eval_cache = eval_set
        return self._eval_cache

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Every eval metric (default rel_mse) of student samples against the teacher's from
        held-out noise, with the data's sampler and guidance (every rank runs it: under FSDP2
        a forward needs all ranks). With gates, also of the rounded model (suffix _rounded)."""
        eval_set = self.eval_set()
        was_training = self.student.training
        self.student.eval()
        try:
            with self.autocast():
                out = run_metrics(self.eval_metrics, eval_set.sample(self.student_eval),
                                  eval_set)
                if self.gates:
                    with rounded_gates(self.gates):
                        out.update(run_metrics(self.eval_metrics,
                                               eval_set.sample(self.student_eval), eval_set,
                                               suffix="_rounded"))
        finally:
            self.student.train(was_training)
        return out

    # ------------------------------------------------------------------ checkpoints, end

    def checkpoint_models(self):
        extra = None
        if self.fake_module is not None:
            extra = {"fake_score": (self.fake_module, self.fake_optimizer)}
        return self.module, self.optimizer, extra

    def checkpoint_state(self) -> dict:
        state = {"data_position": self.schedule.position(self.step), **self._gate_record()}
        if self.gates and not self.gates_fixed(self.step):
            state["alpha_next"] = self._alpha(self.step)
        if self.select_steps is not None:
            state["phase_next"] = "final" if self.gates_fixed(self.step) else "select"
        return state

    def plot(self) -> bool:
        return plot_gates(self.metrics.path, os.path.join(self.out_dir, "gates.png"),
                          self.layer_names, self.cfg.convert.n_linear)

    def finish(self) -> TrainResult:
        """finalize() the gates and save the student with save_pretrained (rank 0)."""
        final_dir = os.path.join(self.out_dir, "final")
        model = self._full_student()
        selection = None
        if self.ctx.is_main:
            if self.gates:
                transfer = dit_api("transfer")
                gates = transfer.gates(model)
                trained = [float(g.detach()) for g in gates]
                apply_final_selection_(gates, self.cfg.convert.n_linear,
                                       self.cfg.train.final_selection)
                warn_untrained_rounding(trained, [float(transfer.hard(g.detach())) for g in gates],
                                        self._gate_names())
                selection = transfer.finalize(model)
            save_model(model, final_dir)
            if selection is not None:
                with open(os.path.join(final_dir, "selection.json"), "w") as f:
                    json.dump(selection, f, indent=1)
            self.plot()
        self.ctx.barrier()
        return TrainResult(self.step, self.out_dir, final_dir, selection, self.metrics.path,
                           model if self.ctx.is_main else None)

    def _full_student(self) -> Optional[nn.Module]:
        """The trained student as one unsharded module on rank 0 (None elsewhere)."""
        if self.strategy != "fsdp":
            return self.student
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)

        full = get_model_state_dict(self.module, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        if not self.ctx.is_main:
            return None
        if self.sharded_load:
            # Rank 0 holds the gathered state anyway: build the structure on the meta device
            # and take those tensors as they are (assign), not a second loaded copy.
            model = make_student(SL.build_empty(self.cfg.model, torch.float32),
                                 self.cfg.convert)
            model.load_state_dict(full, strict=True, assign=True)
        else:
            model = make_student(load_transformer(self.cfg.model, torch.float32),
                                 self.cfg.convert)
            model.load_state_dict(full, strict=True)
        return model.to(self.ctx.device)
