"""The configuration of train_student.py: every key, its default, its valid values and its meaning (`--help` and the
docs tables are generated from it), and `validate`, the checks that involve several keys. train_student_rl.py
extends it (RLConfig). A component's own keys (a KD method's, an agent's) live beside its code and join this schema
when the config is loaded (common.registry.compose_schema)."""
from __future__ import annotations

from dataclasses import dataclass

import kd_methods
from common.config import check_ranges, check_unread_keys, opt, run_config, section
from common.errors import UserError, check
from common.registry import holds_sections_of
from imagedata.image_sources import VAL_FRACTION


# Config schema: every key, its default and its meaning (`--help` prints this table).
# ================================================================================================================
@dataclass
class SyntheticConfig:
    num_classes: int = opt(10, "synthetic data: number of classes (named after the first mini-ImageNet synsets)",
                            ge=2, le=100)
    images_per_class: int = opt(100, "synthetic data: training images per class (validation and test get 1/4 each)",
                                 ge=1)
    eval_images_per_class: int = opt(0, "synthetic data: validation and test images per class "
                                        "(0 = a quarter of images_per_class)", ge=0)
    image_size: int = opt(32, "synthetic data: side of the generated images in pixels", ge=16)
    seed: int = opt(0, "synthetic data: generator seed (the data are a pure function of these six keys)", ge=0)
    label_noise: float = opt(0.0, "synthetic data: fraction of TRAINING labels replaced by a different class drawn "
                                  "uniformly (validation and test stay clean; the true class is kept in a "
                                  "clean_label column)", ge=0, lt=1)


@dataclass
class DataConfig:
    name: str = opt("timm/mini-imagenet", "Hugging Face hub dataset id, or 'synthetic' for generated offline data")
    path: str = opt("", "local copy instead of the hub: a save_to_disk folder or an ImageFolder tree "
                        "<split>/<class>/<image> with train, test and validation (or val, valid; carved from train "
                        "when absent, see data.val_fraction)")
    val_fraction: float = opt(VAL_FRACTION, "for a dataset with train and test splits only: the share of train "
                                            "carved out as validation (printed at start-up); 0 requires a "
                                            "validation split", ge=0, lt=1)
    val_seed: int = opt(0, "seed of that carve; apart from train.seed, so every training seed validates on the "
                           "same images", ge=0)
    image_size: int = opt(224, "side of the training and evaluation views", ge=16)
    crop_scale_min: float = opt(0.08, "RandomResizedCrop lower area bound (upper is 1)", gt=0, le=1)
    hflip: bool = opt(True, "random horizontal flip of training views")
    color_jitter: list[float] = opt([0.2, 0.2, 0.2], "ColorJitter brightness, contrast, saturation", ge=0)
    eval_crop_ratio: float = opt(0.875, "evaluation view: resize to image_size / ratio, centre-crop image_size",
                                 gt=0, le=1)
    workers: int = opt(8, "DataLoader worker processes per rank (0 loads in the main process)", ge=0)
    preprocessed: bool = opt(False, "decode every image once into a uint8 memory map per split (see "
                                    "data.preprocess_size) instead of decoding JPEGs every epoch")
    preprocess_size: int = opt(0, "0: store images as decoded, so training, evaluation and teacher views equal the "
                                  "JPEG path's (disk: height x width x 3 bytes per image, about 40 GB for "
                                  "mini-ImageNet, an estimate). N > 0: store a copy downscaled to short side N "
                                  "(smaller, e.g. about 17 GB at 256), which changes the recipe: random crops come "
                                  "from the downscaled copy, so training views and teacher-cache views differ from "
                                  "the reference (more crops are upscaled)", ge=0)
    preprocess_dir: str = opt("", "where pre-decoded splits live (default <run.out_dir>/predecoded)")
    augment_on: str = opt("auto", "where training crops, flips and jitter run: workers, device (needs "
                                  "data.preprocessed=true), or auto (device when pre-decoded on CUDA, else workers)",
                          choices=("auto", "workers", "device"))
    synthetic: SyntheticConfig = section(SyntheticConfig)


