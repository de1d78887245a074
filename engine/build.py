"""What a Trainer is built from, as the config says: the data splits (pre-decoded when asked), the student, the
teacher and its cache, the loaders, and the module that trains (DDP, torch.compile).

The order in which engine.trainer.Trainer calls these is part of the results: the student's initialisation draws
from training's random streams, and the steps that must not (loading data, building the teacher and its cache)
run under common.rng.rng_isolated there."""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn

import kd_methods
from common.distributed import DistInfo, broadcast_module
from imagedata.augment import AugSpec
from common.content_hash import file_digests
from imagedata.image_sources import SPLITS, data_changes, data_record, load_splits
from imagedata.predecode import predecode_splits
from imagedata.samplers import EpochSampler, ShardSampler, TrainBatchSampler
from imagedata.views import EvalViews, TrainViews, make_loader
from models import check_stage, create_student, create_teacher


def load_training_splits(cfg, dist: DistInfo) -> tuple[dict, dict]:
    """(train / validation / test of `data.*`, as memory-mapped pre-decoded copies when data.preprocessed; the
    `data_record` of the splits as loaded, which the run records)."""
    splits = load_splits(cfg.data)
    record = data_record(splits)
    if cfg.data.preprocessed:
        splits = predecode_splits(splits, cfg.data.preprocess_size,
                                  Path(cfg.data.preprocess_dir or Path(cfg.run.out_dir) / "predecoded"), dist,
                                  cfg.data.workers)
    return splits, record


# ----------------------------------------------------------------------------------------------------------------
# What a run read: recorded in run.json and every checkpoint, compared on resume and by eval.checkpoint.
# ----------------------------------------------------------------------------------------------------------------
def teacher_file_digest(cfg) -> str | None:
    """SHA-256 of the teacher.checkpoint file a run distils from (None when it reads none): a teacher retrained or
    replaced at the same path gives other soft targets."""
    if not (kd_methods.uses_teacher(cfg) and cfg.teacher.checkpoint):
        return None
    path = Path(cfg.teacher.checkpoint).absolute()
    return file_digests(path.parent, [str(path)])[0]


def input_record(cfg, data: dict) -> dict:
    """What a run read that can change on disk under it: `data` (its `data_record`) and the teacher.checkpoint
    file's digest."""
    record = {"data": data}
    teacher = teacher_file_digest(cfg)
    if teacher is not None:
        record["teacher_checkpoint"] = teacher
    return record


def input_changes(recorded: dict, cfg, splits=SPLITS, teacher: bool = True) -> list[str]:
    """What changed since `recorded` (an `input_record`; entries it lacks are not compared): the data of `splits`,
    and with `teacher` the teacher.checkpoint file. Loads the data (no pre-decoding)."""
    changes = []
    if isinstance(recorded.get("data"), dict):
        changes += data_changes(recorded["data"], load_splits(cfg.data), splits)
    if teacher and recorded.get("teacher_checkpoint"):
        now = teacher_file_digest(cfg)
        if now is not None and now != recorded["teacher_checkpoint"]:
            changes.append(f"the teacher weights teacher.checkpoint={cfg.teacher.checkpoint} changed (a retrained or "
                           "replaced file at the same path)")
    return changes


def augments_on_device(data_cfg, device: torch.device) -> bool:
    """`data.augment_on` as it runs: auto is the device for pre-decoded data on CUDA, else the loader workers."""
    return data_cfg.augment_on == "device" or (
        data_cfg.augment_on == "auto" and data_cfg.preprocessed and device.type == "cuda")


def build_student(cfg, num_classes: int, device: torch.device, channels_last: bool) -> nn.Module:
    student = create_student(cfg, num_classes).to(device)
    return student.to(memory_format=torch.channels_last) if channels_last else student


def build_teacher(cfg, class_names: list[str], device: torch.device, channels_last: bool) -> nn.Module:
    """The teacher, identical on every rank (rank 0's weights, even randomly initialised ones)."""
    teacher = create_teacher(cfg, class_names).to(device)
    broadcast_module(teacher)
    return teacher.to(memory_format=torch.channels_last) if channels_last else teacher


def check_stages(cfg, model: nn.Module, what: str) -> None:
    """The selected KD method's declared stages (its `stages(cfg)`) against `model`, the student or the teacher
    (`what`), when the method reads stage maps from it: a UserError naming the valid range, before any work that
    would read them (the teacher cache, training)."""
    cls = kd_methods.method_class(cfg)
    if "stage_maps" not in (cls.student_reads if what == "student" else cls.teacher_reads):
        return
    for stage in cls.stages(cfg):
        check_stage(model, int(stage), f"{what} {getattr(cfg, what).name}", f"kd.method={cls.name} (its stages: "
                                                                           f"{list(cls.stages(cfg))})")


