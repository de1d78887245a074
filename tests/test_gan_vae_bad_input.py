"""gan_vae against bad input and bad numbers: task specs, damaged files, non-finite losses, and re-evaluation of a
run started from another run's task checkpoint. One tiny two-task run (in this process) serves every test that
needs a finished run; each test that changes files works on a copy."""
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import assert_clean_error, call_main
from test_gan_vae import _args, _identity_fid, _in_process_run, _toy_fid, domains  # noqa: F401 - a fixture

import common.rundir
import gan_vae.continual as continual
import gan_vae.evaluate as evaluate
import gan_vae.experts as experts
from common.errors import UserError
from gan_vae.fid import train_domain_classifier
from gan_vae.tasks import TASK_FORM, TaskData, _load_npz, load_task, parse_task

TINY_RUN = ("teacher.steps=4", "student.steps=4", "log.sample_every=4", "run.checkpoint_every=2")


@pytest.fixture(scope="module")
def origin(domains, tmp_path_factory):  # noqa: F811 - the domains fixture
    """A finished two-task run (task_0.pt, task_1.pt, results.json); its FID classifier cache is shared."""
    out = tmp_path_factory.mktemp("origin")
    proc = call_main(continual.main, [*_args(domains, out, ["discs", "inverted"]), *TINY_RUN, "run.name=origin"])
    assert proc.returncode is None, proc.stderr[-3000:]
    return out / "origin"


def _copy(run_dir, tmp_path, name):
    """A copy of a run directory beside its own (the same run.out_dir, so the same FID classifier cache)."""
    return shutil.copytree(run_dir, tmp_path / name)


def _branch(domains, origin_dir, task_ckpt, name, *extra):  # noqa: F811
    """A new run in origin's run.out_dir started from `task_ckpt` with another training key (docs/results.md's
    ablation pattern)."""
    return call_main(continual.main, [*_args(domains, origin_dir.parent, ["discs", "inverted"]), *TINY_RUN,
                                      f"run.name={name}", f"run.resume={task_ckpt}", "kd.previous_weight=2", *extra])


# ---------------------------------------------------------------------------------------------------------------
# Task specs and .npz files
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,fragment", [
    ("mnist:rotate=abc", "cannot read 'rotate=abc'"),
    ("mnist:rotate=", "cannot read 'rotate='"),
    ("mnist:rotate=nan", "finite angle"),
    ("mnist:rotate", "rotate needs a value"),
    ("mnist:classes=a-b", "classes=a-b"),
    ("mnist:classes=-1", "non-negative integer"),
    ("mnist:classes=5-2", "runs backwards"),
    ("mnist:classes=0-12", "mnist has the classes 0-9, not [10, 11, 12]"),
    ("mnist:classes", "classes needs a value"),
    ("mnist:invert=1", "invert takes no value"),
    ("mnist:rotate=10:rotate=20", "'rotate' is given twice"),
    ("mnist:blur", "cannot read 'blur'"),
    ("mnist:", "cannot read ''"),
])
def test_a_bad_task_spec_is_named_with_the_expected_form(spec, fragment):
    with pytest.raises(UserError) as err:
        parse_task(spec)
    assert f"task '{spec}'" in str(err.value) and fragment in str(err.value) and TASK_FORM in str(err.value)


def test_a_class_subset_naming_an_absent_class_is_refused(domains):  # noqa: F811
    # the discs have labels 0 and 1: classes 2 and 3 are a typo, not a smaller task
    with pytest.raises(UserError, match=r"no images of classes \[2, 3\]"):
        load_task(f"{domains / 'discs.npz'}:classes=0-3", "data", 0)
    assert parse_task("mnist:classes=0-2,7,:rotate=-30")["classes"] == [0, 1, 2, 7]


