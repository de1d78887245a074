"""The Trainer: one student trained as the config says, epoch by epoch (train, validate, log, checkpoint).

    trainer = Trainer(cfg, dist, run_dir)      # builds data, student, teacher (or its cache), loaders, optimiser
    trainer.fit(logger)                        # every epoch from trainer.start_epoch
    results = trainer.final_report()           # results.json

What it is built from is in engine.build, its checkpoint in engine.state, the loss of a step in engine.loss, its
reports in engine.report; engine.run runs it in a run directory.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

import kd_methods
from common.distributed import DistInfo, barrier, broadcast_buffers
from common.metrics import MetricLogger
from common.rng import rng_isolated, seed_everything
from engine.build import (augments_on_device, build_loaders, build_student, build_teacher, build_teacher_cache,
                          check_stages, input_record, load_training_splits, wrap_for_training)
from engine.evaluation import evaluate, trace_weights
from engine.loss import EpochTotals, check_finite, masked_loss_terms, rows_of, teacher_targets
from engine.optim import CosineSchedule, autocast_for, build_optimizer, optimizer_step, resolve_amp
from engine.report import epoch_line, final_report
from engine.state import load_trainer_state, save_checkpoints, trainer_state
from engine.teacher_cache import weights_digest
from engine.timing import StepTimer, start_profiler
from imagedata.augment import AugSpec, apply_aug_records
from imagedata.normalization import input_norm, normalize_batch
from imagedata.views import unpack_raw
from kd_methods import Distiller, LossTerms, build_method


class Trainer:
    """Owns everything one run needs. `fit` runs `train_and_validate` then `finish_epoch` per epoch; a component
    (the curriculum of engine.curriculum_run) joins it without subclassing, through these declared points:

    sampler (constructor): a factory sampler(num_train) -> the training sampler (default EpochSampler, every sample
        once per epoch), called once the training set is loaded.
    script (constructor): the program whose checkpoints these are (their "program" entry and messages).
    hooks (constructor, or `add_hook`): objects called in order, each with
        name                          its entry in the checkpoint's "extra" dict
        before_epoch(epoch)           in `train_and_validate`, before epoch `epoch` trains
        after_epoch(epoch, record)    after it is validated (record: its metrics), before the checkpoint
        extra_state() -> dict         what a resume needs
        load_extra_state(state)       from a checkpoint ({} when it has no entry `name`).
    set_temperature(T): the temperature the KD method trains with from the next step on (checkpointed).
    A driver that runs the epochs itself calls `train_and_validate(epoch)` and `finish_epoch(...)`. As a run of
    engine.run.run_training (engine.run.TrainingRun): fit, final_report, load_state, start_epoch, script."""

    script = "train_student"

    def __init__(self, cfg, dist: DistInfo, run_dir: Path | None, sampler=None, hooks=(), script: str | None = None):
        self.cfg, self.dist, self.run_dir = cfg, dist, run_dir
        self.script = script or self.script
        self.hooks = list(hooks)
        self.device = dist.device
        self.autocast = autocast_for(cfg.train.amp, self.device)
        self.channels_last = cfg.train.channels_last
        self.temperature = kd_methods.method_class(cfg).temperature(cfg)
        seed_everything(cfg.train.seed, dist.rank)
        # Training's random streams are drawn by the student's and the method's initialisation, then by training.
        # Every other step here runs under rng_isolated: whether a pre-decoded copy or teacher cache is built now
        # or reused, or whether a (randomly initialised) teacher exists at all, must not change a training number.
        with rng_isolated():
            self.splits, data = load_training_splits(cfg, dist)
        self.inputs = input_record(cfg, data)  # in run.json and every checkpoint: a resume compares them
        self.device_aug = augments_on_device(cfg.data, self.device)
        self.class_names = self.splits["train"].class_names
        self.num_classes = len(self.class_names)
        self.spec = AugSpec.from_cfg(cfg.data)
        self.student = build_student(cfg, self.num_classes, self.device, self.channels_last)
        check_stages(cfg, self.student, "student")  # the method's declared stages, before any work reads them
        self.teacher, self.cache, self.cache_info, self.filler = None, None, {}, None
        if self.uses_teacher:
            with rng_isolated():
                self.teacher = build_teacher(cfg, self.class_names, self.device, self.channels_last)
                check_stages(cfg, self.teacher.model, "teacher")
                if cfg.teacher.pretrained and not cfg.teacher.checkpoint:  # the hub's weights: a resume compares
                    self.inputs["teacher_hub_weights"] = weights_digest(self.teacher.model)
                if cfg.teacher.mode == "cached":
                    self.cache, self.cache_info, self.filler = build_teacher_cache(
                        cfg, self.teacher, self.splits, self.spec, dist, self.autocast, self.device_aug)
        # the KD method and the module that trains (student + the method's own parts: DDP, compile, optimizer)
        self.method = build_method(cfg, self.student, self.teacher).to(self.device)
        self.distiller = Distiller(self.student, self.method)
        self.train_sampler, self.train_batches, self.train_loader, self.eval_loaders = build_loaders(
            cfg, dist, self.splits, self.spec, self.cache, self.device_aug, sampler)
        self.optimizer = build_optimizer(self.distiller.parameters(), cfg)
        self.scheduler = CosineSchedule(self.optimizer, cfg.train)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=resolve_amp(cfg.train.amp, self.device) == "fp16")
        self.model: nn.Module = wrap_for_training(self.distiller, dist, cfg.train.compile)
        self.start_epoch, self.best_acc1, self.best_epoch = 0, -1.0, -1

    # ---- the declared points of the hook protocol ----------------------------------------------------------------
    @property
    def uses_teacher(self) -> bool:
        return kd_methods.uses_teacher(self.cfg)

    def add_hook(self, hook) -> None:
        self.hooks.append(hook)

    def set_temperature(self, temperature: float) -> None:
        self.temperature = temperature

    def extra_state(self) -> dict:
        return {hook.name: hook.extra_state() for hook in self.hooks}

    def load_extra_state(self, state: dict) -> None:
        for hook in self.hooks:
            hook.load_extra_state(state.get(hook.name, {}))

    # ---- one epoch ---------------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        cfg = self.cfg
        self.model.train()
        self.train_sampler.set_epoch(epoch)
        online = self.uses_teacher and cfg.teacher.mode == "online"
        totals, timer = EpochTotals(self.device), StepTimer(self.device)
        profiler = (start_profiler((self.run_dir or Path(cfg.run.out_dir)) / "profile", self.device, self.dist.rank,
                                   self.dist.is_main) if cfg.train.profile and epoch == self.start_epoch else None)
        start = time.perf_counter()
        it, steps = iter(self.train_loader), len(self.train_loader)
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not self.dist.is_main,
                   dynamic_ncols=True, leave=False)
        for step in range(steps):
            self.scheduler.set_progress(epoch + step / steps)
            with timer.data_wait():  # only the time blocked on the loader
                batch = next(it)
            x = self.batch_images(batch, self.filler)
            y = batch["label"].to(self.device, non_blocking=True)
            valid = batch["valid"]  # False marks a DDP padding duplicate (TrainBatchSampler); on the host
            timer.compute_begins()
            logits, terms, mean_loss, loss = self.step_loss(x, y, batch, valid, step, epoch, online)
            optimizer_step(self.optimizer, self.scaler, loss, self.distiller, self.cfg.train.grad_clip)
            timer.compute_ends()
            if profiler is not None:
                profiler.step()
            totals.add(logits, y, valid, terms, mean_loss)
            bar.update(1)
            if (step + 1) % cfg.log.every_steps == 0 or step + 1 == steps:
                running = totals.running_loss()  # one host sync per interval, not per step
                check_finite(running, epoch, step, self.run_dir)
                bar.set_postfix(loss=f"{running:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
        bar.close()
        if profiler is not None:
            profiler.stop()
        record, n = totals.reduce()
        # samples that reached the loss this epoch, over all ranks: exactly the sampler's selection
        assert round(n) == self.train_sampler.num_selected(), (n, self.train_sampler.num_selected())
        epoch_s = time.perf_counter() - start
        data_s, compute_s = timer.totals()
        return {**record, "time/data_s": data_s, "time/compute_s": compute_s,
                "time/other_s": max(epoch_s - data_s - compute_s, 0.0), "time/epoch_s": epoch_s}

    def step_loss(self, x: torch.Tensor, y: torch.Tensor, batch: dict, valid: torch.Tensor, step: int, epoch: int,
                  online: bool) -> tuple[torch.Tensor, LossTerms, torch.Tensor, torch.Tensor]:
        """One step's forward and loss: (student logits, the method's terms, their mean over this rank's valid
        samples, the loss to backpropagate: `masked_loss_terms`)."""
        with self.autocast():
            outputs = self.model(x)
            teacher = teacher_targets(self.method, self.teacher, self.device, x, batch, online)
        step_valid = self.train_batches.global_valid(step)  # the same on every rank, no communication

        def compute(keep, outputs=outputs, teacher=teacher, y=y):
            if keep is not None:
                keep = keep.to(self.device, non_blocking=True)
                outputs, teacher, y = rows_of(outputs, keep), rows_of(teacher, keep), y[keep]
            return self.method.loss_terms(outputs, teacher, y, epoch, self.temperature)
        terms, mean_loss, loss = masked_loss_terms(compute, valid, step_valid, self.dist.world_size)
        return outputs["logits"], terms, mean_loss, loss

    def batch_images(self, batch: dict, filler=None) -> torch.Tensor:
        """The batch's training views as normalised floats on the device (augmented here when data.augment_on
        resolves to device). With `filler` (a lazily filled teacher cache), the teacher first scores the rows whose
        cached view is not filled yet, on these very views (engine.teacher_cache.SlotFiller)."""
        if "raw" in batch:
            views = apply_aug_records(unpack_raw(batch, self.device), batch["record"], self.spec)
        else:
            views = batch["image"]
        if filler is not None:
            filler.complete(batch, views)
        return normalize_batch(views, self.device, self.channels_last, input_norm(self.student))

    def evaluate(self, split: str) -> dict:
        """Metrics of the current student on `split`, with rank 0's BatchNorm statistics on every rank (DDP syncs
        buffers only at the start of a training forward, so each rank holds those its own last batch left)."""
        broadcast_buffers(self.student)
        self.trace_weights(split)
        return evaluate(self.student, self.eval_loaders[split], self.device, self.channels_last, self.autocast,
                        self.num_classes)

    def trace_weights(self, what: str) -> None:
        trace_weights(self.student, self.train_sampler.epoch, what, self.dist.is_main)

    # ---- checkpoints (engine.state) ----------------------------------------------------------------------------
    def state_dict(self, next_epoch: int, rng_per_rank: list[dict] | None = None) -> dict:
        return trainer_state(self, next_epoch, rng_per_rank)

    def load_state(self, ckpt: dict, path: Path) -> None:
        load_trainer_state(self, ckpt, path)

    # ---- the loop ----------------------------------------------------------------------------------------------
    def train_and_validate(self, epoch: int) -> tuple[dict, bool]:
        """Train epoch `epoch`, then validate. Returns (metrics record, whether val/acc1 improved on the best)."""
        for hook in self.hooks:
            hook.before_epoch(epoch)
        record = {"epoch": epoch, **self.train_epoch(epoch)}
        val = self.evaluate("validation")
        record.update({"val/acc1": val["acc1"], "val/acc5": val["acc5"], "val/loss": val["loss"],
                       "lr": self.scheduler.get_last_lr()[0], "kd/temperature": self.temperature})
        improved = val["acc1"] > self.best_acc1
        if improved:
            self.best_acc1, self.best_epoch = val["acc1"], epoch
        for hook in self.hooks:
            hook.after_epoch(epoch, record)
        return record, improved

    def finish_epoch(self, epoch: int, record: dict, improved: bool, logger: MetricLogger, note: str = "") -> None:
        """Write the metrics line, then the checkpoints (so a resumed run re-does any epoch past its checkpoint),
        then the console line (`note`: what the caller adds to it, e.g. the curriculum's action)."""
        logger.log(record)
        save_checkpoints(self, epoch, improved)
        if self.dist.is_main:
            tqdm.write(epoch_line(self.cfg, epoch, record, self.uses_teacher, note))
        barrier()

    def fit(self, logger: MetricLogger) -> None:
        try:
            for epoch in range(self.start_epoch, self.cfg.train.epochs):
                record, improved = self.train_and_validate(epoch)
                self.finish_epoch(epoch, record, improved, logger)
        finally:
            self.release_cache()

    def release_cache(self) -> None:
        """Give back the teacher cache's fill lock (teacher.cache_fill=lazy), so another run may fill it."""
        if self.filler is not None:
            self.filler.close()

    def final_report(self) -> dict:
        """results.json's content (engine.report.final_report), written by rank 0."""
        return final_report(self)
