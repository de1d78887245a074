"""gan_vae: what a run read may not change under it. A resume (run.resume=auto, a checkpoint of its own, or a new
run from another run's checkpoint) and gan_vae.evaluate compare the task files and the FID features with the
fingerprints the checkpoints recorded, and evaluate takes only overrides that cannot change a number. One tiny
two-task run, stopped in task 1 (as a kill would) and then resumed to its end, serves every test; each test that
changes files works on a copy, and restores the task files it changes."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GAN_VAE_FID_CACHE, Killed, assert_clean_error, call_main, read_metrics
from test_gan_vae import _args, domains  # noqa: F401 - a fixture

import gan_vae.continual as continual
import gan_vae.evaluate as evaluate

TINY_RUN = ("teacher.steps=4", "student.steps=4", "log.sample_every=4", "run.checkpoint_every=2", "log.every_steps=1")
STOP_AT = (1, "teacher", 3)  # (task, phase, step) of the last line logged before the stop: last.pt is at step 2


def _run(data, out, name, *extra):
    """gan_vae.continual in this process on the copies of the task files in `data`, with a FID classifier cache of
    this module's own (a test changes the cached file)."""
    tiny = _args(data, out, ["discs", "crosses"], f"fid.cache_dir={out / 'fid'}")
    return call_main(continual.main, [*tiny, *TINY_RUN, f"run.name={name}", *extra])


@pytest.fixture(scope="module")
def stopped(domains, tmp_path_factory):  # noqa: F811 - the domains fixture
    """A run stopped right after it logged task 1's teacher step 3, one step after its last checkpoint, as a kill
    would leave it; its task files are copies of its own (tests change them)."""
    data = tmp_path_factory.mktemp("data")
    for name in ("discs.npz", "crosses.npz"):
        shutil.copy(domains / name, data / name)
    out = tmp_path_factory.mktemp("runs")
    after_step = continual.ContinualRun.after_step

    def stop_after(self, t, phase, step, steps, record):
        after_step(self, t, phase, step, steps, record)
        if (t, phase, step + 1) == STOP_AT:
            raise Killed

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(continual.ContinualRun, "after_step", stop_after)
        with pytest.raises(Killed):
            _run(data, out, "stopped")
    run_dir = out / "stopped"
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["progress"] == {
        "task": 1, "phase": "teacher", "step": 2}
    assert tuple(read_metrics(run_dir)[-1][k] for k in ("task", "phase", "step")) == STOP_AT
    return data, run_dir


def _copy(run_dir: Path, name: str) -> Path:
    """A copy of a run directory beside it (the same run.out_dir, so the same FID classifier cache)."""
    return shutil.copytree(run_dir, run_dir.parent / name)


@pytest.fixture(scope="module")
def finished(stopped):
    """The stopped run, copied and resumed with run.resume=auto to its end."""
    data, run_dir = stopped
    resumed = _copy(run_dir, "finished")
    proc = _run(data, run_dir.parent, "finished", "run.resume=auto")
    assert proc.returncode is None, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    return data, resumed


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()
            and p.name != "run.lock"}


class _replaced:
    """Within the block, the task file `path` holds other images (one repainted), at the same path."""

    def __init__(self, path: Path):
        self.path, self.kept = path, path.read_bytes()

    def __enter__(self):
        with np.load(self.path) as arrays:
            images, labels = arrays["images"].copy(), arrays["labels"]
        images[0] = 255 - images[0]
        np.savez(self.path, images=images, labels=labels)

    def __exit__(self, *exc):
        self.path.write_bytes(self.kept)


# ---------------------------------------------------------------------------------------------------------------
# A resume drops the metrics lines logged after its checkpoint (issue 23, section 5)
# ---------------------------------------------------------------------------------------------------------------
def test_a_resumed_run_drops_the_lines_logged_after_its_checkpoint(finished):
    """The stopped run had logged task 1's teacher step 3 after its last checkpoint (step 2); resumed, it logs that
    step again, so the line logged before the stop is dropped: every (task, phase, step) once, in order."""
    _, run_dir = finished
    lines = [(r["task"], r["phase"], r["step"]) for r in read_metrics(run_dir)]
    assert lines.count(STOP_AT) == 1, lines
    order = {"teacher": 0, "student": 1}
    assert lines == sorted(set(lines), key=lambda k: (k[0], order[k[1]], k[2]))
    assert len(lines) == 2 * (4 + 4)  # two tasks of 4 teacher and 4 student steps, each logged
    assert json.loads((run_dir / "results.json").read_text())["tasks_done"] == 2