@pytest.mark.parametrize("kind", ["truncated", "text", "npy"])
def test_a_damaged_npz_is_named_without_pickle_advice(domains, tmp_path, kind):  # noqa: F811
    path = tmp_path / "task.npz"
    good = (domains / "discs.npz").read_bytes()
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "text":
        path.write_text("images,labels\n")
    else:
        with open(path, "wb") as fh:
            np.save(fh, np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(UserError) as err:
        _load_npz(path)
    assert f"{path} is not a valid .npz file" in str(err.value) and "pickle" not in str(err.value)


def test_damaged_torchvision_files_are_named_not_called_a_failed_download(tmp_path):
    from gan_vae.tasks import TORCHVISION_FILES
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in TORCHVISION_FILES:  # present (so nothing is downloaded) but cut short
        (raw / name).write_bytes(b"\x00\x00\x08\x03" + bytes(40))
    with pytest.raises(UserError) as err:
        load_task("fashion_mnist", str(tmp_path), 0)
    assert f"the files under {raw} are damaged" in str(err.value) and "download" in str(err.value)
    assert "Offline?" not in str(err.value)


def test_npz_labels_must_be_integers(tmp_path):
    np.savez(tmp_path / "t.npz", images=np.zeros((4, 28, 28), np.uint8), labels=np.array([0, 1, np.nan, 2]))
    with pytest.raises(UserError, match="must hold integer class labels"):
        _load_npz(tmp_path / "t.npz")


# ---------------------------------------------------------------------------------------------------------------
# FID: a damaged classifier cache, non-finite images, progress bars
# ---------------------------------------------------------------------------------------------------------------
def test_a_truncated_fid_classifier_cache_is_named_and_rebuilt(tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    labels = np.arange(40) % 2
    task = TaskData("t", images[:30], labels[:30], images[30:], labels[30:])
    torch.manual_seed(0)
    model, info = train_domain_classifier([task], 1, 1, 0, tmp_path, torch.device("cpu"))
    (cached,) = tmp_path.glob("domain_classifier_*.pt")
    cached.write_bytes(cached.read_bytes()[:500])  # a run killed while writing it, or a copy cut short
    torch.manual_seed(0)
    again, again_info = train_domain_classifier([task], 1, 1, 0, tmp_path, torch.device("cpu"))
    assert f"the cached FID domain classifier {cached} cannot be used" in capsys.readouterr().err
    assert again_info == info
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert torch.load(cached, weights_only=False)["info"] == info  # replaced by a whole one


def test_a_branch_from_the_end_of_a_teacher_phase_equals_one_from_the_finished_task(domains, origin,  # noqa: F811
                                                                                      tmp_path):
    """task_<i>_teacher.pt (written when task i's teacher phase ends) lets a student ablation reuse the expert: a new
    run from origin's task_1_teacher.pt with another kd.* key ends with exactly the numbers of a new run from
    origin's task_0.pt with that key (which trains the same task-1 expert again). A teacher key is refused there
    (the expert was made with the checkpoint's), naming the key and both ways."""
    ckpts = origin / "checkpoints"
    assert (ckpts / "task_0_teacher.pt").is_file() and (ckpts / "task_1_teacher.pt").is_file()
    assert torch.load(ckpts / "task_1_teacher.pt", weights_only=False)["progress"] == {
        "task": 1, "phase": "student", "step": 0}
    name = tmp_path.name
    from_task = _branch(domains, origin, ckpts / "task_0.pt", f"from_task_{name}")
    from_teacher = _branch(domains, origin, ckpts / "task_1_teacher.pt", f"from_teacher_{name}")
    assert from_task.returncode is None and from_teacher.returncode is None, from_teacher.stderr[-3000:]
    a, b = (json.loads((origin.parent / f"{k}_{name}" / "results.json").read_text())
            for k in ("from_task", "from_teacher"))
    assert a["recon_mse"] != json.loads((origin / "results.json").read_text())["recon_mse"]  # the key mattered
    for key in ("teacher_fid", "student_fid", "recon_mse", "recon_fid", "student_fid_samples", "forgetting"):
        assert a[key] == b[key], key
    refused = _branch(domains, origin, ckpts / "task_1_teacher.pt", f"teacher_key_{name}", "teacher.lr=0.002")
    assert_clean_error(refused, "teacher.lr", "task_<i>.pt", "task_<i>_teacher.pt")
    assert not (origin.parent / f"teacher_key_{name}").exists()


@pytest.mark.parametrize("damage,fragment", [("empty", "empty"), ("truncated", "cut short")])
def test_a_damaged_inception_weights_file_is_refused_before_the_run(tmp_path, damage, fragment):
    from gan_vae.fid import check_inception_path
    path = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(1000)}, path)  # torch.save's zip format, as the weights file
    path.write_bytes(b"" if damage == "empty" else path.read_bytes()[:300])
    with pytest.raises(UserError, match=f"fid.inception_path={path} is {fragment}.*copy it again"):
        check_inception_path(str(path))


