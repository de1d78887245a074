"""Bad input to train_student.py, train_student_rl.py and gan_vae.continual: each gives a one-paragraph message and
exit code 2, no traceback, and loses nothing already written. Most cases stop before any training, so they run
in-process through `utils.run_cli`; a subprocess is used where the exit code of the real command line matters."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from conftest import RL_ARGS, ROOT, TINY, TINY_LABEL_ONLY, assert_clean_error, call_main, read_metrics, run_script

import gan_vae.continual
import train_student
import train_student_rl
from common.config import load_config, parse_config
from common.distributed import DistInfo
from common.errors import UserError
from common.files import save_config
from common.rundir import prepare_run_dir
from engine.schema import Config


def cli(main, argv, capsys) -> tuple[int | None, str]:
    """Run `main(argv)` the way the scripts do (utils.run_cli): (exit code or None, stderr)."""
    proc = call_main(main, argv)
    return proc.returncode, proc.stderr


def assert_user_error(code, err, *fragments) -> None:
    assert code == 2, (code, err[-3000:])
    assert "Traceback" not in err and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def digest(folder: Path) -> dict[str, str]:
    """Every file below `folder` with a hash of its bytes: to show a refused command changed nothing."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("stop,first_line", [(UserError("the loss became non-finite"), "error: the loss became"),
                                              (KeyboardInterrupt(), "interrupted; the last checkpoint is kept")])
def test_message_after_an_open_progress_bar_starts_on_its_own_line(stop, first_line):
    """A run stopped inside a training loop (a non-finite loss, Ctrl-C) leaves its tqdm bar open: utils.run_cli
    ends the bar on its own line before the message, which would otherwise be glued onto the bar's line."""
    from tqdm import tqdm

    def main(argv):
        bar = tqdm(total=10, desc="epoch 2/3", file=sys.stderr)  # the bar prints to stderr, as train_epoch's does
        bar.update(3)
        raise stop

    err = call_main(main, []).stderr
    assert err.count(first_line) == 1 and "epoch 2/3" in err, err
    assert err.split(first_line)[0].endswith("\n"), repr(err)  # the message begins a line
    assert "epoch 2/3" in err.splitlines()[-2], repr(err)  # the bar's last state stays, on the line above


def test_a_bug_under_an_open_progress_bar_leaves_the_bar_on_its_own_line(capsys):
    """An unexpected exception still propagates (its traceback is the report), after the bar's line is ended."""
    from tqdm import tqdm

    from common.cli import run_cli

    def main(argv):
        bar = tqdm(total=10, desc="epoch 2/3", file=sys.stderr)
        bar.update(3)
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug") as raised:
        run_cli(main, [])
    err = capsys.readouterr().err  # while `raised` holds the traceback, and with it the bar, as Python's report does
    assert raised.traceback
    assert "epoch 2/3" in err and err.endswith("\n"), repr(err)  # what prints next starts a line


# ---------------------------------------------------------------------------------------------------------------
# --config files
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content,fragment", [
    ("", "is empty"),
    ("# only a comment\n", "is empty"),
    ("- kd.alpha=0.5\n- train.epochs=3\n", "holds a list at its top level"),
    ("[1, 2]\n", "holds a list at its top level"),
    ("5\n", "holds a single value at its top level"),
    ("kd: [\n", "is not valid YAML"),
    ("kd:\n  temperature: 2\n---\ntrain:\n  epochs: 1\n", "is not valid YAML"),
])
def test_config_file_that_is_not_a_mapping_of_keys(tmp_path, content, fragment):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(UserError, match=fragment):
        parse_config(Config, ["--config", str(path)], prog="train_student.py")


def test_config_that_is_not_a_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        parse_config(Config, ["--config", str(tmp_path / "missing.yaml")], prog="train_student.py")
    with pytest.raises(UserError, match="is a directory; --config takes a YAML file"):
        parse_config(Config, ["--config", str(tmp_path)], prog="train_student.py")
    with pytest.raises(UserError, match="--config needs a YAML file"):
        parse_config(Config, ["--config="], prog="train_student.py")  # was silently ignored


def test_config_file_errors_on_the_command_line(tmp_path):
    (tmp_path / "list.yaml").write_text("- kd.alpha=0.5\n")
    assert_clean_error(run_script("train_student.py", "--config", str(tmp_path / "list.yaml")),
                       "holds a list at its top level")


# ---------------------------------------------------------------------------------------------------------------
# Values that would train nothing
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("main", [train_student.main, train_student_rl.main])
def test_zero_epochs_is_refused_before_anything_is_written(main, tmp_path, capsys):
    code, err = cli(main, [*TINY, "kd.alpha=0.5", "train.epochs=0", f"run.out_dir={tmp_path}", "run.name=z"], capsys)
    assert_user_error(code, err, "train.epochs=0 must be >= 1: nothing would be trained", "eval.checkpoint=PATH")
    assert not (tmp_path / "z").exists()


# ---------------------------------------------------------------------------------------------------------------
# Paths that cannot be written (tests run as root, where chmod stops nothing: a parent that is a file does)
# ---------------------------------------------------------------------------------------------------------------
GAN_VAE_TINY = ["data.tasks=[mnist]", "teacher.steps=2", "student.steps=2"]


