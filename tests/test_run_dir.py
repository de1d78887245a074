"""Run directories, resume, checkpoints and metrics files of all three entry points: a run directory and a
checkpoint record the program that made them (another program refuses them, naming both), a checkpoint path starts a
new run and never splices into an existing one, one process at a time writes a run directory, a failed start leaves
no run directory behind, and damaged files (a torn metrics line, a checkpoint that is not one, a full disk) give a
clean error naming the file. In-process (common.cli.run_cli), on the stopped runs of conftest.stopped_runs."""
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RL_ARGS, ROOT, TINY, TINY_LABEL_ONLY, TINY_LOCAL_TEACHER, read_metrics
from test_bad_input import _copy_run, assert_user_error, cli, digest

import common.cli
import common.files
import common.rundir
import gan_vae.continual
import train_student
import train_student_rl
from common.checkpoint import load_checkpoint, save_checkpoint
from common.distributed import DistInfo
from common.errors import UserError
from common.files import write_json
from common.metrics import MetricLogger, read_jsonl

TS_ARGS = TINY_LABEL_ONLY
MAINS = {"train_student": (train_student.main, TS_ARGS), "train_student_rl": (train_student_rl.main, RL_ARGS)}


def _gan_vae_args(tmp_path: Path) -> list[str]:
    data = tmp_path / "domain.npz"
    np.savez(data, images=np.random.default_rng(0).integers(0, 255, (40, 28, 28), np.uint8),
             labels=np.zeros(40, np.int64))  # a valid task: code that loads the data first gets past it
    return [f"data.tasks=[{data}]", "teacher.steps=2", "student.steps=2", f"fid.cache_dir={tmp_path / 'fid'}"]


# ---------------------------------------------------------------------------------------------------------------
# Which program made a run directory, or a checkpoint
# ---------------------------------------------------------------------------------------------------------------
def test_runs_and_checkpoints_record_their_program(stopped_runs):
    for name, program in (("ts", "train_student.py"), ("rl", "train_student_rl.py")):
        assert json.loads((stopped_runs / name / "run.json").read_text())["program"] == program
        assert load_checkpoint(stopped_runs / name / "checkpoints" / "last.pt")["program"] == program


@pytest.mark.parametrize("legacy", [False, True], ids=["run.json", "older run: inferred from config.yaml"])
def test_train_student_refuses_to_continue_an_rl_run(stopped_runs, tmp_path, legacy):
    """It used to resume it without complaint and rewrite its config.yaml without the curriculum, difficulty and
    agent sections."""
    run = _copy_run(stopped_runs, "rl", tmp_path)
    if legacy:  # a run directory from before run.json, with a checkpoint from before its "program" entry
        (run / "run.json").unlink()
        ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
        del ckpt["program"]
        torch.save(ckpt, run / "checkpoints" / "last.pt")
    before = digest(run)
    code, err = cli(train_student.main, [*TS_ARGS, f"run.out_dir={tmp_path}", "run.name=rl",
                                         "run.resume=auto"], None)
    assert_user_error(code, err, "was made by another script, train_student_rl.py; train_student.py cannot continue",
                      "Continue it with train_student_rl.py")
    assert digest(run) == before
    assert "curriculum:" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("how", ["run directory", "checkpoint path"])
def test_gan_vae_refuses_a_train_student_run_naming_it(stopped_runs, tmp_path, how):
    """It used to list gan_vae's own defaults as what the train_student.py checkpoint 'was made with'."""
    run = _copy_run(stopped_runs, "ts", tmp_path)
    target = (["run.name=ts", "run.resume=auto"] if how == "run directory" else
              ["run.name=new", f"run.resume={run / 'checkpoints' / 'last.pt'}"])
    before = digest(run)
    code, err = cli(gan_vae.continual.main, [*_gan_vae_args(tmp_path), f"run.out_dir={tmp_path}", *target], None)
    assert_user_error(code, err, "made by another script, train_student.py; gan_vae.continual cannot")
    assert "was made with" not in err
    assert digest(run) == before and not (tmp_path / "new").exists()


