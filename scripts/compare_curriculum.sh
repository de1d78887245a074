#!/usr/bin/env bash
# The curriculum comparison of the README: agents (ppo, bandit) against controls (all, random_subset,
# easy_to_hard, fixed) on the quickstart's synthetic data and teacher, 3 seeds each, then the summary table.
# Needs runs/quickstart_teacher (python train_student.py --config configs/quickstart_teacher.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
C=configs/curriculum_synthetic.yaml
for s in 0 1 2; do
  python train_student_rl.py --config $C train.seed=$s agent.name=ppo run.name=cur_ppo_s$s
  python train_student_rl.py --config $C train.seed=$s agent.name=bandit run.name=cur_bandit_s$s
  python train_student_rl.py --config $C train.seed=$s agent.name=fixed run.name=cur_fixed_s$s
  python train_student_rl.py --config $C train.seed=$s agent.name=fixed curriculum.strategy=random_subset run.name=cur_random_subset_s$s
  python train_student_rl.py --config $C train.seed=$s agent.name=fixed curriculum.strategy=easy_to_hard curriculum.pacing_epochs=15 run.name=cur_easy_to_hard_s$s
  python train_student_rl.py --config $C train.seed=$s agent.name=fixed curriculum.strategy=all train.epochs=11 run.name=cur_all_s$s
done
python summarize.py runs/cur_*_s* --keys test/acc1 test/acc1_last val/acc1_best --reach 70
