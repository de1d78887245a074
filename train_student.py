"""Distil an ImageNet-pretrained teacher into a student trained from scratch on mini-ImageNet.

    # the reference recipe: ResNet-152 (torchvision V1 weights) -> MobileNetV2, teacher run once and cached
    python train_student.py
    python train_student.py --config configs/mini_imagenet_kd.yaml kd.temperature=2 train.epochs=5
    python train_student.py kd.alpha=1                       # label-only baseline: no teacher is built or run
    python train_student.py teacher.mode=online              # run the teacher on every batch (slow, for comparison)
    python train_student.py run.name=my_run run.resume=auto  # continue a killed run
    torchrun --nproc_per_node=4 train_student.py             # DDP: NCCL on GPU, gloo on CPU

    # offline quickstart on generated data, one command (under 3 minutes on a 2-core CPU): trains the quickstart
    # teacher (configs/quickstart_teacher.yaml) unless it exists, distils it, trains the label-only baseline
    python train_student.py --config configs/quickstart.yaml

Loss: alpha * CE(z_s, y) + (1 - alpha) * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))  (models.kd_loss).
Outputs in <run.out_dir>/<run.name>/: config.yaml, metrics.jsonl, checkpoints/{last,best}.pt, results.json,
student.safetensors, curves.png, tensorboard/ (log.tensorboard=true).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import kd_methods
from common.checkpoint import load_checkpoint, load_state_strict, save_checkpoint
from common.cli import run_cli
from common.config import (RESUME_SAFE_KEYS, check_ranges, check_resume_config, check_same_config_on_all_ranks, opt,
                           parse_config, run_config, section, to_plain)
from common.distributed import (DistInfo, all_gather_objects, all_reduce_sum, barrier, broadcast_buffers,
                                broadcast_module, broadcast_object, cleanup_distributed, setup_distributed)
from common.errors import UserError, check
from common.files import atomic_write, save_config, write_json
from common.metrics import MetricLogger, read_jsonl
from common.plots import plot_curves
from common.rng import rng_isolated, rng_state, seed_everything, set_rng_state, state_digest, trace, trace_dir
from common.rundir import (check_program, checkpoint_program, claim_run_dir, default_run_name, make_dirs, plan_run_dir,
                           read_saved_config, require_entries, run_files, run_name)
from engine.config import Config, validate
from imagedata.augment import AugSpec, apply_aug_records
from imagedata.image_sources import VAL_FRACTION, check_data_path, load_splits
from imagedata.normalization import input_norm, normalize_batch
from imagedata.predecode import predecode_splits
from imagedata.samplers import EpochSampler, ShardSampler, TrainBatchSampler
from imagedata.views import EvalViews, TrainViews, make_loader, unpack_raw
from kd_methods import Distiller, LossTerms, build_method
from models import count_params, create_student, create_teacher

# ================================================================================================================


# ================================================================================================================
# Pieces of the engine.
# ================================================================================================================
def resolve_amp(amp: str, device: torch.device) -> str:
    """`train.amp` as it runs: 'auto' is bf16 on a CUDA device that computes bf16 natively (Ampere and newer), fp16
    (with the GradScaler) on older GPUs, where bf16 is emulated and slow, and off on CPU."""
    if amp != "auto":
        return amp
    if device.type != "cuda":
        return "off"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def autocast_for(amp: str, device: torch.device):
    """A zero-argument factory of the autocast context for `train.amp` (see `resolve_amp` for 'auto')."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_amp(amp, device))
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, nesterov=True, weight_decay=t.weight_decay)
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


def lr_at(progress: float, epochs: float, warmup_epochs: float, lr: float, min_lr: float) -> float:
    """Learning rate after `progress` epochs (fractional): linear warm-up to lr over warmup_epochs, then cosine
    from lr to min_lr at `epochs`. A function of progress in epochs rather than of a step counter, so that epochs
    of different lengths (curriculum subsets) still follow one schedule."""
    if progress < warmup_epochs:
        return lr * progress / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    t = min(1.0, (progress - warmup_epochs) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))


class CosineSchedule:
    """Sets the optimizer's learning rate from training progress (see `lr_at`); its state is that progress."""

    def __init__(self, optimizer: torch.optim.Optimizer, train_cfg):
        self.optimizer, self.cfg, self.progress = optimizer, train_cfg, 0.0
        self.set_progress(0.0)

    def set_progress(self, progress: float) -> None:
        self.progress = progress
        lr = lr_at(progress, self.cfg.epochs, self.cfg.warmup_epochs, self.cfg.lr, self.cfg.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"progress": self.progress}

    def load_state_dict(self, state: dict) -> None:
        self.set_progress(state["progress"])


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, channels_last: bool, autocast, num_classes: int) -> dict:
    """Top-1, top-5 and mean CE over the loader, each sample counted once across ranks (ShardSampler + all-reduce).
    Returns {"acc1", "acc5", "loss", "n"}."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss sum, count
    k = min(5, num_classes)
    for batch in loader:
        x = normalize_batch(batch["image"], device, channels_last, input_norm(model))
        y = batch["label"].to(device, non_blocking=True)
        with autocast():
            logits = model(x)
        logits = logits.float()
        top = logits.topk(k, dim=1).indices
        sums[0] += (top[:, 0] == y).sum()
        sums[1] += (top == y[:, None]).any(dim=1).sum()
        sums[2] += nn.functional.cross_entropy(logits, y, reduction="sum")
        sums[3] += y.numel()
    all_reduce_sum(sums)
    model.train(was_training)
    n = max(sums[3].item(), 1)
    return {"acc1": 100 * sums[0].item() / n, "acc5": 100 * sums[1].item() / n, "loss": sums[2].item() / n,
            "n": int(sums[3].item())}


def weighted_sum(terms: LossTerms) -> torch.Tensor:
    """sum_k w_k * v_k over a method's (weight, value) terms: the loss it trains on."""
    return sum(weight * value for weight, value in terms.values())