def test_fid_of_non_finite_images_is_a_user_error():
    ev = _identity_fid(10)
    ev.add_real("a", torch.randn(10, 4, 1, 1))
    with pytest.raises(UserError, match="hold NaN or inf"):
        ev.fid("a", iter([torch.full((10, 4, 1, 1), float("nan"))]))


def test_evaluation_shows_a_progress_bar(domains, tmp_path, capsys):  # noqa: F811
    run = _in_process_run(domains, tmp_path, ["discs", "crosses"])
    _toy_fid(run, 48)
    run.learner.student.add_task()
    run.learner.student.add_task()
    run.evaluate(1)
    assert "task 1: evaluation of tasks 0-1 (FID)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Non-finite losses and weights: a hard stop before anything is saved or evaluated
# ---------------------------------------------------------------------------------------------------------------
def test_a_non_finite_teacher_loss_stops_the_run_keeping_the_last_good_checkpoint(
        domains, origin, tmp_path, monkeypatch):  # noqa: F811
    critic_loss, calls = experts.wgan_critic_loss, [0]

    def diverging(real, fake):  # from teacher step 3 of the run's first task on (5 critic steps per step)
        calls[0] += 1
        return critic_loss(real, fake) * (float("nan") if calls[0] > 10 else 1.0)

    monkeypatch.setattr(experts, "wgan_critic_loss", diverging)
    proc = _branch(domains, origin, origin / "checkpoints" / "task_0.pt", f"nan_branch_{tmp_path.name}")
    assert_clean_error(proc, "teacher/loss_d (= nan) became non-finite at task 1", "teacher step 3",
                       "Stopped without saving: the last good checkpoints are kept in", "(last.pt)",
                       f"run.resume={(origin / 'checkpoints' / 'task_0.pt').resolve()} teacher.lr=<lower>")
    branch = origin.parent / f"nan_branch_{tmp_path.name}" / "checkpoints"
    assert not (branch / "task_1.pt").exists()
    last = torch.load(branch / "last.pt", weights_only=False)  # the checkpoint at teacher step 2 is the last good
    assert last["progress"] == {"task": 1, "phase": "teacher", "step": 2}
    assert all(torch.isfinite(v).all() for e in last["experts"] for v in e["generator"].values())


def test_non_finite_weights_behind_a_finite_loss_stop_before_the_experts_fid(domains, tmp_path):  # noqa: F811
    """The last step's update can leave NaN weights behind a finite loss: caught before the expert's FID."""
    run = _in_process_run(domains, tmp_path, ["discs"], "teacher.steps=2", experts=(0,))
    expert = run.experts[0]
    step, calls = expert.opt_g.step, [0]

    def poisoned_step(*args, **kwargs):  # the generator update of the last step (of 2) goes wrong
        out = step(*args, **kwargs)
        calls[0] += 1
        if calls[0] == 2:
            next(expert.generator.parameters()).data.fill_(float("nan"))
        return out

    expert.opt_g.step = poisoned_step
    with pytest.raises(UserError, match=r"the weights \(Generator\..*\) became non-finite at task 0"):
        run.train_teacher(0, 0)


