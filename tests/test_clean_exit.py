"""How a process that ran in a process group ends (common.cli.run_cli, common.distributed.end_process): exit code 0
after a run, never SIGABRT ("terminate called without an active exception") at interpreter exit, and the same exit
codes as a single process for errors (2), Ctrl-C (130) and other exceptions (1, with the traceback); its output,
atexit functions and non-daemon threads all complete.

The ranks are two plain processes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set here, as torchrun would), so each
one's own exit code is seen. The abort seen in CI needs a gloo worker thread to take the GIL after the interpreter
began finalising; there CPython ends the thread with pthread_exit, and C++ turns that into std::terminate. In CI
that thread was freeing a broadcast's temporaries (tensors Python created), late on a loaded machine: rare. The
program below makes it certain: rank 1's last all_reduce has a Python callback, which gloo's thread runs when the
collective completes, and rank 0 joins that collective late, when rank 1's `main` has returned and its interpreter
is finalising (something left to the finalisation takes a second to free). Before the fix both success tests failed
every time (10 of 10) with exit code -6 on rank 1."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PROGRAM = r'''
import atexit, os, sys, threading, time
sys.path.insert(0, os.environ["KD_ROOT"])
import torch
import torch.distributed as torch_dist
from common.cli import run_cli
from common.distributed import broadcast_object, cleanup_distributed, setup_distributed
from common.errors import UserError

class SlowToFree:
    """Freed by the interpreter's finalisation (a module global, as objects in reference cycles are), slowly."""
    def __del__(self, sleep=time.sleep):
        sleep(1.0)

LEFT_TO_FINALISATION = [SlowToFree()]

def main(argv):
    mode, out = argv[0], argv[1]
    torch.set_num_threads(1)
    dist = setup_distributed("cpu")
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))  # keeps gloo's threads alive
    model(torch.randn(3, 4)).sum().backward()
    atexit.register(lambda: open(f"{out}/atexit.rank{dist.rank}", "w").close())
    def late_writer():
        time.sleep(0.3)
        with open(f"{out}/thread.rank{dist.rank}", "w") as fh:
            fh.write("done")
    threading.Thread(target=late_writer).start()
    if mode == "user_error":
        raise UserError(f"bad input on rank {dist.rank}")
    if mode == "interrupt":
        raise KeyboardInterrupt
    if mode == "crash":
        raise RuntimeError(f"boom on rank {dist.rank}")
    value = broadcast_object({"epoch": 3, "rows": list(range(1000))})
    if dist.rank == 0:
        with open(f"{out}/results.json", "w") as fh:
            fh.write(repr(value["epoch"]))
        time.sleep(0.5)
        torch_dist.all_reduce(torch.ones(1000))
    else:  # a Python callback of the last collective: gloo's thread runs it (with the GIL) once rank 0 has joined
        work = torch_dist.all_reduce(torch.ones(1000), async_op=True)
        work.get_future().then(lambda fut: fut.value())
    if mode == "cleanup":
        cleanup_distributed()  # as train_student.py ends its main
    print(f"rank {dist.rank} finished", end="")  # unflushed: end_process must flush it

run_cli(main)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(tmp_path: Path, mode: str, root: Path = ROOT) -> list[subprocess.CompletedProcess]:
    """Run PROGRAM as rank 0 and rank 1 of a gloo group (code from `root`); both results."""
    program = tmp_path / "program.py"
    program.write_text(PROGRAM)
    out = tmp_path / mode
    out.mkdir(exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update({"KD_ROOT": str(root), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
                "OMP_NUM_THREADS": "1"})
    procs = [subprocess.Popen([sys.executable, str(program), mode, str(out)], cwd=tmp_path, text=True,
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in (0, 1)]
    outputs = [p.communicate(timeout=120) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, *o) for p, o in zip(procs, outputs)]


def check_finished(tmp_path: Path, mode: str, ranks: list[subprocess.CompletedProcess], code: int) -> None:
    out = tmp_path / mode
    for rank, proc in enumerate(ranks):
        assert "terminate called" not in proc.stderr, proc.stderr[-3000:]
        assert proc.returncode == code, f"rank {rank} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        assert (out / f"atexit.rank{rank}").exists() and (out / f"thread.rank{rank}").read_text() == "done"


@pytest.mark.parametrize("mode", ["cleanup", "no_cleanup"])
def test_ranks_exit_0_with_everything_written_however_late_gloo_frees_the_last_collective(tmp_path, mode):
    """`cleanup`: main ends with cleanup_distributed(), as train_student.py does; `no_cleanup`: main just returns,
    as gan_vae's programs do."""
    ranks = two_ranks(tmp_path, mode)
    check_finished(tmp_path, mode, ranks, 0)
    for rank, proc in enumerate(ranks):
        assert proc.stdout.endswith(f"rank {rank} finished"), (rank, proc.stdout[-500:])
    assert (tmp_path / mode / "results.json").read_text() == "3"


def test_errors_in_a_process_group_keep_their_exit_codes(tmp_path):
    ranks = two_ranks(tmp_path, "user_error")
    check_finished(tmp_path, "user_error", ranks, 2)
    for rank, proc in enumerate(ranks):
        assert f"error: bad input on rank {rank}" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr

    ranks = two_ranks(tmp_path, "interrupt")
    check_finished(tmp_path, "interrupt", ranks, 130)
    assert all("interrupted; the last checkpoint is kept" in p.stderr for p in ranks)

    ranks = two_ranks(tmp_path, "crash")
    check_finished(tmp_path, "crash", ranks, 1)
    for rank, proc in enumerate(ranks):  # Python's own report of an uncaught exception
        assert "Traceback (most recent call last)" in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.rstrip().endswith(f"RuntimeError: boom on rank {rank}"), proc.stderr[-3000:]