def masked_loss_terms(compute: Callable[[torch.Tensor | None], LossTerms], valid: torch.Tensor, step_valid: int,
                      world_size: int) -> tuple[LossTerms, torch.Tensor, torch.Tensor]:
    """One rank's loss for a training step whose batch may hold padded duplicates (valid[i] = False).

    `compute(keep)` returns the method's terms, each a mean over the rows `keep` (None: all rows). With V_r this
    rank's valid samples, n_r = |V_r|, W ranks and n = sum_r n_r the step's valid samples over all ranks
    (`step_valid`), the loss to backpropagate is

        L_r = (W / n) * sum_{i in V_r} l_i = (n_r W / n) * mean_{i in V_r} l_i,   l_i = the per-sample loss,

    so that DDP's gradient average (1/W) sum_r grad L_r = grad (1/n) sum_{i in V} l_i: the mean over the step's
    valid samples, padding excluded. When every rank's batch is full and valid (always in one process) the factor
    is 1 and L_r is the plain batch mean. (A term that is a statistic of the batch, such as DIST's intra-class
    relation, is computed over each rank's valid samples.) Returns (terms, mean loss over V_r for logging, L_r); a
    rank with no valid sample gets zero terms and a zero loss that still reaches every parameter (DDP)."""
    n_valid = int(valid.sum())
    scale = n_valid * world_size / step_valid
    if n_valid == len(valid) and scale == 1.0:
        terms = compute(None)
        loss = weighted_sum(terms)
        return terms, loss, loss
    if n_valid == 0:
        terms = compute(None)
        zero = weighted_sum(terms) * 0.0
        return {name: (weight, torch.zeros_like(value)) for name, (weight, value) in terms.items()}, zero, zero
    terms = compute(valid)  # `compute` moves the mask to its tensors' device
    loss = weighted_sum(terms)
    return terms, loss, loss * scale


def rows_of(tensors: dict, keep: torch.Tensor) -> dict:
    """The rows `keep` of every tensor in a dict (None entries stay None)."""
    return {k: (None if v is None else v[keep]) for k, v in tensors.items()}


@torch.no_grad()
def measure_latency(model: nn.Module, batch_size: int, image_size: int, device, channels_last: bool, autocast,
                    repeats: int = 5) -> float:
    """Median wall time (ms) of one eval-mode forward at this batch size, after one warm-up pass. The input comes
    from a generator of its own: a latency report (eval.latency) must not move the process's random streams."""
    model.eval()
    x = torch.randn(batch_size, 3, image_size, image_size, device=device,
                    generator=torch.Generator(device=device).manual_seed(0))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast():
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def save_student_safetensors(model: nn.Module, path: Path) -> None:
    """Weights loadable with timm.create_model(name, num_classes=C, pretrained=True,
    pretrained_cfg_overlay=dict(file=path, num_classes=C)). The overlay's num_classes matters: without it timm
    assumes the 1000-way ImageNet head and silently drops our classifier weights."""
    from safetensors.torch import save
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(path, "wb") as fh:
        fh.write(save(state))


