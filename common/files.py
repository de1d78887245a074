"""Atomic file writes (temp file + rename; disk errors become UserError) for configs, JSON and checkpoints.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

from omegaconf import DictConfig, OmegaConf

from common.config import to_plain
from common.errors import UserError


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def write_failure(exc: BaseException, path: Path, kept: str) -> UserError | None:
    """The UserError for a write of `path` that the disk refused (full, over quota, read-only, an I/O error), saying
    what was kept (`kept`); None when `exc` is no such failure. torch.save's zip writer may report a full disk as a
    RuntimeError of its own ("unexpected pos", "file write failed"), with the OSError only in its context, or not at
    all: then a disk with no free space left is taken to be the cause."""
    path = Path(path)
    chain = list(_exception_chain(exc))
    os_error = next((e for e in chain if isinstance(e, OSError) and e.errno), None)
    code = os_error.errno if os_error is not None else None
    if code is None and any(isinstance(e, RuntimeError) and "inline_container" in str(e) for e in chain):
        try:
            code = errno.ENOSPC if shutil.disk_usage(path.parent).free == 0 else None
        except OSError:
            code = None
    if code is None:
        return None
    if code in DISK_FULL_ERRNOS:
        what = f"the disk is full ({os.strerror(code)}) at {path.parent}"
        fix = "Free some space there (or move run.out_dir to another disk)"
    else:
        what = f"{os.strerror(code)}"
        fix = "Make that folder writable"
    return UserError(f"cannot write {path}: {what}. {kept}. {fix}, then continue the run with run.resume=auto")


@contextmanager
def atomic_write(path: Path, mode: str = "w") -> Iterator[IO]:
    """Open a temp file beside `path` for writing (mode "w" or "wb"); on a clean exit flush, fsync and rename it
    over `path`, so a reader or a crash mid-write finds the old file or the new one, never half of one (os.replace
    is atomic on POSIX). The temp file's name is unique (`.<name>.<random>.tmp`), so two processes writing the same
    file never write into one temp file: the last rename wins, whole. On an error the temp file is removed and
    `path` is left as it was; a write the disk refused (full, over quota, read-only) becomes a UserError saying so.
    The one atomic writer: checkpoints, JSON, configs, metrics and exported weights all go through it."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = open_temp(path)
        with os.fdopen(fd, mode) as fh:  # owns fd from here
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except Exception as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        kept = (f"Nothing was replaced: the earlier {path.name} is kept" if path.exists() else
                f"Nothing was written (there was no earlier {path.name})")
        failure = write_failure(exc, path, kept)
        if failure is not None:
            raise failure from None
        raise
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


def open_temp(path: Path) -> tuple[int, Path]:
    """A new file `.<name>.<random>.tmp` beside `path`, opened for writing: (fd, its path). Created with O_EXCL and
    mode 0666 less the umask, the mode open() gives `path` itself (mkstemp's 0600 would hide a shared run's files
    from the other users)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path))


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_write(path) as fh:
        fh.write(text)


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    """The resolved config, re-runnable with --config (run.resume is cleared so a re-run starts afresh)."""
    plain = to_plain(cfg)
    if isinstance(plain.get("run"), dict) and "resume" in plain["run"]:
        plain["run"]["resume"] = ""
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(plain)))


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")