def build_teacher_cache(cfg, teacher: nn.Module, splits: dict, spec: AugSpec, dist: DistInfo, autocast,
                        device_aug: bool) -> tuple:
    """teacher.mode=cached: the teacher's outputs on K views of every training image, built once and reused
    (engine.teacher_cache). Returns (cache, info: built, build_s, path, fill, filled_slots, slots, fill_role,
    the SlotFiller that completes batches while the cache is not full, or None)."""
    from engine.teacher_cache import build_or_load_cache, fill_lock_path, fill_remaining, open_filler, several_nodes
    cache_dir = Path(cfg.teacher.cache_dir or Path(cfg.run.out_dir) / "teacher_cache")
    chunk = teacher_chunk(cfg)
    fill = cfg.teacher.cache_fill
    if fill == "auto":  # lazy writes one cache file from every rank: one machine only
        fill = "eager" if several_nodes(dist) else "lazy"
    cache, info = build_or_load_cache(
        teacher, splits, spec, cfg.teacher.cache_views, cfg.train.seed, cache_dir, dist, chunk,
        cfg.data.workers, autocast, device_aug, with_features=kd_methods.needs_teacher_features(cfg), fill=fill)
    filler, role = open_filler(cache, teacher, chunk, dist, autocast, splits, spec, cfg.data.workers)
    info["fill_role"] = role
    if fill == "eager" and filler is not None and role == "fills" and not cache.complete:
        # a cache a lazy run started (or a lazy run killed): finish it now, as eager promises
        start = time.perf_counter()
        fill_remaining(filler, splits["train"], spec, cfg.train.seed, dist, device_aug)
        info["filled_slots"], _ = cache.count_filled()
        info["build_s"] += time.perf_counter() - start
        filler = None if cache.complete else filler
    if dist.is_main:
        verb = f"built in {info['build_s']:.1f}s" if info["built"] else "reused"
        filled = "" if filler is None else (
            f"; {info['filled_slots']:,} of {info['slots']:,} training views scored, the rest "
            + ("scored and written as training reaches them" if role == "fills" else
               "scored by this run's teacher as training reaches them, not written (another run holds the fill "
               f"lock {fill_lock_path(cache.root)}, or the folder is read-only)"))
        print(f"teacher cache {verb} ({fill} fill): {info['path']}{filled}")
    return cache, info, filler


def teacher_chunk(cfg) -> int:
    """Views per teacher forward when scoring the cache: teacher.batch_size, at most a training batch (the lazy
    fill scores a batch's unfilled rows padded to this many, engine.teacher_cache.score_chunks)."""
    return min(cfg.teacher.batch_size, cfg.train.batch_size)


def build_loaders(cfg, dist: DistInfo, splits: dict, spec: AugSpec, cache, device_aug: bool, sampler=None):
    """Loaders built once (samplers carry the epoch, so workers persist). `sampler(num_train)`: the training
    sampler (default EpochSampler, every sample once per epoch). Returns (train sampler, its TrainBatchSampler,
    train loader, {validation, test: eval loader})."""
    w, r = dist.world_size, dist.rank
    num_train = len(splits["train"])
    train_sampler = sampler(num_train) if sampler else EpochSampler(num_train, cfg.train.seed, w, r)
    # every selected sample exactly once per epoch: no drop_last, a last batch of 1 merged into the previous
    # one (BatchNorm), DDP padding marked invalid (see TrainBatchSampler and Trainer.train_epoch)
    train_batches = TrainBatchSampler(train_sampler, cfg.train.batch_size)
    train_loader = make_loader(TrainViews(splits["train"], spec, cfg.train.seed, cache, device_aug),
                               train_batches, None, cfg.data.workers, dist.device)
    eval_loaders = {s: make_loader(EvalViews(splits[s], spec), ShardSampler(len(splits[s]), w, r),
                                   cfg.train.eval_batch_size, cfg.data.workers, dist.device)
                    for s in ("validation", "test")}
    return train_sampler, train_batches, train_loader, eval_loaders


def wrap_for_training(distiller: nn.Module, dist: DistInfo, compile_: bool) -> nn.Module:
    """The module the steps call: the distiller (student + the method's parts), in DDP across ranks, compiled
    when train.compile."""
    model = distiller
    if dist.distributed:
        model = nn.parallel.DistributedDataParallel(
            distiller, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    if compile_:
        model = torch.compile(model)
    return model
