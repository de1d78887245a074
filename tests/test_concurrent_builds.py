"""The teacher cache and the pre-decoded store are built once, whole, and never read in part: two processes
building the same one at once (the second waits, then reuses the first's), a builder killed mid-way, a full disk,
a folder that cannot be written, damaged files, and an image changed in place (same name, same byte size)."""
import contextlib
import errno
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common import locked_build
from common.config import load_config
from common.distributed import DistInfo
from common.errors import UserError
from engine import teacher_cache
from engine.schema import Config
from engine.teacher_cache import build_or_load_cache
from imagedata import predecode
from imagedata.augment import AugSpec
from imagedata.image_sources import ImageSource, load_local, load_splits
from imagedata.label_alignment import mini_imagenet_synsets
from imagedata.predecode import predecode_split
from models import create_teacher

ARGS = ["data.name=synthetic", "data.synthetic.num_classes=4", "data.synthetic.images_per_class=6",
        "data.synthetic.image_size=32", "data.image_size=32", "teacher.name=resnet10t", "teacher.pretrained=false"]
FORK = multiprocessing.get_context("fork")  # the children inherit the teacher and data: no second start-up


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(Config, None, ARGS)
    torch.manual_seed(0)
    splits = load_splits(cfg.data)
    return splits, create_teacher(cfg, splits["train"].class_names), AugSpec.from_cfg(cfg.data)


def _cache(setup, cache_dir, splits=None):
    default_splits, teacher, spec = setup
    return build_or_load_cache(teacher, splits or default_splits, spec, 3, 0, cache_dir, DistInfo(), batch_size=8,
                               workers=0, autocast=contextlib.nullcontext)


def _unscored_rows(cache) -> dict[str, int]:
    """Rows whose teacher logits are all zero (never written), per split and field."""
    out = {}
    for split in ("train", "validation", "test"):
        arr = np.asarray(cache.array(split))
        out[split] = int((np.abs(arr["eval_logits"].astype(np.float32)).sum(1) == 0).sum())
        if split == "train":
            out["train_views"] = int((np.abs(arr["view_logits"].astype(np.float32)).sum((1, 2)) == 0).sum())
    return out


def _cache_child(setup, cache_dir, result, delay):
    """A builder in its own process, slowed down per batch so that two builds overlap."""
    real = teacher_cache.batch_views
    teacher_cache.batch_views = lambda *a, **k: (time.sleep(delay), real(*a, **k))[1]
    torch.set_num_threads(1)
    cache, info = _cache(setup, cache_dir)
    arrays = {s: np.asarray(cache.array(s)).tobytes().hex() for s in ("train", "validation", "test")}
    rows = {s: len(cache.array(s)) for s in ("train", "validation", "test")}
    Path(result).write_text(json.dumps({**info, "rows": rows, "unscored": _unscored_rows(cache), "arrays": arrays}))


def _started(folder: Path, timeout: float = 60) -> None:
    """Wait until a build has left its first trace in `folder` (a lock, a build directory or, before the lock,
    the cache directory itself)."""
    deadline = time.time() + timeout
    while time.time() < deadline and not (folder.exists() and any(folder.iterdir())):
        time.sleep(0.01)
    time.sleep(0.2)


def _race(target, folder: Path, tmp_path: Path, kill_second_after_first: bool = False):
    """Start builder A, then builder B once A has started; wait for both (or, with `kill_second_after_first`,
    SIGKILL B as soon as A has finished). Returns their exit codes and result files."""
    results = [tmp_path / "a.json", tmp_path / "b.json"]
    a = FORK.Process(target=target, args=(results[0],))
    a.start()
    _started(folder)
    b = FORK.Process(target=target, args=(results[1],))
    b.start()
    a.join(120)
    if kill_second_after_first and b.is_alive():
        os.kill(b.pid, signal.SIGKILL)
    b.join(120)
    return [a.exitcode, b.exitcode], results


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _no_leftovers(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if locked_build.BUILD_INFIX in p.name or
                locked_build.OLD_INFIX in p.name]