# ================================================================================================================
# The trainer: data, student, teacher (or its cache), optimiser and the epoch loop. train_student_rl.py drives it.
# ================================================================================================================
class StepTimer:
    """Splits an epoch into data wait (blocked on the loader), compute (forward, backward, optimiser step) and the
    rest. On CUDA, compute is the GPU time between events recorded around each step, read once at the end of the
    epoch (no per-step synchronisation); on CPU it is wall time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.data_s, self.compute_wall_s, self._t0 = 0.0, 0.0, 0.0
        self.events: list[tuple] = []

    @contextlib.contextmanager
    def data_wait(self):
        t0 = time.perf_counter()
        yield
        self.data_s += time.perf_counter() - t0

    def compute_begins(self) -> None:
        if self.cuda:
            self.events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.events[-1][0].record()
        else:
            self._t0 = time.perf_counter()

    def compute_ends(self) -> None:
        if self.cuda:
            self.events[-1][1].record()
        else:
            self.compute_wall_s += time.perf_counter() - self._t0

    def totals(self) -> tuple[float, float]:
        """(data wait s, compute s)."""
        if self.cuda:
            torch.cuda.synchronize()
            return self.data_s, sum(a.elapsed_time(b) for a, b in self.events) / 1000
        return self.data_s, self.compute_wall_s


class Trainer:
    """Owns everything one run needs. `fit` runs `train_and_validate` then `finish_epoch` per epoch; the
    curriculum run (train_student_rl.CurriculumTrainer) drives those two itself and plugs in without subclassing:

    sampler: builds the training sampler from the training-set size (known once __init__ has loaded the data);
        default EpochSampler, every sample once per epoch.
    hooks: objects called in order (the list `self.hooks`, which parts built from the trainer append to), with
        name                          their entry in the checkpoint's "extra" dict
        before_epoch(epoch)           in `train_and_validate`, before epoch `epoch` trains
        after_epoch(epoch, record)    after it is validated (record: its metrics), before the checkpoint
        extra_state() -> dict         what a resume needs
        load_extra_state(state)       from a checkpoint ({} when it has no entry `name`)."""

    script = "train_student"

    def __init__(self, cfg, dist: DistInfo, run_dir: Path | None, sampler=None, hooks=()):
        self.cfg, self.dist, self.run_dir = cfg, dist, run_dir
        self.hooks = list(hooks)
        self.device = dist.device
        self.autocast = autocast_for(cfg.train.amp, self.device)
        self.channels_last = cfg.train.channels_last
        self.alpha = cfg.kd.alpha
        self.temperature = kd_methods.method_class(cfg).temperature(cfg)
        seed_everything(cfg.train.seed, dist.rank)
        # Training's random streams are drawn by the student's and the method's initialisation, then by training.
        # Every other step here runs under rng_isolated: whether a pre-decoded copy or teacher cache is built now
        # or reused, or whether a (randomly initialised) teacher exists at all, must not change a training number.

        # ---- data ----------------------------------------------------------------------------------------------
        with rng_isolated():
            self.splits = load_splits(cfg.data)
            if cfg.data.preprocessed:
                self.splits = predecode_splits(self.splits, cfg.data.preprocess_size,
                                               Path(cfg.data.preprocess_dir or Path(cfg.run.out_dir) / "predecoded"),
                                               dist, cfg.data.workers)
        self.device_aug = cfg.data.augment_on == "device" or (
            cfg.data.augment_on == "auto" and cfg.data.preprocessed and self.device.type == "cuda")
        self.class_names = self.splits["train"].class_names
        self.num_classes = len(self.class_names)
        self.spec = AugSpec.from_cfg(cfg.data)

        # ---- models --------------------------------------------------------------------------------------------
        self.student = create_student(cfg, self.num_classes).to(self.device)
        if self.channels_last:
            self.student = self.student.to(memory_format=torch.channels_last)
        self.teacher = None
        self.cache, self.cache_info = None, {}
        if self.uses_teacher:
            with rng_isolated():
                self.teacher = create_teacher(cfg, self.class_names).to(self.device)
                broadcast_module(self.teacher)  # identical teachers on all ranks, even randomly initialised ones
                if self.channels_last:
                    self.teacher = self.teacher.to(memory_format=torch.channels_last)
                if cfg.teacher.mode == "cached":
                    self.build_cache()
        # the KD method and the module that trains (student + the method's own parts: DDP, compile, optimizer)
        self.method = build_method(cfg, self.student, self.teacher).to(self.device)
        self.distiller = Distiller(self.student, self.method)

        # ---- loaders: built once; samplers carry the epoch, so workers persist ----------------------------------
        w, r = dist.world_size, dist.rank
        num_train = len(self.splits["train"])
        self.train_sampler = sampler(num_train) if sampler else EpochSampler(num_train, cfg.train.seed, w, r)
        # every selected sample exactly once per epoch: no drop_last, a last batch of 1 merged into the previous
        # one (BatchNorm), DDP padding marked invalid (see TrainBatchSampler and train_epoch)
        self.train_batches = TrainBatchSampler(self.train_sampler, cfg.train.batch_size)
        self.train_loader = make_loader(TrainViews(self.splits["train"], self.spec, cfg.train.seed, self.cache,
                                                   self.device_aug),
                                        self.train_batches, None, cfg.data.workers, self.device)
        self.eval_loaders = {s: make_loader(EvalViews(self.splits[s], self.spec),
                                            ShardSampler(len(self.splits[s]), w, r), cfg.train.eval_batch_size,
                                            cfg.data.workers, self.device)
                             for s in ("validation", "test")}

        # ---- optimisation ---------------------------------------------------------------------------------------
        self.optimizer = build_optimizer(self.distiller.parameters(), cfg)
        self.scheduler = CosineSchedule(self.optimizer, cfg.train)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=resolve_amp(cfg.train.amp, self.device) == "fp16")
        self.model: nn.Module = self.distiller
        if dist.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.distiller, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.train.compile:
            self.model = torch.compile(self.model)
        self.start_epoch, self.best_acc1, self.best_epoch = 0, -1.0, -1

    # ------------------------------------------------------------------------------------------------------------
    @property
    def uses_teacher(self) -> bool:
        return kd_methods.uses_teacher(self.cfg)

    def build_cache(self) -> None:
        from engine.teacher_cache import build_or_load_cache
        cfg = self.cfg
        cache_dir = Path(cfg.teacher.cache_dir or Path(cfg.run.out_dir) / "teacher_cache")
        self.cache, self.cache_info = build_or_load_cache(
            self.teacher, self.splits, self.spec, cfg.teacher.cache_views, cfg.train.seed, cache_dir, self.dist,
            cfg.teacher.batch_size, cfg.data.workers, self.autocast, self.device_aug,
            with_features=kd_methods.needs_teacher_features(cfg))
        if self.dist.is_main:
            verb = f"built in {self.cache_info['build_s']:.1f}s" if self.cache_info["built"] else "reused"
            print(f"teacher cache {verb}: {self.cache_info['path']}")

    def extra_state(self) -> dict:
        return {hook.name: hook.extra_state() for hook in self.hooks}

    def load_extra_state(self, state: dict) -> None:
        for hook in self.hooks:
            hook.load_extra_state(state.get(hook.name, {}))

    # ---- one epoch ---------------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        cfg, device = self.cfg, self.device
        self.model.train()
        self.train_sampler.set_epoch(epoch)
        online = self.uses_teacher and cfg.teacher.mode == "online"
        sums, names = None, []  # float64 [loss, one per term, correct, count], created at the first step
        count = 0  # samples that reached the loss on this rank, counted on the host (no per-step device copy)
        timer = StepTimer(device)
        profiler = self.start_profiler() if cfg.train.profile and epoch == self.start_epoch else None
        start = time.perf_counter()
        bar = tqdm(total=len(self.train_loader), desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                   disable=not self.dist.is_main, dynamic_ncols=True, leave=False)
        it = iter(self.train_loader)
        steps = len(self.train_loader)
        for step in range(steps):
            self.scheduler.set_progress(epoch + step / steps)
            with timer.data_wait():  # only the time blocked on the loader
                batch = next(it)
            x = self.batch_images(batch)
            y = batch["label"].to(device, non_blocking=True)
            valid = batch["valid"]  # False marks a DDP padding duplicate (TrainBatchSampler); on the host
            n_valid = int(valid.sum())
            timer.compute_begins()
            logits, terms, mean_loss, loss = self.step_loss(x, y, batch, valid, step, epoch, online)
            self.optimizer_step(loss)
            timer.compute_ends()
            if profiler is not None:
                profiler.step()
            with torch.no_grad():
                n = n_valid
                correct = (logits.argmax(1) == y)
                correct = correct.sum() if n == len(valid) else correct[valid.to(device)].sum()
                if sums is None:
                    names = list(terms)
                    sums = torch.zeros(len(names) + 3, dtype=torch.float64, device=device)
                sums[:-1] += torch.stack([mean_loss.detach() * n, *(terms[k][1].detach() * n for k in names),
                                          correct.double()]).double()
                count += n
            bar.update(1)
            if (step + 1) % cfg.log.every_steps == 0 or step + 1 == steps:
                running = sums[0].item() / max(count, 1)  # one host sync per interval, not per step
                self.check_finite(running, epoch, step)
                bar.set_postfix(loss=f"{running:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
        bar.close()
        if profiler is not None:
            profiler.stop()
        sums[-1] = count
        all_reduce_sum(sums)
        n = sums[-1].item()
        # samples that reached the loss this epoch, over all ranks: exactly the sampler's selection
        assert round(n) == self.train_sampler.num_selected(), (n, self.train_sampler.num_selected())
        epoch_s = time.perf_counter() - start
        data_s, compute_s = timer.totals()
        return {"train/loss": sums[0].item() / n,
                **{f"train/loss_{name}": sums[1 + i].item() / n for i, name in enumerate(names)},
                "train/acc1": 100 * sums[-2].item() / n, "train/samples": int(round(n)),
                "time/data_s": data_s, "time/compute_s": compute_s,
                "time/other_s": max(epoch_s - data_s - compute_s, 0.0), "time/epoch_s": epoch_s}

    def step_loss(self, x: torch.Tensor, y: torch.Tensor, batch: dict, valid: torch.Tensor, step: int, epoch: int,
                  online: bool) -> tuple[torch.Tensor, LossTerms, torch.Tensor, torch.Tensor]:
        """One step's forward and loss: (student logits, the method's terms, their mean over this rank's valid
        samples, the loss to backpropagate: `masked_loss_terms`)."""
        with self.autocast():
            outputs = self.model(x)
            teacher = self.teacher_targets(x, batch, online)
        step_valid = self.train_batches.global_valid(step)  # the same on every rank, no communication

        def compute(keep, outputs=outputs, teacher=teacher, y=y):
            if keep is not None:
                keep = keep.to(self.device, non_blocking=True)
                outputs, teacher, y = rows_of(outputs, keep), rows_of(teacher, keep), y[keep]
            return self.method.loss_terms(outputs, teacher, y, epoch, self.temperature)
        terms, mean_loss, loss = masked_loss_terms(compute, valid, step_valid, self.dist.world_size)
        return outputs["logits"], terms, mean_loss, loss

    def optimizer_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.train.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.distiller.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def check_finite(self, running_loss: float, epoch: int, step: int) -> None:
        """A hard stop on a non-finite loss, before anything is saved (the last good checkpoint stays)."""
        if not math.isfinite(running_loss):
            raise UserError(
                f"the training loss became non-finite ({running_loss}) at epoch {epoch + 1}, step {step + 1}. "
                "Stopped without saving; the last good checkpoint is kept in "
                f"{self.run_dir / 'checkpoints' if self.run_dir else 'the run directory'}. "
                "Start a new run (another run.name) with a lower train.lr or with train.grad_clip set: both change "
                "results, so run.resume refuses them")

    def teacher_targets(self, x: torch.Tensor, batch: dict, online: bool) -> dict:
        """What the method reads from the teacher for this batch, on the device: {"logits", "features"} (None
        where absent): from the cache (replayed with the batch), or from the teacher now (online)."""
        if online:
            if "features" in self.method.teacher_outputs:
                logits, features = self.teacher.logits_and_features(x)
                return {"logits": logits, "features": features}
            return {"logits": self.teacher(x), "features": None}
        return {name: (batch[f"teacher_{name}"].to(self.device, non_blocking=True) if f"teacher_{name}" in batch
                       else None) for name in kd_methods.TEACHER_OUTPUTS}

    def batch_images(self, batch: dict) -> torch.Tensor:
        """The batch's training views as normalised floats on the device (augmented here when data.augment_on
        resolves to device)."""
        if "raw" in batch:
            views = apply_aug_records(unpack_raw(batch, self.device), batch["record"], self.spec)
            return normalize_batch(views, self.device, self.channels_last, input_norm(self.student))
        return normalize_batch(batch["image"], self.device, self.channels_last, input_norm(self.student))

    def start_profiler(self):
        """torch.profiler over training steps 3-7 (1 skipped, 1 warm-up, 5 recorded), trace in <run>/profile/."""
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler
        folder = (self.run_dir or Path(self.cfg.run.out_dir)) / "profile"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        prof = profile(activities=activities, schedule=schedule(skip_first=1, wait=0, warmup=1, active=5, repeat=1),
                       on_trace_ready=tensorboard_trace_handler(str(folder), worker_name=f"rank{self.dist.rank}"),
                       record_shapes=False, with_stack=False)
        prof.start()
        if self.dist.is_main:
            tqdm.write(f"profiling training steps 3-7 into {folder}")
        return prof

    def evaluate(self, split: str) -> dict:
        """Metrics of the current student on `split`, with rank 0's BatchNorm statistics on every rank (DDP syncs
        buffers only at the start of a training forward, so each rank holds those its own last batch left)."""
        broadcast_buffers(self.student)
        self.trace_weights(split)
        return evaluate(self.student, self.eval_loaders[split], self.device, self.channels_last, self.autocast,
                        self.num_classes)

    def trace_weights(self, what: str) -> None:
        """KD_TRACE_DIR (tests): the digest of the weights this rank evaluates with right now (`what`: validation,
        test or difficulty); rank 0 also keeps each epoch's validation weights for a single-process re-evaluation."""
        folder = trace_dir()
        if folder is None:
            return
        state, epoch = self.student.state_dict(), self.train_sampler.epoch
        trace("weights", {"pass": what, "epoch": epoch, "digest": state_digest(state)})
        if what == "validation" and self.dist.is_main:
            torch.save(state, folder / f"weights_validation_e{epoch:03d}.pt")

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self, next_epoch: int, rng_per_rank: list[dict] | None = None) -> dict:
        """Everything a resume needs. `rng_per_rank`: every rank's RNG state, in rank order (`checkpoint` gathers
        them); by default this process's alone, which is all a single process has."""
        return {"model": self.student.state_dict(), "method": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": next_epoch, "best_acc1": self.best_acc1, "best_epoch": self.best_epoch,
                "rng_per_rank": rng_per_rank or [rng_state()], "sampler": {"epoch": self.train_sampler.epoch},
                "temperature": self.temperature, "config": to_plain(self.cfg), "extra": self.extra_state(),
                "program": f"{self.script}.py"}

    def load_state(self, ckpt: dict, path: Path) -> None:
        require_entries(ckpt, TRAIN_CHECKPOINT_KEYS, path, f"{self.script}.py")
        load_state_strict(self.student, ckpt["model"], f"checkpoint {path}")
        load_state_strict(self.method, ckpt.get("method", {}), f"checkpoint {path} (kd.method={self.cfg.kd.method})")
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as exc:
            raise UserError(f"the optimizer state in {path} does not fit train.optimizer="
                            f"{self.cfg.train.optimizer}: {exc}") from None
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch, self.best_acc1, self.best_epoch = ckpt["epoch"], ckpt["best_acc1"], ckpt["best_epoch"]
        self.train_sampler.set_epoch(ckpt["sampler"]["epoch"])
        self.temperature = ckpt.get("temperature", self.temperature)
        if not (ckpt.get("rng_per_rank") or ckpt.get("rng")):
            require_entries(ckpt, ("rng_per_rank",), path, f"{self.script}.py")
        self.load_rng_states(ckpt.get("rng_per_rank") or [ckpt["rng"]], path)  # "rng": rank 0's, older checkpoints
        trace("rng_restored", {"epoch": self.start_epoch, "digest": state_digest(rng_state())})
        self.load_extra_state(ckpt.get("extra", {}))

    def load_rng_states(self, per_rank: list[dict], path: Path) -> None:
        """Each rank continues its own saved random stream. A checkpoint from a different number of processes
        resumes too: ranks it has a state for restore theirs, the others start a fresh stream seeded from
        (train.seed, epoch, rank), and rank 0 warns that the run is no longer the uninterrupted one."""
        rank, world = self.dist.rank, self.dist.world_size
        if rank < len(per_rank):
            set_rng_state(per_rank[rank])
        else:
            seed_everything(self.cfg.train.seed + 7919 * self.start_epoch, rank)
        if len(per_rank) != world and self.dist.is_main:
            print(f"warning: {path} holds the random state of {len(per_rank)} process(es); this run has {world}. "
                  f"Training continues from epoch {self.start_epoch}; ranks without a saved random state start one "
                  "seeded from (train.seed, epoch, rank). The global batch (processes x train.batch_size) and the "
                  "shards change, so the numbers will differ from an uninterrupted run", file=sys.stderr)

    def checkpoint(self, epoch: int, improved: bool) -> None:
        own = rng_state()
        trace("rng_saved", {"epoch": epoch + 1, "digest": state_digest(own)})
        rng_per_rank = all_gather_objects(own)  # every rank's stream, written by rank 0 (a collective: all ranks)
        if not self.dist.is_main:
            return
        ckpt_dir = self.run_dir / "checkpoints"
        if improved:
            save_checkpoint({"model": self.student.state_dict(), "epoch": epoch, "val/acc1": self.best_acc1,
                             "config": to_plain(self.cfg)}, ckpt_dir / "best.pt")
        save_checkpoint(self.state_dict(epoch + 1, rng_per_rank), ckpt_dir / "last.pt")

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
        self.checkpoint(epoch, improved)
        if self.dist.is_main:
            tqdm.write(self.epoch_line(epoch, record, note))
        barrier()

    def epoch_line(self, epoch: int, record: dict, note: str = "") -> str:
        """The console line of an epoch. The loss is labelled with what it is: a distillation loss holds terms
        scaled by T² (a KL of about 0.5 at T = 4 reads as 8), so it is several times a label-only run's CE and
        moves with the temperature; its terms follow it (train/loss_<name> in metrics.jsonl)."""
        if self.uses_teacher:
            terms = ", ".join(f"{key.removeprefix('train/loss_')} {value:.4f}" for key, value in record.items()
                              if key.startswith("train/loss_"))
            loss = f"loss ({self.cfg.kd.method}, T²-scaled) {record['train/loss']:.4f} [{terms}]"
        else:
            loss = f"loss (labels only, CE) {record['train/loss']:.4f}"
        return (f"epoch {epoch + 1}/{self.cfg.train.epochs}  {note + '  ' if note else ''}{loss}  "
                f"val acc1 {record['val/acc1']:.2f}  acc5 {record['val/acc5']:.2f}  "
                f"({record['time/epoch_s']:.1f}s: data wait {record['time/data_s']:.1f}, "
                f"fwd/bwd {record['time/compute_s']:.1f}, other {record['time/other_s']:.1f})")

    def fit(self, logger: MetricLogger) -> None:
        for epoch in range(self.start_epoch, self.cfg.train.epochs):
            record, improved = self.train_and_validate(epoch)
            self.finish_epoch(epoch, record, improved, logger)

    # ---- final report ------------------------------------------------------------------------------------------
    def teacher_accuracy(self) -> dict:
        if not self.uses_teacher:
            return {}
        if self.cache is not None:
            return {f"teacher/{s}_acc1": self.cache.meta[f"teacher/{s}_acc1"] for s in ("validation", "test")}
        return {f"teacher/{s}_acc1": evaluate(self.teacher, self.eval_loaders[s], self.device, self.channels_last,
                                              self.autocast, self.num_classes)["acc1"] for s in ("validation", "test")}

    def final_report(self) -> dict:
        cfg = self.cfg
        last_state = copy.deepcopy(self.student.state_dict())
        last = self.evaluate("test")
        best_path = self.run_dir / "checkpoints" / "best.pt"
        best_ckpt = load_checkpoint(best_path) if best_path.exists() else {"model": last_state, "epoch": -1}
        load_state_strict(self.student, best_ckpt["model"], f"checkpoint {best_path}")
        best = self.evaluate("test")
        results = {"test/acc1": best["acc1"], "test/acc5": best["acc5"], "test/loss": best["loss"],
                   "test/acc1_last": last["acc1"], "test/acc5_last": last["acc5"], "test/n": best["n"],
                   "val/acc1_best": self.best_acc1, "best_epoch": best_ckpt["epoch"],
                   "params/student": count_params(self.student), "kd/method": cfg.kd.method, "kd/alpha": self.alpha,
                   "teacher/mode": cfg.teacher.mode if self.uses_teacher else "none", **self.teacher_accuracy()}
        if self.teacher is not None:
            results["params/teacher"] = count_params(self.teacher.model)
            results["compression_ratio"] = results["params/teacher"] / results["params/student"]
        if self.cache_info:
            results["time/teacher_cache_build_s"] = self.cache_info["build_s"]
        if cfg.eval.latency and self.dist.is_main:
            for bs in (1, 128):
                results[f"latency_ms/batch{bs}"] = measure_latency(self.student, bs, cfg.data.image_size, self.device,
                                                                   self.channels_last, self.autocast)
            results["latency_device"] = str(self.device)
        if self.dist.is_main:
            write_json(self.run_dir / "results.json", results)
            save_student_safetensors(self.student, self.run_dir / "student.safetensors")
        return results


