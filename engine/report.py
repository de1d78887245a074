"""What a run reports: its console line per epoch, the final report (results.json, student.safetensors), the
results table printed at the end, and curves.png."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch.nn as nn

import kd_methods
from common.checkpoint import load_checkpoint, load_state_strict
from common.config import to_plain
from common.files import atomic_write, write_json
from common.metrics import read_jsonl
from engine.teacher_cache import teacher_acc1
from common.plots import plot_curves
from engine.evaluation import evaluate, measure_latency
from models import count_params


def epoch_line(cfg, epoch: int, record: dict, uses_teacher: bool, note: str = "") -> str:
    """The console line of an epoch. The loss is labelled with what it is, by its method
    (kd_methods.loss_label: its terms and weights, e.g. "0 CE + 1 T² KL"): a term scaled by T² (a KL of about 0.5
    at T = 4 reads as 8) makes it several times a label-only run's CE; its terms follow it (train/loss_<name> in
    metrics.jsonl)."""
    if uses_teacher:
        terms = ", ".join(f"{key.removeprefix('train/loss_')} {value:.4f}" for key, value in record.items()
                          if key.startswith("train/loss_"))
        loss = f"loss ({cfg.kd.method}: {kd_methods.loss_label(cfg)}) {record['train/loss']:.4f} [{terms}]"
    else:
        loss = f"loss (labels only, CE) {record['train/loss']:.4f}"
    return (f"epoch {epoch + 1}/{cfg.train.epochs}  {note + '  ' if note else ''}{loss}  "
            f"val acc1 {record['val/acc1']:.2f}  acc5 {record['val/acc5']:.2f}  "
            f"({record['time/epoch_s']:.1f}s: data wait {record['time/data_s']:.1f}, "
            f"fwd/bwd {record['time/compute_s']:.1f}, other {record['time/other_s']:.1f})")


def teacher_accuracy(t) -> dict:
    """Trainer `t`'s teacher on validation and test (from its cache when it has one); {} without a teacher."""
    if not t.uses_teacher:
        return {}
    if t.cache is not None:  # the stored fp16 logits (a lazily filled cache scores them now, on first read)
        return {f"teacher/{s}_acc1": teacher_acc1(t.cache.eval_logits(s), t.splits[s].labels)
                for s in ("validation", "test")}
    return {f"teacher/{s}_acc1": evaluate(t.teacher, t.eval_loaders[s], t.device, t.channels_last, t.autocast,
                                          t.num_classes)["acc1"] for s in ("validation", "test")}


def final_report(t) -> dict:
    """Trainer `t` after its last epoch: test accuracy of the best-validation checkpoint and of the last weights,
    sizes, the teacher's accuracy and latency; rank 0 writes results.json and student.safetensors (the best
    weights, which the student holds afterwards)."""
    cfg = t.cfg
    last_state = copy.deepcopy(t.student.state_dict())
    last = t.evaluate("test")
    best_path = t.run_dir / "checkpoints" / "best.pt"
    best_ckpt = load_checkpoint(best_path) if best_path.exists() else {"model": last_state, "epoch": -1}
    load_state_strict(t.student, best_ckpt["model"], f"checkpoint {best_path}")
    best = t.evaluate("test")
    results = {"test/acc1": best["acc1"], "test/acc5": best["acc5"], "test/loss": best["loss"],
               "test/acc1_last": last["acc1"], "test/acc5_last": last["acc5"], "test/n": best["n"],
               "val/acc1_best": t.best_acc1, "best_epoch": best_ckpt["epoch"],
               "params/student": count_params(t.student), "kd/method": cfg.kd.method,
               "kd/loss": kd_methods.loss_label(cfg),
               "teacher/mode": cfg.teacher.mode if t.uses_teacher else "none", **teacher_accuracy(t)}
    if t.teacher is not None:
        results["params/teacher"] = count_params(t.teacher.model)
        results["compression_ratio"] = results["params/teacher"] / results["params/student"]
    if t.cache_info:
        results["time/teacher_cache_build_s"] = t.cache_info["build_s"]
    if cfg.eval.latency and t.dist.is_main:
        for bs in (1, 128):
            results[f"latency_ms/batch{bs}"] = measure_latency(t.student, bs, cfg.data.image_size, t.device,
                                                               t.channels_last, t.autocast)
        results["latency_device"] = str(t.device)
    if t.dist.is_main:
        write_json(t.run_dir / "results.json", results)
        save_student_safetensors(t.student, t.run_dir / "student.safetensors",
                                 {"config": {"data": to_plain(cfg.data)}, "inputs": t.inputs})
    return results