def test_a_damaged_run_record_is_named(tmp_path):
    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)
    save_checkpoint({"program": "train_student.py"}, run / "checkpoints" / "last.pt")
    (run / "run.json").write_text('{"program": "train_st')
    with pytest.raises(UserError, match=r"cannot read .*r/run.json \(the record of which program made the run\)"):
        common.rundir.plan_run_dir(str(tmp_path), "r", "auto", "train_student.py")


def test_train_student_refuses_a_gan_vae_checkpoint_naming_it(tmp_path):
    """It used to say only that the file is not a training checkpoint (no 'model' entry)."""
    path = tmp_path / "g" / "checkpoints" / "task_0.pt"
    save_checkpoint({"experts": [], "program": "gan_vae.continual"}, path)
    code, err = cli(train_student.main, [*TS_ARGS, f"run.out_dir={tmp_path}", "run.name=new", f"run.resume={path}"],
                    None)
    assert_user_error(code, err, "made by another script, gan_vae.continual; train_student.py cannot")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("script", ["train_student", "gan_vae"])
def test_resume_auto_without_a_run_name_or_from_a_directory(stopped_runs, tmp_path, script):
    """run.resume=auto with no run.name looked for a new timestamped run; a run directory as run.resume was 'no
    such checkpoint file'."""
    main, args = MAINS[script] if script in MAINS else (gan_vae.continual.main, _gan_vae_args(tmp_path))
    code, err = cli(main, [*args, f"run.out_dir={tmp_path}", "run.resume=auto"], None)
    assert_user_error(code, err, "run.resume=auto continues the run named by run.name, which is empty")
    run = _copy_run(stopped_runs, "ts", tmp_path)
    code, err = cli(main, [*args, f"run.out_dir={tmp_path}", "run.name=x", f"run.resume={run}"], None)
    assert_user_error(code, err, f"run.resume={run} is a directory", str(run / "checkpoints" / "last.pt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ts", *(["domain.npz"] if script == "gan_vae"
                                                                        else [])])


# ---------------------------------------------------------------------------------------------------------------
# run.resume=<checkpoint path>: a new run, never spliced into an existing one
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", ["train_student", "train_student_rl"])
def test_checkpoint_path_into_an_existing_run_is_refused(stopped_runs, tmp_path, script):
    """Run B's epochs, checkpoints and config.yaml used to be replaced by A's continuation."""
    main, args = MAINS[script]
    name = "ts" if script == "train_student" else "rl"
    source = _copy_run(stopped_runs, name, tmp_path / "a")
    target = _copy_run(stopped_runs, name, tmp_path / "b")
    before = digest(target)
    code, err = cli(main, [*args, f"run.out_dir={tmp_path / 'b'}", f"run.name={name}",
                           f"run.resume={source / 'checkpoints' / 'last.pt'}"], None)
    assert_user_error(code, err, "starts a new run from that checkpoint", "already holds a run",
                      "another run.name")
    assert digest(target) == before


def test_gan_vae_checkpoint_path_into_an_existing_run_is_refused(tmp_path):
    other = tmp_path / "other" / "checkpoints"
    other.mkdir(parents=True)
    save_checkpoint({"config": {"fid": {}}, "program": "gan_vae.continual"}, other / "task_0.pt")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.jsonl").write_text('{"task": 0, "phase": "teacher", "step": 0}\n')
    code, err = cli(gan_vae.continual.main, [*_gan_vae_args(tmp_path), f"run.out_dir={tmp_path}", "run.name=b",
                                             f"run.resume={other / 'task_0.pt'}"], None)
    assert_user_error(code, err, "starts a new run from that checkpoint", "already holds a run")