# ================================================================================================================
# Entry points.
# ================================================================================================================
def plot_run(run_dir: Path) -> None:
    records = read_jsonl(run_dir / "metrics.jsonl")
    if records:
        plot_curves(records, run_dir / "curves.png",
                    [("loss", ["train/loss", "train/loss_ce", "train/loss_kd", "val/loss"]),
                     ("accuracy (%)", ["train/acc1", "val/acc1", "val/acc5"])])


# Keys a resumed run may change: none of them changes a number the run prints. Where files go (run.*, the cache
# and pre-decoded folders, whose contents are fingerprinted), logging (log.*), loader processes (every view is a
# pure function of seed, epoch and index), profiling, the latency report, the separate label-only baseline, and
# train.compile (the same model, traced: it changes rounding only, and a run whose compile broke must be able to
# continue eagerly).
# Everything else (train.epochs included: it sets the cosine schedule; train.device: it sets train.amp=auto) must
# match the run's config.
TRAIN_RESUME_SAFE_KEYS = (*RESUME_SAFE_KEYS, "data.workers", "data.preprocess_dir", "teacher.cache_dir",
                          "train.profile", "train.compile", "eval.*", "kd.baseline")


def output_dirs(cfg) -> dict[str, Path]:
    """The folders outside the run directory that this config writes to, by config key."""
    dirs = {}
    if kd_methods.uses_teacher(cfg) and cfg.teacher.mode == "cached":
        dirs["teacher.cache_dir"] = Path(cfg.teacher.cache_dir or Path(cfg.run.out_dir) / "teacher_cache")
    if cfg.data.preprocessed:
        dirs["data.preprocess_dir"] = Path(cfg.data.preprocess_dir or Path(cfg.run.out_dir) / "predecoded")
    return dirs