@dataclass
class TeacherConfig:
    name: str = opt("resnet152.tv_in1k", "timm teacher; resnet152.tv_in1k = torchvision V1 weights, "
                                         "resnet152.tv2_in1k = V2")
    pretrained: bool = opt(True, "load the hub weights of teacher.name (ignored when teacher.checkpoint is set)")
    checkpoint: str = opt("", "local teacher weights (.pt, .pth or .safetensors; e.g. student.safetensors of a "
                              "kd.alpha=1 run) used instead of hub weights")
    mode: str = opt("cached", "'cached': score K views per image once (teacher.cache_fill) and replay them; "
                              "'online': run it on every training batch", choices=("cached", "online"))
    cache_views: int = opt(10, "K: augmented views per training image stored in the teacher cache", ge=1)
    cache_features: bool = opt(True, "also store the teacher's pooled features of every cached view (fp16) when "
                                      "kd.method needs them (pooled_hint); false refuses such a method")
    prepare: str = opt("", "a config file that trains the teacher when teacher.checkpoint does not exist yet: that "
                           "run goes first, into this run.out_dir, and must write teacher.checkpoint (its "
                           "student.safetensors); a stopped one is continued. configs/quickstart.yaml uses "
                           "configs/quickstart_teacher.yaml")
    cache_dir: str = opt("", "teacher cache location (default <run.out_dir>/teacher_cache)")
    cache_fill: str = opt("auto", "when the cache's training views are scored: 'lazy' each the first time training "
                                  "replays it (the same logits as 'eager'; until every view is filled an epoch costs "
                                  "an online one, then a label-only one); 'eager' all before the first step; 'auto' "
                                  "lazy on one machine, eager across several (where lazy is refused)",
                          choices=("auto", "lazy", "eager"))
    batch_size: int = opt(256, "views per teacher forward when scoring the cache (capped at train.batch_size; "
                               "part of the cache's key, since it sets the rounding)", ge=1)


@dataclass
class StudentConfig:
    name: str = opt("mobilenetv2_100", "timm student model")
    pretrained: bool = opt(False, "start the student from hub weights (the reference trains from scratch)")


@holds_sections_of(kd_methods.KD_METHODS)
@dataclass
class KDConfig:
    """The keys every method shares; each method's own section (kd.dkd.*, kd.dist.*, kd.pooled_hint.*, kd.fitnet.*,
    a plugin's) is declared beside the method in kd_methods.py and added from the registry
    (common.registry.compose_schema)."""
    method: str = opt("kd", "KD method (kd_methods.KD_METHODS, or one a run.plugins file registers)",
                      choices=kd_methods.KD_METHODS)
    alpha: float = opt(0.0, "kd / pooled_hint: shorthand for the two weights below, CE weight alpha and KD weight "
                            "1 - alpha (0 = teacher only, 1 = labels only: no teacher is built for kd)", ge=0, le=1)
    ce_weight: float | None = opt(None, "kd / pooled_hint: weight of the label cross-entropy, set together with "
                                        "kd.kd_weight (then kd.alpha stays at its default 0); null = from kd.alpha. "
                                        "configs/methods/ has the authors' settings, e.g. 0.5 / 0.5 (mdistiller "
                                        "ImageNet), 0.1 / 9 (Sun et al. 2024)", ge=0)
    kd_weight: float | None = opt(None, "kd / pooled_hint: weight of the T² KL term, set together with "
                                        "kd.ce_weight; 0 = labels only (no teacher is built for kd); null = "
                                        "1 - kd.alpha", ge=0)
    temperature: float = opt(4.0, "kd / pooled_hint: distillation temperature T", gt=0)
    logit_standardize: bool = opt(False, "kd, dkd, pooled_hint: z-score each sample's logits before the temperature "
                                         "(Sun et al. CVPR 2024, logit standardisation); refused with methods that do "
                                         "not implement it (dist, fitnet)")
    baseline: bool = opt(False, "also train a label-only student (kd.alpha=1) with the same budget and seed into "
                                "<run>/label_only/ and print both side by side")