# ---------------------------------------------------------------------------------------------------------------
# Task files that changed under a run
# ---------------------------------------------------------------------------------------------------------------
def test_a_resume_refuses_a_task_file_changed_under_the_run(stopped, tmp_path):
    """Task 0's .npz replaced at the same path while the run is stopped in task 1: run.resume=auto, a resume from the
    run's own checkpoint and a new run from its task_0.pt are each refused, naming the task and the file, before
    anything in the run directory changes. With the file restored the resume goes on."""
    data, origin = stopped
    run_dir = _copy(origin, f"changed_{tmp_path.name}")
    before = _files(run_dir)
    with _replaced(data / "discs.npz"):
        auto = _run(data, run_dir.parent, run_dir.name, "run.resume=auto")
        own = _run(data, run_dir.parent, run_dir.name, f"run.resume={run_dir / 'checkpoints' / 'last.pt'}")
        branch = _run(data, run_dir.parent, f"branch_{tmp_path.name}",
                      f"run.resume={run_dir / 'checkpoints' / 'task_0.pt'}")
    for proc in (auto, own, branch):
        assert_clean_error(proc, "changed since it was written", f"task 0 ({data / 'discs.npz'}): "
                                                                 f"{data / 'discs.npz'} (SHA-256")
        assert "task 1 (" not in proc.stderr  # the unchanged file is not named
    assert _files(run_dir) == before
    assert not (run_dir.parent / f"branch_{tmp_path.name}").exists()
    recorded = json.loads((run_dir / "run.json").read_text())["data"]
    assert [r["task"] for r in recorded] == [str(data / "discs.npz"), str(data / "crosses.npz")]


def test_evaluate_refuses_a_task_file_changed_since_the_run(finished, tmp_path):
    data, origin = finished
    run_dir = _copy(origin, f"evaluate_changed_{tmp_path.name}")
    before = (run_dir / "results.json").read_text()
    with _replaced(data / "crosses.npz"):
        proc = call_main(evaluate.main, [run_dir])
    assert_clean_error(proc, "changed since it was written", f"task 1 ({data / 'crosses.npz'})", "re-evaluating")
    assert "re-evaluated task" not in proc.stderr
    assert (run_dir / "results.json").read_text() == before


def test_a_checkpoint_without_fingerprints_resumes_with_a_note_and_records_them(stopped, tmp_path):
    """A checkpoint of a gan_vae from before the fingerprints cannot be checked: the resume says so, records when
    the fingerprints started (run.json), and its later checkpoints hold them."""
    data, origin = stopped
    run_dir = _copy(origin, f"old_{tmp_path.name}")
    last = run_dir / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=False)
    del ckpt["data"], ckpt["fid_features"]
    torch.save(ckpt, last)
    proc = _run(data, run_dir.parent, run_dir.name, "run.resume=auto")
    assert proc.returncode is None, proc.stderr[-3000:]
    assert f"note: {last} was written by an older gan_vae" in proc.stderr
    assert "data_recorded_on_resume" in json.loads((run_dir / "run.json").read_text())
    assert len(torch.load(run_dir / "checkpoints" / "task_1.pt", weights_only=False)["data"]) == 2


