"""Shared helpers: run the scripts the way a user does (a subprocess in the repository root), tiny configs."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Under pytest-xdist (pytest.ini) several workers share the cores: each worker, and every script a test starts
# (they inherit the environment), computes with one thread. Set before any test module imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

# The test session's own HOME and XDG_CACHE_HOME (set here, inside pytest only: .ci/run keeps its virtual environment
# under the real $HOME/.cache), so that nothing a test runs writes into the user's ~/.cache/kd-distill (the file
# digest indexes); scripts the tests start inherit them. Caches of downloaded weights and fonts keep their real
# places, so pre-downloaded models stay usable offline.
REAL_HOME = Path.home()
REAL_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or REAL_HOME / ".cache")
if not os.environ.get("KD_TEST_HOME"):
    import atexit
    import shutil
    import tempfile
    for var, place in (("HF_HOME", REAL_CACHE / "huggingface"), ("TORCH_HOME", REAL_CACHE / "torch"),
                       ("MPLCONFIGDIR", REAL_CACHE / "matplotlib")):
        os.environ.setdefault(var, str(place))
    _test_home = tempfile.mkdtemp(prefix="kd-test-home-")
    atexit.register(shutil.rmtree, _test_home, ignore_errors=True)
    os.environ.update({"KD_TEST_HOME": _test_home, "HOME": _test_home,
                       "XDG_CACHE_HOME": str(Path(_test_home) / ".cache")})

# The FID domain classifier of the tiny gan_vae runs (test_gan_vae.py `_tiny`): one cache for the whole session, which
# its lock lets every worker share (the first run of a task list trains it, the others load it), and one per ATen
# CPU capability (test_cpu_capabilities.py runs tests again under another, in this same KD_TEST_HOME)
GAN_VAE_FID_CACHE = (Path(os.environ["KD_TEST_HOME"])
                     / f"gan_vae_fid_{os.environ.get('ATEN_CPU_CAPABILITY') or 'native'}")
ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

# A run small enough for a few seconds on a 2-core CPU: 4 synthetic classes, 32 px, small timm models.
TINY = ["data.name=synthetic", "data.synthetic.num_classes=4", "data.synthetic.images_per_class=12",
        "data.synthetic.image_size=32", "data.image_size=32", "data.crop_scale_min=0.35", "data.workers=0",
        "teacher.name=resnet10t", "teacher.pretrained=false", "teacher.cache_views=2", "student.name=mobilenetv2_035",
        "train.batch_size=8", "train.eval_batch_size=16", "train.epochs=2", "eval.latency=false"]
# TINY with an online teacher: without the cache's teacher.cache_views, which teacher.mode=online does not read
TINY_ONLINE = [*(a for a in TINY if not a.startswith("teacher.cache_views=")), "teacher.mode=online"]
# TINY with local teacher weights (teacher.checkpoint): without teacher.pretrained, which the checkpoint makes unread
TINY_LOCAL_TEACHER = [a for a in TINY if not a.startswith("teacher.pretrained=")]
# TINY on labels only (kd.alpha=1): no teacher is built, so none of TINY's teacher.* keys (they would be refused)
TINY_LABEL_ONLY = [*(a for a in TINY if not a.startswith("teacher.")), "kd.alpha=1"]


RL_ARGS = [*TINY_LABEL_ONLY, "curriculum.strategy=random_subset", "agent.name=fixed"]


class Killed(Exception):
    pass


@pytest.fixture(scope="session")
def stopped_runs(tmp_path_factory):
    """A 2-epoch run of each trainer, made in-process and stopped right after its first checkpoint, as a kill
    would (each test copies the one it uses; test_bad_input.py and test_run_dir.py share them)."""
    import train_student
    import train_student_rl
    from engine.trainer import Trainer
    root = tmp_path_factory.mktemp("stopped")
    finish_epoch = Trainer.finish_epoch

    def finish_then_die(self, epoch, *args, **kwargs):
        finish_epoch(self, epoch, *args, **kwargs)
        raise Killed

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "finish_epoch", finish_then_die)
        with pytest.raises(Killed):
            train_student.main([*TINY_LABEL_ONLY, f"run.out_dir={root}", "run.name=ts"])
        with pytest.raises(Killed):
            train_student_rl.main([*RL_ARGS, f"run.out_dir={root}", "run.name=rl"])
    return root


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: without the plugin (-p no:xdist) it is skipped
def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pytest.ini): one worker more than there are cores, at most 4. Most tests wait on a script they
    started, so a third worker on two cores keeps both busy."""
    return min(4, (os.cpu_count() or 1) + 1)


