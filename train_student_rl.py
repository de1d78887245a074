"""Knowledge distillation with a curriculum chosen every epoch by a reinforcement-learning agent.

    python train_student_rl.py                                     # mini-ImageNet, PPO agent, adaptive curriculum
    python train_student_rl.py agent.name=bandit                   # discounted Thompson sampling over 15 actions
    python train_student_rl.py agent.name=fixed agent.fixed_actions=[[2,1]]     # control: target 0.5, T unchanged
    python train_student_rl.py curriculum.strategy=easy_to_hard agent.name=fixed   # pacing control
    python train_student_rl.py run.name=my_run run.resume=auto     # continue a killed run (agent included)
    python train_student_rl.py --config runs/x/config.yaml eval.checkpoint=runs/x/checkpoints/best.pt  # test split
    torchrun --nproc_per_node=4 train_student_rl.py

    # on the offline quickstart's data and teacher (trained first by teacher.prepare unless it exists)
    python train_student_rl.py --config configs/curriculum_synthetic.yaml agent.name=bandit

Everything train_student.py has (config, cached teacher, AMP, DDP, resume, run directory) comes from its engine:
engine.curriculum_run.CurriculumRun composes an engine.trainer.Trainer with the curriculum (curriculum.Curriculum:
the sampler of curriculum_dataloader.STRATEGY_REGISTRY's strategy and the difficulty refresh), the Gymnasium
environment (rl_curriculum_env.CurriculumEnv: one step = one epoch, the action of step t applies to the epoch step
t trains) and the agent (agents.AGENT_REGISTRY); the schema is engine.rl_schema. This program is the command line
only. Extra outputs: curriculum.jsonl (one line per epoch), curriculum.png, difficulty/epoch_XXX.{npy,png} at every
refresh.
"""
from __future__ import annotations

import kd_methods
from common.cli import run_cli
from common.config import check_same_config_on_all_ranks, parse_config
from common.distributed import cleanup_distributed, setup_distributed
from engine.curriculum_run import CurriculumRun
from engine.rl_schema import RLConfig, validate_rl
from engine.run import evaluate_checkpoint, prepare_teacher, run_training


def main(argv: list[str]) -> None:
    cfg = parse_config(RLConfig, argv, prog="train_student_rl.py", doc=__doc__)
    validate_rl(cfg)
    dist = setup_distributed(cfg.train.device)
    check_same_config_on_all_ranks(cfg)
    if cfg.eval.checkpoint:  # the student a curriculum run saved, on the test split, as train_student.py does it
        evaluate_checkpoint(cfg, dist)
        return cleanup_distributed()
    if cfg.teacher.prepare and kd_methods.uses_teacher(cfg):
        prepare_teacher(cfg, dist)  # a train_student.py run, in its own run directory
    run_training(cfg, dist, CurriculumRun)
    cleanup_distributed()


if __name__ == "__main__":
    run_cli(main)