def test_a_new_run_from_a_checkpoint_path_records_its_source(tmp_path):
    source = tmp_path / "a" / "checkpoints" / "last.pt"
    save_checkpoint({"program": "train_student.py"}, source)
    plan = common.rundir.plan_run_dir(str(tmp_path), "b", str(source), "train_student.py")
    assert not plan.continues and plan.checkpoint == source and not (tmp_path / "b").exists()
    with common.rundir.claim_run_dir(plan, "train_student.py", DistInfo()) as run_dir:
        record = json.loads((run_dir / "run.json").read_text())
    assert record["program"] == "train_student.py" and record["started_from"] == str(source.resolve())
    # the run's own checkpoint continues it
    own = common.rundir.plan_run_dir(str(tmp_path), "a", str(source), "train_student.py")
    assert own.continues and own.run_dir == tmp_path / "a"


# ---------------------------------------------------------------------------------------------------------------
# One process per run directory
# ---------------------------------------------------------------------------------------------------------------
def _hold_lock(run_dir: Path):
    """What another process running in `run_dir` holds: its run.lock, flock-ed, with its pid (two flock opens
    conflict also within one process)."""
    from filelock import FileLock
    lock = FileLock(str(run_dir / "run.lock"), timeout=0)
    lock.acquire()
    (run_dir / "run.lock").write_text("pid 4242 on elsewhere\n")
    return lock


def test_a_second_process_on_a_run_directory_is_refused_naming_the_holder(stopped_runs, tmp_path):
    run = _copy_run(stopped_runs, "ts", tmp_path)
    other = _hold_lock(run)
    before = digest(run)
    try:
        code, err = cli(train_student.main, [*TS_ARGS, f"run.out_dir={tmp_path}", "run.name=ts", "run.resume=auto"],
                        None)
        assert_user_error(code, err, f"{run} is in use by another process (pid 4242 on elsewhere", "run.lock")
        assert digest(run) == before
        (tmp_path / "fresh").mkdir()
        starting = _hold_lock(tmp_path / "fresh")  # a fresh run of the same run.name, still starting
        code, err = cli(train_student.main, [*TS_ARGS, f"run.out_dir={tmp_path}", "run.name=fresh"], None)
        assert_user_error(code, err, "is in use by another process (pid 4242")
        starting.release()
    finally:
        other.release()


# ---------------------------------------------------------------------------------------------------------------
# A failed start leaves no run directory behind; checks come before the directory
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", ["train_student", "train_student_rl"])
def test_a_run_that_fails_at_start_leaves_no_run_directory(tmp_path, script):
    """The data error comes after the run directory is made: it used to stay, holding only config.yaml."""
    main, args = MAINS[script]
    args = [a for a in args if not a.startswith("data.synthetic.")]  # read with data.name=synthetic only
    code, err = cli(main, [*args, "data.name=x", f"data.path={tmp_path / 'no_such_data'}",
                           f"run.out_dir={tmp_path / 'runs'}"], None)  # no run.name: a timestamped directory
    assert_user_error(code, err, "data.path=", "does not exist")
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


def test_claim_removes_only_a_directory_it_made_that_holds_nothing(tmp_path):
    for name, existed, result in (("new", False, False), ("old", True, False), ("ran", False, True)):
        if existed:
            (tmp_path / name).mkdir()
        with pytest.raises(UserError, match="bad data"):
            with common.rundir.claim_run_dir(common.rundir.plan_run_dir(str(tmp_path), name, "", "p"), "p", DistInfo()) as run_dir:
                (run_dir / "config.yaml").write_text("a: 1\n")
                if result:
                    (run_dir / "metrics.jsonl").write_text('{"epoch": 0}\n')
                raise UserError("bad data")
        assert (tmp_path / name).exists() == (existed or result), name


