"""A run records what it read (each split's content fingerprint, the teacher.checkpoint file's digest) in run.json
and in its checkpoints; a resume and eval.checkpoint compare them and refuse a change, naming the split or file
(issue 23). In-process (common.cli.run_cli), each run stopped after its first checkpoint as a kill would."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, TINY_LABEL_ONLY, TINY_LOCAL_TEACHER, Killed

# TINY without the generated data's keys, which a run on data from disk refuses (it does not read them)
TINY_DATA_ON_DISK = [a for a in TINY_LABEL_ONLY if not a.startswith(("data.name=", "data.synthetic."))]  # kd.alpha=1
from PIL import Image
from test_bad_input import assert_user_error, cli, digest

import train_student
import train_student_rl
from common.checkpoint import load_checkpoint
from engine.trainer import Trainer
from imagedata.synthetic_data import make_synthetic_dataset, write_synthetic_jpeg_folder

MAINS = {"train_student": train_student.main, "train_student_rl": train_student_rl.main}
RL_EXTRA = ["curriculum.strategy=random_subset", "agent.name=fixed"]


def _stop_after_first_epoch(monkeypatch, main, argv) -> None:
    finish_epoch = Trainer.finish_epoch

    def finish_then_die(self, epoch, *args, **kwargs):
        finish_epoch(self, epoch, *args, **kwargs)
        raise Killed

    with monkeypatch.context() as mp:
        mp.setattr(Trainer, "finish_epoch", finish_then_die)
        with pytest.raises(Killed):
            main(argv)


def _repaint(path: Path) -> None:
    """Other pixels in the same file: same name, same byte size, same mtime (cp -p, rsync -t keep it)."""
    before = path.stat()
    img = Image.open(path)
    img.load()
    Image.fromarray(255 - np.asarray(img)).save(path, format="BMP")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size


def _image_folder(root: Path) -> Path:
    """An ImageFolder tree of 4 classes, stored as BMP (a repaint keeps the byte size)."""
    write_synthetic_jpeg_folder(root, num_classes=4, images_per_class=8, height=32)
    for jpeg in sorted(root.rglob("*.JPEG")):
        Image.open(jpeg).convert("RGB").save(jpeg.with_suffix(".bmp"))
        jpeg.unlink()
    return root


def _args(tmp_path: Path, data: Path, name: str, *extra: str) -> list[str]:
    return [*TINY_DATA_ON_DISK, "data.name=folder", f"data.path={data}", f"run.out_dir={tmp_path / 'runs'}",
            f"run.name={name}", *extra]


@pytest.mark.parametrize("script", ["train_student", "train_student_rl"])
def test_a_training_image_repainted_in_place_stops_the_resume(tmp_path, monkeypatch, script):
    """An ImageFolder run was killed after epoch 1, one training image repainted in place, and run.resume=auto
    continued on different images without a word."""
    data = _image_folder(tmp_path / "data")
    extra = RL_EXTRA if script == "train_student_rl" else []
    main = MAINS[script]
    _stop_after_first_epoch(monkeypatch, main, _args(tmp_path, data, "r", *extra))
    run = tmp_path / "runs" / "r"
    recorded = json.loads((run / "run.json").read_text())["inputs"]["data"]
    assert set(recorded) == {"train", "validation", "test"}
    assert load_checkpoint(run / "checkpoints" / "last.pt")["inputs"]["data"] == recorded
    assert load_checkpoint(run / "checkpoints" / "best.pt")["inputs"]["data"] == recorded

    image = sorted((data / "train").rglob("*.bmp"))[3]
    _repaint(image)
    before = digest(run)
    code, err = cli(main, [*_args(tmp_path, data, "r", *extra), "run.resume=auto"], None)
    assert_user_error(code, err, "cannot resume from", "the train split's images changed", str(image))
    assert "the test split" not in err and "the validation split" not in err
    assert digest(run) == before
    # a checkpoint path (here the run's own last.pt) is compared alike
    code, err = cli(main, [*_args(tmp_path, data, "r", *extra), f"run.resume={run / 'checkpoints' / 'last.pt'}"],
                    None)
    assert_user_error(code, err, "the train split's images changed")


def test_an_added_image_and_a_replaced_arrow_file_stop_the_resume(tmp_path, monkeypatch):
    """Another number of images is named as such; a save_to_disk dataset whose arrow file was replaced at the same
    path (under the same `datasets` fingerprint) is named with the file."""
    data = _image_folder(tmp_path / "data")
    _stop_after_first_epoch(monkeypatch, train_student.main, _args(tmp_path, data, "r"))
    shutil.copy(next((data / "validation").rglob("*.bmp")), next((data / "validation").iterdir()) / "added.bmp")
    code, err = cli(train_student.main, [*_args(tmp_path, data, "r"), "run.resume=auto"], None)
    assert_user_error(code, err, "the validation split had 8 images, it has 9 now")

    hub = tmp_path / "hub"
    make_synthetic_dataset(num_classes=4, images_per_class=12, image_size=32, seed=0).save_to_disk(hub)
    args = [*TINY_DATA_ON_DISK, "data.name=hub", f"data.path={hub}", f"run.out_dir={tmp_path / 'runs'}",
            "run.name=h"]
    _stop_after_first_epoch(monkeypatch, train_student.main, args)
    other = tmp_path / "other"
    make_synthetic_dataset(num_classes=4, images_per_class=12, image_size=32, seed=1).save_to_disk(other)
    arrow = sorted((hub / "test").glob("*.arrow"))
    for path in arrow:
        shutil.copy(other / "test" / path.name, path)
    code, err = cli(train_student.main, [*args, "run.resume=auto"], None)
    assert_user_error(code, err, "the test split's images changed", str(arrow[0]))


def test_eval_checkpoint_refuses_a_changed_test_split(tmp_path, monkeypatch):
    """eval.checkpoint (best.pt, or the student.safetensors of a finished run) compares the test split it measures
    (a changed training split does not change that number); another dataset, named on purpose, is not compared."""
    data = _image_folder(tmp_path / "data")
    code, err = cli(train_student.main, [*_args(tmp_path, data, "r", "train.epochs=1")], None)
    assert code is None, err
    saved = [tmp_path / "runs" / "r" / "checkpoints" / "best.pt", tmp_path / "runs" / "r" / "student.safetensors"]
    _repaint(sorted((data / "train").rglob("*.bmp"))[0])
    for path in saved:
        code, err = cli(train_student.main, [*_args(tmp_path, data, "e", "train.epochs=1"),
                                             f"eval.checkpoint={path}"], None)
        assert code is None, err
    image = sorted((data / "test").rglob("*.bmp"))[1]
    _repaint(image)
    for path in saved:  # the file is named while the digest index knows it was written since it was read
        code, err = cli(train_student.main, [*_args(tmp_path, data, "e", "train.epochs=1"),
                                             f"eval.checkpoint={path}"], None)
        assert_user_error(code, err, f"eval.checkpoint={path}", "the test split's images changed",
                          *([str(image)] if path == saved[0] else []))
    copy = shutil.copytree(data, tmp_path / "another_dataset")
    code, err = cli(train_student.main, [*_args(tmp_path, copy, "e", "train.epochs=1"),
                                         f"eval.checkpoint={saved[1]}"], None)
    assert code is None, err


def test_a_replaced_teacher_checkpoint_stops_the_resume(tmp_path, monkeypatch):
    """teacher.checkpoint retrained or replaced at the same path: the resumed epochs would distil other soft
    targets (the teacher cache, keyed by the weights, is simply rebuilt)."""
    import timm
    from safetensors.torch import save_file
    teacher = tmp_path / "teacher.safetensors"
    for seed in (0, 1):
        torch.manual_seed(seed)
        state = timm.create_model("resnet10t", num_classes=4).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, teacher if seed == 0 else tmp_path / "other.st")
    args = [*TINY_LOCAL_TEACHER, "kd.alpha=0.5", f"teacher.checkpoint={teacher}", f"run.out_dir={tmp_path / 'runs'}", "run.name=r"]
    _stop_after_first_epoch(monkeypatch, train_student.main, args)
    run = tmp_path / "runs" / "r"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["inputs"]["teacher_checkpoint"]
    shutil.copy(tmp_path / "other.st", teacher)
    before = digest(run)
    code, err = cli(train_student.main, [*args, "run.resume=auto"], None)
    assert_user_error(code, err, f"the teacher weights teacher.checkpoint={teacher} changed")
    assert digest(run) == before


def test_changed_hub_weights_of_the_teacher_stop_the_resume(tmp_path, monkeypatch):
    """teacher.pretrained=true without teacher.checkpoint: the weights come from the hub (or its local cache), and
    another revision there gave the resumed epochs another teacher without a word. The digest of the loaded weights
    is now recorded in the checkpoint and compared on resume. (The hub is simulated: timm.create_model with
    pretrained=True returns seeded random weights; the seed stands for the revision.)"""
    import timm
    create = timm.create_model
    revision = {"seed": 0}

    def hub(name, pretrained=False, **kwargs):
        if not pretrained:
            return create(name, **kwargs)
        with torch.random.fork_rng():
            torch.manual_seed(revision["seed"])
            return create(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", hub)
    args = [*TINY_LOCAL_TEACHER, "kd.alpha=0.5", f"run.out_dir={tmp_path / 'runs'}", "run.name=r"]
    _stop_after_first_epoch(monkeypatch, train_student.main, args)
    run = tmp_path / "runs" / "r"
    recorded = load_checkpoint(run / "checkpoints" / "last.pt")["inputs"]["teacher_hub_weights"]
    assert json.loads((run / "run.json").read_text())["inputs"]["teacher_hub_weights"] == recorded
    revision["seed"] = 1
    before = digest(run)
    code, err = cli(train_student.main, [*args, "run.resume=auto"], None)
    # known only once the teacher is loaded (after the teacher cache of the new weights is built): the last line
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert err.splitlines()[-1].startswith(f"error: cannot resume from {run / 'checkpoints' / 'last.pt'}: the hub "
                                           "weights of teacher.name=resnet10t changed since its run loaded them")
    assert digest(run) == before
    revision["seed"] = 0  # the same weights again: the run continues
    code, err = cli(train_student.main, [*args, "run.resume=auto"], None)
    assert code is None, err