# ---------------------------------------------------------------------------------------------------------------
# gan_vae.evaluate: the right checkpoints, checked before the work
# ---------------------------------------------------------------------------------------------------------------
def test_evaluate_a_run_branched_from_another_runs_task_checkpoint(domains, origin, tmp_path):  # noqa: F811
    """docs/results.md's ablation pattern: a new run from another run's task_0.pt holds only task_1.pt of its own. Its
    re-evaluation takes task 0 from the other run's task_0.pt (as the run recorded it) and reproduces its matrices;
    when that file is replaced or gone, it refuses and leaves results.json alone."""
    source = _copy(origin, origin.parent, f"source_{tmp_path.name}")
    name = f"branch_{tmp_path.name}"
    proc = _branch(domains, origin, source / "checkpoints" / "task_0.pt", name)
    assert proc.returncode is None, proc.stderr[-3000:]
    branch = origin.parent / name
    assert sorted(p.name for p in (branch / "checkpoints").glob("task_*.pt")) == ["task_1.pt", "task_1_teacher.pt"]
    written = json.loads((branch / "results.json").read_text())
    assert written["tasks_done"] == 2

    again = call_main(evaluate.main, [branch])
    assert again.returncode is None, again.stderr[-3000:]
    assert f"re-evaluated task 0: {(source / 'checkpoints' / 'task_0.pt').resolve()}" in again.stderr
    re_res = json.loads((branch / "results.json").read_text())
    for key in ("tasks_done", "teacher_fid", "student_fid", "recon_mse", "recon_fid", "student_fid_samples",
                "forgetting", "bwt", "time/wall_s"):
        assert re_res[key] == written[key], key

    (source / "checkpoints" / "task_1.pt").replace(source / "checkpoints" / "task_0.pt")  # another file there
    replaced = call_main(evaluate.main, [branch])
    assert_clean_error(replaced, "task_0.pt is not the file this run started from")
    (source / "checkpoints" / "task_0.pt").unlink()
    gone = call_main(evaluate.main, [branch])
    assert_clean_error(gone, "the state after some is gone: task 0: ", "task_0.pt (this run started from it)")
    assert json.loads((branch / "results.json").read_text()) == re_res


@pytest.mark.parametrize("damage,fragment", [
    ("half_results", "results.json cannot be read"),
    ("truncated_task_1", "cannot read checkpoint"),
    ("task_1_is_task_0", "task_1.pt does not hold the state at the end of task 1"),
    ("no_task_0", "the state after some is gone: task 0: "),
])
def test_evaluate_checks_every_file_before_the_work(origin, tmp_path, damage, fragment):
    run_dir = _copy(origin, origin.parent, f"{damage}_{tmp_path.name}")
    checkpoints = run_dir / "checkpoints"
    if damage == "half_results":
        text = (run_dir / "results.json").read_text()
        (run_dir / "results.json").write_text(text[: len(text) // 2])
    elif damage == "truncated_task_1":
        data = (checkpoints / "task_1.pt").read_bytes()
        (checkpoints / "task_1.pt").write_bytes(data[: len(data) // 2])
    elif damage == "task_1_is_task_0":
        shutil.copy(checkpoints / "task_0.pt", checkpoints / "task_1.pt")
    else:
        (checkpoints / "task_0.pt").unlink()
    before = (run_dir / "results.json").read_text()
    proc = call_main(evaluate.main, [run_dir])
    assert_clean_error(proc, fragment)
    assert "re-evaluated task" not in proc.stderr and "FID" not in proc.stderr  # refused before any evaluation
    assert (run_dir / "results.json").read_text() == before


def test_one_writer_per_run_directory(domains, origin):  # noqa: F811
    """While a process writes a run directory (training it, or re-evaluating it), neither an evaluation nor a run
    with the same run.name may write there too."""
    held = common.rundir.lock_run_dir(origin)
    try:
        busy = call_main(evaluate.main, [origin])
        again = call_main(continual.main, [*_args(domains, origin.parent, ["discs", "inverted"]), *TINY_RUN,
                                           "run.name=origin", "run.resume=auto"])
    finally:
        held.release()
    assert_clean_error(busy, f"{origin} is in use by another process")
    assert_clean_error(again, "is in use by another process", "Wait for it to finish")
