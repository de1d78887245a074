"""Measure what the distillation modes cost, side by side in one process, as ratios to label-only training.

    python bench.py                 # default teacher-student pair (ResNet-152 -> MobileNetV2) at 64 px
    python bench.py --quick         # fewer images and repeats (about a minute on a 2-core CPU)
    python bench.py --image-size 224 --images-per-class 50 --out bench_gpu

It builds one synthetic dataset and three trainers on it (label-only, cached teacher, online teacher), all with
untrained weights (speed does not depend on them), then runs their training epochs interleaved (L C O L C O ...)
so that machine noise hits each alike. It reports the median and spread of the epoch times after a warm-up epoch,
each divided by the label-only median (the floor), and the teacher-cache build time in label-only epochs.
Writes <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from train_student import Config, Trainer
from utils import DistInfo, load_config


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


def build_trainers(args, cache_dir: str) -> dict[str, Trainer]:
    base = ["data.name=synthetic", f"data.synthetic.num_classes={args.classes}",
            f"data.synthetic.images_per_class={args.images_per_class}",
            f"data.synthetic.image_size={args.image_size}", f"data.image_size={args.image_size}",
            f"data.workers={args.workers}", f"train.batch_size={args.batch_size}", "teacher.pretrained=false",
            f"teacher.name={args.teacher}", f"student.name={args.student}", f"teacher.cache_views={args.cache_views}",
            f"teacher.cache_dir={cache_dir}", "train.epochs=1000", "eval.latency=false"]
    modes = {"label-only": ["kd.alpha=1"], "cached": ["kd.alpha=0", "teacher.mode=cached"],
             "online": ["kd.alpha=0", "teacher.mode=online"]}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {name: Trainer(load_config(Config, None, base + extra), DistInfo(device=device), None)
            for name, extra in modes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats")
    parser.add_argument("--image-size", type=int, default=64, help="image side (reduced from 224 to fit a CPU)")
    parser.add_argument("--classes", type=int, default=10, help="synthetic classes")
    parser.add_argument("--images-per-class", type=int, default=32, help="training images per class")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--cache-views", type=int, default=4, help="teacher.cache_views (K)")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per mode, after one warm-up epoch")
    parser.add_argument("--teacher", default="resnet152.tv_in1k", help="teacher model")
    parser.add_argument("--student", default="mobilenetv2_100", help="student model")
    parser.add_argument("--out", default="bench", help="output prefix for .json and .md")
    args = parser.parse_args()
    if args.quick:
        args.images_per_class, args.repeats = 16, 2

    with tempfile.TemporaryDirectory() as cache_dir:
        trainers = build_trainers(args, cache_dir)
        epoch_s: dict[str, list[float]] = {name: [] for name in trainers}
        for rep in range(args.repeats + 1):
            for name, trainer in trainers.items():
                seconds = trainer.train_epoch(rep)["time/epoch_s"]
                if rep:  # the first round is the warm-up
                    epoch_s[name].append(seconds)
                print(f"round {rep} {name:>10}: {seconds:.2f}s", flush=True)
        build_s = trainers["cached"].cache_info["build_s"]

    floor = statistics.median(epoch_s["label-only"])
    rows = {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                   "ratio_to_label_only": statistics.median(t) / floor} for name, t in epoch_s.items()}
    result = {"machine": machine(), "args": vars(args), "epoch_time": rows,
              "teacher_cache_build_s": build_s, "teacher_cache_build_in_label_only_epochs": build_s / floor}
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} threads, torch {m['torch']}, device {m['device']}. "
             f"{args.teacher} -> {args.student}, {args.classes * args.images_per_class} training images at "
             f"{args.image_size} px, batch {args.batch_size}, K = {args.cache_views}, {args.repeats} timed epochs "
             "per mode, interleaved.", "",
             "| measurement | median | spread (min-max) | ratio to label-only |", "|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| KD epoch, {name} | {r['median_s']:.2f} s | {r['min_s']:.2f}-{r['max_s']:.2f} s | "
                     f"{r['ratio_to_label_only']:.2f} |")
    lines.append(f"| teacher-cache build | {build_s:.2f} s | one run | "
                 f"{result['teacher_cache_build_in_label_only_epochs']:.2f} label-only epochs |")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