def test_read_only_teacher_cache_dir_is_refused_before_the_run(tmp_path, monkeypatch):
    """make_dirs probed only run.out_dir: an existing teacher.cache_dir that cannot be written got through."""
    cache = tmp_path / "cache"
    cache.mkdir()
    write_bytes = Path.write_bytes

    def read_only(path, data):
        if path.parent == cache:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return write_bytes(path, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    code, err = cli(train_student.main, [*TINY, "kd.alpha=0.5", "train.epochs=1", f"teacher.cache_dir={cache}",
                                         f"run.out_dir={tmp_path}", "run.name=r"], None)
    assert_user_error(code, err, "(teacher.cache_dir)", "Read-only file system")
    assert not (tmp_path / "r").exists()


def _read_only(monkeypatch, folder: Path) -> None:
    """Make `folder` read-only for this process (the tests run as root, whom permission bits do not stop): every
    way the code creates, writes, renames or deletes something below it fails with EROFS, as on a read-only
    shared filesystem."""
    import builtins
    import io
    import tempfile
    folder, real_mkdtemp = os.path.abspath(folder), tempfile.mkdtemp

    def below(path) -> bool:
        if not isinstance(path, (str, os.PathLike)):
            return False
        path = os.path.abspath(os.fspath(path))
        return path == folder or path.startswith(folder + os.sep)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def guard(fn, writes=lambda *a, **k: True):
        def guarded(path, *args, **kwargs):
            if below(path) and writes(*args, **kwargs):
                refuse(path)
            return fn(path, *args, **kwargs)
        return guarded

    def guard2(fn):  # two paths: either one below the folder
        def guarded(src, dst, *args, **kwargs):
            if below(src) or below(dst):
                refuse(src)
            return fn(src, dst, *args, **kwargs)
        return guarded

    writing_mode = lambda mode="r", *a, **k: any(c in mode for c in "wax+")  # noqa: E731
    writing_flags = lambda flags, *a, **k: bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))  # noqa: E731
    monkeypatch.setattr(builtins, "open", guard(builtins.open, writing_mode))
    monkeypatch.setattr(io, "open", guard(io.open, writing_mode))
    monkeypatch.setattr(os, "open", guard(os.open, writing_flags))
    for name in ("mkdir", "unlink", "remove", "rmdir", "utime", "chmod"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))
    for name in ("rename", "replace", "symlink", "link"):
        monkeypatch.setattr(os, name, guard2(getattr(os, name)))
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, dir=None, **k: refuse(dir) if below(dir) else
                        real_mkdtemp(*a, dir=dir, **k))


@pytest.mark.parametrize("key,extra", [("teacher.cache_dir", [*TINY, "kd.alpha=0.5"]),
                                       ("data.preprocess_dir", [*TINY_LABEL_ONLY, "data.preprocessed=true"])])
def test_a_read_only_shared_cache_holding_what_the_run_needs_is_reused(tmp_path, monkeypatch, key, extra):
    """Issue 23 (a regression): a read-only teacher.cache_dir that holds the complete cache the run needs was
    refused ("cannot write to ..."): reading a published cache needs no write access and no lock. Writability is
    probed only when a build is needed, and a read-only folder without the cache is still refused, naming it.
    The same for the pre-decoded store."""
    cache = tmp_path / "shared_cache"
    args = [*extra, "train.epochs=1", f"{key}={cache}", f"run.out_dir={tmp_path}"]
    code, err = cli(train_student.main, [*args, "run.name=builds"], None)
    assert code is None, err
    published = digest(cache)
    with monkeypatch.context() as ro:
        _read_only(ro, cache)
        with pytest.raises(OSError, match="Read-only"):  # the mechanism works, root or not
            (cache / "probe").write_bytes(b"")
        code, err = cli(train_student.main, [*args, "run.name=reuses"], None)
        assert code is None, err
        assert read_metrics(tmp_path / "reuses")[-1]["epoch"] == 0
        # a run that needs another cache (other data) must build it: refused, naming the key, no run left
        code, err = cli(train_student.main, [*args, "data.synthetic.seed=1", "run.name=needs_a_build"], None)
        assert_user_error(code, err, f"({key})", "Read-only file system")
        assert not (tmp_path / "needs_a_build").exists()
    assert digest(cache) == published