# ---------------------------------------------------------------------------------------------------------------
# FID features other than the run's
# ---------------------------------------------------------------------------------------------------------------
def test_resume_and_evaluate_refuse_other_fid_features(stopped, finished, tmp_path):
    """The cached FID domain classifier replaced by other weights (as one trained again on another machine would be):
    a resume and a re-evaluation would measure in other features, and are refused before any change."""
    data, origin = stopped
    (cache,) = (origin.parent / "fid").glob("domain_classifier_*.pt")
    kept = cache.read_bytes()
    state = torch.load(cache, weights_only=False)
    first = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][first] = state["model"][first] + 1e-3
    stopped_copy = _copy(origin, f"fid_stopped_{tmp_path.name}")
    finished_copy = _copy(finished[1], f"fid_finished_{tmp_path.name}")
    before = _files(stopped_copy), (finished_copy / "results.json").read_text()
    try:
        torch.save(state, cache)
        resumed = _run(data, stopped_copy.parent, stopped_copy.name, "run.resume=auto")
        evaluated = call_main(evaluate.main, [finished_copy])
    finally:
        cache.write_bytes(kept)
    assert_clean_error(resumed, "the FID features differ from those", "resuming is refused")
    assert_clean_error(evaluated, "the FID features differ from those", "re-evaluating is refused")
    assert (_files(stopped_copy), (finished_copy / "results.json").read_text()) == before


# ---------------------------------------------------------------------------------------------------------------
# gan_vae.evaluate: only overrides that cannot change a number (issue 23, 1.1)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,named", [
    (["train.seed=1"], ["train.seed = 1 (the run's config.yaml: 0)"]),
    (["data.test_fraction=0.5"], ["data.test_fraction = 0.5 (the run's config.yaml: 0.2)"]),
    (["student.width=16"], ["student.width = 16"]),
    (["teacher.ema_decay=0.9"], ["teacher.ema_decay = 0.9"]),  # which weights the experts sampled from
    (["fid.samples=20", "kd.previous_weight=2"], ["fid.samples = 20", "kd.previous_weight = 2.0"]),
    (["log.every_steps=3"], ["log.every_steps = 3"]),  # does nothing in an evaluation: refused, not ignored
    (["run.name=other"], ["run.name = \"other\""]),
])
def test_evaluate_refuses_overrides_that_change_what_was_measured(finished, overrides, named):
    _, run_dir = finished
    before = _files(run_dir)
    proc = call_main(evaluate.main, [run_dir, *overrides])
    assert_clean_error(proc, "would change what it measured", *named, "It takes only train.device")
    assert "Traceback" not in proc.stderr and "re-evaluated task" not in proc.stderr
    assert _files(run_dir) == before


def test_evaluate_takes_the_keys_that_change_no_number_and_old_checkpoints_with_a_note(finished, tmp_path):
    """train.device, fid.cache_dir (the same cache) and a key set to the run's own value are accepted and reproduce
    the run's matrices; a task checkpoint of an older gan_vae, without fingerprints, is evaluated with a note, and
    a key its config.yaml holds that runs now refuse as unread (data.root with .npz tasks) does not stop it."""
    from omegaconf import OmegaConf
    _, origin = finished
    run_dir = _copy(origin, f"evaluate_ok_{tmp_path.name}")
    saved = OmegaConf.load(run_dir / "config.yaml")
    saved.data.root = "elsewhere"
    OmegaConf.save(saved, run_dir / "config.yaml")
    task_0 = run_dir / "checkpoints" / "task_0.pt"
    ckpt = torch.load(task_0, weights_only=False)
    del ckpt["data"], ckpt["fid_features"]
    torch.save(ckpt, task_0)
    written = json.loads((run_dir / "results.json").read_text())
    proc = call_main(evaluate.main, [run_dir, "train.device=cpu", f"fid.cache_dir={origin.parent / 'fid'}",
                                     "train.seed=0", "data.test_fraction=0.2"])
    assert proc.returncode is None, proc.stderr[-3000:]
    assert f"note: {task_0} was written by an older gan_vae" in proc.stderr
    again = json.loads((run_dir / "results.json").read_text())
    for key in ("teacher_fid", "student_fid", "recon_mse", "recon_fid"):
        assert again[key] == written[key], key