# ----------------------------------------------------------------------------------------------------------------
# Teacher cache
# ----------------------------------------------------------------------------------------------------------------
def test_two_processes_build_one_teacher_cache(setup, tmp_path, capfd):
    """Both finish (exit 0) with the same, fully scored arrays: the second waited for the first and reused them."""
    cache_dir = tmp_path / "cache"
    codes, results = _race(lambda r: _cache_child(setup, cache_dir, r, 0.1), cache_dir, tmp_path)
    a, b = (json.loads(r.read_text()) if r.exists() else {} for r in results)
    with capfd.disabled():  # the numbers, for the record (pytest -s)
        print(f"concurrent teacher-cache builders: exit codes {codes}, built {a.get('built')} / {b.get('built')}, "
              f"rows {a.get('rows')}, unscored rows {a.get('unscored')} / {b.get('unscored')}, arrays equal: "
              f"{a.get('arrays') == b.get('arrays')}")
    assert codes == [0, 0]
    _no_leftovers(cache_dir)
    assert a["unscored"] == b["unscored"] == {"train": 0, "train_views": 0, "validation": 0, "test": 0}
    assert a["arrays"] == b["arrays"] and a["path"] == b["path"]
    assert [a["built"], b["built"]] == [True, False]
    assert Path(a["path"]).stat().st_mode & 0o777 == 0o777 & ~_umask()  # readable by others, as mkdir would make it
    assert "waiting for another process to finish building the teacher cache" in capfd.readouterr().err


def test_builder_killed_mid_build_leaves_nothing_a_later_run_reads(setup, tmp_path):
    """B is killed while A builds or waits: A's published cache is whole, and a later run reuses exactly it. And a
    lone builder killed mid-way publishes nothing; the next run rebuilds it whole and deletes the leftovers."""
    cache_dir = tmp_path / "cache"
    codes, results = _race(lambda r: _cache_child(setup, cache_dir, r, 0.1), cache_dir, tmp_path,
                           kill_second_after_first=True)
    assert codes[0] == 0, codes
    a = json.loads(results[0].read_text())
    later, info = _cache(setup, cache_dir)
    print(f"builder B killed: later run built={info['built']}, unscored rows {_unscored_rows(later)}")
    assert not info["built"] and _unscored_rows(later) == a["unscored"] == {"train": 0, "train_views": 0,
                                                                             "validation": 0, "test": 0}
    assert {s: np.asarray(later.array(s)).tobytes().hex() for s in ("train", "validation", "test")} == a["arrays"]

    lone = tmp_path / "lone"
    proc = FORK.Process(target=_cache_child, args=(setup, lone, tmp_path / "lone.json", 0.2))
    proc.start()
    _started(lone)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert not [p for p in lone.iterdir() if not p.name.startswith(".")]  # nothing published
    cache, info = _cache(setup, lone)
    assert info["built"] and _unscored_rows(cache) == a["unscored"]
    _no_leftovers(lone)