def test_rl_trains_its_teacher_with_teacher_prepare(tmp_path, monkeypatch):
    """The offline RL config ran before its teacher exists said only 'checkpoint ... does not exist'."""
    missing = tmp_path / "teacher" / "student.safetensors"
    args = [*TINY_LOCAL_TEACHER, "kd.alpha=0.5", "agent.name=bandit", f"teacher.checkpoint={missing}", f"run.out_dir={tmp_path}",
            "run.name=r"]
    code, err = cli(train_student_rl.main, args, None)
    assert_user_error(code, err, f"teacher.checkpoint={missing} does not exist",
                      "configs/quickstart_teacher.yaml", "teacher.prepare")
    assert not (tmp_path / "r").exists()

    class Prepared(Exception):
        pass

    def prepare(cfg, dist):
        raise Prepared(cfg.teacher.prepare)
    monkeypatch.setattr(train_student_rl, "prepare_teacher", prepare, raising=False)
    with pytest.raises(Prepared, match="teacher.yaml"):
        train_student_rl.main([*args, f"teacher.prepare={tmp_path / 'teacher.yaml'}"])
    from common.config import load_config
    from engine.rl_schema import RLConfig
    assert load_config(RLConfig, str(ROOT / "configs" / "curriculum_synthetic.yaml")).teacher.prepare == \
        "configs/quickstart_teacher.yaml"


# ---------------------------------------------------------------------------------------------------------------
# metrics.jsonl: a torn last line is expected, a damaged middle line is not
# ---------------------------------------------------------------------------------------------------------------
def test_resume_drops_a_half_written_last_metrics_line(stopped_runs, tmp_path):
    run = _copy_run(stopped_runs, "ts", tmp_path)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 1, "train/loss": 1.2')  # killed mid-write
    code, err = cli(train_student.main, [*TS_ARGS, f"run.out_dir={tmp_path}", "run.name=ts", "run.resume=auto"],
                    None)
    assert code is None, err[-3000:]
    assert "dropped the half-written last line (2)" in err
    assert [m["epoch"] for m in read_metrics(run)] == [0, 1]


