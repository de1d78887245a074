#!/usr/bin/env bash
# The curriculum comparison of the README: agents (ppo, bandit) against controls (fixed target 0.5, random_subset,
# easy_to_hard, all) on the quickstart's synthetic data and teacher, in three regimes, then the summary tables
# (test top-1 mean ± sd, exact train/samples totals, paired per-seed differences against random_subset and all).
#
#   bash scripts/compare_curriculum.sh            # all three regimes, seeds 0-4
#   bash scripts/compare_curriculum.sh a          # one regime: a (equal budget), b (short budget), c (noisy labels)
#   bash scripts/compare_curriculum.sh b 0 1 2    # ... and chosen seeds
#
# a: 15 epochs, fraction 0.7, difficulty refreshed before epochs 3, 8, 13 (whole set before); easy_to_hard paces
#    0.4 -> 1 over 15 epochs; `all` trains 11 epochs (6,600 samples, the closest to the adaptive rows' 6,660).
# b: about 40% of (a)'s whole-set budget (15 x 600 = 9,000): 10 epochs, difficulty refreshed before epochs 2, 5, 8
#    (whole set in epoch 1); adaptive rows fraction 0.556 (600 + 9 x 334 = 3,606), random_subset fraction 0.6
#    (10 x 360 = 3,600), easy_to_hard 0.31 -> 1 over 14 epochs (600 + 3,009 = 3,609), all 6 epochs (3,600).
# c: (a) with data.synthetic.label_noise=0.2 (20% of the training labels flipped) and kd.alpha=0.5.
#
# Two runs at a time (xargs -P 2), each with OMP_NUM_THREADS=1: on a 2-core CPU that is the fastest way through
# the 30 runs of a regime, and these are the settings the README's numbers were measured with. Runs whose
# results.json exists are skipped, so an interrupted comparison continues where it stopped. Each regime first runs
# its ppo row (one run per seed, two seeds at a time), which builds the teacher cache of every seed, so that no
# two runs ever build the same cache at once.
# Needs runs/quickstart_teacher (python train_student.py --config configs/quickstart_teacher.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
C=configs/curriculum_synthetic.yaml
REGIMES=${1:-abc}
shift || true
SEEDS=${*:-0 1 2 3 4}
[[ -f runs/quickstart_teacher/student.safetensors ]] || {
  echo "error: runs/quickstart_teacher/student.safetensors is missing; first run:" >&2
  echo "  python train_student.py --config configs/quickstart_teacher.yaml" >&2; exit 2; }

# regime -> settings shared by every row, and per-row settings
common() {
  case $1 in
    a) echo "" ;;
    b) echo "train.epochs=10 difficulty.warmup_epochs=1 difficulty.refresh_every=3" ;;
    c) echo "data.synthetic.label_noise=0.2 kd.alpha=0.5" ;;
  esac
}
row_args() {  # regime row
  local f=0.7 rf=0.7 start=0.4 pacing=15 all_epochs=11
  if [[ $1 == b ]]; then f=0.556 rf=0.6 start=0.31 pacing=14 all_epochs=6; fi
  case $2 in
    ppo|bandit) echo "agent.name=$2 curriculum.fraction=$f" ;;
    fixed) echo "agent.name=fixed curriculum.fraction=$f" ;;
    random_subset) echo "agent.name=fixed curriculum.strategy=random_subset curriculum.fraction=$rf" ;;
    easy_to_hard) echo "agent.name=fixed curriculum.strategy=easy_to_hard curriculum.start_fraction=$start curriculum.pacing_epochs=$pacing" ;;
    all) echo "agent.name=fixed curriculum.strategy=all train.epochs=$all_epochs" ;;
  esac
}
jobs_for() {  # regime rows... -> one command line per run not yet finished, row-major (seeds vary fastest)
  local r=$1; shift
  for row in "$@"; do
    for s in $SEEDS; do
      local name=cur_${r}_${row}_s$s
      [[ -f runs/$name/results.json ]] && continue
      rm -rf "runs/$name"  # an unfinished run from an interrupted comparison starts again
      echo "python train_student_rl.py --config $C $(common "$r") $(row_args "$r" "$row") train.seed=$s run.name=$name > runs/logs/$name.log 2>&1"
    done
  done
}
mkdir -p runs/logs
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for r in $(echo "$REGIMES" | grep -o .); do
  start=$(date +%s)
  for rows in ppo "bandit fixed random_subset easy_to_hard all"; do
    # shellcheck disable=SC2086
    jobs_for "$r" $rows | xargs -P 2 -I{} bash -c "{}" || {
      echo "error: a run of regime $r failed; its log (runs/logs/cur_${r}_*.log) says why:" >&2
      grep -l -i "error" runs/logs/cur_"${r}"_*.log | head -3 | xargs -r tail -n 5 >&2; exit 1; }
  done
  echo "== regime $r: $(( $(date +%s) - start )) s"
  reach=70; [[ $r == b ]] && reach=50  # epochs to this validation top-1: the short budget never reaches 70%
  python summarize.py runs/cur_${r}_*_s* --keys test/acc1 test/acc1_last val/acc1_best --reach $reach \
      --paired random_subset all
done