def test_full_disk_before_the_teacher_cache_build_is_a_clean_error(setup, tmp_path, monkeypatch):
    """Too little free space for the (exactly known) cache size: refused before any scoring, saying how much is
    needed; the space of every array is reserved (posix_fallocate), so a disk that fills up anyway fails at the
    reservation with a message instead of a SIGBUS in the memory map. Nothing partial is left either way."""
    free = type("Usage", (), {"free": 500})()
    monkeypatch.setattr(locked_build.shutil, "disk_usage", lambda path: free)
    with pytest.raises(UserError, match=r"not enough space for the teacher cache .* \(teacher.cache_dir\): it needs "
                                        r"\d+\.\d KB, 500 B are free"):
        _cache(setup, tmp_path)
    monkeypatch.undo()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(locked_build.os, "posix_fallocate", full)
    with pytest.raises(UserError, match=r"no space to write the teacher cache .*\(teacher.cache_dir\).* it needs "):
        _cache(setup, tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_teacher_cache_dir_that_cannot_be_written_is_a_clean_error(setup, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me\n")
    with pytest.raises(UserError, match=r"cannot write the teacher cache in .* \(teacher.cache_dir\): .*Set "
                                        r"teacher.cache_dir to a folder"):
        _cache(setup, blocker / "cache")
    assert blocker.read_text() == "keep me\n"


def test_teacher_cache_files_of_the_wrong_kind_are_rebuilt(setup, tmp_path):
    few = load_splits(load_config(Config, None, [*ARGS, "data.synthetic.images_per_class=1",
                                                 "data.synthetic.eval_images_per_class=1"]).data)
    cache, _ = _cache(setup, tmp_path, few)
    (cache.root / "meta.json").write_text("[1, 2]\n")  # valid JSON, not a dict
    again, info = _cache(setup, tmp_path, few)
    assert info["built"] and _unscored_rows(again)["train"] == 0
    np.save(cache.root / "test.npy", np.zeros(3))  # a whole .npy file, of another dtype and shape
    _, info = _cache(setup, tmp_path, few)
    assert info["built"]


# ----------------------------------------------------------------------------------------------------------------
# Pre-decoded store
# ----------------------------------------------------------------------------------------------------------------
class MemorySource(ImageSource):
    """`n` small images made on the fly (each a different size), optionally slowed down per image."""

    def __init__(self, n: int = 12, delay: float = 0.0):
        self.labels, self.class_names, self.fingerprint = np.zeros(n, dtype=np.int64), ["a"], f"memory-{n}"
        self.delay = delay

    def load(self, index: int) -> Image.Image:
        time.sleep(self.delay)
        rng = np.random.default_rng(index)
        return Image.fromarray(rng.integers(0, 256, (8 + index % 5, 9 + index % 3, 3), dtype=np.uint8))

    def describe(self, index: int) -> str:
        return f"memory image {index}"


def _store_child(store_dir, result, delay, n=12):
    pre = predecode_split(MemorySource(n, delay), 0, store_dir, "train", show_progress=False)
    equal = [bool(np.array_equal(pre.array(i), np.asarray(MemorySource(n).load(i)))) for i in range(n)]
    Path(result).write_text(json.dumps({"folder": str(pre.folder), "equal": equal,
                                        "pixels": (pre.folder / "pixels.u8").read_bytes().hex()}))


def test_two_processes_build_one_predecoded_store(tmp_path, capfd):
    store = tmp_path / "pre"
    codes, results = _race(lambda r: _store_child(store, r, 0.1), store, tmp_path)
    a, b = (json.loads(r.read_text()) if r.exists() else {} for r in results)
    with capfd.disabled():
        equal = [f"{sum(r['equal'])}/{len(r['equal'])}" if r else "-" for r in (a, b)]
        print(f"concurrent pre-decoders: exit codes {codes}, images equal to the source {equal[0]} and {equal[1]}, "
              f"stores equal: {a.get('pixels') == b.get('pixels')}")
    assert codes == [0, 0]
    _no_leftovers(store)
    assert all(a["equal"]) and all(b["equal"]) and a["pixels"] == b["pixels"] and a["folder"] == b["folder"]
    assert Path(a["folder"]).stat().st_mode & 0o777 == 0o777 & ~_umask()
    assert "waiting for another process to finish building the pre-decoded store" in capfd.readouterr().err


def test_predecoder_killed_mid_build_leaves_nothing_a_later_run_reads(tmp_path):
    store = tmp_path / "pre"
    codes, results = _race(lambda r: _store_child(store, r, 0.1), store, tmp_path, kill_second_after_first=True)
    assert codes[0] == 0, codes
    later = predecode_split(MemorySource(), 0, store, "train", show_progress=False)
    assert all(np.array_equal(later.array(i), np.asarray(MemorySource().load(i))) for i in range(12))

    lone = tmp_path / "lone"
    proc = FORK.Process(target=_store_child, args=(lone, tmp_path / "lone.json", 0.3))
    proc.start()
    _started(lone)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert not [p for p in lone.iterdir() if not p.name.startswith(".")]  # nothing published
    rebuilt = predecode_split(MemorySource(), 0, lone, "train", show_progress=False)
    assert all(np.array_equal(rebuilt.array(i), np.asarray(MemorySource().load(i))) for i in range(12))
    _no_leftovers(lone)


def test_full_disk_while_predecoding_is_a_clean_error(tmp_path, monkeypatch):
    """The store's size is known only as images are decoded: running out of space mid-way (ENOSPC on a write) is a
    UserError with the projected need, and a projection that clearly exceeds the free space stops the build
    early; the build folder is deleted either way."""
    class FullDisk:
        def __init__(self, path, mode):
            self.fh, self.written = open(path, mode), 0

        def write(self, data):
            if self.written:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return self.fh.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(predecode, "open", FullDisk, raising=False)
    with pytest.raises(UserError, match=r"no space to write the pre-decoded store in .* \(data.preprocess_dir\): "
                                        r"No space left on device; it needs about \d+\.\d KB, .* free"):
        predecode_split(MemorySource(), 0, tmp_path, "train", show_progress=False)
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    _no_leftovers(tmp_path)
    monkeypatch.undo()

    monkeypatch.setattr(predecode, "free_bytes", lambda path: 100)
    with pytest.raises(UserError, match=r"projected from the first 64 of 70 images it needs about"):
        predecode_split(MemorySource(70), 0, tmp_path, "train", show_progress=False)
    _no_leftovers(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_preprocess_dir_that_cannot_be_written_is_a_clean_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me\n")
    with pytest.raises(UserError, match=r"cannot write the pre-decoded store in .* \(data.preprocess_dir\)"):
        predecode_split(MemorySource(), 0, blocker / "pre", "train", show_progress=False)


def test_predecoded_files_of_the_wrong_kind_are_rebuilt(tmp_path):
    pre = predecode_split(MemorySource(), 0, tmp_path, "train", show_progress=False)
    built = json.loads((pre.folder / "meta.json").read_text())["build_s"]
    rows = np.load(pre.folder / "index.npy")
    rows[[0, 1]] = rows[[1, 0]]  # same size and last row, but the rows no longer tile pixels.u8
    np.save(pre.folder / "index.npy", rows)
    again = predecode_split(MemorySource(), 0, tmp_path, "train", show_progress=False)
    assert json.loads((again.folder / "meta.json").read_text())["build_s"] != built
    assert all(np.array_equal(again.array(i), np.asarray(MemorySource().load(i))) for i in range(12))
    (pre.folder / "meta.json").write_text('"done"\n')  # valid JSON, not a dict
    predecode_split(MemorySource(), 0, tmp_path, "train", show_progress=False)
    assert isinstance(json.loads((pre.folder / "meta.json").read_text()), dict)


# ----------------------------------------------------------------------------------------------------------------
# A folder dataset's fingerprint is of its content
# ----------------------------------------------------------------------------------------------------------------
def test_image_changed_in_place_gets_new_caches(setup, tmp_path, monkeypatch):
    """An image rewritten with other pixels but the same name, byte size and even mtime (cp -p, rsync -t) changes
    the folder's fingerprint, so the teacher cache and the pre-decoded copy are rebuilt, not reused."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the digest index, kept out of the user's home
    rng = np.random.default_rng(0)
    for split in ("train", "validation", "test"):
        for i in range(4):
            folder = tmp_path / "tree" / split / mini_imagenet_synsets()[i]  # the teacher's 4 classes
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / "img.bmp")
    sources = load_local(tmp_path / "tree")
    cache, info = _cache(setup, tmp_path / "cache", sources)
    pre = predecode_split(sources["train"], 0, tmp_path / "pre", "train", show_progress=False)
    assert info["built"] and not _cache(setup, tmp_path / "cache", load_local(tmp_path / "tree"))[1]["built"]

    changed = tmp_path / "tree" / "train" / mini_imagenet_synsets()[2] / "img.bmp"
    before = changed.stat()
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(changed)
    os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert changed.stat().st_size == before.st_size and changed.stat().st_mtime_ns == before.st_mtime_ns

    sources = load_local(tmp_path / "tree")
    again, info = _cache(setup, tmp_path / "cache", sources)
    assert info["built"] and again.root != cache.root
    pre_again = predecode_split(sources["train"], 0, tmp_path / "pre", "train", show_progress=False)
    assert pre_again.folder != pre.folder and not pre_again.array(sources["train"].paths.index(str(changed))).any()


def test_save_to_disk_dataset_changed_under_the_same_datasets_fingerprint_gets_a_new_one(tmp_path, monkeypatch):
    """`datasets`' own fingerprint of a dataset read from arrow files says how it was made, not what it holds
    (load_dataset("imagefolder") keeps it when an image changes in place with its size and mtime): the arrow
    files' bytes are hashed in, so other pixels under the same `_fingerprint` get another fingerprint."""
    from imagedata.synthetic_data import make_synthetic_dataset
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert load_splits(load_config(Config, None, ARGS).data)["train"].data_files == []  # in memory: datasets' own
    fingerprints, hf_fingerprints = [], []
    for seed in (0, 1):
        path = tmp_path / f"ds{seed}"
        make_synthetic_dataset(num_classes=2, images_per_class=3, image_size=16, seed=seed).save_to_disk(path)
        state = path / "train" / "state.json"
        state.write_text(json.dumps({**json.loads(state.read_text()), "_fingerprint": "same-recipe"}))
        train = load_local(path)["train"]
        assert train.data_files
        fingerprints.append(train.fingerprint)
        hf_fingerprints.append(train.hf_fingerprint)
    assert hf_fingerprints[0] == hf_fingerprints[1] and fingerprints[0] != fingerprints[1]
    assert load_local(tmp_path / "ds0")["train"].fingerprint == fingerprints[0]  # and stable


# ----------------------------------------------------------------------------------------------------------------
# The file-digest index (common.content_hash)
# ----------------------------------------------------------------------------------------------------------------
def _count_hashing(monkeypatch) -> list[str]:
    """The files common.content_hash hashes from now on (a list that grows)."""
    import hashlib

    from common import content_hash
    hashed, file_digest = [], hashlib.file_digest

    def counting(fh, digest):
        hashed.append(Path(fh.name).name)
        return file_digest(fh, digest)

    monkeypatch.setattr(content_hash.hashlib, "file_digest", counting)
    return hashed


def test_two_splits_in_one_folder_keep_each_others_digests(tmp_path, monkeypatch):
    """Issue 23: the index of a folder kept only the last caller's files, so two splits whose files share a folder
    (the hub cache's *-train.arrow and *-test.arrow) re-hashed each other's files on every start."""
    from common.content_hash import file_digests, index_path
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for name in ("a-train.arrow", "a-test.arrow"):
        (tmp_path / name).write_bytes(name.encode() * 100)
    train, test = [str(tmp_path / "a-train.arrow")], [str(tmp_path / "a-test.arrow")]
    hashed = _count_hashing(monkeypatch)
    first = file_digests(tmp_path, train), file_digests(tmp_path, test)
    assert hashed == ["a-train.arrow", "a-test.arrow"]
    for _ in range(2):  # the next starts: one stat per file, no hashing
        assert (file_digests(tmp_path, train), file_digests(tmp_path, test)) == first
    assert hashed == ["a-train.arrow", "a-test.arrow"]
    assert set(json.loads(index_path(tmp_path).read_text())) == {"a-train.arrow", "a-test.arrow"}


def test_the_digest_index_is_pruned(tmp_path, monkeypatch):
    """Nothing pruned ~/.cache/kd-distill/file-hashes: entries of deleted files stayed, and so did the index of
    every dataset folder ever read. A save drops entries of files that are gone; an index no run read for
    INDEX_MAX_AGE_DAYS is deleted."""
    from common import content_hash
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    data = tmp_path / "data"
    data.mkdir()
    for name in ("x.png", "y.png", "z.png"):
        (data / name).write_bytes(name.encode())
    content_hash.file_digests(data, [str(data / "x.png"), str(data / "y.png")])
    (data / "y.png").unlink()
    content_hash.file_digests(data, [str(data / "z.png")])
    assert set(json.loads(content_hash.index_path(data).read_text())) == {"x.png", "z.png"}

    stale = content_hash.index_dir() / "0123456789abcdef.json"  # a dataset folder not read for a long time
    stale.write_text("{}")
    old = time.time() - (content_hash.INDEX_MAX_AGE_DAYS + 1) * content_hash.DAY_S
    os.utime(stale, (old, old))
    recent = content_hash.index_path(data)
    os.utime(recent, (old, old))
    content_hash.file_digests(data, [str(data / "x.png")])  # a read refreshes this index; no save needed
    assert recent.stat().st_mtime > old
    (data / "w.png").write_bytes(b"w")
    content_hash.file_digests(data, [str(data / "w.png")])  # a save prunes
    assert not stale.exists() and recent.exists()


def test_the_test_session_keeps_the_digest_index_out_of_the_users_home():
    """The suite wrote digest index files into the real ~/.cache/kd-distill: conftest gives the session (and the
    scripts it starts) a HOME and XDG_CACHE_HOME of its own."""
    import pwd
    import subprocess
    import sys

    from common.content_hash import index_dir
    home = Path(pwd.getpwuid(os.getuid()).pw_dir).resolve()
    assert not index_dir().resolve().is_relative_to(home), index_dir()
    child = subprocess.run([sys.executable, "-c", "from common.content_hash import index_dir; print(index_dir())"],
                           cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=True)
    assert Path(child.stdout.strip()) == index_dir()


# ----------------------------------------------------------------------------------------------------------------
# Publication
# ----------------------------------------------------------------------------------------------------------------
def test_publishing_over_a_damaged_directory_that_cannot_be_fully_deleted(tmp_path, monkeypatch):
    """A damaged published directory is renamed aside, then deleted: deleting it in place first (rmtree, then
    rename) showed readers a half-deleted directory, and where a file in it could not be deleted (a busy NFS
    file, a reader holding it open) left the half-deleted one published and the new build unpublished."""
    final = tmp_path / "cache" / "abc"
    final.mkdir(parents=True)
    for name in ("meta.json", "train.npy", "test.npy"):
        (final / name).write_text("old")
    build = locked_build.new_build_dir(final, "teacher cache", "teacher.cache_dir")
    for name in ("meta.json", "train.npy", "test.npy"):
        (build / name).write_text("new")
    rmtree = locked_build.shutil.rmtree

    def busy_rmtree(path, ignore_errors=False, **kwargs):  # deletes one file, then hits one it cannot delete
        victim = sorted(Path(path).rglob("*.json"))
        if victim:
            victim[0].unlink()
        if not ignore_errors:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(path))

    monkeypatch.setattr(locked_build.shutil, "rmtree", busy_rmtree)
    locked_build.publish(build, final, "teacher cache", "teacher.cache_dir")
    monkeypatch.setattr(locked_build.shutil, "rmtree", rmtree)
    assert {p.name: p.read_text() for p in final.iterdir()} == {n: "new" for n in ("meta.json", "train.npy",
                                                                                    "test.npy")}
    assert not build.exists()
    locked_build.new_build_dir(final, "teacher cache", "teacher.cache_dir")  # the next builder deletes the rest
    assert not [p for p in final.parent.iterdir() if locked_build.OLD_INFIX in p.name]
