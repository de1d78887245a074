"""Compiled, bf16 and channels_last runs of train_student.py against eager fp32, on the quickstart data:
first-epoch loss difference and steady-state epoch time ratio (docs/distributed.md's "GPU switches" table).

    python scripts/compile_vs_eager.py [OUT_DIR]      # default /tmp/compile_vs_eager; about 3 minutes on 2 cores
"""
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/compile_vs_eager")
shutil.rmtree(root, ignore_errors=True)
base = ["data.name=synthetic", "data.synthetic.num_classes=10", "data.synthetic.images_per_class=60",
        "data.synthetic.image_size=32", "data.image_size=32", "data.crop_scale_min=0.35", "data.workers=0",
        "student.name=test_resnet", "kd.alpha=1", "train.epochs=4", "train.batch_size=64", "eval.latency=false",
        f"run.out_dir={root}"]
runs = {"eager fp32": ["train.compile=false", "train.amp=off", "train.channels_last=false"],
        "compiled fp32": ["train.compile=true", "train.amp=off", "train.channels_last=false"],
        "eager bf16": ["train.compile=false", "train.amp=bf16", "train.channels_last=false"],
        "eager channels_last": ["train.compile=false", "train.amp=off", "train.channels_last=true"],
        "compiled bf16 + channels_last": ["train.compile=true", "train.amp=bf16", "train.channels_last=true"]}
out = {}
for i, (name, ov) in enumerate(runs.items()):
    p = subprocess.run([sys.executable, "train_student.py", *base, *ov, f"run.name=r{i}"], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    m = [json.loads(l) for l in (root / f"r{i}" / "metrics.jsonl").read_text().splitlines()]
    out[name] = {"loss0": m[0]["train/loss"], "epoch1_s": m[0]["time/epoch_s"],
                 "steady_s": statistics.median(r["time/epoch_s"] for r in m[1:])}
ref = out["eager fp32"]
print("| run | first-epoch loss | relative difference | first epoch s | epochs 2-4 median s | ratio |")
print("|---|---|---|---|---|---|")
for name, r in out.items():
    print(f"| {name} | {r['loss0']:.8f} | {abs(r['loss0'] - ref['loss0']) / ref['loss0']:.2e} | "
          f"{r['epoch1_s']:.2f} | {r['steady_s']:.3f} | {r['steady_s'] / ref['steady_s']:.2f} |")
