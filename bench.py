"""Measure what this repository's work costs, side by side in one process, as ratios to a floor.

    python bench.py                 # default teacher-student pair (ResNet-152 -> MobileNetV2) at 64 px
    python bench.py --quick         # fewer images and repeats
    python bench.py --suite gpu --out bench_gpu   # on a GPU box: images/s and peak memory at full size

Every item runs its alternatives interleaved (A B A B ...), after one warm-up round, so that machine noise hits
each alike; it reports the median and the spread (min-max) of the repeats and each median's ratio to its floor:
1. KD epoch: teacher.mode=online, teacher.mode=cached and label-only (kd.alpha=1, the floor), synthetic data;
   and every KD method at its defaults (kd_methods.py): dkd, dist, kd + logit standardisation and pooled_hint on
   the cached teacher, fitnet on the online teacher (its feature maps are too large to cache).
2. Teacher-cache build time, in label-only epochs.
3. Difficulty refresh (train_student_rl.py: student pass over the training set + score) / one cached-KD epoch.
4. Curriculum RL epoch (agent + environment step, incl. validation and a refresh every --refresh-every epochs)
   / plain KD epoch with validation, for the ppo and bandit agents.
5. Input pipeline alone, in images per second / the student's training throughput (forward + backward + step on
   ready batches, the floor): decoding full-resolution JPEGs (4:3, --jpeg-height) in the loader, the pre-decoded
   copy (data.preprocessed=true) augmented in the loader, and the pre-decoded copy augmented on the device.
6. gan_vae: WGAN-GP teacher steps and beta-VAE student steps per second, and one FID evaluation against cached
   real statistics (in teacher steps).
7. End to end, cache included (--skip e2e leaves it out): a whole KD run with the online teacher, the eagerly built
   cache (teacher.cache_fill=eager) and the lazily filled one (teacher.cache_fill=lazy), each from launch (the
   Trainer built, teacher, data and a fresh cache included) to the end of epoch E for E in --e2e-epochs, as ratios to
   the online run at the same E; one run of max(E) epochs gives every E (a shorter run is its prefix), each E with
   the end of a run's teacher cost added (its validation and test accuracy). Also the time from launch to the first
   training step. The student's validation is left out: it costs every mode the same.
Writes <out>.json and <out>.md (machine, torch version and device in the header).

--suite gpu measures instead what a GPU user needs, in images per second with the peak GPU memory of each item, at
224 px, batch 128, ResNet-152 -> MobileNetV2, 100 classes x 50 synthetic images (--images-per-class scales it),
pre-decoded data augmented on the device: label-only, cached-KD and online-KD training with train.compile off and
on, the teacher-cache build, the input pipeline alone (pre-decoded on the device; JPEGs with --workers loader
processes), and gan_vae teacher and student steps at the default config's sizes. Without CUDA it runs at a reduced
size. Targets: cached KD >= 3,000 img/s on one H100, cached KD / label-only >= 0.95, pipeline >= 2x training.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common.config import load_config
from common.distributed import DistInfo
from engine.schema import Config
from engine.trainer import Trainer


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"cpu": cpu, "cores": torch.get_num_threads(), "torch": torch.__version__, "device": dev}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def common_overrides(args, cache_dir: str) -> list[str]:
    return ["data.name=synthetic", f"data.synthetic.num_classes={args.classes}",
            f"data.synthetic.images_per_class={args.images_per_class}",
            f"data.synthetic.image_size={args.image_size}", f"data.image_size={args.image_size}",
            f"data.workers={args.workers}", f"train.batch_size={args.batch_size}", "teacher.pretrained=false",
            f"teacher.name={args.teacher}", f"student.name={args.student}", f"teacher.cache_views={args.cache_views}",
            f"teacher.cache_dir={cache_dir}", "eval.latency=false", f"run.out_dir={cache_dir}"]


def checked_config(schema, args: list[str]):
    """The config the bench times, checked as the scripts check theirs: load_config less the teacher.* keys that
    this mode does not read (the modes share common_overrides: labels only builds no teacher, an online teacher no
    cache, a local checkpoint no hub weights), then the program's own validation, so nothing is timed that
    train_student.py or train_student_rl.py would refuse."""
    from engine.rl_schema import RLConfig, validate_rl
    from engine.schema import unread_teacher_keys, validate
    unread = {f"teacher.{k}" for k in unread_teacher_keys(load_config(schema, None, args))}
    cfg = load_config(schema, None, [a for a in args if a.split("=", 1)[0] not in unread])
    (validate_rl if issubclass(schema, RLConfig) else validate)(cfg)
    return cfg


def interleaved(alternatives: dict, repeats: int, label: str, unit: str = "s") -> dict[str, list[float]]:
    """Run each alternative (name -> callable returning seconds) once per round, in turn, for 1 + `repeats`
    rounds; the first round is the warm-up. Returns name -> timed seconds."""
    out: dict[str, list[float]] = {name: [] for name in alternatives}
    for rep in range(repeats + 1):
        for name, fn in alternatives.items():
            seconds = fn(rep)
            if rep:
                out[name].append(seconds)
            print(f"{label} round {rep} {name}: {seconds:.3f} {unit}", flush=True)
    return out


def row(item: str, values: list[float], unit: str, floor_value: float | None, floor: str,
        higher_is_better: bool = False) -> dict:
    """One table row: median, min, max, and the median's ratio to the floor's median."""
    med = statistics.median(values)
    ratio = None if floor_value is None else (med / floor_value)
    return {"item": item, "unit": unit, "median": med, "min": min(values), "max": max(values), "n": len(values),
            "ratio": ratio, "floor": floor, "higher_is_better": higher_is_better}


def loader_rate(loader, sampler, epoch: int, images, dev: torch.device) -> float:
    """Images per second of one pass over `loader` with `sampler` set to `epoch`; `images(batch)` makes a batch's
    images on the device (the timed work besides loading). Synchronises CUDA before stopping the clock."""
    sampler.set_epoch(epoch)
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(images(batch))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


# ---- 1, 2: KD epochs and the teacher cache -----------------------------------------------------------------------
def bench_kd(args, cache_dir: str) -> tuple[list[dict], dict[str, Trainer]]:
    base = common_overrides(args, cache_dir) + ["train.epochs=1000"]
    modes = {"label-only": ["kd.alpha=1"], "cached": ["kd.alpha=0", "teacher.mode=cached"],
             "online": ["kd.alpha=0", "teacher.mode=online"]}
    if not args.no_methods:  # each KD method on the cached teacher, at its defaults
        modes.update({"cached dkd": ["kd.method=dkd"], "cached dist": ["kd.method=dist"],
                      "cached kd + logit standardisation": ["kd.alpha=0", "kd.logit_standardize=true"],
                      "cached pooled_hint (+ kd)": ["kd.alpha=0", "kd.method=pooled_hint"],
                      "online fitnet": ["kd.method=fitnet", "teacher.mode=online"]})
    trainers = {name: Trainer(checked_config(Config, base + extra), DistInfo(device=device()), None)
                for name, extra in modes.items()}
    epochs = interleaved({name: (lambda rep, t=t: t.train_epoch(rep)["time/epoch_s"]) for name, t in trainers.items()},
                         args.repeats, "KD epoch")
    floor = statistics.median(epochs["label-only"])
    rows = [row(f"KD epoch, {name}", v, "s", floor, "label-only epoch") for name, v in epochs.items()]
    build_s = trainers["cached"].cache_info["build_s"]
    rows.append({**row("teacher-cache build", [build_s], "s", floor, "label-only epoch"), "note": "one build"})
    if "cached pooled_hint (+ kd)" in trainers:
        build_s = trainers["cached pooled_hint (+ kd)"].cache_info["build_s"]
        rows.append({**row("teacher-cache build, with pooled features", [build_s], "s", floor, "label-only epoch"),
                     "note": "one build (pooled_hint)"})
    return rows, trainers


# ---- 7: end to end, cache included -------------------------------------------------------------------------------
E2E_MODES = {"online": ["kd.alpha=0", "teacher.mode=online"],
             "eager cache": ["kd.alpha=0", "teacher.mode=cached", "teacher.cache_fill=eager"],
             "lazy cache": ["kd.alpha=0", "teacher.mode=cached", "teacher.cache_fill=lazy"]}


def bench_end_to_end(args, work: Path) -> list[dict]:
    """Item 7: after a warm-up round (one epoch per mode), for each round one run per mode (interleaved, each with a
    fresh cache folder), timed from launch to the end of every epoch in --e2e-epochs; rows per E as ratios to
    online at that E, then launch -> first step."""
    import shutil

    from engine.report import teacher_accuracy
    epochs = sorted(set(args.e2e_epochs))
    last = epochs[-1]
    ends = {name: {e: [] for e in epochs} for name in E2E_MODES}
    first_step = {name: [] for name in E2E_MODES}
    for rep in range(-1, args.e2e_repeats):  # round -1: a warm-up of one epoch per mode, not recorded
        for name, extra in E2E_MODES.items():
            folder = work / f"e2e_{rep}_{name.split()[0]}"
            start = time.perf_counter()
            run_epochs = 1 if rep < 0 else last
            cfg = checked_config(Config, common_overrides(args, str(folder)) + [f"train.epochs={run_epochs}", *extra])
            t = Trainer(cfg, DistInfo(device=device()), None)
            if rep >= 0:
                first_step[name].append(time.perf_counter() - start)  # the first step starts now
            report_s, report_first = 0.0, None
            for epoch in range(run_epochs):
                t.train_epoch(epoch)
                if rep >= 0 and epoch + 1 in ends[name]:
                    # a run of E epochs ends with the teacher's accuracy on validation and test: online, a teacher
                    # pass; lazy, the evaluation views scored (the first call; later ones read them); eager, a read.
                    # Every E gets the first call's cost, and no E pays an earlier E's.
                    lap = time.perf_counter()
                    teacher_accuracy(t)
                    report_first = time.perf_counter() - lap if report_first is None else report_first
                    ends[name][epoch + 1].append(lap - start - report_s + report_first)
                    report_s += time.perf_counter() - lap
            if rep < 0:
                teacher_accuracy(t)  # the warm-up's end of run
            t.release_cache()
            del t
            shutil.rmtree(folder, ignore_errors=True)
            if rep >= 0:
                print(f"end to end round {rep} {name}: first step after {first_step[name][-1]:.1f} s; "
                      + ", ".join(f"E={e}: {v[-1]:.1f} s" for e, v in ends[name].items()), flush=True)
    rows = []
    for e in epochs:
        floor = statistics.median(ends["online"][e])
        rows += [{**row(f"end to end, E = {e}, {name}", ends[name][e], "s", floor, f"online run, E = {e}"),
                  "note": "launch to the end of epoch E, cache included"} for name in E2E_MODES]
    floor = statistics.median(first_step["online"])
    rows += [{**row(f"launch to first step, {name}", first_step[name], "s", floor, "online run"),
              "note": "teacher, data and cache ready"} for name in E2E_MODES]
    return rows


# ---- 3, 4: difficulty refresh and curriculum RL epochs -----------------------------------------------------------
def bench_curriculum(args, cache_dir: str) -> list[dict]:
    """train_student_rl.py epochs (agent + environment step: curriculum, training, validation and, every
    `refresh_every` epochs, the difficulty refresh) against plain KD epochs (training + validation), same samples per
    epoch (strategy all), interleaved; then the difficulty refresh alone against a training epoch."""
    from engine.curriculum_run import CurriculumRun
    from engine.rl_schema import RLConfig
    epochs = args.refresh_every * args.rl_cycles + 1
    base = common_overrides(args, cache_dir) + [
        "kd.alpha=0", "curriculum.strategy=all", f"difficulty.refresh_every={args.refresh_every}",
        "difficulty.warmup_epochs=0", f"train.epochs={epochs}"]
    # PPO's rollout fits the run (agent.ppo.n_steps <= train.epochs, as train_student_rl.py requires)
    steps = min(5, epochs)
    agents = {"ppo": ["agent.name=ppo", f"agent.ppo.n_steps={steps}", f"agent.ppo.batch_size={steps}"],
              "bandit": ["agent.name=bandit"]}
    plain = Trainer(checked_config(RLConfig, base + agents["ppo"]), DistInfo(device=device()), None)
    rl = {a: CurriculumRun(checked_config(RLConfig, base + extra), DistInfo(device=device()), None)
          for a, extra in agents.items()}
    obs = {a: t.env.reset(seed=0)[0] for a, t in rl.items()}

    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def rl_epoch(a: str, epoch: int) -> float:
        def step():
            t = rl[a]
            action = t.agent.act(obs[a])
            next_obs, reward, done, _, _ = t.env.step(action)
            t.agent.observe(obs[a], action, reward, next_obs, done)
            obs[a] = next_obs
        return timed(step)

    # every epoch of the cycle is timed (epoch 0, the warm-up, had its refresh in reset, outside the timing)
    seconds = interleaved({"plain KD": lambda e: timed(lambda: plain.train_and_validate(e)),
                           **{f"RL {a}": (lambda e, a=a: rl_epoch(a, e)) for a in rl}}, epochs - 1, "curriculum")
    floor = sum(seconds["plain KD"])
    rows = [{**row(f"curriculum epoch, {name}", v, "s", None, "plain KD epoch"),
             "ratio": sum(v) / floor, "note": f"ratio of totals over {len(v)} epochs"}
            for name, v in seconds.items()]
    run = rl["bandit"]
    refresh = interleaved({"training epoch": lambda e: run.trainer.train_epoch(epochs + e)["time/epoch_s"],
                           "difficulty refresh":
                               lambda e: timed(lambda: run.curriculum.refresh_difficulty(epochs + e))},
                          args.repeats, "refresh")
    rows.append(row("difficulty refresh", refresh["difficulty refresh"], "s",
                    statistics.median(refresh["training epoch"]), "cached-KD training epoch"))
    return rows


# ---- 5: the input pipeline -----------------------------------------------------------------------------------------
def bench_pipeline(args, work: Path, student_trainer: Trainer) -> list[dict]:
    """Images per second of the training loader alone (views made, batches delivered, nothing trained) for the
    JPEG and pre-decoded paths, over the student's training throughput on ready batches."""
    from imagedata.augment import AugSpec, apply_aug_records
    from imagedata.image_sources import load_local
    from imagedata.predecode import predecode_split
    from imagedata.samplers import EpochSampler
    from imagedata.synthetic_data import write_synthetic_jpeg_folder
    from imagedata.views import TrainViews, make_loader, unpack_raw
    tree = write_synthetic_jpeg_folder(work / "jpeg", args.classes, args.images_per_class, args.jpeg_height)
    jpeg = load_local(tree)["train"]
    start = time.perf_counter()
    pre = predecode_split(jpeg, args.preprocess_size, work / "predecoded", "train", args.workers)
    predecode_s = time.perf_counter() - start
    spec = AugSpec(image_size=args.image_size)
    dev = device()
    loaders = {
        "JPEG decode + augment in loader": make_loader(TrainViews(jpeg, spec, 0), EpochSampler(len(jpeg)),
                                                       args.batch_size, args.workers, dev),
        "pre-decoded, augment in loader": make_loader(TrainViews(pre, spec, 0), EpochSampler(len(pre)),
                                                      args.batch_size, args.workers, dev),
        "pre-decoded, augment on device": make_loader(TrainViews(pre, spec, 0, device_aug=True),
                                                      EpochSampler(len(pre)), args.batch_size, args.workers, dev)}

    def on_device(batch: dict) -> torch.Tensor:
        if "raw" in batch:
            return apply_aug_records(unpack_raw(batch, dev), batch["record"], spec)
        return batch["image"].to(dev, non_blocking=True)

    def pass_over(loader, epoch: int) -> float:
        return loader_rate(loader, loader.sampler, epoch, on_device, dev)

    # the student's training throughput on ready batches: forward, backward and optimiser step, no loader
    student_rate = student_rate_of(args, student_trainer, max(2, len(jpeg) // args.batch_size))

    rates = interleaved({"student training": student_rate,
                         **{name: (lambda e, ld=ld: pass_over(ld, e)) for name, ld in loaders.items()}},
                        args.repeats, "pipeline")
    student = rates.pop("student training")
    floor = statistics.median(student)
    stored = f"short side {args.preprocess_size}" if args.preprocess_size else "as decoded"
    rows = [{**row("student training throughput", student, "img/s", floor, "itself", True),
             "note": f"{args.student}, batch {args.batch_size}, {args.image_size} px, forward + backward + step"}]
    for name, v in rates.items():
        rows.append({**row(f"input pipeline, {name}", v, "img/s", floor, "student training throughput", True),
                     "note": f"{args.workers} workers, JPEG {int(round(args.jpeg_height * 4 / 3))}x{args.jpeg_height}"
                             f", pre-decoded {stored}"})
    rows.append({**row("pre-decoding (one-time)", [predecode_s], "s", None, "-"),
                 "note": f"{len(jpeg)} JPEGs -> {stored}"})
    return rows


def student_rate_of(args, t: Trainer, steps: int):
    """A round function: images per second of `steps` training steps of trainer `t`'s student (forward, backward,
    optimiser step) on one ready uint8 batch, no loader."""
    dev = device()
    x = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8)
    y = torch.randint(0, t.num_classes, (args.batch_size,))

    def student_rate(_: int) -> float:
        from imagedata.normalization import input_norm, normalize_batch
        from models import kd_loss_terms
        t.model.train()
        start = time.perf_counter()
        for _ in range(steps):
            with t.autocast():
                logits = t.model(normalize_batch(x, dev, t.channels_last, input_norm(t.student)))["logits"]
            loss = kd_loss_terms(logits, None, y.to(dev), 1.0, 1.0)["loss"]
            t.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            t.optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return steps * args.batch_size / (time.perf_counter() - start)
    return student_rate


# ---- the GPU suite (--suite gpu) -----------------------------------------------------------------------------------
def memory_allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(base: int) -> float | None:
    """GPU memory (GB) allocated at the peak since `reset_peak`, above `base` bytes (what other items hold); None
    on CPU."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def bench_gpu_suite(args, work: Path) -> list[dict]:
    """Images per second at full size, for label-only, cached-KD and online-KD training with compile off and on, the
    teacher-cache build and the input pipeline alone, each with its peak GPU memory. Training reads pre-decoded
    data augmented on the device (data.preprocessed=true data.augment_on=device), as a GPU run should.

    Each trainer is built, then trained one warm-up epoch alone (its peak memory above what the trainers built
    before it hold: its weights, optimiser state, teacher and activations), then every trainer's epochs are timed
    interleaved."""
    compiles = {"off": ["off"], "on": ["on"], "both": ["off", "on"]}[args.compile]
    trainers, memory, rows = gpu_trainers(args, work, compiles)
    epochs = interleaved({name: (lambda rep, t=t: (lambda r: r["train/samples"] / r["time/epoch_s"])(
        t.train_epoch(1 + rep))) for name, t in trainers.items()}, args.repeats, "gpu suite epoch", "img/s")
    floors = {c: statistics.median(epochs[f"label-only, compile {c}"]) for c in compiles}
    for name, rates in epochs.items():
        c = name.rsplit(" ", 1)[1]
        rows.append({**row(f"training, {name}", rates, "img/s", floors[c], f"label-only, compile {c}", True),
                     "peak_gb": memory[name],
                     "note": f"{args.student}{' <- ' + args.teacher if 'KD' in name else ''}, batch "
                             f"{args.batch_size}, {args.image_size} px, pre-decoded, augmented on the device"})
    best_training = max(statistics.median(v) for k, v in epochs.items() if k.startswith("cached KD"))
    rows += gpu_pipeline_rows(args, work, trainers[f"label-only, compile {compiles[0]}"], best_training)
    before = memory_allocated()
    reset_peak()
    gan_rows = bench_gan_vae(args, work)
    gan_peak = peak_gb(before)
    for r in gan_rows:
        r["peak_gb"] = gan_peak
    return rows + gan_rows


def gpu_trainers(args, work: Path, compiles: list[str]) -> tuple[dict[str, Trainer], dict, list[dict]]:
    """The GPU suite's trainers (label-only, cached KD, online KD per train.compile), each built and trained one
    warm-up epoch alone. Returns (name -> trainer, name -> its peak memory, the teacher-cache build row)."""
    dev = device()
    base = common_overrides(args, str(work / "cache")) + [
        "train.epochs=1000", "data.preprocessed=true", "data.augment_on=device",
        f"data.preprocess_dir={work / 'predecoded'}"]
    modes = {"label-only": ["kd.alpha=1"], "cached KD": ["kd.alpha=0", "teacher.mode=cached"],
             "online KD": ["kd.alpha=0", "teacher.mode=online"]}
    trainers: dict[str, Trainer] = {}
    memory: dict[str, float | None] = {}
    rows: list[dict] = []
    for c in compiles:
        for mode, extra in modes.items():
            name = f"{mode}, compile {c}"
            before = memory_allocated()
            reset_peak()
            t = Trainer(checked_config(Config, base + extra + [f"train.compile={'true' if c == 'on' else 'false'}"]),
                        DistInfo(device=dev), None)
            if t.cache_info.get("built"):
                n = {s: len(t.splits[s]) for s in t.splits}
                views = n["train"] * (args.cache_views + 1) + n["validation"] + n["test"]
                rows.append({**row("teacher-cache build", [views / t.cache_info["build_s"]], "img/s", None, "-",
                                   True), "peak_gb": peak_gb(before),
                             "note": f"{views} teacher forwards ({n['train']} x (K + 1) training views, then "
                                     f"the evaluation views), teacher.batch_size {t.cfg.teacher.batch_size}"})
            reset_peak()
            t.train_epoch(0)  # warm-up alone: compilation, the loader's first fill, its peak memory
            memory[name] = peak_gb(before)
            trainers[name] = t
    return trainers, memory, rows


def gpu_pipeline_rows(args, work: Path, t: Trainer, best_training: float) -> list[dict]:
    """The input pipeline alone: trainer `t`'s loader (pre-decoded, augmented on the device) and JPEGs, in images
    per second over the fastest cached-KD training rate."""
    from imagedata.augment import AugSpec
    from imagedata.image_sources import load_local
    from imagedata.samplers import EpochSampler
    from imagedata.synthetic_data import write_synthetic_jpeg_folder
    from imagedata.views import TrainViews, make_loader
    dev = device()
    tree = write_synthetic_jpeg_folder(work / "jpeg", args.classes, args.images_per_class, args.jpeg_height)
    jpeg = load_local(tree)["train"]
    spec = AugSpec(image_size=args.image_size)
    jpeg_loader = make_loader(TrainViews(jpeg, spec, 0), EpochSampler(len(jpeg)), args.batch_size, args.workers, dev)

    def predecoded_rate(epoch: int) -> float:
        return loader_rate(t.train_loader, t.train_sampler, epoch, t.batch_images, dev)

    def jpeg_rate(epoch: int) -> float:
        return loader_rate(jpeg_loader, jpeg_loader.sampler, epoch,
                           lambda batch: batch["image"].to(dev, non_blocking=True), dev)

    before = memory_allocated()
    reset_peak()
    rates = interleaved({"pre-decoded, augment on device": predecoded_rate,
                         f"JPEG decode + augment, {args.workers} workers": jpeg_rate}, args.repeats,
                        "gpu suite pipeline", "img/s")
    pipeline_peak = peak_gb(before)
    return [{**row(f"input pipeline, {name}", v, "img/s", best_training, "fastest cached-KD training", True),
             "peak_gb": pipeline_peak if "device" in name else None,
             "note": f"JPEG {int(round(args.jpeg_height * 4 / 3))}x{args.jpeg_height}" if "JPEG" in name
             else "crops, flips and jitter on the device, normalised"} for name, v in rates.items()]


# ---- 6: gan_vae ----------------------------------------------------------------------------------------------------
def bench_gan_vae(args, work: Path) -> list[dict]:
    from gan_vae.continual import ContinualConfig, ContinualRun, validate
    write_shapes(work / "shapes.npz", args.gan_images)
    cfg = load_config(ContinualConfig, None, [
        f"data.tasks=[{work / 'shapes.npz'}]", "teacher.steps=100000", "student.steps=100000",
        "fid.classifier_epochs=1", f"fid.samples={args.fid_samples}", f"fid.cache_dir={work / 'fid'}",
        f"train.device={device().type}"])
    validate(cfg)  # as python -m gan_vae checks it
    run = ContinualRun(cfg, None, device())
    run.build_fid()
    run.decide(0)
    expert = run.experts[0]
    counter = {"teacher": 0, "student": 0}

    def teacher_chunk(_: int) -> float:
        expert.unfreeze()
        start = time.perf_counter()
        for _ in range(args.gan_steps):
            run.teacher_step(0, counter["teacher"], expert, run.train_x[0], 0)
            counter["teacher"] += 1
        expert.freeze()
        return args.gan_steps / (time.perf_counter() - start)

    def student_chunk(_: int) -> float:
        start = time.perf_counter()
        first = counter["student"]
        run.cfg.student.steps = first + args.gan_steps  # train_student runs [first, steps)
        run.train_student(0, first)
        counter["student"] = first + args.gan_steps
        return args.gan_steps / (time.perf_counter() - start)

    def fid_eval(_: int) -> float:
        g = torch.Generator().manual_seed(1)
        start = time.perf_counter()
        run.evaluator.fid("test0", run.batches(lambda n: expert.sample(n, g), args.fid_samples))
        return time.perf_counter() - start

    out = interleaved({"teacher": teacher_chunk, "student": student_chunk, "fid": fid_eval}, args.repeats, "gan_vae")
    teacher_rate = statistics.median(out["teacher"])
    return [{**row("gan_vae teacher (WGAN-GP) steps", out["teacher"], "steps/s", None, "-", True),
             "note": "batch 64, 5 critic steps per generator step"},
            {**row("gan_vae student (beta-VAE + distillation) steps", out["student"], "steps/s", None, "-", True),
             "note": "batch 64, two contrastive views"},
            {**row("gan_vae FID evaluation", out["fid"], "s", 1 / teacher_rate, "teacher step"),
             "note": f"{args.fid_samples} generated samples vs the cached statistics of {len(run.test_x[0])} real "
                     "test images, domain-classifier features"}]


def write_shapes(path: Path, n: int) -> None:
    """gan_vae's task data for the bench: n 28x28 grey synthetic images of 10 classes, as an .npz."""
    from imagedata.synthetic_data import render_synthetic_image, synthetic_class_attributes
    rng = np.random.default_rng(0)
    attrs = synthetic_class_attributes(10)
    labels = np.arange(n) % 10
    images = np.stack([render_synthetic_image(attrs[c], float(rng.uniform(0, 0.5)), 28, rng).mean(2)
                       for c in labels]).astype(np.uint8)
    np.savez(path, images=images, labels=labels)


def markdown(result: dict) -> str:
    m, a = result["machine"], result["args"]
    gpu = result.get("suite") == "gpu"
    size = "" if not gpu else (" Full size (--suite gpu)." if m["device"] != "cpu" else
                               " --suite gpu at reduced size: no CUDA device, so these are not GPU numbers.")
    lines = [f"Machine: {m['cpu']}, {m['cores']} threads, torch {m['torch']}, device {m['device']}.{size} "
             f"{a['teacher']} -> {a['student']}, {a['classes'] * a['images_per_class']} training images at "
             f"{a['image_size']} px, batch {a['batch_size']}, K = {a['cache_views']}, {a['workers']} loader workers, "
             f"{a['repeats']} timed rounds per item after a warm-up, alternatives interleaved.", "",
             "| item | median | spread (min-max) | ratio | floor |" + (" peak GPU memory |" if gpu else "") +
             " notes |", "|---|---|---|---|---|" + ("---|" if gpu else "") + "---|"]
    for r in result["rows"]:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}" if r["ratio"] < 10 else f"{r['ratio']:.1f}"
        unit = f" {r['unit']}"
        memory = "" if not gpu else (" - |" if r.get("peak_gb") is None else f" {r['peak_gb']:.2f} GB |")
        lines.append(f"| {r['item']} | {r['median']:.4g}{unit} | {r['min']:.4g}-{r['max']:.4g}{unit} | {ratio} | "
                     f"{r['floor']} |{memory} {r.get('note', '')} |")
    if gpu:
        lines += ["", TARGETS]
    return "\n".join(lines) + "\n"


