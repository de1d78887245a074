"""train_student.py end to end, as a user runs it: every teacher mode, resume after SIGKILL, DDP, bad input."""
import json
import sys

import pytest
from conftest import (ROOT, TINY, TINY_LABEL_ONLY, TINY_LOCAL_TEACHER, TINY_ONLINE, assert_clean_error,
                      read_metrics, run_and_sigkill, run_main, run_script, runs_documented_command)

TIME_KEYS = ("time/",)


def _files_ok(run_dir, with_teacher: bool):
    for name in ("config.yaml", "metrics.jsonl", "checkpoints/last.pt", "checkpoints/best.pt", "results.json",
                 "student.safetensors", "curves.png"):
        assert (run_dir / name).is_file(), name
    metrics = read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == [0, 1]
    for key in ("epoch", "train/loss", "val/acc1", "val/acc5", "lr", "time/epoch_s"):
        assert key in metrics[0], key
    results = json.loads((run_dir / "results.json").read_text())
    for key in ("test/acc1", "test/acc5", "test/acc1_last", "val/acc1_best", "params/student"):
        assert key in results, key
    assert ("teacher/test_acc1" in results) == with_teacher and ("params/teacher" in results) == with_teacher
    assert 0 <= results["test/acc1"] <= 100 and results["test/n"] == 12  # 4 classes x 3 test images
    return metrics, results