def save_student_safetensors(model: nn.Module, path: Path, record: dict | None = None) -> None:
    """Weights loadable with timm.create_model(name, num_classes=C, pretrained=True,
    pretrained_cfg_overlay=dict(file=path, num_classes=C)). The overlay's num_classes matters: without it timm
    assumes the 1000-way ImageNet head and silently drops our classifier weights. `record`: JSON-able entries
    (the run's data section and inputs) kept in the file's metadata, each as a JSON string, for eval.checkpoint."""
    from safetensors.torch import save
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {key: json.dumps(value) for key, value in (record or {}).items()} or None
    with atomic_write(path, "wb") as fh:
        fh.write(save(state, metadata=metadata))

def loss_curve_keys(records: list[dict]) -> list[str]:
    """The loss panel of curves.png: train/loss, then every train/loss_<term> the run logged (its KD method's:
    kd's ce and kd, DKD's tckd and nckd, DIST's inter and intra, any other method's), in the order first logged,
    then val/loss."""
    terms = dict.fromkeys(key for record in records for key in record if key.startswith("train/loss_"))
    return ["train/loss", *terms, "val/loss"]


def plot_run(run_dir: Path) -> None:
    """curves.png of a run directory: the losses (`loss_curve_keys`) and the accuracies per epoch."""
    records = read_jsonl(run_dir / "metrics.jsonl")
    if records:
        plot_curves(records, run_dir / "curves.png",
                    [("loss", loss_curve_keys(records)), ("accuracy (%)", ["train/acc1", "val/acc1", "val/acc5"])])


# What each row of a printed results table is (print_results says it under the table); {key}: that results entry.
ROW_MEANINGS = {
    "teacher": "the teacher, trained first by teacher.prepare (a run of its own); the student distils from it",
    "KD student": "the student distilled from the teacher (kd.method={kd/method}: {kd/loss})",
    "labels only": "a student trained on labels alone (kd.alpha=1, no teacher): what distillation must beat",
}
COLUMN_MEANINGS = ("test/acc1, acc5: the best-validation checkpoint on the test split; test/acc1_last: the last "
                   "epoch's weights; teacher/test_acc1: the teacher this row distilled from (- without one)")


def run_label(cfg) -> str:
    """A run's row in the results table: "KD student" when it learns from a teacher, else "labels only"."""
    return "KD student" if kd_methods.uses_teacher(cfg) else "labels only"


def print_results(title: str, rows: dict[str, dict]) -> None:
    """A markdown table, one row per run (label -> results.json's content), then what each row and column is."""
    keys = ["test/acc1", "test/acc5", "test/acc1_last", "val/acc1_best", "teacher/test_acc1", "params/student"]
    print(f"\n{title}\n| run | " + " | ".join(keys) + " |\n" + "|---" * (len(keys) + 1) + "|")
    for name, res in rows.items():
        cells = [f"{res[k]:.2f}" if isinstance(res.get(k), float) else str(res.get(k, "-")) for k in keys]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for name, res in rows.items():
        if name in ROW_MEANINGS:
            print(f"{name}: " + ROW_MEANINGS[name].format_map(res))
    print(COLUMN_MEANINGS)