# --suite gpu's sizes: full size on a GPU, reduced on a CPU (so that it runs, and is tested, anywhere)
GPU_SUITE = {"cuda": {"image_size": 224, "classes": 100, "images_per_class": 50, "batch_size": 128,
                      "workers": min(8, os.cpu_count() or 1), "cache_views": 4, "compile": "both"},
             "cpu": {"image_size": 64, "classes": 10, "images_per_class": 8, "batch_size": 32, "workers": 0,
                     "cache_views": 2, "compile": "off"}}
TARGETS = ("Targets: cached KD >= 3,000 img/s on one H100; cached KD / label-only >= 0.95; input pipeline >= 2x "
           "the training rate.")


def main() -> None:
    parser = build_parser()
    suite = parser.parse_known_args()[0].suite
    if suite == "gpu":  # the suite's sizes, unless given on the command line
        parser.set_defaults(**GPU_SUITE["cuda" if torch.cuda.is_available() else "cpu"])
    args = parser.parse_args()
    if args.suite == "gpu":
        run_gpu_suite(args)
        return
    if args.quick:
        args.images_per_class, args.repeats, args.refresh_every = 12, 2, 2
        args.gan_images, args.gan_steps, args.fid_samples = 500, 4, 1000
        args.e2e_epochs, args.e2e_repeats = [1, 2, 5], 1
    if "kd" in args.skip and "pipeline" not in args.skip:
        parser.error("the pipeline item measures against the label-only student of the kd item: do not skip kd")

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        trainers = {}
        if "kd" not in args.skip:
            kd_rows, trainers = bench_kd(args, str(work / "cache"))
            rows += kd_rows
        if "curriculum" not in args.skip:
            rows += bench_curriculum(args, str(work / "cache"))
        if "pipeline" not in args.skip:
            rows += bench_pipeline(args, work, trainers["label-only"])
        if "gan_vae" not in args.skip:
            rows += bench_gan_vae(args, work)
        if "e2e" not in args.skip:
            rows += bench_end_to_end(args, work)
    write_results({"machine": machine(), "args": vars(args), "rows": rows, "suite": "cpu"}, args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["cpu", "gpu"], default="cpu",
                        help="cpu: the items below at 64 px, as ratios (the default). gpu: images per second and "
                             "peak GPU memory at full size (224 px, batch 128, 100 classes x 50 images, pre-decoded "
                             "data augmented on the device, compile off and on); on a machine without CUDA it runs "
                             f"at reduced size ({GPU_SUITE['cpu']})")
    parser.add_argument("--compile", choices=["off", "on", "both"], default=None,
                        help="--suite gpu: train.compile of the training items (default both on CUDA, off on CPU)")
    parser.add_argument("--quick", action="store_true", help="fewer images, steps and repeats (< 2 min on 2 cores)")
    parser.add_argument("--image-size", type=int, default=64, help="view side (reduced from 224 to fit a CPU)")
    parser.add_argument("--classes", type=int, default=10, help="synthetic classes")
    parser.add_argument("--images-per-class", type=int, default=32, help="training images per class")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--cache-views", type=int, default=4, help="teacher.cache_views (K)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per item, after one warm-up round")
    parser.add_argument("--teacher", default="resnet152.tv_in1k", help="teacher model")
    parser.add_argument("--student", default="mobilenetv2_100", help="student model")
    parser.add_argument("--refresh-every", type=int, default=5, help="difficulty refresh interval for the RL item")
    parser.add_argument("--rl-cycles", type=int, default=1, help="refresh cycles timed in the RL item")
    parser.add_argument("--jpeg-height", type=int, default=375, help="height of the 4:3 JPEGs of the pipeline item")
    parser.add_argument("--preprocess-size", type=int, default=0,
                        help="data.preprocess_size of the pipeline item (0, the default: stored as decoded)")
    parser.add_argument("--gan-images", type=int, default=1000, help="28x28 images of the gan_vae task")
    parser.add_argument("--gan-steps", type=int, default=10, help="teacher and student steps per timed round")
    parser.add_argument("--fid-samples", type=int, default=2000, help="samples of the timed FID evaluation")
    parser.add_argument("--no-methods", action="store_true",
                        help="KD item: only label-only, cached and online kd (not dkd, dist, logit standardisation, "
                             "pooled_hint, fitnet)")
    parser.add_argument("--e2e-epochs", type=int, nargs="+", default=[1, 2, 5, 10, 20],
                        help="end-to-end item: the run lengths E timed (one run of the longest per mode and round)")
    parser.add_argument("--e2e-repeats", type=int, default=3, help="end-to-end item: rounds (each mode once per round)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["kd", "curriculum", "pipeline", "gan_vae", "e2e"],
                        help="items to leave out")
    parser.add_argument("--out", default="bench", help="output prefix for .json and .md")
    return parser


def run_gpu_suite(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench_gpu_suite(args, Path(tmp))
    result = {"machine": machine(), "args": vars(args), "rows": rows, "suite": "gpu"}
    write_results(result, args.out)


def write_results(result: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    Path(f"{out}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