@pytest.mark.parametrize("main,args", [(train_student.main, TINY), (train_student_rl.main, [*TINY, "kd.alpha=0.5",
                                                                                            "agent.name=bandit"]),
                                       (gan_vae.continual.main, GAN_VAE_TINY)],
                         ids=["train_student", "train_student_rl", "gan_vae"])
def test_run_out_dir_that_cannot_be_written(main, args, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me\n")
    code, err = cli(main, [*args, f"run.out_dir={blocker / 'runs'}", "run.name=r"], capsys)
    assert_user_error(code, err, "(run.out_dir)", "Not a directory")
    assert blocker.read_text() == "keep me\n"


@pytest.mark.parametrize("key,extra", [("teacher.cache_dir", [*TINY, "kd.alpha=0.5"]),
                                       ("data.preprocess_dir", [*TINY_LABEL_ONLY, "data.preprocessed=true"])])
def test_cache_dirs_that_cannot_be_written(key, extra, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me\n")
    code, err = cli(train_student.main, [*extra, f"{key}={blocker / 'x'}", f"run.out_dir={tmp_path}",
                                         "run.name=r"], capsys)
    assert_user_error(code, err, f"({key})", f"Set {key} to a folder")
    assert blocker.read_text() == "keep me\n"


# ---------------------------------------------------------------------------------------------------------------
# Empty and inconsistent datasets
# ---------------------------------------------------------------------------------------------------------------
def _tiny_dataset() -> datasets.DatasetDict:
    from imagedata.synthetic_data import make_synthetic_dataset
    return make_synthetic_dataset(num_classes=2, images_per_class=4, image_size=16)


def test_a_split_with_no_images():
    from imagedata.image_sources import _hf_splits
    ds = _tiny_dataset()
    ds["validation"] = ds["validation"].select([])
    with pytest.raises(UserError, match="split 'validation' has no rows"):
        _hf_splits(ds, "dataset at x")


def test_labels_that_are_not_a_class_label():
    from imagedata.image_sources import _hf_splits
    ds = _tiny_dataset().cast_column("label", datasets.Value("int64"))
    with pytest.raises(UserError, match="not a ClassLabel"):
        _hf_splits(ds, "dataset at x")


def test_image_folder_with_an_empty_split_or_an_unknown_class(tmp_path):
    from PIL import Image

    from imagedata.image_sources import load_local
    for split in ("train", "validation", "test"):
        for synset in ("n01532829", "n01558993"):
            (tmp_path / split / synset).mkdir(parents=True)
            if split != "test":
                Image.new("RGB", (20, 20)).save(tmp_path / split / synset / "a.png")
    with pytest.raises(UserError, match="test holds no images"):
        load_local(tmp_path)
    for synset in ("n01532829", "n01558993", "n09999999"):
        (tmp_path / "test" / synset).mkdir(exist_ok=True)
        Image.new("RGB", (20, 20)).save(tmp_path / "test" / synset / "a.png")
    with pytest.raises(UserError, match=r"class folder\(s\) \['n09999999'\]"):
        load_local(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Resuming with a different config
# ---------------------------------------------------------------------------------------------------------------
def _copy_run(stopped_runs: Path, name: str, tmp_path: Path) -> Path:
    shutil.copytree(stopped_runs / name, tmp_path / name)
    assert [m["epoch"] for m in read_metrics(tmp_path / name)] == [0]
    return tmp_path / name


def test_resume_with_another_optimizer_names_the_key(stopped_runs, tmp_path, capsys):
    run = _copy_run(stopped_runs, "ts", tmp_path)
    before = digest(run)
    code, err = cli(train_student.main, [*TINY_LABEL_ONLY, "train.optimizer=sgd",
                                         f"run.out_dir={tmp_path}", "run.name=ts", "run.resume=auto"], capsys)
    assert_user_error(code, err, 'train.optimizer = "adam" in the run, "sgd" now',
                      "drop run.resume and pick a new run.name")
    assert digest(run) == before  # config.yaml included: it used to be overwritten before the KeyError


def test_resume_names_every_differing_key(stopped_runs, tmp_path, capsys):
    run = _copy_run(stopped_runs, "ts", tmp_path)
    before = digest(run)
    code, err = cli(train_student.main, [*TINY_LABEL_ONLY, "train.epochs=3", "train.lr=0.01",
                                         "student.name=resnet10t", "data.synthetic.seed=4", f"run.out_dir={tmp_path}",
                                         "run.name=ts", "run.resume=auto"], capsys)
    assert_user_error(code, err, "train.epochs = 2 in the run, 3 now", "train.lr = 0.001 in the run, 0.01 now",
                      'student.name = "mobilenetv2_035" in the run, "resnet10t" now',
                      "data.synthetic.seed = 0 in the run, 4 now")
    assert digest(run) == before


def test_resume_may_change_keys_that_change_no_result(stopped_runs, tmp_path, capsys):
    run = _copy_run(stopped_runs, "ts", tmp_path)
    first = read_metrics(run)[0]
    code, err = cli(train_student.main, [*TINY_LABEL_ONLY, "log.every_steps=3", "eval.latency=false",
                                         f"run.out_dir={tmp_path}", "run.name=ts", "run.resume=auto"], capsys)
    assert code is None, err[-3000:]
    assert [m["epoch"] for m in read_metrics(run)] == [0, 1] and read_metrics(run)[0] == first
    saved = load_config(Config, str(run / "config.yaml"))
    assert saved.log.every_steps == 3 and saved.run.resume == ""


def test_rl_resume_with_other_agent_settings_names_the_key(stopped_runs, tmp_path, capsys):
    run = _copy_run(stopped_runs, "rl", tmp_path)
    before = digest(run)
    code, err = cli(train_student_rl.main, [*RL_ARGS, "agent.fixed_actions=[[2,1],[2,1]]",
                                            f"run.out_dir={tmp_path}", "run.name=rl", "run.resume=auto"], capsys)
    assert_user_error(code, err, "agent.fixed_actions = [[2, 1]] in the run, [[2, 1], [2, 1]] now")
    assert digest(run) == before


def test_rl_cannot_continue_a_train_student_checkpoint(stopped_runs, capsys, tmp_path):
    ckpt = stopped_runs / "ts" / "checkpoints" / "last.pt"
    code, err = cli(train_student_rl.main, [*TINY_LABEL_ONLY, "curriculum.strategy=random_subset",
                                            "agent.name=fixed", f"run.out_dir={tmp_path}", "run.name=x", f"run.resume={ckpt}"], capsys)
    assert_user_error(code, err, "made by another script")
    # the last line of defence, should a config ever match: no curriculum or agent state to continue
    from engine.curriculum_run import CurriculumRun
    with pytest.raises(UserError, match="written by train_student.py"):
        CurriculumRun.load_extra_state(None, {})


# ---------------------------------------------------------------------------------------------------------------
# The saved config re-runs as docs/getting-started.md says, also after a resume
# ---------------------------------------------------------------------------------------------------------------
def test_saved_config_of_a_resumed_run_reruns_under_a_new_name(tmp_path):
    cfg = load_config(Config, None, ["data.name=synthetic", f"run.out_dir={tmp_path}", "run.name=first",
                                     "run.resume=auto"])
    (tmp_path / "first").mkdir()
    save_config(cfg, tmp_path / "first")
    again = load_config(Config, str(tmp_path / "first" / "config.yaml"), ["run.name=again"])
    assert again.run.resume == ""
    assert prepare_run_dir(again.run.out_dir, again.run.name, again.run.resume, DistInfo()) == (tmp_path / "again",
                                                                                                None)


# ---------------------------------------------------------------------------------------------------------------
# A run killed before its first checkpoint
# ---------------------------------------------------------------------------------------------------------------
def test_resume_auto_of_a_run_without_checkpoint(tmp_path):
    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"epoch": 0}\n')  # killed between epoch 0's metrics line and checkpoint
    with pytest.raises(UserError, match="already holds a run. Continue it with run.resume=auto"):
        prepare_run_dir(str(tmp_path), "r", "", DistInfo(), restart_without_checkpoint=True)
    assert prepare_run_dir(str(tmp_path), "r", "auto", DistInfo(), restart_without_checkpoint=True) == (run, None)
    with pytest.raises(UserError, match="nothing to resume"):  # callers that cannot restart keep the old answer
        prepare_run_dir(str(tmp_path), "r", "auto", DistInfo())
    with pytest.raises(UserError, match="nothing to resume"):  # a run.name that never ran is still an error
        prepare_run_dir(str(tmp_path), "typo", "auto", DistInfo(), restart_without_checkpoint=True)


KILL_AFTER_CACHE = """
import os, signal, sys
import train_student
from common.cli import run_cli
from engine import teacher_cache
build = teacher_cache.build_or_load_cache
def build_then_die(*args, **kwargs):
    out = build(*args, **kwargs)  # the cache is complete (meta.json written): now the process dies, uncleanly
    os.kill(os.getpid(), signal.SIGKILL)
teacher_cache.build_or_load_cache = build_then_die
run_cli(train_student.main, sys.argv[1:])
"""


def test_run_killed_after_the_teacher_cache_resumes_from_the_start_and_reuses_it(tmp_path):
    args = [*TINY, "kd.alpha=0.5", "train.epochs=1", f"run.out_dir={tmp_path}", "run.name=k"]
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_CACHE, *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = tmp_path / "k"
    assert not (run / "checkpoints" / "last.pt").exists()
    [meta] = (tmp_path / "teacher_cache").glob("*/meta.json")
    stamp = (meta.stat().st_mtime_ns, meta.read_bytes())

    resumed = run_script("train_student.py", *args, "run.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "has no checkpoint yet" in resumed.stdout and "teacher cache reused" in resumed.stdout
    assert (meta.stat().st_mtime_ns, meta.read_bytes()) == stamp  # not rebuilt
    assert [m["epoch"] for m in read_metrics(run)] == [0]
    assert json.loads((run / "results.json").read_text())["test/n"] == 12 and (run / "config.yaml").is_file()