# ---------------------------------------------------------------------------------------------------------------
# Paths that hold something of another kind than the run keeps there
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rel,make", [
    ("checkpoints/task_1.pt", "folder"),  # not written yet: the run would stop at the end of task 1
    ("checkpoints/task_0.pt", "folder"),  # a finished task's state, gone: evaluate could not read it
    ("samples", "file"),
    ("checkpoints/task_1_teacher.pt", "dangling link"),
])
def test_a_resume_refuses_a_run_path_of_the_wrong_kind(stopped, tmp_path, rel, make):
    data, origin = stopped
    run_dir = _copy(origin, f"kind_{tmp_path.name}")
    path = run_dir / rel
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    if make == "folder":
        path.mkdir()
    elif make == "file":
        path.write_text("")
    else:
        path.symlink_to(tmp_path / "absent")
    before = _files(run_dir)
    proc = _run(data, run_dir.parent, run_dir.name, "run.resume=auto")
    assert_clean_error(proc, f"{rel} (a {'folder' if make == 'file' else 'file'} is expected)", "Nothing was touched")
    assert _files(run_dir) == before


@pytest.mark.parametrize("rel", ["results.json", "forgetting_report.md", "heatmap_recon_fid.png"])
def test_evaluate_refuses_an_output_path_of_the_wrong_kind(finished, tmp_path, rel):
    """evaluate rewrites these at the end: a folder there is refused before the work, not after it."""
    _, origin = finished
    run_dir = _copy(origin, f"evaluate_kind_{tmp_path.name}")
    (run_dir / rel).unlink()
    (run_dir / rel).mkdir()
    proc = call_main(evaluate.main, [run_dir])
    assert_clean_error(proc, f"{rel} (a file is expected)")
    assert "re-evaluated task" not in proc.stderr


def test_a_folder_at_the_fid_classifier_cache_file_is_refused_before_training(tmp_path):
    from common.errors import UserError
    from gan_vae.fid import train_domain_classifier
    from gan_vae.tasks import TaskData
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), np.arange(12) % 2
    task = TaskData("t", images[:8], labels[:8], images[8:], labels[8:])
    trained = []
    import gan_vae.fid as fid
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fid, "_train_classifier", lambda *a: trained.append(1) or {"test_acc": {}})
        train_domain_classifier([task], 1, 1, 0, tmp_path, torch.device("cpu"))  # saved (untrained) in the cache
        (cached,) = tmp_path.glob("domain_classifier_*.pt")
        cached.unlink()
        cached.mkdir()
        with pytest.raises(UserError, match="in fid.cache_dir is not a file"):
            train_domain_classifier([task], 1, 1, 0, tmp_path, torch.device("cpu"))
    assert trained == [1]  # refused before training again


# ---------------------------------------------------------------------------------------------------------------
# Keys the run's choices do not read: refused, not ignored
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,fragment", [
    (["data.root=elsewhere"], "data.root=elsewhere (only mnist and fashion_mnist tasks read it"),
    (["fid.inception_path=WEIGHTS"], "fid.inception_path=WEIGHTS (fid.backend=domain does not read it"),
    (["fid.backend=inception", "fid.inception_path=WEIGHTS"],
     "fid.cache_dir=FIDCACHE (fid.backend=inception does not"),
    (["fid.backend=inception", "fid.inception_path=WEIGHTS"], "fid.classifier_epochs=2 (fid.backend=inception"),
])
def test_a_key_the_run_does_not_read_is_refused(domains, tmp_path, overrides, fragment):  # noqa: F811
    from common.config import load_config
    from common.errors import UserError
    weights = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(3)}, weights)
    overrides = [o.replace("WEIGHTS", str(weights)) for o in overrides]
    cfg = load_config(continual.ContinualConfig, None, [*_args(domains, tmp_path, ["discs"]), *overrides])
    with pytest.raises(UserError) as err:
        continual.validate(cfg)
    assert fragment.replace("WEIGHTS", str(weights)).replace("FIDCACHE", str(GAN_VAE_FID_CACHE)) in str(err.value)
    assert "A key that would do nothing is refused" in str(err.value)