@dataclass
class TrainingConfig:
    epochs: int = opt(100, "training epochs", ge=1,
                      why="nothing would be trained (to evaluate a saved student on the test split, use "
                          "eval.checkpoint=PATH)")
    batch_size: int = opt(128, "training batch size per rank", ge=1)
    eval_batch_size: int = opt(256, "evaluation batch size per rank", ge=1)
    optimizer: str = opt("adam", "adam (L2 weight decay, as the reference), adamw or sgd (Nesterov)",
                         choices=("adam", "adamw", "sgd"))
    lr: float = opt(1e-3, "peak learning rate", gt=0)
    min_lr: float = opt(1e-6, "learning rate at the end of the cosine schedule (at most train.lr)", ge=0)
    warmup_epochs: float = opt(0.0, "linear warm-up before the cosine decay, in epochs", ge=0)
    weight_decay: float = opt(1e-4, "weight decay", ge=0)
    momentum: float = opt(0.9, "SGD momentum (train.optimizer=sgd, Nesterov: needs > 0)", ge=0, lt=1)
    grad_clip: float = opt(0.0, "clip the gradient norm to this value (0 = off)", ge=0)
    seed: int = opt(0, "seed for weights, shuffling and augmentation (the same seed gives the same numbers on CPU)",
                    ge=0, le=2**32 - 1, why="NumPy's global seed, which the PPO agent sets, takes 32 bits")
    device: str = opt("auto", "auto (CUDA if available), cuda or cpu", choices=("auto", "cuda", "cpu"))
    amp: str = opt("auto", "mixed precision: auto (bf16 on CUDA, off on CPU), bf16, fp16 (with a GradScaler; runs "
                           "on CPU too) or off", choices=("auto", "bf16", "fp16", "off"))
    channels_last: bool = opt(True, "channels_last memory format for the student and its inputs")
    compile: bool = opt(False, "torch.compile the student and the KD method's parts (inductor; on CPU it needs a "
                               "C++ compiler). Compilation happens in the first steps; may change on resume")
    profile: bool = opt(False, "write a torch.profiler trace of training steps 3-7 of the first epoch to "
                               "<run>/profile/ (TensorBoard / chrome://tracing / Perfetto)")


@dataclass
class EvalConfig:
    checkpoint: str = opt("", "evaluate this checkpoint on the test split, print the result as JSON and exit")
    latency: bool = opt(True, "measure the student's inference latency at batch 1 and 128 in the final report")


@dataclass
class RunConfig(run_config("train_student", "<data>")):
    """The shared run.* keys, as a class of this module so that a config pickles (see utils.run_config)."""


@dataclass
class LogConfig:
    tensorboard: bool = opt(False, "also write TensorBoard logs to <run>/tensorboard")
    every_steps: int = opt(20, "progress-bar refresh and non-finite loss check interval, in steps", ge=1)


@dataclass
class Config:
    data: DataConfig = section(DataConfig)
    teacher: TeacherConfig = section(TeacherConfig)
    student: StudentConfig = section(StudentConfig)
    kd: KDConfig = section(KDConfig)
    train: TrainingConfig = section(TrainingConfig)
    eval: EvalConfig = section(EvalConfig)
    run: RunConfig = section(RunConfig)
    log: LogConfig = section(LogConfig)


# The teacher.* keys that only the teacher cache (teacher.mode=cached) reads.
CACHE_ONLY_TEACHER_KEYS = ("cache_views", "cache_features", "cache_dir", "cache_fill", "batch_size")


