"""tests/forkserver.py: a script run forked from the test worker's fork server behaves as one run in a fresh
interpreter, in everything a test reads of it (exit code, stdout, stderr, files, signals, environment)."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from conftest import ROOT, run_script, start_script

PROBE = '''
import atexit, os, random, sys, threading
import numpy as np
import torch
atexit.register(lambda: print("atexit ran", flush=True))
threading.Thread(target=lambda: (__import__("time").sleep(0.2), print("thread finished"))).start()
print("argv", sys.argv[1:], "cwd", os.getcwd(), "main", __name__, "path0", sys.path[0])
print("env", os.environ.get("KD_PROBE"), "threads", torch.get_num_threads())
print("draws", random.random(), float(np.random.rand()), float(torch.rand(1)))
print("to stderr", file=sys.stderr)
what = sys.argv[1] if len(sys.argv) > 1 else ""
if what == "raise":
    raise ValueError("boom")
if what == "message":
    sys.exit("stopped with a message")
if what == "sleep":
    open(sys.argv[2], "w").close()
    __import__("time").sleep(60)
sys.exit(int(what) if what.isdigit() else None)
'''


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    path = tmp_path_factory.mktemp("probe") / "probe.py"
    path.write_text(PROBE)
    return path


def _both(probe, monkeypatch, *args, env=None):
    forked = run_script(str(probe), *args, env=env)
    monkeypatch.setenv("KD_TEST_FRESH_PROCESSES", "1")
    fresh = run_script(str(probe), *args, env=env)
    monkeypatch.delenv("KD_TEST_FRESH_PROCESSES")
    return forked, fresh


def _same_lines(a: str, b: str) -> list[str]:
    return [line for line in a.splitlines() if not line.startswith("draws")], \
        [line for line in b.splitlines() if not line.startswith("draws")]


@pytest.mark.parametrize("args,code", [([], 0), (["3"], 3), (["raise"], 1), (["message"], 1)])
def test_a_forked_run_reports_what_a_fresh_interpreter_reports(probe, monkeypatch, args, code):
    forked, fresh = _both(probe, monkeypatch, *args, env={"OMP_NUM_THREADS": "1", "KD_PROBE": "seen"})
    assert forked.returncode == fresh.returncode == code
    a, b = _same_lines(forked.stdout, fresh.stdout)
    assert a == b and f"cwd {ROOT}" in forked.stdout and "main __main__" in forked.stdout
    assert "env seen threads 1" in forked.stdout and "atexit ran" in forked.stdout
    assert "thread finished" in forked.stdout  # non-daemon threads are waited for, as at interpreter exit
    assert forked.stderr.startswith("to stderr\n") and fresh.stderr.startswith("to stderr\n")
    if args == ["raise"]:
        assert forked.stderr.rstrip().endswith("ValueError: boom") and "Traceback" in forked.stderr
    if args == ["message"]:
        assert forked.stderr.rstrip().endswith("stopped with a message")


def test_forked_runs_draw_fresh_random_streams(probe):
    """Unseeded draws differ between runs, as between fresh interpreters: a test comparing two runs cannot pass
    because they inherited one random state."""
    draws = [next(line for line in run_script(str(probe)).stdout.splitlines() if line.startswith("draws"))
             for _ in range(2)]
    assert draws[0] != draws[1]


def test_a_forked_run_can_be_killed_and_reports_the_signal(probe, tmp_path):
    started = tmp_path / "started"
    with open(os.devnull, "w") as sink:
        proc = start_script([str(probe), "sleep", str(started)], dict(os.environ), sink, sink)
        deadline = time.time() + 60
        while not started.exists() and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL


def test_an_environment_a_library_reads_at_import_gets_a_fresh_interpreter(probe, monkeypatch):
    """HF_HUB_OFFLINE is read when huggingface_hub is imported, which the server has done: such a run is not
    forked (tests/forkserver.eligible), so it sees its own value."""
    import forkserver
    assert not forkserver.eligible(dict(os.environ), {**os.environ, "HF_HUB_OFFLINE": "1"})
    assert forkserver.eligible(dict(os.environ), {**os.environ, "OMP_NUM_THREADS": "1", "KD_TRACE_DIR": "/x"})
    proc = run_script(str(probe), env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0


def test_a_timeout_kills_the_forked_run(probe, tmp_path):
    with pytest.raises(subprocess.TimeoutExpired):
        run_script(str(probe), "sleep", str(tmp_path / "s"), timeout=3)


def test_the_longest_tests_head_every_workers_first_share():
    """conftest.deal_slow_first: each of 3 workers' first shares (worksteal's split) starts with its long tests,
    longest first, and no test is lost or repeated."""
    from types import SimpleNamespace
    from conftest import deal_slow_first
    items = [SimpleNamespace(nodeid=f"t{i}") for i in range(20)]
    out = deal_slow_first(items, 3, slow=("t19", "t3", "t12", "t7"))
    assert sorted(it.nodeid for it in out) == sorted(it.nodeid for it in items)
    shares = [out[0:6], out[6:13], out[13:20]]  # 20 // 3, 14 // 2, 7
    assert [s[0].nodeid for s in shares] == ["t19", "t3", "t12"] and shares[0][1].nodeid == "t7"
