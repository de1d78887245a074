"""Content fingerprints of image files: a SHA-256 of each file's bytes, so that a dataset whose image changed but
kept its name and byte size gets new teacher caches and pre-decoded copies (a listing of names and sizes would
not see it).

Hashing reads every byte (measured ~0.8 GB/s on this repository's CPU, so a few seconds per GB once the files are
in the page cache). It happens once per file: the digests are memoised in a small JSON index per dataset folder under
`$XDG_CACHE_HOME/kd-distill/file-hashes/` (default ~/.cache), keyed by the file's (size, mtime_ns, ctime_ns,
inode, device). Any write to a file changes its ctime, which no user tool can set back, so a changed file is
always re-hashed; an unchanged one costs one stat. The index is only a shortcut: deleting it, or a folder where it
cannot be written, costs time, never correctness.

One index serves every caller whose files lie under one folder (the hub cache keeps `*-train.arrow` and
`*-test.arrow` side by side): a save merges this caller's entries into what is there, so two splits never re-hash
each other's files. Pruning keeps the folder small: a save drops the entries of files that no longer exist, and
deletes index files that no run has read for INDEX_MAX_AGE_DAYS (a run that reads an index refreshes its mtime once
a day), so datasets that were deleted or moved leave nothing behind for long.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from common.errors import UserError

ANNOUNCE_BYTES = 1 << 30  # say what is happening before hashing this many bytes at once
INDEX_MAX_AGE_DAYS = 90    # an index no run has read for this long is deleted (see the module docstring)
DAY_S = 86400


def index_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kd-distill" / "file-hashes"


def index_path(root: Path) -> Path:
    key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return index_dir() / f"{key}.json"


def _read_index(memo_file: Path) -> dict:
    """The memo of an index file ({} when it is missing or damaged); refreshes its mtime once a day (pruning)."""
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        return {}
    try:
        if time.time() - memo_file.stat().st_mtime > DAY_S:
            os.utime(memo_file)
    except OSError:
        pass
    return memo if isinstance(memo, dict) else {}


def _current(entry, stat_key: list[int]) -> bool:
    return isinstance(entry, list) and entry[:-1] == stat_key and isinstance(entry[-1], str)


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def file_digests(root: Path, paths: list[str]) -> list[str]:
    """SHA-256 (hex) of the bytes of each file in `paths` (files under `root`), memoised as the module says."""
    root = Path(root)
    memo_file = index_path(root)
    memo = _read_index(memo_file)
    rel = [os.path.relpath(p, root) for p in paths]
    with _read_errors():
        stats = [_stat_key(os.stat(p)) for p in paths]
    todo = [i for i, (r, s) in enumerate(zip(rel, stats)) if not _current(memo.get(r), s)]
    todo_bytes = sum(stats[i][0] for i in todo)
    if todo_bytes >= ANNOUNCE_BYTES and int(os.environ.get("RANK", 0)) == 0:
        print(f"hashing {len(todo)} image files ({todo_bytes / 1e9:.1f} GB) under {root} for the data fingerprint "
              f"of caches; once: the digests are kept in {memo_file}", file=sys.stderr, flush=True)
    with _read_errors():
        for i in todo:
            with open(paths[i], "rb") as fh:
                memo[rel[i]] = [*stats[i], hashlib.file_digest(fh, "sha256").hexdigest()]
    if todo:
        _save(root, memo_file, {r: memo[r] for r in rel})
    return [memo[r][-1] for r in rel]


def changed_since_hashed(root: Path, paths: list[str]) -> list[str]:
    """The files of `paths` whose index entry says they were written since they were last hashed (another size,
    mtime or ctime): the likely culprits when a fingerprint changed. Reads the index only; [] when it has none."""
    memo = _read_index(index_path(root))
    changed = []
    for p in paths:
        entry = memo.get(os.path.relpath(p, root))
        try:
            if isinstance(entry, list) and not _current(entry, _stat_key(os.stat(p))):
                changed.append(p)
        except OSError:
            changed.append(p)
    return changed


@contextmanager
def _read_errors() -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise UserError(f"cannot read image file {exc.filename}: {exc.strerror or exc}. Restore it, or remove it from "
                        "the dataset folder, and run again") from None


def _save(root: Path, path: Path, memo: dict) -> None:
    """Merge `memo` into the index at `path` (re-read now: another split or run may have added entries since),
    dropping entries of files that no longer exist under `root`, and replace it atomically (a unique temp file,
    then rename: concurrent ranks or runs may write it too). Then prune old index files (`prune_indexes`)."""
    others = {r: e for r, e in _read_index(path).items() if r not in memo and os.path.isfile(os.path.join(root, r))}
    memo = {**others, **memo}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(memo, fh, separators=(",", ":"))
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:  # the index is a shortcut only: the digests are correct without it
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"note: cannot keep the file digests in {path} ({exc.strerror or exc}); they are computed again "
                  "on the next start", file=sys.stderr)
    prune_indexes()


def prune_indexes(max_age_days: float = INDEX_MAX_AGE_DAYS) -> list[Path]:
    """Delete the index files (and temp files of writers that died) that no run has read for `max_age_days`;
    returns them. Errors are ignored: the index is a shortcut only."""
    removed = []
    cutoff = time.time() - max_age_days * DAY_S
    try:
        entries = list(index_dir().iterdir())
    except OSError:
        return removed
    for entry in entries:
        try:
            if entry.is_file() and entry.stat().st_mtime < cutoff:
                entry.unlink()
                removed.append(entry)
        except OSError:
            pass
    return removed


def folder_fingerprint(root: Path, paths: list[str], salt: str = "") -> str:
    """The content fingerprint of the files `paths` under `root`: their relative paths and byte digests (after
    `salt`, another fingerprint to fold in)."""
    listing = "\n".join([salt, *(f"{os.path.relpath(p, root)}:{d}" for p, d in zip(paths, file_digests(root, paths)))])
    return hashlib.sha256(listing.encode()).hexdigest()[:16]
