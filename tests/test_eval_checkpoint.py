"""eval.checkpoint in both programs: the saved student is evaluated on the test split and nothing is trained; a key
that differs from the config the checkpoint records is refused, unless it only says how or where to run."""
from __future__ import annotations

import json

import pytest
from conftest import RL_ARGS, TINY, TINY_LABEL_ONLY, assert_clean_error, run_main

TS_ARGS = TINY_LABEL_ONLY


def _evaluated(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_rl_eval_checkpoint_evaluates_and_trains_nothing(stopped_runs, tmp_path):
    """train_student_rl.py eval.checkpoint=best.pt: the checkpoint's test accuracy, as train_student.py measures it,
    and no training: no epoch line, no run directory, the stopped run untouched."""
    best = stopped_runs / "rl" / "checkpoints" / "best.pt"
    metrics = (stopped_runs / "rl" / "metrics.jsonl").read_text()
    out = [f"run.out_dir={tmp_path / 'runs'}", "run.name=new"]
    proc = run_main("train_student_rl.py", *RL_ARGS, *out, f"eval.checkpoint={best}")
    rl = _evaluated(proc)
    assert "epoch 1/" not in proc.stdout and "resumed" not in proc.stdout
    assert not (tmp_path / "runs").exists()
    assert (stopped_runs / "rl" / "metrics.jsonl").read_text() == metrics
    assert rl["checkpoint"] == str(best) and rl["test/n"] == 12  # 4 classes x 3 test images
    # train_student.py's evaluation of the same file (its data and student are those of the RL run)
    ts = _evaluated(run_main("train_student.py", *TS_ARGS, *out, f"eval.checkpoint={best}"))
    assert (rl["test/acc1"], rl["test/acc5"]) == (ts["test/acc1"], ts["test/acc5"])


@pytest.mark.parametrize("override,key", [
    ("data.synthetic.seed=3", "data.synthetic.seed = 0 in the checkpoint, 3 now"),  # other test images
    ("data.image_size=48", "data.image_size = 32 in the checkpoint, 48 now"),      # another view
    ("train.weight_decay=0.001", "train.weight_decay = 0.0001 in the checkpoint, 0.001 now"),  # not evaluated
    ("train.profile=true", "train.profile = false in the checkpoint, true now"),  # an evaluation profiles nothing
    ("train.epochs=5", "train.epochs = 2 in the checkpoint, 5 now"),
])
@pytest.mark.parametrize("script", ["train_student", "train_student_rl"])
def test_eval_checkpoint_refuses_keys_that_change_or_miss_the_measurement(stopped_runs, tmp_path, script, override,
                                                                         key):
    run, args = ("ts", TS_ARGS) if script == "train_student" else ("rl", RL_ARGS)
    best = stopped_runs / run / "checkpoints" / "best.pt"
    proc = run_main(f"{script}.py", *args, override, f"run.out_dir={tmp_path}", f"eval.checkpoint={best}")
    assert_clean_error(proc, f"eval.checkpoint={best} was trained with another config", key)
    assert "test/acc1" not in proc.stdout


def test_eval_checkpoint_accepts_how_and_where_it_runs(stopped_runs, tmp_path):
    best = stopped_runs / "ts" / "checkpoints" / "best.pt"
    base = _evaluated(run_main("train_student.py", *TS_ARGS, f"eval.checkpoint={best}"))
    other = _evaluated(run_main("train_student.py", *TS_ARGS, "train.eval_batch_size=5", "train.device=cpu",
                                f"run.out_dir={tmp_path}", "log.every_steps=3", f"eval.checkpoint={best}"))
    assert other["test/acc1"] == base["test/acc1"]


def test_eval_checkpoint_of_a_label_only_run_saved_with_teacher_keys(stopped_runs, tmp_path):
    """A label-only checkpoint saved when unread teacher.* keys were accepted (teacher.name=resnet10t, ...) is
    evaluated with the run's config less those keys, which are refused now: a run that builds no teacher does not
    read them, so they may differ from the checkpoint's."""
    from common.checkpoint import load_checkpoint, save_checkpoint
    ckpt = load_checkpoint(stopped_runs / "ts" / "checkpoints" / "best.pt")
    ckpt["config"]["teacher"].update(name="resnet10t", pretrained=False, cache_views=2)
    best = tmp_path / "best.pt"
    save_checkpoint(ckpt, best)
    original = stopped_runs / "ts" / "checkpoints" / "best.pt"
    base = _evaluated(run_main("train_student.py", *TS_ARGS, f"eval.checkpoint={original}"))
    old = _evaluated(run_main("train_student.py", *TS_ARGS, f"eval.checkpoint={best}"))
    assert old["test/acc1"] == base["test/acc1"]