def test_a_damaged_metrics_line_in_the_middle_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0}\n{"epoch": 1, "val\n{"epoch": 2}\n{"epoch": 3, "x"')
    with pytest.raises(UserError, match=r"metrics.jsonl line 2 is damaged"):
        read_jsonl(path)
    path.write_text('{"epoch": 0}\n{"no_epoch": 1}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl line 2 is not a record this run wrote"):
        MetricLogger(path, True).truncate_after(1)
    path.write_text('{"epoch": 0}\n{"epoch": 1}\n{"epo')
    MetricLogger(path, True).truncate_after(1)
    assert path.read_text() == '{"epoch": 0}\n'


# ---------------------------------------------------------------------------------------------------------------
# Files that are not checkpoints
# ---------------------------------------------------------------------------------------------------------------
def _bad_checkpoint(kind: str, path: Path, good: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "bare tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "dict without the keys":
        torch.save({"step": 3, "notes": "no weights"}, path)
    elif kind == "not a checkpoint":
        path.write_text("epoch: 3\n")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[:5000])
    else:
        path.write_bytes(b"")


KINDS = ["bare tensor", "dict without the keys", "not a checkpoint", "truncated", "empty"]
FRAGMENTS = {"bare tensor": "holds a Tensor, not a checkpoint", "dict without the keys": "no 'model' entry",
             "not a checkpoint": "truncated or not a PyTorch checkpoint", "truncated": "truncated or not a PyTorch",
             "empty": "is empty (0 bytes)"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("entry", ["train_student", "train_student_rl", "gan_vae", "eval.checkpoint",
                                   "teacher.checkpoint"])
def test_a_file_that_is_not_a_checkpoint_is_named(stopped_runs, tmp_path, entry, kind):
    bad = tmp_path / "bad" / "last.pt"
    _bad_checkpoint(kind, bad, stopped_runs / "ts" / "checkpoints" / "last.pt")
    out = [f"run.out_dir={tmp_path / 'runs'}", "run.name=new"]
    if entry in MAINS:
        main, args = MAINS[entry]
        argv = [*args, *out, f"run.resume={bad}"]
    elif entry == "gan_vae":
        main, argv = gan_vae.continual.main, [*_gan_vae_args(tmp_path), *out, f"run.resume={bad}"]
    elif entry == "eval.checkpoint":
        main, argv = train_student.main, [*TS_ARGS, *out, f"eval.checkpoint={bad}"]
    else:
        main, argv = train_student.main, [*TINY_LOCAL_TEACHER, "kd.alpha=0.5", *out, f"teacher.checkpoint={bad}"]
    fragment = FRAGMENTS[kind]
    if entry == "gan_vae" and kind == "dict without the keys":
        fragment = "gan_vae.continual (no 'experts' entry"
    elif entry in ("eval.checkpoint", "teacher.checkpoint") and kind == "dict without the keys":
        fragment = "holds no model weights"
    code, err = cli(main, argv, None)
    assert_user_error(code, err, str(bad), fragment)
    assert not (tmp_path / "runs" / "new").exists()


# ---------------------------------------------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------------------------------------------
needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


@needs_dev_full
@pytest.mark.parametrize("size", [10, 3_000_000], ids=["small", "large: torch's own error first"])
def test_a_full_disk_while_writing_a_checkpoint(tmp_path, size, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint({"epoch": 1}, path)
    before = path.read_bytes()

    def full_temp(target: Path):  # the temp file is /dev/full: every write fails with ENOSPC
        tmp = target.with_name(f".{target.name}.full.tmp")
        tmp.symlink_to("/dev/full")
        return os.open(tmp, os.O_WRONLY), tmp

    monkeypatch.setattr(common.files, "open_temp", full_temp)
    with pytest.raises(UserError, match=r"cannot write .*last.pt: the disk is full .*the earlier last.pt is kept"):
        save_checkpoint({"epoch": 2, "model": torch.zeros(size)}, path)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]
    with pytest.raises(UserError, match=r"r.json: the disk is full .*there was no earlier r.json"):
        write_json(tmp_path / "r.json", {"a": 1})
    assert not list(tmp_path.glob(".r.json*"))


@needs_dev_full
def test_a_full_disk_while_logging_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.symlink_to("/dev/full")
    with pytest.raises(UserError, match=r"metrics.jsonl: the disk is full .*run.resume=auto drops"):
        MetricLogger(path, True).log({"epoch": 0, "train/loss": 1.0})


# ---------------------------------------------------------------------------------------------------------------
# Run files of the wrong kind; what the lock guards
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rel,kind", [("checkpoints/last.pt", "folder"), ("checkpoints/best.pt", "folder"),
                                      ("metrics.jsonl", "folder"), ("config.yaml", "folder"),
                                      ("results.json", "folder"), ("metrics.jsonl", "dangling link"),
                                      ("checkpoints", "file"), ("curves.png", "folder"),
                                      ("label_only", "file")])
def test_a_run_file_of_the_wrong_kind_stops_the_resume_before_anything_is_touched(stopped_runs, tmp_path, rel,
                                                                                   kind):
    """Issue 23: a finished run whose checkpoints/last.pt was a directory was taken for one never checkpointed:
    run.resume=auto restarted it from epoch 1, cut metrics.jsonl back and overwrote best.pt, and only then stopped
    with "Nothing was replaced"."""
    run = _copy_run(stopped_runs, "ts", tmp_path)
    path = run / rel
    kept = tmp_path / "kept"
    if path.exists():
        path.rename(kept)
    if kind == "folder":
        path.mkdir()
        (path / "inside").write_text("x")
    elif kind == "file":
        path.write_text("x")
    else:
        path.symlink_to(tmp_path / "nowhere")
    before = digest(run)
    code, err = cli(train_student.main, [*TS_ARGS, f"run.out_dir={tmp_path}", "run.name=ts", "run.resume=auto"],
                    None)
    assert_user_error(code, err, f"{path} is a {kind}, not a ", "Nothing was touched")
    assert digest(run) == before


def test_a_failed_start_deletes_its_directory_before_releasing_the_lock(tmp_path, monkeypatch):
    """Issue 23: claim_run_dir released run.lock, then deleted the directory of a start that failed; a second
    process that claimed the same fresh name in between had its live run directory deleted under it. The window
    is widened here: the second process claims (and starts writing) at the moment of the deletion."""
    rmtree, second = common.rundir.shutil.rmtree, {}

    def second_process_claims_first(path, *args, **kwargs):
        if not second:
            try:
                plan = common.rundir.plan_run_dir(str(tmp_path), "fresh", "", "p")
                with common.rundir.claim_run_dir(plan, "p", DistInfo()) as run_dir:
                    (run_dir / "metrics.jsonl").write_text('{"epoch": 0}\n')  # its run is under way
                second["ran"] = True
            except UserError as exc:
                second["refused"] = str(exc)
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(common.rundir.shutil, "rmtree", second_process_claims_first)
    with pytest.raises(UserError, match="bad data"):
        with common.rundir.claim_run_dir(common.rundir.plan_run_dir(str(tmp_path), "fresh", "", "p"), "p",
                                         DistInfo()):
            raise UserError("bad data")
    assert "in use by another process" in second.get("refused", ""), second
    assert not (tmp_path / "fresh").exists()


def test_the_plan_is_checked_again_under_the_lock(stopped_runs, tmp_path):
    """What plan_run_dir saw may change before the directory is locked (_check_plan_still_holds): a fresh run whose
    directory another process filled meanwhile, or a resume whose last.pt another process rewrote meanwhile."""
    fresh = common.rundir.plan_run_dir(str(tmp_path), "new", "", "train_student.py")
    (tmp_path / "new" / "checkpoints").mkdir(parents=True)
    (tmp_path / "new" / "metrics.jsonl").write_text('{"epoch": 0}\n')  # another process started it meanwhile
    with pytest.raises(UserError, match="already holds a run \\(another process started it just now\\)"):
        with common.rundir.claim_run_dir(fresh, "train_student.py", DistInfo()):
            pytest.fail("claimed a directory another run had started")
    assert (tmp_path / "new" / "metrics.jsonl").read_text() == '{"epoch": 0}\n'

    run = _copy_run(stopped_runs, "ts", tmp_path)
    plan = common.rundir.plan_run_dir(str(tmp_path), "ts", "auto", "train_student.py")
    last = run / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=False)
    save_checkpoint({**ckpt, "epoch": ckpt["epoch"] + 1}, last)  # another process checkpointed meanwhile
    os.utime(last, ns=(plan.stamp[0] + 10**9, plan.stamp[0] + 10**9))
    with pytest.raises(UserError, match="another process wrote .*last.pt while this one was starting"):
        with common.rundir.claim_run_dir(plan, "train_student.py", DistInfo()):
            pytest.fail("continued from a checkpoint other than the one it planned")


@pytest.mark.parametrize("script", ["train_student", "train_student_rl"])
def test_a_new_run_from_a_checkpoint_with_no_epochs_left_is_refused(stopped_runs, tmp_path, script):
    """A new run (run.resume=<another run's last.pt>) whose checkpoint has trained all of train.epochs trained
    nothing and ended in a traceback (no metrics.jsonl of its own to plot); now refused before any work, with the
    way on. With epochs left the same branch trains them."""
    main, args = MAINS[script]
    source = _copy_run(stopped_runs, "ts" if script == "train_student" else "rl", tmp_path)
    last = source / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last)
    assert ckpt["epoch"] == 1 and ckpt["config"]["train"]["epochs"] == 2
    ckpt["epoch"] = 2  # as the finished run's last.pt holds it
    save_checkpoint(ckpt, last)
    code, err = cli(main, [*args, f"run.out_dir={tmp_path}", "run.name=new", f"run.resume={last}"], None)
    assert_user_error(code, err, f"run.resume={last} has trained 2 of train.epochs=2 epochs, so a new run from it")
    assert not (tmp_path / "new").exists()