_FORK_SERVER = None
_OWN_SERVERS: list = []  # fork servers of the running test (fork_server_with), tried before the worker's


def start_script(argv: list[str], env: dict, stdout, stderr, cwd: Path = ROOT):
    """`python *argv` in `cwd` (the repository root), as subprocess.Popen does it, or forked from this worker's fork
    server (tests/forkserver.py: the libraries imported once, the script run in a new process of its own) when the
    environment allows it, or from the running test's own server (fork_server_with) when it was started with that
    environment. KD_TEST_FRESH_PROCESSES=1: always a fresh interpreter."""
    global _FORK_SERVER
    if os.environ.get("KD_TEST_FRESH_PROCESSES") != "1":
        import forkserver
        server = next((s for s in _OWN_SERVERS if forkserver.eligible(s.env, env)), None)
        if server is None:
            if _FORK_SERVER is None:
                import atexit
                _FORK_SERVER = forkserver.ForkServer(sys.executable)
                atexit.register(_FORK_SERVER.close)
            if forkserver.eligible(_FORK_SERVER.env, env):
                server = _FORK_SERVER
        if server is not None:
            with open(os.devnull) as null, open(os.devnull, "w") as sink:
                fds = [sink.fileno() if f == subprocess.DEVNULL else f if isinstance(f, int) else f.fileno()
                       for f in (stdout, stderr)]
                if stderr == subprocess.STDOUT:
                    fds[1] = fds[0]
                return server.spawn(argv, str(cwd), env, null.fileno(), *fds)
    return subprocess.Popen([sys.executable, *argv], cwd=cwd, stdin=subprocess.DEVNULL, stdout=stdout,
                            stderr=stderr, env=env)


@contextlib.contextmanager
def fork_server_with(env: dict):
    """A fork server of the test's own for the block, started with this environment updated by `env`. A variable
    that a library reads when it is imported (HF_HUB_OFFLINE, ...) makes a run ineligible for the worker's server
    (forkserver.eligible), so each such run would start a fresh interpreter; a test that starts several runs with
    the same such `env` pays that start-up (the imports) once here instead. The server imported its libraries
    under `env`, so its children see exactly what a fresh interpreter with `env` sees; runs with another
    environment go on as before. KD_TEST_FRESH_PROCESSES=1: no server, every run a fresh interpreter."""
    if os.environ.get("KD_TEST_FRESH_PROCESSES") == "1":
        yield
        return
    import forkserver
    server = forkserver.ForkServer(sys.executable, {**os.environ, **env})
    _OWN_SERVERS.append(server)
    try:
        yield
    finally:
        _OWN_SERVERS.remove(server)
        server.close()


def runs_documented_command(*commands: str):
    """Declares that the decorated test runs these shell commands of README.md or docs/ (at tiny size where its
    docstring says so). tests/test_docs.py reads the declarations from the test sources: a documented command that
    no test declares must be marked <!-- cmd: gpu|network|long --> in the docs."""
    def declare(test):
        test.documented_commands = commands
        return test
    return declare