# every key that only replay reads, at a value away from its default
REPLAY_ONLY = [["student.self_replay=0.0"], ["student.replay_share=0.5"], ["student.mixup=true"],
               ["student.replay_source=real"], ["student.joint=true"],
               ["kd.previous_weight=2.0"], ["kd.previous_posterior=kl"], ["kd.weight_floor=0.5"],
               ["kd.weight_ceiling=0.9"], ["student.freeze_old_priors=true"], ["student.replay_truncation=1.0"]]


@pytest.mark.parametrize("overrides", REPLAY_ONLY, ids=lambda o: o[0])
def test_a_replay_key_is_refused_without_replay_and_accepted_with_it(domains, tmp_path, overrides):  # noqa: F811
    """student.replay=false: every batch holds the current task alone, so no key of the replay is read (the
    finished tasks' priors get no gradient, frozen or not); with replay the same key is read and accepted."""
    from common.config import load_config
    from common.errors import UserError
    key, value = overrides[0].split("=")
    two_tasks = _args(domains, tmp_path, ["discs", "crosses"])
    continual.validate(load_config(continual.ContinualConfig, None, [*two_tasks, *overrides]))
    cfg = load_config(continual.ContinualConfig, None, [*two_tasks, *overrides, "student.replay=false"])
    with pytest.raises(UserError) as err:
        continual.validate(cfg)
    if key != "student.replay_share":  # refused before, by its own check ("set it to 0 or student.replay=true")
        assert f"{key}={value} (student.replay=false: every batch holds the current task alone" in str(err.value)
        assert "A key that would do nothing is refused" in str(err.value)


@pytest.mark.parametrize("overrides", [*REPLAY_ONLY, ["student.replay=false"], ["student.steps_per_earlier_task=2"]],
                         ids=lambda o: o[0])
def test_a_key_of_later_tasks_is_refused_with_one_task(domains, tmp_path, overrides):  # noqa: F811
    """With one task there is no earlier task: nothing to replay, no extra steps, no finished task's prior."""
    from common.config import load_config
    from common.errors import UserError
    cfg = load_config(continual.ContinualConfig, None, [*_args(domains, tmp_path, ["discs"]), *overrides])
    with pytest.raises(UserError, match="A key that would do nothing is refused") as err:
        continual.validate(cfg)
    assert f"{overrides[0]} (data.tasks has one task, so there is no earlier task" in str(err.value)


def test_the_posterior_of_self_distillation_is_refused_when_no_copy_is_kept(domains, tmp_path):  # noqa: F811
    """kd.previous_weight=0 and student.self_replay=0: the student keeps no copy from before the task, so there is
    no self-distillation whose posterior kd.previous_posterior could choose; with either of them on it is read."""
    from common.config import load_config
    from common.errors import UserError
    args = [*_args(domains, tmp_path, ["discs", "crosses"]), "kd.previous_posterior=kl"]
    with pytest.raises(UserError, match=r"kd\.previous_posterior=kl \(kd\.previous_weight=0 and student\.self_replay=0 "
                                        "keep no copy"):
        continual.validate(load_config(continual.ContinualConfig, None,
                                       [*args, "kd.previous_weight=0", "student.self_replay=0"]))
    continual.validate(load_config(continual.ContinualConfig, None, [*args, "student.self_replay=0"]))


# a term weighted 0 still runs (and is logged) but adds 0 x its value: the keys only it reads change nothing
WEIGHT_ZERO = {"student.contrastive_temperature=0.2": "student.contrastive_weight=0",
               "kd.temperature_max=6.0": "kd.relational_weight=0", "kd.temperature_min=2.0": "kd.relational_weight=0",
               "kd.temperature_fid_gain=1.0": "kd.relational_weight=0", "kd.previous_posterior=kl": "kd.previous_weight=0"}