@pytest.mark.parametrize("mode", ["cached", "online", "labels"])
def test_tiny_run_in_each_teacher_mode(tmp_path, mode):
    args = {"cached": [*TINY, "teacher.mode=cached"], "online": TINY_ONLINE, "labels": TINY_LABEL_ONLY}[mode]
    extra = [] if mode == "labels" else ["kd.alpha=0.5"]
    proc = run_script("train_student.py", *args, *extra, f"run.out_dir={tmp_path}", "run.name=r",
                      "log.tensorboard=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics, results = _files_ok(tmp_path / "r", with_teacher=mode != "labels")
    assert ("teacher cache built" in proc.stdout) == (mode == "cached")
    if mode == "labels":
        assert all(m["train/loss_kd"] == 0 for m in metrics)
        assert "teacher cache" not in proc.stdout and results["teacher/mode"] == "none"
        # the console says what the loss and the result row are
        assert f"epoch 2/2  loss (labels only, CE) {metrics[1]['train/loss']:.4f}  val acc1" in proc.stdout
        assert "| labels only |" in proc.stdout and "labels only: a student trained on labels alone" in proc.stdout
    else:
        assert all(m["train/loss_kd"] > 0 for m in metrics)
        assert results["compression_ratio"] > 1
        m = metrics[1]
        assert (f"epoch 2/2  loss (kd: 0.5 CE + 0.5 T² KL) {m['train/loss']:.4f} [ce {m['train/loss_ce']:.4f}, "
                f"kd {m['train/loss_kd']:.4f}]  val acc1") in proc.stdout
        assert "| KD student |" in proc.stdout and "KD student: the student distilled from the teacher (kd.method=kd: " \
                                                    "0.5 CE + 0.5 T² KL)" in proc.stdout
    assert "| student |" not in proc.stdout
    assert list((tmp_path / "r" / "tensorboard").iterdir())


def _strip_time(records):
    return [{k: v for k, v in r.items() if not k.startswith(TIME_KEYS)} for r in records]


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    args = [*TINY, "data.synthetic.images_per_class=40", "train.epochs=4", "teacher.cache_views=2",
            f"run.out_dir={tmp_path}", "teacher.mode=cached", "kd.alpha=0.3"]
    full = run_script("train_student.py", *args, "run.name=full")
    assert full.returncode == 0, full.stderr[-3000:]

    done_before = run_and_sigkill("train_student.py", *args, "run.name=killed",
                                  watch=tmp_path / "killed" / "metrics.jsonl", after_lines=2)
    assert done_before < 4

    resumed = run_script("train_student.py", *args, "run.name=killed", "run.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "killed")
    assert [r["epoch"] for r in b] == [0, 1, 2, 3]
    assert _strip_time(a) == _strip_time(b)
    ra = json.loads((tmp_path / "full" / "results.json").read_text())
    rb = json.loads((tmp_path / "killed" / "results.json").read_text())
    for key in ("test/acc1", "test/acc5", "test/acc1_last", "val/acc1_best", "test/loss"):
        assert ra[key] == rb[key], key


def test_two_process_torchrun_matches_single_process_evaluation(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = run_script("train_student.py", *TINY, "data.synthetic.num_classes=5", "data.synthetic.images_per_class=9",
                      "teacher.mode=cached", "kd.alpha=0.5", f"run.out_dir={tmp_path}", "run.name=ddp",
                      launcher=launcher, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "ddp"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["test/n"] == 10  # 5 classes x 2 test images, each counted once across the 2 ranks
    single = run_script("train_student.py", "--config", str(run_dir / "config.yaml"),
                        f"eval.checkpoint={run_dir / 'checkpoints' / 'best.pt'}")
    assert single.returncode == 0, single.stderr[-3000:]
    evaluated = json.loads(single.stdout.strip().splitlines()[-1])
    assert evaluated["test/n"] == 10
    assert evaluated["test/acc1"] == results["test/acc1"] and evaluated["test/acc5"] == results["test/acc5"]


def test_label_only_baseline_side_by_side(tmp_path):
    proc = run_script("train_student.py", *TINY, "train.epochs=1", "kd.alpha=0.5", "kd.baseline=true",
                      f"run.out_dir={tmp_path}", "run.name=kd")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "kd" / "label_only" / "results.json").is_file()
    table = proc.stdout.split("KD vs labels only")[1]
    assert "| KD student |" in table and "| labels only |" in table  # the rows were "student", "label-only student"


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import torch

    from common.config import load_config
    from common.distributed import DistInfo
    from common.errors import UserError
    from common.metrics import MetricLogger
    from common.rundir import prepare_run_dir
    from engine.schema import Config
    from engine.trainer import Trainer

    cfg = load_config(Config, None, [*TINY, "kd.alpha=0.5", "train.epochs=1", f"run.out_dir={tmp_path}",
                                                   "run.name=nan", "log.every_steps=1"])
    run_dir, _ = prepare_run_dir(cfg.run.out_dir, cfg.run.name, "", DistInfo())
    trainer = Trainer(cfg, DistInfo(), run_dir)
    logger = MetricLogger(run_dir / "metrics.jsonl", True)
    trainer.fit(logger)
    last = (run_dir / "checkpoints" / "last.pt").read_bytes()

    import kd_methods
    real_terms = kd_methods.kd_loss_terms  # the kd method's loss (kd_methods.KD), which the loop sums

    def nan_terms(*args, **kwargs):
        terms = real_terms(*args, **kwargs)
        terms["kd"] = terms["kd"] * torch.tensor(float("nan"))
        return terms

    monkeypatch.setattr(kd_methods, "kd_loss_terms", nan_terms)
    cfg.train.epochs, trainer.start_epoch = 2, 1
    with pytest.raises(UserError, match=r"non-finite \(nan\) at epoch 2, step 1.*last good checkpoint is kept"):
        trainer.fit(logger)
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == last
    assert len(read_metrics(run_dir)) == 1


def test_checkpoint_from_a_different_model(tmp_path):
    ok = run_script("train_student.py", *TINY_LABEL_ONLY, "train.epochs=1", f"run.out_dir={tmp_path}", "run.name=a")
    assert ok.returncode == 0, ok.stderr[-2000:]
    ckpt = tmp_path / "a" / "checkpoints" / "last.pt"
    proc = run_script("train_student.py", *TINY_LABEL_ONLY, "student.name=resnet10t", f"run.out_dir={tmp_path}",
                      "run.name=b", f"run.resume={ckpt}", "train.epochs=1")
    # refused before anything is built, naming the key (the strict load behind it: test_strict_load_names_the_mismatch)
    assert_clean_error(proc, 'student.name = "mobilenetv2_035" in the run, "resnet10t" now')


def test_fresh_run_never_overwrites(tmp_path):
    ok = run_script("train_student.py", *TINY_LABEL_ONLY, "train.epochs=1", f"run.out_dir={tmp_path}", "run.name=a")
    assert ok.returncode == 0
    before = (tmp_path / "a" / "metrics.jsonl").read_text()
    proc = run_script("train_student.py", *TINY_LABEL_ONLY, f"run.out_dir={tmp_path}", "run.name=a")
    assert_clean_error(proc, "already holds a run")
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == before


def test_corrupt_image_in_a_worker_is_named_without_traceback(tmp_path):
    from PIL import Image
    for split in ("train", "validation", "test"):
        for k, synset in enumerate(("n01532829", "n01558993")):
            folder = tmp_path / "ds" / split / synset
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 40), (200 * k, 50, 100 + 20 * i)).save(folder / f"img{i}.png")
    (tmp_path / "ds" / "train" / "n01558993" / "img2.png").write_bytes(b"\x89PNG truncated")
    proc = run_script("train_student.py", "data.path=" + str(tmp_path / "ds"), "data.image_size=32", "kd.alpha=1",
                      "student.name=test_resnet", "data.workers=1", "train.batch_size=4", "train.epochs=1",
                      "eval.latency=false", f"run.out_dir={tmp_path}", "run.name=bad")
    assert_clean_error(proc, "cannot read image", "img2.png")


@runs_documented_command("python train_student.py --config configs/quickstart.yaml")
def test_teacher_prepare_trains_the_teacher_once_then_reuses_it(tmp_path, monkeypatch):
    """configs/quickstart.yaml's one-command route, at tiny size (the file, then TINY's data, models and epochs and a
    tiny teacher config): teacher.prepare trains the teacher first when teacher.checkpoint is missing, a second run
    reuses it, and a teacher run that would write elsewhere is refused."""
    teacher_yaml = tmp_path / "teacher.yaml"
    teacher_yaml.write_text("\n".join(["data:", "  name: synthetic", "  image_size: 32", "  workers: 0",
                                       "  synthetic:", "    num_classes: 4", "    images_per_class: 12",
                                       "    image_size: 32", "    seed: 1", "student:", "  name: test_resnet",
                                       "kd:", "  alpha: 1.0", "train:", "  epochs: 1", "  batch_size: 8",
                                       "eval:", "  latency: false", "run:", "  name: tiny_teacher", ""]))
    checkpoint = tmp_path / "tiny_teacher" / "student.safetensors"
    args = ["--config", "configs/quickstart.yaml", *TINY_LOCAL_TEACHER, "data.synthetic.eval_images_per_class=0",
            "teacher.name=test_resnet", f"teacher.checkpoint={checkpoint}", f"teacher.prepare={teacher_yaml}",
            "kd.alpha=0", "kd.baseline=true", "train.epochs=1", f"run.out_dir={tmp_path}"]
    first = run_script("train_student.py", *args, "run.name=first")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "does not exist yet; training it first" in first.stdout and checkpoint.is_file()
    assert "same budget, same seed: KD vs labels only" in first.stdout
    # each result row says what it is: the teacher's own run, the distilled student, the label-only baseline
    teacher_table, student_table = first.stdout.split("\ntrain_student: ")[1:3]
    assert "| teacher |" in teacher_table and "teacher: the teacher, trained first by teacher.prepare" in teacher_table
    assert "| KD student |" in student_table
    comparison = first.stdout.split("same budget, same seed: KD vs labels only")[1]
    assert comparison.index("| KD student |") < comparison.index("| labels only |")
    assert "| student |" not in first.stdout
    for run in ("tiny_teacher", "first", "first/label_only"):
        assert (tmp_path / run / "results.json").is_file(), run
    stamp = checkpoint.stat().st_mtime_ns
    second = run_script("train_student.py", *args, "run.name=second")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"teacher: reusing {checkpoint}" in second.stdout and checkpoint.stat().st_mtime_ns == stamp
    # refused while the teacher run's config is checked, before any work: in this process (run_main), in the
    # repository root as the scripts run (--config configs/quickstart.yaml is relative)
    monkeypatch.chdir(ROOT)
    elsewhere = run_main("train_student.py", *args, f"teacher.checkpoint={tmp_path / 'other.safetensors'}",
                         "run.name=third")
    assert_clean_error(elsewhere, f"writes {checkpoint}", "agree")
    assert not (tmp_path / "third").exists()


def test_loss_curve_keys_are_every_logged_loss_term():
    """curves.png's loss panel: train/loss, every train/loss_<term> the run logged (whatever the method), val/loss.
    The old panel was a fixed kd list (ce, kd) and left DKD's, DIST's and any new method's terms out."""
    from engine.report import loss_curve_keys
    dkd = [{"epoch": 0, "train/loss": 1.0, "train/loss_ce": 0.5, "train/loss_tckd": 0.2, "train/loss_nckd": 0.3,
            "train/acc1": 10.0, "val/loss": 1.1}]
    assert loss_curve_keys(dkd) == ["train/loss", "train/loss_ce", "train/loss_tckd", "train/loss_nckd", "val/loss"]
    dist = [{"epoch": 0, "train/loss_inter": 1.0}, {"epoch": 1, "train/loss_inter": 1.0, "train/loss_intra": 2.0}]
    assert loss_curve_keys(dist) == ["train/loss", "train/loss_inter", "train/loss_intra", "val/loss"]


def test_dkd_run_draws_its_terms_in_curves_png(tmp_path, monkeypatch):
    """A kd.method=dkd run writes curves.png whose loss panel plots train/loss_tckd and train/loss_nckd."""
    import train_student
    from engine import report
    panels = []
    real = report.plot_curves
    monkeypatch.setattr(report, "plot_curves", lambda records, path, p: (panels.append(p), real(records, path, p)))
    train_student.main([*TINY, "kd.method=dkd", "train.epochs=1", f"run.out_dir={tmp_path}", "run.name=dkd"])
    assert (tmp_path / "dkd" / "curves.png").is_file()
    loss_keys = dict(panels[-1])["loss"]
    assert {"train/loss_tckd", "train/loss_nckd"} <= set(loss_keys)
    assert all(key in read_metrics(tmp_path / "dkd")[0] for key in loss_keys)
