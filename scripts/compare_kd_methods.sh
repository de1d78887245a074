#!/usr/bin/env bash
# The KD-method comparison of the README: on the quickstart data and its cached ResNet-10t teacher, the same
# student (test_resnet), budget (15 epochs) and seeds (0, 1, 2) for seven rows, then the summary table (test top-1
# mean ± sd, paired per-seed differences against `kd`). Epoch-time ratios come from bench.py (side by side in one
# process, see the README).
#
#   bash scripts/compare_kd_methods.sh                              # all rows, seeds 0-2
#   bash scripts/compare_kd_methods.sh 0 1                          # chosen seeds
#   ROWS="pooled_hint fitnet" bash scripts/compare_kd_methods.sh    # chosen rows (kd always runs: the pairing)
#
# Rows: label_only (configs/quickstart_label_only.yaml: kd.alpha=1, no teacher), kd (kd.alpha=0, T=4: the
# quickstart), dkd, dist (each at its paper's ImageNet defaults), kd_ls (kd + kd.logit_standardize=true),
# pooled_hint (kd + a hint on pooled features, cached), fitnet
# (FitNets: CE + 100 x a stage-2 feature-map hint, mdistiller's defaults, on the online teacher: the maps are too
# large to cache). Two runs at a time, OMP_NUM_THREADS=1 each; runs whose results.json exists are skipped, so an
# interrupted comparison continues. Each seed's kd run goes first and builds that seed's logits cache; the
# pooled_hint rows build their own (features) cache.
# Uses runs/quickstart_teacher, and trains it first (one thread, like every run here) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
C=configs/quickstart.yaml
SEEDS=${*:-0 1 2}
ROWS=${ROWS:-label_only dkd dist kd_ls pooled_hint fitnet}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
if [[ ! -f runs/quickstart_teacher/student.safetensors ]]; then  # the quickstart's teacher, trained here if missing
  rm -rf runs/quickstart_teacher
  python train_student.py --config configs/quickstart_teacher.yaml
fi
row_config() {  # label_only builds no teacher, so it has a config without the quickstart's teacher.* keys
  if [[ $1 == label_only ]]; then echo configs/quickstart_label_only.yaml; else echo "$C"; fi
}
row_args() {
  case $1 in
    label_only) echo "" ;;  # kd.alpha=1 in its config
    kd) echo "kd.method=kd" ;;
    dkd) echo "kd.method=dkd" ;;
    dist) echo "kd.method=dist" ;;
    kd_ls) echo "kd.method=kd kd.logit_standardize=true" ;;
    pooled_hint) echo "kd.method=pooled_hint" ;;
    # an online teacher has no cache: C's teacher.cache_views back at its default (a cache key is refused online)
    fitnet) echo "kd.method=fitnet teacher.mode=online teacher.cache_views=10" ;;
    *) echo "error: unknown row $1" >&2; exit 2 ;;
  esac
}
for row in $ROWS; do row_args "$row" > /dev/null; done  # an unknown row stops here, before any run
jobs_for() {  # rows... -> one command line per run not yet finished
  for row in "$@"; do
    for s in $SEEDS; do
      local name=kdm_${row}_s$s
      [[ -f runs/$name/results.json ]] && continue
      rm -rf "runs/$name"
      echo "python train_student.py --config $(row_config "$row") kd.baseline=false $(row_args "$row") train.seed=$s run.name=$name > runs/logs/$name.log 2>&1"
    done
  done
}
mkdir -p runs/logs
start=$(date +%s)
for rows in kd "$ROWS"; do
  # shellcheck disable=SC2086
  jobs_for $rows | xargs -P 2 -I{} bash -c "{}" || {
    echo "error: a run failed; its log (runs/logs/kdm_*.log) says why:" >&2
    grep -l -i "error" runs/logs/kdm_*.log | head -3 | xargs -r tail -n 5 >&2; exit 1; }
done
echo "== $(( $(date +%s) - start )) s"
python summarize.py runs/kdm_*_s* --keys test/acc1 test/acc1_last val/acc1_best --paired kdm_kd