# What Trainer.load_state reads from a checkpoint: one without these is not a training checkpoint.
TRAIN_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "best_acc1", "best_epoch", "sampler")


def check_resumable(ckpt: dict | None, path: Path | None, cfg, run_dir: Path, program: str) -> None:
    """Before anything is built or written: `ckpt` (None when a run that stopped before its first checkpoint is
    restarted) must be a training checkpoint of `program` (e.g. "train_student.py"), and the run's config must
    match `cfg` up to TRAIN_RESUME_SAFE_KEYS."""
    if ckpt is not None:  # the program first: another program's checkpoint lacks these entries for that reason
        check_program(checkpoint_program(ckpt), program, f"checkpoint {path}")
        require_entries(ckpt, TRAIN_CHECKPOINT_KEYS, path, program)
    saved = ckpt.get("config") if ckpt is not None else read_saved_config(run_dir)
    check_resume_config(saved, cfg, str(path if ckpt is not None else run_dir / "config.yaml"),
                        TRAIN_RESUME_SAFE_KEYS)


def check_inputs(cfg) -> None:
    """Files the config names that this run only reads: checked before its run directory is created."""
    if cfg.data.path and cfg.data.name != "synthetic":
        check_data_path(Path(cfg.data.path))
    teacher = Path(cfg.teacher.checkpoint)
    if kd_methods.uses_teacher(cfg) and cfg.teacher.checkpoint and not teacher.is_file():
        raise UserError(f"teacher.checkpoint={teacher} does not exist. Train that teacher first, with "
                        "train_student.py and a config whose run writes it (e.g. `python train_student.py --config "
                        "configs/quickstart_teacher.yaml` writes runs/quickstart_teacher/student.safetensors), or "
                        "set teacher.prepare=<that config> so this command trains it first")


