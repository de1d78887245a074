"""A fork server for the tests' script runs: the interpreter start-up and the third-party imports (torch,
torchvision, timm, datasets, matplotlib, ...) are paid once per test worker, not once per script run.

Every end-to-end test starts the scripts as a user does, a new process per command (conftest.run_script,
run_and_sigkill). Each such process spends about 4 s of CPU importing libraries before the script does anything;
over the suite's few hundred runs that was a third of its CPU time. Here one server per test worker imports
those libraries (never a module of this repository), then forks a child per run:

- the child is a real process with its own pid (a test may SIGKILL it), its own file descriptors (stdout and stderr
  go where the test asked), its own working directory, environment and sys.argv;
- it runs the script from its file (`runpy.run_path` as __main__, or `runpy.run_module` for `-m`), importing this
  repository's code afresh, and exits as the interpreter would (atexit handlers, exit code, a traceback and 1 for an
  uncaught exception);
- what a fresh interpreter would start differently is reset: Python's and NumPy's global random state are
  reseeded from the OS, torch's default generator is put back to its start-up seed, the thread count follows
  OMP_NUM_THREADS, signal dispositions are the defaults.

What cannot be reset falls back to a fresh process (conftest decides, `eligible`): an environment that differs from
the server's in a variable read when a library is imported (HF_*, ATEN_CPU_CAPABILITY, PYTHONPATH, ...), a launcher
such as torchrun; a test that starts several runs with such a variable may open a server of its own started with
their environment (conftest.fork_server_with), which forks them. The hash seed of str is the server's for all its
children (PYTHONHASHSEED cannot change in a running interpreter); KD_TEST_FRESH_PROCESSES=1 turns the servers off
and runs every script in a fresh interpreter.

Protocol (AF_UNIX stream): the client sends one JSON line {"argv", "cwd", "env"} with three file descriptors
(stdin, stdout, stderr) attached; the server forks a monitor, which forks the child, sends "pid N\\n", waits for
the child and sends "exit CODE\\n" (CODE < 0: killed by that signal, as subprocess reports it)."""
from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import sys

# Imported once by the server. Only third-party libraries: the repository's own modules are imported by each child.
PRELOAD = ("numpy", "PIL.Image", "yaml", "omegaconf", "tqdm", "filelock", "safetensors.torch", "torch",
           "torchvision", "torchvision.transforms.v2", "timm", "datasets", "scipy.stats", "matplotlib",
           "gymnasium", "stable_baselines3", "torch.utils.tensorboard")
# Environment variables a child may have other than the server's: read when used, not when a library is imported.
SAFE_ENV = ("PYTHONUNBUFFERED", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "KD_TRACE_DIR", "PYTEST_CURRENT_TEST",
            "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def eligible(server_env: dict, env: dict) -> bool:
    """Whether a run with environment `env` can be forked from a server started with `server_env`."""
    keys = set(server_env) | set(env)
    return all(server_env.get(k) == env.get(k) for k in keys if k not in SAFE_ENV)


# ---- server ------------------------------------------------------------------------------------------------------
def serve(path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # what the repository's plotting selects; no GUI backend probe per child
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the monitors are reaped by the kernel
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path + ".tmp")
    server.listen(64)
    os.rename(path + ".tmp", path)  # the client waits for this name: the server is ready
    while True:
        conn, _ = server.accept()
        message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        if os.fork() == 0:  # the monitor
            server.close()
            _monitor(conn, json.loads(message.decode()), fds)
        conn.close()
        for fd in fds:
            os.close(fd)


def _monitor(conn: socket.socket, request: dict, fds: list[int]) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        _child(conn, request, fds)  # does not return
    for fd in fds:
        os.close(fd)
    conn.sendall(f"pid {pid}\n".encode())
    _, status = os.waitpid(pid, 0)
    try:
        conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
    except OSError:  # the client has gone
        pass
    os._exit(0)


def _child(conn: socket.socket, request: dict, fds: list[int]) -> None:
    import io
    import random
    import runpy

    import numpy as np
    import torch
    conn.close()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    encoding = sys.stdout.encoding if sys.stdout is not None else "utf-8"

    def text(fd: int, errors: str, line_buffering: bool):
        raw = io.FileIO(fd, "w", closefd=False)
        return io.TextIOWrapper(raw if unbuffered else io.BufferedWriter(raw), encoding=encoding, errors=errors,
                                line_buffering=line_buffering, write_through=unbuffered)
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding=encoding)
    sys.stdout = sys.__stdout__ = text(1, "strict", False)
    sys.stderr = sys.__stderr__ = text(2, "backslashreplace", True)
    # what a fresh interpreter starts with
    random.seed()
    np.random.seed()
    torch.seed()  # a fresh interpreter seeds torch's default generator non-deterministically too
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var, "").isdigit():
            torch.set_num_threads(int(os.environ[var]))
            break
    argv = request["argv"]
    code = 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:  # as the interpreter reports it: None 0, an int itself, anything else printed and 1
        code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    _exit(code)


def _exit(code: int) -> None:
    """What the interpreter does at exit that a script can see (wait for its non-daemon threads, run its atexit
    handlers, flush stdout and stderr), then the exit itself, without tearing down every preloaded module (which
    would take seconds of nothing)."""
    import atexit
    import threading
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code & 0xFF)


if __name__ == "__main__":
    serve(sys.argv[1])


# ---- client ------------------------------------------------------------------------------------------------------
class ForkServer:
    """The client side: one server process, started on first use with this process's environment (or `env`)."""

    def __init__(self, python: str, env: dict | None = None):
        import subprocess
        import tempfile
        import time
        self.env = dict(os.environ if env is None else env)
        self.dir = tempfile.mkdtemp(prefix="kd-forkserver-")
        self.path = os.path.join(self.dir, "socket")
        self.proc = subprocess.Popen([python, os.path.abspath(__file__), self.path], env=self.env,
                                     stdin=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not os.path.exists(self.path):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the test fork server did not start (exit {self.proc.poll()})")
            time.sleep(0.05)

    def spawn(self, argv: list[str], cwd: str, env: dict, stdin: int, stdout: int, stderr: int) -> "Forked":
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.path)
        socket.send_fds(conn, [json.dumps({"argv": argv, "cwd": str(cwd), "env": env}).encode()],
                        [stdin, stdout, stderr])
        return Forked(conn)

    def close(self) -> None:
        import shutil
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Forked:
    """A forked run, as much of subprocess.Popen as the tests use: pid, poll, wait, send_signal, returncode."""

    def __init__(self, conn: socket.socket):
        self.conn, self.buffer, self.returncode = conn, b"", None
        self.pid = int(self._line(None).split()[1])

    def _line(self, timeout: float | None) -> str | None:
        while b"\n" not in self.buffer:
            self.conn.settimeout(timeout)
            try:
                data = self.conn.recv(4096)
            except (socket.timeout, BlockingIOError):
                return None
            if not data:
                raise RuntimeError("the test fork server's monitor went away")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def poll(self) -> int | None:
        if self.returncode is None:
            line = self._line(0.0)
            if line is not None:
                self.returncode = int(line.split()[1])
                self.conn.close()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            line = self._line(timeout)
            if line is None:
                import subprocess
                raise subprocess.TimeoutExpired(f"forked pid {self.pid}", timeout)
            self.returncode = int(line.split()[1])
            self.conn.close()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