def run_script(script: str, *args: str, timeout: float = 300, env: dict | None = None,
               launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run `python <script> args...` (or `python -m <module> args...` with script="-m", module first in args)."""
    import locale
    import tempfile
    target = [script] if script == "-m" else [str(ROOT / script)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if launcher is not None:
        return subprocess.run(launcher + target + list(args), cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout, env=full_env)
    cmd = [sys.executable, *target, *args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = start_script([*target, *args], full_env, out, err)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise subprocess.TimeoutExpired(cmd, timeout) from None
        # as text=True reads it: the locale's encoding, universal newlines
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode(locale.getpreferredencoding(False)).replace("\r\n", "\n").replace("\r", "\n"))
    return subprocess.CompletedProcess(cmd, code, *texts)


def run_main(script: str, *args: str) -> subprocess.CompletedProcess:
    """What `run_script(script, *args)` returns, from the script's own `main` run through `utils.run_cli` in this
    process: exit code (SystemExit), stdout and stderr. For bad-input tests, which stop before any work, so they skip
    the interpreter start-up (every script keeps end-to-end subprocess tests too). An exception other than the
    user error run_cli prints propagates: the test fails with it, as a traceback would fail it."""
    import importlib
    module = args[0] if script == "-m" else script.removesuffix(".py").replace("/", ".")
    proc = call_main(importlib.import_module(module).main, list(args[1:] if script == "-m" else args))
    proc.returncode = 0 if proc.returncode is None else proc.returncode
    return proc


def call_main(main, argv: list) -> subprocess.CompletedProcess:
    """`utils.run_cli(main, argv)` in this process: its SystemExit code (None when main returned), stdout, stderr."""
    import contextlib
    import io

    from common.cli import run_cli
    out, err, code = io.StringIO(), io.StringIO(), None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_cli(main, [str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) or exc.code is None else 1
    return subprocess.CompletedProcess(["<main>", *map(str, argv)], code, out.getvalue(), err.getvalue())


def run_and_sigkill(script: str, *args: str, watch: Path, after_lines: int, settle: float = 0.3,
                    module: str | None = None, env: dict | None = None, written: Path | None = None) -> int:
    """Start a script (or `python -m module` with script="-m"), wait until `watch` has `after_lines` lines (and the
    file `written` exists: an epoch's metrics line comes before its checkpoint, which a loaded machine may take
    longer than `settle` to write), let it run `settle` seconds more, then SIGKILL it. Returns the number of lines
    `watch` had at the kill."""
    target = ["-m", module] if script == "-m" else [str(ROOT / script)]
    proc = start_script([*target, *args], {**os.environ, **(env or {})}, subprocess.DEVNULL, subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if watch.exists() and len(watch.read_text().splitlines()) >= after_lines and (written is None
                                                                                       or written.exists()):
            break
        time.sleep(0.05)
    time.sleep(settle)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return len(watch.read_text().splitlines())


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user error: non-zero exit, a one-paragraph message naming the problem, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "error:" in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


def export_commit(commit: str, dest: Path) -> Path:
    """The repository's files at `commit` (`git archive`) extracted into `dest`, for running older code next to the
    current one; a pytest skip where the checkout lacks that commit (a shallow clone, an exported tarball)."""
    import io
    import tarfile
    proc = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"commit {commit} is not in this checkout (a shallow clone?): {proc.stderr[-200:]!r}")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


# The longest tests (measured: 30-110 s each with the suite's three workers on two cores), longest first. Under
# pytest-xdist they are dealt out so that each worker starts its first share of the collection with them
# (`pytest_collection_modifyitems`): started last, one of them kept a single worker busy after the others had
# finished. Only the order changes; every test still runs.
SLOW_FIRST = (
    "tests/test_gan_vae.py::test_repeated_domain_reuses_expert_and_new_domain_adds_one",
    "tests/test_gan_vae.py::test_real_data_run_on_shared_arrays",
    "tests/test_curriculum.py::test_difficulty_tracks_the_true_difficulty",
    "tests/test_gan_vae.py::test_inception_backend_runs_offline_with_a_local_weights_file",
    "tests/test_train_e2e.py::test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run",
    "tests/test_curriculum.py::test_rl_resume_after_kill_matches_uninterrupted",
    "tests/test_cuda_path.py::test_compile_bf16_channels_last_together_in_both_scripts",
    "tests/test_studies.py::test_tiny_study_end_to_end_on_the_local_executor",
    "tests/test_cpu_capabilities.py::test_numerics_tests_pass_under_another_cpu_capability",
    "tests/test_studies.py::test_a_branch_row_equals_the_same_run_made_by_hand",
    "tests/test_models.py::test_unreachable_hub_weights_and_dataset",
    "tests/test_clean_exit.py::test_errors_in_a_process_group_keep_their_exit_codes",
    "tests/test_studies.py::test_a_preempted_local_job_is_requeued_and_equals_an_uninterrupted_run",
    "tests/test_cuda_path.py::test_compile_failure_names_it_and_the_eager_way",
    "tests/test_ddp.py::test_ddp_ranks_share_decisions_rng_and_batchnorm_across_sigkill_and_resume",
    "tests/test_multinode.py::test_two_nodes_rl_run_killed_and_resumed",
)


def deal_slow_first(items: list, workers: int, slow: tuple[str, ...] = SLOW_FIRST) -> list:
    """`items` reordered for `workers` xdist workers: worksteal's first distribution gives worker i the i-th of
    `workers` contiguous shares (share i: what is left // (workers - i) items), so the tests named in `slow` are
    dealt round-robin, longest first, to the head of each share; the rest keep their order."""
    rank = {name: i for i, name in enumerate(slow)}
    first = sorted((it for it in items if it.nodeid in rank), key=lambda it: rank[it.nodeid])
    rest = iter([it for it in items if it.nodeid not in rank])
    out, left = [], len(items)
    for i in range(workers):
        size = left // (workers - i)
        left -= size
        head = first[i::workers]
        out += head + [next(rest) for _ in range(max(0, size - len(head)))]
    out += list(rest)
    return out


def pytest_collection_modifyitems(config, items):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        items[:] = deal_slow_first(items, workers)