def run_training(cfg, dist: DistInfo, trainer_cls=Trainer, label: str | None = None) -> dict:
    """Train one student as configured, write its run directory, return results.json's content. `label`: the
    run's row in the printed table (a ROW_MEANINGS key; by default `run_label(cfg)`).

    Everything checkable is checked before the run directory is created or touched: where it goes and what it
    resumes from (utils.plan_run_dir), the checkpoint and the run's config, the files the config names, the output
    folders. The directory is then locked for the run's lifetime (utils.claim_run_dir), and one this call created
    is removed again if the run stops with a UserError before its first epoch is logged (bad data, say)."""
    program = f"{trainer_cls.script}.py"
    cfg.run.name = broadcast_object(run_name(cfg.run, lambda: default_run_name(
        trainer_cls.script, cfg.data.name.split("/")[-1], cfg.train.seed)))
    plan = plan_run_dir(cfg.run.out_dir, cfg.run.name, cfg.run.resume, program, restart_without_checkpoint=True,
                        dist=dist)
    resume_from = plan.checkpoint
    ckpt = load_checkpoint(resume_from) if resume_from is not None else None
    if cfg.run.resume:
        check_resumable(ckpt, resume_from, cfg, plan.run_dir, program)
    check_inputs(cfg)
    make_dirs({"run.out_dir": Path(cfg.run.out_dir), **output_dirs(cfg)}, dist, probe=True)
    with claim_run_dir(plan, program, dist) as run_dir:
        if dist.is_main:  # written now, so a run killed before its first checkpoint can be resumed (and checked)
            save_config(cfg, run_dir)
        trainer = trainer_cls(cfg, dist, run_dir)
        if ckpt is not None:
            trainer.load_state(ckpt, resume_from)
            del ckpt
            if dist.is_main:
                print(f"resumed from {resume_from} at epoch {trainer.start_epoch}")
        logger = MetricLogger(run_dir / "metrics.jsonl", dist.is_main,
                              run_dir / "tensorboard" if cfg.log.tensorboard else None)
        logger.truncate_after(trainer.start_epoch)
        trainer.fit(logger)
        results = trainer.final_report()
        logger.close()
        if dist.is_main:
            plot_run(run_dir)
            print_results(f"{trainer.script}: {run_dir}", {label or run_label(cfg): results})
    return results