@pytest.mark.parametrize("key", sorted(WEIGHT_ZERO))
def test_a_key_of_a_term_weighted_zero_is_refused(domains, tmp_path, key):  # noqa: F811
    """student.contrastive_temperature with student.contrastive_weight=0, the relational temperature's keys with
    kd.relational_weight=0, kd.previous_posterior with kd.previous_weight=0: the term is computed and multiplied by
    0, so the key changed only a logged diagnostic and was accepted; now refused, naming the weight. With the
    weight on, the same key is read and accepted."""
    from common.config import load_config
    from common.errors import UserError
    args = [*_args(domains, tmp_path, ["discs", "crosses"]), key]
    continual.validate(load_config(continual.ContinualConfig, None, args))
    weight = WEIGHT_ZERO[key]
    with pytest.raises(UserError, match="A key that would do nothing is refused") as err:
        continual.validate(load_config(continual.ContinualConfig, None, [*args, weight]))
    term = {"student.contrastive_weight": "contrastive", "kd.relational_weight": "relational_kd",
            "kd.previous_weight": "previous_kd"}[weight.split("=")[0]]
    assert f"{key} ({weight} takes the {term} term, which alone reads it, out of the loss)" in str(err.value)


def test_a_run_saved_with_a_replay_key_resumes_without_it(domains, tmp_path):  # noqa: F811
    """A run saved while such keys were accepted (student.replay=false with student.self_replay=0, as the
    ablation script gave them) resumes without the key, which it never read; a key it reads is still compared."""
    from common.config import load_config, to_plain
    from common.errors import UserError
    no_replay = [*_args(domains, tmp_path, ["discs", "crosses"]), "student.replay=false"]
    saved = to_plain(load_config(continual.ContinualConfig, None, no_replay))
    saved["student"]["self_replay"] = 0.0
    run_dir = tmp_path / "old_run"
    ckpt = {"config": saved, "progress": {"task": 1, "phase": "student", "step": 20}}
    now = load_config(continual.ContinualConfig, None, no_replay)
    continual.check_config_matches_checkpoint(ckpt, run_dir / "checkpoints" / "last.pt", now, run_dir)
    saved["student"]["contrastive_weight"] = 0.5
    with pytest.raises(UserError, match=r"student\.contrastive_weight = 0\.5"):
        continual.check_config_matches_checkpoint(ckpt, run_dir / "checkpoints" / "last.pt", now, run_dir)


def test_a_key_the_run_reads_is_accepted(domains, tmp_path):  # noqa: F811
    from common.config import load_config
    cfg = load_config(continual.ContinualConfig, None, [*_args(domains, tmp_path, ["discs"]),
                                                         "data.tasks=[mnist]", "data.root=elsewhere"])
    continual.validate(cfg)


def test_evaluate_refuses_a_key_the_run_does_not_read(finished):
    _, run_dir = finished
    proc = call_main(evaluate.main, [run_dir, "data.root=elsewhere"])
    assert_clean_error(proc, "data.root=elsewhere (only mnist and fashion_mnist tasks read it")


def test_torchvision_tasks_are_fingerprinted_by_their_raw_files_wherever_data_root_is(tmp_path):
    """An mnist task reads torchvision's four raw files under data.root: their digests, by names that do not hold
    data.root (a key a resume may change), so a copy elsewhere matches and a repainted file does not."""
    from common.config import load_config
    from gan_vae.tasks import TORCHVISION_FILES, data_fingerprints
    for root in ("a", "b"):
        raw = tmp_path / root / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for name in TORCHVISION_FILES:
            (raw / name).write_bytes(name.encode())
    first, second = data_fingerprints(["mnist"], str(tmp_path / "a")), data_fingerprints(["mnist"], str(tmp_path / "b"))
    assert first == second and sorted(first[0]) == sorted(f"MNIST/raw/{n}" for n in TORCHVISION_FILES)
    (tmp_path / "b" / "MNIST" / "raw" / "t10k-images-idx3-ubyte").write_bytes(b"repainted")
    cfg = load_config(continual.ContinualConfig, None, ["data.tasks=[mnist]", f"data.root={tmp_path / 'b'}"])
    now = data_fingerprints(["mnist"], str(tmp_path / "b"))
    name = "MNIST/raw/t10k-images-idx3-ubyte"
    assert continual.data_changes(first, now, cfg) == [
        f"task 0 (mnist): {tmp_path / 'b' / name} (SHA-256 {first[0][name][:12]}... then, {now[0][name][:12]}... now)"]
