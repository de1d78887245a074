"""Distil an ImageNet-pretrained teacher into a student trained from scratch on mini-ImageNet.

    # the reference recipe: ResNet-152 (torchvision V1 weights) -> MobileNetV2, teacher run once and cached
    python train_student.py
    python train_student.py --config configs/mini_imagenet_kd.yaml kd.temperature=2 train.epochs=5
    python train_student.py kd.method=dkd                    # another KD method (kd_methods.KD_METHODS)
    python train_student.py kd.alpha=1                       # label-only baseline: no teacher is built or run
    python train_student.py teacher.mode=online              # run the teacher on every batch (slow, for comparison)
    python train_student.py run.name=my_run run.resume=auto  # continue a killed run
    python train_student.py --config runs/x/config.yaml eval.checkpoint=runs/x/checkpoints/best.pt  # its test acc.
    torchrun --nproc_per_node=4 train_student.py             # DDP: NCCL on GPU, gloo on CPU

    # offline quickstart on generated data, one command (under 3 minutes on a 2-core CPU): trains the quickstart
    # teacher (configs/quickstart_teacher.yaml) unless it exists, distils it, trains the label-only baseline
    python train_student.py --config configs/quickstart.yaml

The loss is the KD method's (kd.method: kd, dkd, dist, pooled_hint, fitnet or a plugin's; each term with its formula and paper
in kd_methods.py). This program is the command line only: the schema is engine.schema, the training loop
engine.trainer, the run lifecycle engine.run. Outputs in <run.out_dir>/<run.name>/: config.yaml, metrics.jsonl,
checkpoints/{last,best}.pt, results.json, student.safetensors, curves.png, tensorboard/ (log.tensorboard=true);
with kd.baseline=true also label_only/, the label-only student of the same budget and seed.
"""
from __future__ import annotations

import copy
from pathlib import Path

from omegaconf import OmegaConf

import kd_methods
from common.cli import run_cli
from common.config import check_same_config_on_all_ranks, parse_config
from common.distributed import cleanup_distributed, setup_distributed
from common.rundir import run_files
from engine.schema import Config, validate
from engine.report import print_results, run_label
from engine.run import evaluate_checkpoint, prepare_teacher, run_training


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
        base = baseline_config(cfg)
        results[run_label(base)] = run_training(base, dist)
        if dist.is_main:
            print_results("same budget, same seed: KD vs labels only", results)
    cleanup_distributed()


def baseline_config(cfg):
    """kd.baseline: the label-only student (kd.alpha=1) of the same budget and seed, in <run>/label_only/."""
    base = copy.deepcopy(cfg)
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    # every kd.* and teacher.* key back at its default, then kd.alpha=1 alone: CE only (kd_methods.kd_weights). The
    # method's keys would be unread by labels-only kd, the teacher's by a run that builds no teacher
    # (engine.schema.check_unread_teacher_keys), and its config.yaml must load as a config of its own
    defaults = OmegaConf.structured(OmegaConf.get_type(cfg))
    base.kd, base.teacher = defaults.kd, defaults.teacher
    base.kd.alpha = 1.0
    base.run.out_dir, base.run.name = str(run_dir), "label_only"
    # continue the baseline too when it had started (even if it stopped before its first checkpoint)
    base.run.resume = "auto" if cfg.run.resume and any(run_files(run_dir / "label_only")) else ""
    return base


if __name__ == "__main__":
    run_cli(main)