def unread_teacher_keys(cfg) -> tuple[str, ...]:
    """The teacher.* keys (without the prefix) that no code reads under `cfg`: all of them when the run builds no
    teacher (kd_methods.uses_teacher: labels only, e.g. kd.alpha=1; teacher.prepare included, which trains a teacher
    only for a run that uses one), teacher.pretrained when teacher.checkpoint gives the weights, the cache's (CACHE_ONLY_TEACHER_KEYS) with teacher.mode=online, and
    teacher.cache_features with a cached teacher whose method reads no teacher features."""
    if not kd_methods.uses_teacher(cfg):
        return tuple(TeacherConfig.__dataclass_fields__)
    hub = ("pretrained",) if cfg.teacher.checkpoint else ()  # local weights replace the hub's: it is never read
    if cfg.teacher.mode == "online":
        return (*hub, *CACHE_ONLY_TEACHER_KEYS)
    return (*hub, *(() if kd_methods.needs_teacher_features(cfg) else ("cache_features",)))


def check_unread_teacher_keys(cfg) -> None:
    """Refuse teacher.* keys set away from their defaults that this config does not read (unread_teacher_keys),
    naming them, why they are unread and what to do instead."""
    unread, defaults = unread_teacher_keys(cfg), TeacherConfig()
    shown = {True: "true", False: "false"}
    changed = [f"teacher.{k}={shown.get(getattr(cfg.teacher, k), getattr(cfg.teacher, k))}" for k in unread
               if getattr(cfg.teacher, k) != getattr(defaults, k)]
    if not changed:
        return
    if kd_methods.uses_teacher(cfg) and "pretrained" in unread and cfg.teacher.pretrained != defaults.pretrained:
        raise UserError(f"teacher.pretrained={str(cfg.teacher.pretrained).lower()} set, but teacher.checkpoint="
                        f"{cfg.teacher.checkpoint} gives the teacher's weights, so the hub's are never loaded and it "
                        "would change nothing: drop teacher.pretrained (no hub download happens with a checkpoint)")
    if not kd_methods.uses_teacher(cfg):
        raise UserError(f"{', '.join(changed)} set, but this run builds no teacher (kd.method={cfg.kd.method}, "
                        f"{kd_methods.loss_label(cfg)}), so they would change nothing. Drop the teacher.* keys "
                        "(leave them at their defaults): for the quickstart's label-only run use --config "
                        "configs/quickstart_label_only.yaml, not configs/quickstart.yaml with kd.alpha=1")
    if cfg.teacher.mode == "online":
        raise UserError(f"{', '.join(changed)} set, but teacher.mode=online builds no teacher cache, which is all "
                        "that reads them, so they would change nothing: leave them at their defaults, or use "
                        "teacher.mode=cached")
    raise UserError(f"{', '.join(changed)} set, but kd.method={cfg.kd.method} reads no teacher features, so the "
                    "cache holds none either way and it would change nothing: leave it at its default")


def check_read_only_when_used(cfg) -> None:
    """Keys that only one setting of another key reads, refused (not ignored) when set away from their defaults
    under another: the generator's keys without data.name=synthetic, data.path with it, the pre-decoded copy's size
    without data.preprocessed, SGD's momentum with another optimizer. (The teacher's keys without a teacher, and its
    cache's without the cache: check_unread_teacher_keys, which validate runs last.)"""
    d, defaults = cfg.data, SyntheticConfig()
    if d.name != "synthetic":
        changed = [f"data.synthetic.{k}" for k in SyntheticConfig.__dataclass_fields__
                   if getattr(d.synthetic, k) != getattr(defaults, k)]
        check(not changed, f"{', '.join(changed)} set, but data.name={d.name} is not the generated data "
                           "(data.name=synthetic), so they would change nothing: leave them at their defaults")
    check(d.name != "synthetic" or not d.path, f"data.path={d.path} is not read with data.name=synthetic (the data "
                                               "are generated): drop data.path, or name the dataset in data.name")
    check(d.preprocessed or d.preprocess_size == 0,
          f"data.preprocess_size={d.preprocess_size} sizes the pre-decoded copy, which data.preprocessed=false does "
          "not make: set data.preprocessed=true, or leave data.preprocess_size at 0")
    check(cfg.train.optimizer == "sgd" or cfg.train.momentum == TrainingConfig.momentum,
          f"train.momentum={cfg.train.momentum} is read by train.optimizer=sgd only (train.optimizer="
          f"{cfg.train.optimizer}): leave it at its default {TrainingConfig.momentum}, or use train.optimizer=sgd")


