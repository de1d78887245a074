"""Directories that runs build once and then share (the teacher cache, the pre-decoded store): built under an
exclusive lock into a temporary directory beside their final place, published with one atomic rename.

Why each part:
- The lock (`build_lock`, a `filelock.FileLock` on `.<name>.lock`, flock(2) underneath: the kernel drops it when
  its holder dies, even by SIGKILL) makes two runs that need the same directory build it once: the second waits,
  says what it waits for, then reuses the first one's result.
- The temporary directory (`new_build_dir`) and the rename (`publish`) mean that the final path holds a whole,
  finished build or nothing: a builder that is killed, or runs out of disk, leaves only a `.<name>.building-*`
  directory, which no reader opens and the next builder (holding the lock, so no live builder owns it) deletes.
- Space is reserved (`reserve`: posix_fallocate) or checked (`check_free_space`) before a large write whose size
  is known, and an OSError while writing (no space, no permission, a read-only filesystem) becomes a UserError
  naming the folder, its config key and the bytes needed (`write_errors`). A memory map written on a full disk
  would otherwise kill the process with SIGBUS (exit 135) and no message.

Readers need no lock and no write access: a published directory is complete by construction, so a read-only
shared cache works. Writability is probed (`probe_writable`) only once a build is needed.
"""
from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from common.errors import UserError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
BUILD_INFIX = ".building-"  # temporary build directories: .<name>.building-<pid>-<random>
OLD_INFIX = ".replaced-"    # a damaged published directory, moved aside while its replacement is published


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def write_error(exc: OSError, folder: Path, what: str, key: str, need: int | None = None,
                projected: bool = False) -> UserError:
    """The user-facing form of an OSError raised while writing `what` under `folder` (set by config key `key`);
    `need`: the bytes the whole write takes (`projected`: estimated from what was written so far)."""
    folder = Path(folder)
    reason = exc.strerror or str(exc)
    if exc.errno in NO_SPACE:
        free = free_bytes(folder)
        about = "about " if projected else ""
        needs = f"it needs {about}{human_bytes(need)}" if need is not None else "it needs more space"
        has = f", {human_bytes(free)} are free" if free is not None else ""
        return UserError(f"no space to write the {what} in {folder} ({key}): {reason}; {needs}{has}. Free space "
                         f"there, or set {key} to a folder on a disk with room. Nothing partial was kept")
    return UserError(f"cannot write the {what} in {folder} ({key}): {reason}. Set {key} to a folder this user can "
                     "create and write")


@contextmanager
def write_errors(folder: Path, what: str, key: str, need: int | None = None) -> Iterator[None]:
    """Turn an OSError raised inside the block (ENOSPC, EDQUOT, EACCES, EROFS, ...) into `write_error`'s UserError."""
    try:
        yield
    except OSError as exc:
        raise write_error(exc, folder, what, key, need) from None


def probe_writable(folder: Path, key: str, what: str | None = None) -> None:
    """Create `folder` (parents included), then write and remove a file in it: a folder that cannot be created or
    written (no permission, a read-only filesystem, a parent that is a file) is a UserError naming its config key
    (and `what` is written there, as `write_error` says it). Only where something will be written: reading a
    published directory needs no write access."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        test = folder / f".write-test-{os.getpid()}"
        test.write_bytes(b"")
        test.unlink()
    except OSError as exc:
        if what is not None:
            raise write_error(exc, folder, what, key) from None
        raise UserError(f"cannot write to {folder} ({key}): {exc.strerror or exc}. Set {key} to a folder this user "
                        "can create and write") from None


def free_bytes(folder: Path) -> int | None:
    """Bytes free to this user on the filesystem holding `folder` (its nearest existing ancestor), or None."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def check_free_space(folder: Path, need: int, what: str, key: str) -> None:
    """Refuse, before any work, a build of `need` bytes where fewer are free."""
    free = free_bytes(folder)
    if free is not None and free < need:
        raise UserError(f"not enough space for the {what} in {folder} ({key}): it needs {human_bytes(need)}, "
                        f"{human_bytes(free)} are free. Free space there, or set {key} to a folder on a disk with "
                        "room")


def reserve(path: Path, nbytes: int) -> None:
    """Allocate the blocks of file `path` up to `nbytes` now, so that writing it later through a memory map cannot
    hit a full disk (a sparse file's pages would SIGBUS). Filesystems without fallocate (EOPNOTSUPP, EINVAL) keep
    the sparse file; `check_free_space` stands guard there."""
    if nbytes <= 0:
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
    finally:
        os.close(fd)


def lock_path(final: Path) -> Path:
    final = Path(final)
    return final.with_name(f".{final.name}.lock")


@contextmanager
def build_lock(final: Path, what: str, key: str) -> Iterator[None]:
    """Hold the exclusive lock of `final`'s build for the block. When another process holds it, say on stderr what
    this run waits for (so a run that seems to hang says why), then wait for as long as that build takes."""
    from filelock import FileLock, Timeout
    final = Path(final)
    lock = FileLock(lock_path(final))
    with write_errors(final.parent, what, key):
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"waiting for another process to finish building the {what} {final} (it holds "
                  f"{lock_path(final)}); this run reuses it once it is published", file=sys.stderr, flush=True)
            lock.acquire()
    try:
        yield
    finally:
        lock.release()


def new_build_dir(final: Path, what: str, key: str) -> Path:
    """A fresh, empty `.<name>.building-<pid>-<random>` directory beside `final`, after deleting those left by
    builders that died (the caller holds the lock, so no live builder owns one)."""
    final = Path(final)
    with write_errors(final.parent, what, key):
        for stale in final.parent.glob(f".{final.name}{BUILD_INFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in final.parent.glob(f".{final.name}{OLD_INFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        build_dir = Path(tempfile.mkdtemp(prefix=f".{final.name}{BUILD_INFIX}{os.getpid()}-", dir=final.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(build_dir, 0o777 & ~umask)  # mkdtemp's 0700 would hide a shared cache from the other users
        return build_dir


def publish(build_dir: Path, final: Path, what: str, key: str) -> None:
    """Make the finished `build_dir` the directory `final` by one atomic rename. A damaged `final` in the way is
    first renamed aside and then deleted: a reader sees the old directory, none (it then waits for the lock), or
    the new one, never a mix."""
    final = Path(final)
    with write_errors(final.parent, what, key):
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}{OLD_INFIX}", dir=final.parent))
            os.rename(final, old / final.name)
            os.rename(build_dir, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(build_dir, final)


def discard(build_dir: Path | None) -> None:
    """Delete an unfinished build (after an error), so that nothing partial stays on disk."""
    if build_dir is not None:
        shutil.rmtree(build_dir, ignore_errors=True)
