"""The command-line wrapper every script's `main` runs under (`run_cli`): a UserError or a torch.compile failure becomes
`error: <message>` and exit 2, Ctrl-C exit 130, with progress bars closed first. A process that ran in a process
group (torchrun) ends through common.distributed.end_process, with the same exit codes.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from common.distributed import cleanup_distributed, end_process, ran_process_group
from common.errors import UserError, user_error_message


def run_cli(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """Run `main(argv)` as a command-line program: UserError becomes a short message and exit code 2. In a process
    group, every way out (success 0, errors 2, Ctrl-C 130, any other exception 1 after its traceback, as Python
    itself would) goes through end_process; a single process returns or raises as before."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except UserError as exc:
        end_progress_bars()
        print(f"error: {user_error_message(exc)}", file=sys.stderr)
        cleanup_distributed(wait_for_peers=False)
        end_process(2)
    except KeyboardInterrupt:
        end_progress_bars()
        print("interrupted; the last checkpoint is kept and `run.resume=auto` continues from it", file=sys.stderr)
        cleanup_distributed(wait_for_peers=False)
        end_process(130)
    except Exception as exc:  # noqa: BLE001 - only torch.compile's failures are translated; the rest re-raise
        end_progress_bars()  # a traceback, too, starts on its own line
        if not is_compile_failure(exc):
            if not ran_process_group():
                raise
            sys.excepthook(type(exc), exc, exc.__traceback__)  # what Python prints for an uncaught exception
            end_process(1)
        print(f"error: {compile_failure_message(exc)}", file=sys.stderr)
        cleanup_distributed(wait_for_peers=False)
        end_process(2)
    if ran_process_group():
        end_process(0)


def end_progress_bars() -> None:
    """Close every tqdm bar still open (the loop that raised never reached its `close`), leaving each one's last
    state on its own line: a message printed next starts on a fresh line instead of being glued onto the bar's
    (a bar redraws with a carriage return and no newline), and the bar shows where the run stopped."""
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.leave = True
        bar.close()


def is_compile_failure(exc: BaseException) -> bool:
    """Whether an exception comes from torch.compile (dynamo tracing, or the inductor backend compiling the graph:
    a missing or broken C++ / CUDA compiler, an unsupported operation). Only a run with train.compile=true can
    raise one."""
    try:
        from torch._dynamo.exc import TorchDynamoException
    except ImportError:  # a torch without dynamo
        return False
    return isinstance(exc, TorchDynamoException) or type(exc).__name__ in ("CppCompileError", "CUDACompileError")


def compile_failure_message(exc: BaseException) -> str:
    """What failed, in a line, and the way out."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = lines[0][:300] if lines else ""
    return (f"torch.compile failed (train.compile=true): {type(exc).__name__}: {detail}. Nothing of this epoch "
            "was saved; checkpoints of earlier epochs are kept. train.compile=false trains the same model eagerly "
            "(a run stopped here continues with run.resume=auto train.compile=false)")