# What each row of a printed results table is (print_results says it under the table); {key}: that results entry.
ROW_MEANINGS = {
    "teacher": "the teacher, trained first by teacher.prepare (a run of its own); the student distils from it",
    "KD student": "the student distilled from the teacher (kd.method={kd/method}, kd.alpha={kd/alpha})",
    "labels only": "a student trained on labels alone (kd.alpha=1, no teacher): what distillation must beat",
}
COLUMN_MEANINGS = ("test/acc1, acc5: the best-validation checkpoint on the test split; test/acc1_last: the last "
                   "epoch's weights; teacher/test_acc1: the teacher this row distilled from (- without one)")


def run_label(cfg) -> str:
    """A run's row in the results table: "KD student" when it learns from a teacher, else "labels only"."""
    return "KD student" if kd_methods.uses_teacher(cfg) else "labels only"


def print_results(title: str, rows: dict[str, dict]) -> None:
    """A markdown table, one row per run (label -> results.json's content), then what each row and column is."""
    keys = ["test/acc1", "test/acc5", "test/acc1_last", "val/acc1_best", "teacher/test_acc1", "params/student"]
    print(f"\n{title}\n| run | " + " | ".join(keys) + " |\n" + "|---" * (len(keys) + 1) + "|")
    for name, res in rows.items():
        cells = [f"{res[k]:.2f}" if isinstance(res.get(k), float) else str(res.get(k, "-")) for k in keys]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for name, res in rows.items():
        if name in ROW_MEANINGS:
            print(f"{name}: " + ROW_MEANINGS[name].format_map(res))
    print(COLUMN_MEANINGS)


