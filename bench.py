"""Measure what the distillation modes cost, side by side in one process, as ratios to label-only training.

    python bench.py                 # default teacher-student pair (ResNet-152 -> MobileNetV2) at 64 px
    python bench.py --quick         # fewer images and repeats (about a minute on a 2-core CPU)
    python bench.py --image-size 224 --images-per-class 50 --out bench_gpu

It builds one synthetic dataset and three trainers on it (label-only, cached teacher, online teacher), all with
untrained weights (speed does not depend on them), then runs their training epochs interleaved (L C O L C O ...)
so that machine noise hits each alike. It reports the median and spread of the epoch times after a warm-up epoch,
each divided by the label-only median (the floor), and the teacher-cache build time in label-only epochs. Then it
times train_student_rl.py epochs (ppo and bandit agents, difficulty refresh every 5 epochs) against plain KD epochs
over one refresh cycle, interleaved. Writes <out>.json and <out>.md.
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


def bench_curriculum(args, cache_dir: str) -> dict:
    """Wall time of a train_student_rl.py epoch (agent + environment step: curriculum, training, validation and,
    every `refresh_every` epochs, the difficulty refresh) over a plain KD epoch (training + validation), for each
    agent, with the same samples per epoch (strategy all) and interleaved epochs. Returns seconds per mode."""
    from train_student_rl import CurriculumTrainer, RLConfig
    base = ["data.name=synthetic", f"data.synthetic.num_classes={args.classes}",
            f"data.synthetic.images_per_class={args.images_per_class}",
            f"data.synthetic.image_size={args.image_size}", f"data.image_size={args.image_size}",
            f"data.workers={args.workers}", f"train.batch_size={args.batch_size}", "teacher.pretrained=false",
            f"teacher.name={args.teacher}", f"student.name={args.student}", f"teacher.cache_views={args.cache_views}",
            f"teacher.cache_dir={cache_dir}", "kd.alpha=0", "eval.latency=false", "curriculum.strategy=all",
            f"difficulty.refresh_every={args.refresh_every}", "difficulty.warmup_epochs=0",
            f"train.epochs={args.refresh_every * args.rl_cycles + 1}"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plain = Trainer(load_config(RLConfig, None, base), DistInfo(device=device), None)
    rl = {a: CurriculumTrainer(load_config(RLConfig, None, base + [f"agent.name={a}"]), DistInfo(device=device), None)
          for a in ("ppo", "bandit")}
    obs = {a: t.env.reset(seed=0)[0] for a, t in rl.items()}
    seconds: dict[str, list[float]] = {"plain KD": [], **{f"RL {a}": [] for a in rl}}
    for epoch in range(args.refresh_every * args.rl_cycles + 1):
        start = time.perf_counter()
        plain.train_and_validate(epoch)
        if epoch:  # epoch 0 is the warm-up (its difficulty refresh happened in reset, outside the timing)
            seconds["plain KD"].append(time.perf_counter() - start)
        for a, t in rl.items():
            start = time.perf_counter()
            action = t.agent.act(obs[a])
            next_obs, reward, done, _, _ = t.env.step(action)
            t.agent.observe(obs[a], action, reward, next_obs, done)
            obs[a] = next_obs
            if epoch:
                seconds[f"RL {a}"].append(time.perf_counter() - start)
        print(f"curriculum epoch {epoch}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in seconds.items() if v),
              flush=True)
    return seconds


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
    parser.add_argument("--refresh-every", type=int, default=5, help="difficulty refresh interval for the RL item")
    parser.add_argument("--rl-cycles", type=int, default=1, help="refresh cycles timed in the RL item")
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
        rl_seconds = bench_curriculum(args, cache_dir)

    floor = statistics.median(epoch_s["label-only"])
    rows = {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                   "ratio_to_label_only": statistics.median(t) / floor} for name, t in epoch_s.items()}
    rl_floor = sum(rl_seconds["plain KD"])
    rl_rows = {name: {"total_s": sum(t), "epochs": len(t), "ratio_to_plain_kd": sum(t) / rl_floor}
               for name, t in rl_seconds.items()}
    result = {"machine": machine(), "args": vars(args), "epoch_time": rows,
              "teacher_cache_build_s": build_s, "teacher_cache_build_in_label_only_epochs": build_s / floor,
              "curriculum_epoch_time": rl_rows}
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
    lines += ["", f"Curriculum (train_student_rl.py) epochs against plain KD epochs (train_student.py), both with "
              f"validation, same samples per epoch (strategy all), difficulty refreshed every {args.refresh_every} "
              f"epochs, {len(rl_seconds['plain KD'])} interleaved epochs each:", "",
              "| measurement | total | ratio to plain KD |", "|---|---|---|"]
    for name, r in rl_rows.items():
        lines.append(f"| {name} epoch | {r['total_s']:.2f} s over {r['epochs']} epochs | "
                     f"{r['ratio_to_plain_kd']:.3f} |")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
