#!/usr/bin/env bash
# The gan_vae shared-data run of the README and its ablation of task 1: the full run (MNIST, then Fashion-MNIST),
# then task 1 retrained from the full run's task-0 checkpoint with one override per row (no replay, and the
# self-distillation weight kd.previous_weight at 0, 1 and 4; the full run is the default 8). Finished rows (their
# results.json exists) are skipped, so an interrupted ablation continues where it stopped. The four rows run two at
# a time (logs in runs/logs/gv_*.log); every run has OMP_NUM_THREADS=1, so the numbers do not depend on the machine's core count (a different thread count
# rounds differently and changes them slightly) and the rows differ only in their override.
#
#   bash scripts/gan_vae_ablation.sh
set -euo pipefail
cd "$(dirname "$0")/.."
C=configs/gan_vae_shared_data.yaml
FULL=runs/gan_vae_shared
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
run() {  # name, overrides...
  local name=$1; shift
  if [[ -f runs/$name/results.json ]]; then echo "[ablation] $name: done, skipped"; return; fi
  echo "[ablation] $name: $*"
  python -m gan_vae.continual --config $C run.name="$name" "$@"
}
run gan_vae_shared
mkdir -p runs/logs
# the four task-1 rows, two at a time (one thread each), each from the full run's task-0 checkpoint
export -f run
export C FULL
printf '%s\n' "gv_noreplay student.replay=false" "gv_prev0 kd.previous_weight=0" "gv_prev1 kd.previous_weight=1" \
    "gv_prev4 kd.previous_weight=4" |
  xargs -P 2 -I{} bash -c 'set -- {}; name=$1; shift; run "$name" run.resume=$FULL/checkpoints/task_0.pt "$@" \
    > runs/logs/$name.log 2>&1' || { echo "error: a row failed; see runs/logs/gv_*.log" >&2; exit 1; }
python - <<'PY'
import json
from pathlib import Path
rows = [("no replay (student.replay=false)", "gv_noreplay"), ("kd.previous_weight=0", "gv_prev0"),
        ("kd.previous_weight=1", "gv_prev1"), ("kd.previous_weight=4", "gv_prev4"),
        ("kd.previous_weight=8 (the full run)", "gan_vae_shared")]
base = json.loads(Path("runs/gan_vae_shared/results.json").read_text())["recon_mse"][0][0]  # after task 0
cell = lambda v, fmt: "–" if v is None else format(v, fmt)
print(f"recon MSE on MNIST after task 0 (every row starts there): {base:.5f}")
print("| task 1 trained with | recon MSE MNIST (forgetting) | recon MSE Fashion | student FID MNIST | "
      "student FID Fashion | samples [real, fake] |")
print("|---|---|---|---|---|---|")
for label, name in rows:
    r = json.loads(Path("runs", name, "results.json").read_text())
    mse, fid, n = r["recon_mse"][1], r["student_fid"][1], r["student_fid_samples"][1]
    change = 100 * (mse[0] - base) / base
    print(f"| {label} | {mse[0]:.5f} ({change:+.1f}%) | {cell(mse[1], '.5f')} | {cell(fid[0], '.2f')} | "
          f"{cell(fid[1], '.2f')} | {n} |")
PY