def evaluate_checkpoint(cfg, dist: DistInfo) -> dict:
    """`eval.checkpoint=PATH`: test-split accuracy of a saved student (best.pt, last.pt or .safetensors)."""
    from models import load_state_file
    state = load_state_file(Path(cfg.eval.checkpoint))  # before the data: a wrong path fails at once
    splits = load_splits(cfg.data)
    student = create_student(cfg, len(splits["train"].class_names)).to(dist.device)
    load_state_strict(student, state, f"eval.checkpoint={cfg.eval.checkpoint}")
    loader = make_loader(EvalViews(splits["test"], AugSpec.from_cfg(cfg.data)),
                         ShardSampler(len(splits["test"]), dist.world_size, dist.rank), cfg.train.eval_batch_size,
                         cfg.data.workers, dist.device)
    res = evaluate(student, loader, dist.device, False, autocast_for(cfg.train.amp, dist.device),
                   len(splits["train"].class_names))
    out = {"test/acc1": res["acc1"], "test/acc5": res["acc5"], "test/n": res["n"], "checkpoint": cfg.eval.checkpoint}
    if dist.is_main:
        print(json.dumps(out))
    return out


def prepare_teacher(cfg, dist: DistInfo) -> None:
    """`teacher.prepare`: train the teacher with that config unless teacher.checkpoint exists (then it is reused).
    The teacher run lands in this run.out_dir; a teacher run that was stopped is continued (run.resume=auto)."""
    checkpoint = Path(cfg.teacher.checkpoint)
    check(bool(cfg.teacher.checkpoint), "teacher.prepare needs teacher.checkpoint: the student.safetensors that the "
                                        "teacher run writes, which this run then distils from")
    if checkpoint.is_file():
        if dist.is_main:
            print(f"teacher: reusing {checkpoint}")
        return
    source = Path(cfg.teacher.prepare)
    check(source.is_file(), f"teacher.prepare={cfg.teacher.prepare} is not a file (a config that trains the teacher)")
    teacher_cfg = parse_config(Config, ["--config", str(source), f"run.out_dir={cfg.run.out_dir}",
                                        f"train.device={cfg.train.device}"], prog="train_student.py")
    validate(teacher_cfg)
    check(not teacher_cfg.teacher.prepare, f"{source} sets teacher.prepare itself: one level only")
    run_dir = Path(teacher_cfg.run.out_dir) / (teacher_cfg.run.name or "")
    writes = run_dir / "student.safetensors"
    check(bool(teacher_cfg.run.name) and writes.resolve() == checkpoint.resolve(),
          f"teacher.prepare={source} writes {writes}, but teacher.checkpoint={checkpoint}: set run.name in {source} "
          "and teacher.checkpoint so that they agree")
    if any(run_files(run_dir)):  # a teacher run that was stopped: continue it
        teacher_cfg.run.resume = "auto"
    if dist.is_main:
        print(f"teacher: {checkpoint} does not exist yet; training it first with {source} (into {run_dir})")
    run_training(teacher_cfg, dist, label="teacher")
    barrier()  # rank 0 writes student.safetensors at the very end of the teacher run
    check(checkpoint.is_file(), f"the teacher run {run_dir} ended without writing {checkpoint}")


def main(argv: list[str]) -> None:
    cfg = parse_config(Config, argv, prog="train_student.py", doc=__doc__)
    validate(cfg)
    dist = setup_distributed(cfg.train.device)
    check_same_config_on_all_ranks(cfg)
    if cfg.eval.checkpoint:
        evaluate_checkpoint(cfg, dist)
        return cleanup_distributed()
    if cfg.teacher.prepare and kd_methods.uses_teacher(cfg):
        prepare_teacher(cfg, dist)
    results = {run_label(cfg): run_training(cfg, dist)}
    if cfg.kd.baseline and kd_methods.uses_teacher(cfg):
        base = copy.deepcopy(cfg)
        run_dir = Path(cfg.run.out_dir) / cfg.run.name
        base.kd.method, base.kd.alpha, base.kd.baseline = "kd", 1.0, False
        base.run.out_dir, base.run.name = str(run_dir), "label_only"
        # continue the baseline too when it had started (even if it stopped before its first checkpoint)
        base.run.resume = "auto" if cfg.run.resume and any(run_files(run_dir / "label_only")) else ""
        results[run_label(base)] = run_training(base, dist)
        if dist.is_main:
            print_results("same budget, same seed: KD vs labels only", results)
    cleanup_distributed()


if __name__ == "__main__":
    run_cli(main)
