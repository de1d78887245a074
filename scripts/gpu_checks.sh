#!/usr/bin/env bash
# The GPU checks of issue 11, in one call for a session that is lent a GPU (see DEVELOPERS.md, device tool):
#   bash scripts/gpu_checks.sh [OUT]        # default OUT=gpu_checks; an estimated 10 minutes on one H100 (not yet run)
# 1. bench.py --suite gpu (full size: 224 px, batch 128, ResNet-152 -> MobileNetV2, compile off and on);
# 2. a one-epoch end-to-end run of every script on CUDA, synthetic data at 224 px (train_student.py cached and
#    online, compiled; train_student_rl.py; gan_vae.continual with its default sizes, few steps).
# Every command's log goes to OUT/<name>.log; the summary (exit codes, wall times) to OUT/summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_checks}
mkdir -p "$out"
summary="$out/summary.txt"
python -c "import torch; print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', 'torch', torch.__version__)" | tee "$summary"

step() {  # step NAME COMMAND...: run, log, record exit code and seconds
  local name=$1; shift
  local start=$SECONDS
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start)) s" | tee -a "$summary"
  tail -n 25 "$out/$name.log" | sed "s/^/  [$name] /"
}

SYN="data.name=synthetic data.synthetic.num_classes=100 data.synthetic.images_per_class=20 \
data.synthetic.eval_images_per_class=4 data.synthetic.image_size=224 data.image_size=224 data.workers=8 \
teacher.pretrained=false train.epochs=1 run.out_dir=$out/runs"

step bench_gpu python bench.py --suite gpu --out "$out/bench_gpu"
step student_cached python train_student.py $SYN train.compile=true data.preprocessed=true run.name=cached
step student_online python train_student.py $SYN teacher.mode=online run.name=online
step student_rl python train_student_rl.py $SYN train.epochs=2 difficulty.warmup_epochs=1 agent.ppo.n_steps=2 agent.ppo.batch_size=2 run.name=rl
python - "$out" <<'PY'
import numpy as np, sys
rng = np.random.default_rng(0)
np.savez(f"{sys.argv[1]}/digits.npz", images=rng.integers(0, 256, (600, 28, 28), dtype=np.uint8),
         labels=np.arange(600) % 10)
PY
step gan_vae python -m gan_vae.continual "data.tasks=[$out/digits.npz,$out/digits.npz:invert]" teacher.steps=50 \
  student.steps=50 fid.samples=200 fid.classifier_epochs=1 run.out_dir="$out/runs" run.name=gan_vae
cat "$summary"
