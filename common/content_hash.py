"""Content fingerprints of image files: a SHA-256 of each file's bytes, so that a dataset whose image changed but
kept its name and byte size gets new teacher caches and pre-decoded copies (a listing of names and sizes would
not see it).

Hashing reads every byte (measured ~0.8 GB/s on this repository's CPU, so a few seconds per GB once the files are
in the page cache). It happens once per file: the digests are memoised in a small JSON index per dataset folder under
`$XDG_CACHE_HOME/kd-distill/file-hashes/` (default ~/.cache), keyed by the file's (size, mtime_ns, ctime_ns,
inode, device). Any write to a file changes its ctime, which no user tool can set back, so a changed file is
always re-hashed; an unchanged one costs one stat. The index is only a shortcut: deleting it, or a folder where it
cannot be written, costs time, never correctness.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from common.errors import UserError

ANNOUNCE_BYTES = 1 << 30  # say what is happening before hashing this many bytes at once


def index_path(root: Path) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return base / "kd-distill" / "file-hashes" / f"{key}.json"


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def file_digests(root: Path, paths: list[str]) -> list[str]:
    """SHA-256 (hex) of the bytes of each file in `paths` (files under `root`), memoised as the module says."""
    root = Path(root)
    memo_file = index_path(root)
    try:
        memo = json.loads(memo_file.read_text())
        memo = memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        memo = {}
    rel = [os.path.relpath(p, root) for p in paths]
    with _read_errors():
        stats = [_stat_key(os.stat(p)) for p in paths]
    todo = [i for i, (r, s) in enumerate(zip(rel, stats))
            if not (isinstance(memo.get(r), list) and memo[r][:-1] == s and isinstance(memo[r][-1], str))]
    todo_bytes = sum(stats[i][0] for i in todo)
    if todo_bytes >= ANNOUNCE_BYTES and int(os.environ.get("RANK", 0)) == 0:
        print(f"hashing {len(todo)} image files ({todo_bytes / 1e9:.1f} GB) under {root} for the data fingerprint "
              f"of caches; once: the digests are kept in {memo_file}", file=sys.stderr, flush=True)
    with _read_errors():
        for i in todo:
            with open(paths[i], "rb") as fh:
                memo[rel[i]] = [*stats[i], hashlib.file_digest(fh, "sha256").hexdigest()]
    if todo:
        _save(memo_file, {r: memo[r] for r in rel})
    return [memo[r][-1] for r in rel]


@contextmanager
def _read_errors() -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise UserError(f"cannot read image file {exc.filename}: {exc.strerror or exc}. Restore it, or remove it from "
                        "the dataset folder, and run again") from None


def _save(path: Path, memo: dict) -> None:
    """Replace the index atomically (a unique temp file, then rename: concurrent ranks or runs may write it too)."""
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


def folder_fingerprint(root: Path, paths: list[str], salt: str = "") -> str:
    """The content fingerprint of the files `paths` under `root`: their relative paths and byte digests (after
    `salt`, another fingerprint to fold in)."""
    listing = "\n".join([salt, *(f"{os.path.relpath(p, root)}:{d}" for p, d in zip(paths, file_digests(root, paths)))])
    return hashlib.sha256(listing.encode()).hexdigest()[:16]