def validate(cfg) -> None:
    """Every key against its declared range (utils.check_ranges; load_config has done it already, this covers a
    config changed in code), the keys the selected components do not read (check_unread_keys, likewise), then the
    checks that involve several keys, the selected KD method's own, and the teacher.* keys this config does not
    read (check_unread_teacher_keys)."""
    check_ranges(cfg)
    check_unread_keys(cfg)
    t = cfg.train
    check(t.min_lr <= t.lr, f"train.min_lr={t.min_lr} is above train.lr={t.lr}: the cosine schedule would raise "
                            "the learning rate; use train.min_lr <= train.lr")
    check(t.optimizer != "sgd" or t.momentum > 0, "train.optimizer=sgd uses Nesterov momentum, which needs "
                                                  f"train.momentum > 0 (got {t.momentum})")
    check(len(cfg.data.color_jitter) == 3, "data.color_jitter takes three numbers: brightness, contrast, saturation")
    check(cfg.data.preprocess_size == 0 or cfg.data.preprocess_size >= cfg.data.image_size,
          f"data.preprocess_size={cfg.data.preprocess_size} must be >= data.image_size={cfg.data.image_size}, "
          "or 0 (store images as decoded)")
    check(t.warmup_epochs < t.epochs, f"train.warmup_epochs={t.warmup_epochs} is not below train.epochs={t.epochs}: "
                                      "the learning rate would never reach its cosine decay (the run would end "
                                      "still warming up); use train.warmup_epochs < train.epochs")
    check(not cfg.kd.baseline or kd_methods.uses_teacher(cfg),
          "kd.baseline=true trains a label-only student beside a distilled one, but this run has no teacher (it is "
          "the label-only run itself): set kd.baseline=false")
    check_read_only_when_used(cfg)
    check(cfg.data.augment_on != "device" or cfg.data.preprocessed,
          "data.augment_on=device needs data.preprocessed=true (JPEGs are decoded in the workers)")
    check_method_needs(cfg)
    kd_methods.validate_method(cfg)
    # last: a run without a teacher because its loss weights are all 0, say, is told that first
    check_unread_teacher_keys(cfg)


def check_method_needs(cfg) -> None:
    """The selected KD method's declaration (kd_methods.KDMethod: student_reads, teacher_reads, stages,
    teacher_outputs), checked before any work: what it reads is among kd_methods.MODEL_OUTPUTS, a method reading
    stage maps names its stages, and teacher.mode=cached is refused for a method whose teacher outputs the cache
    cannot hold (the method's `cache_refusal` text added). The stages themselves are checked against the models
    once they are built (engine.build.check_stages)."""
    cls = kd_methods.method_class(cfg)
    method = f"kd.method={cls.name}"
    for model, reads in (("student", cls.student_reads), ("teacher", cls.teacher_reads)):
        unknown = [r for r in reads if r not in kd_methods.MODEL_OUTPUTS]
        check(not unknown, f"{method} declares that it reads {unknown} from the {model}; a method reads "
                           f"{', '.join(kd_methods.MODEL_OUTPUTS)} (fix {cls.__name__}.{model}_reads)")
    stages = tuple(cls.stages(cfg))
    reads_maps = "stage_maps" in (*cls.student_reads, *cls.teacher_reads)
    check(bool(stages) == reads_maps, f"{method} reads stage maps but declares no stages (its stages(cfg))"
                                      if reads_maps else f"{method} declares stages {list(stages)} but reads no "
                                                         "stage maps (student_reads / teacher_reads)")
    if cls.uses_teacher(cfg) and cfg.teacher.mode == "cached" and not cls.can_cache(cfg):
        extra = cls.cache_refusal(cfg)
        raise UserError(f"{method} cannot use teacher.mode=cached: it reads the teacher's "
                        f"{', '.join(cls.teacher_outputs)}, and the teacher cache holds only "
                        f"{', '.join(kd_methods.TEACHER_OUTPUTS)}. {extra + '. ' if extra else ''}"
                        "Use teacher.mode=online")
