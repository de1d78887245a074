"""Pre-decoded splits (data.preprocessed=true): every image decoded once into one uint8 memory map per split.

`predecode_splits` builds what is missing on the main rank (under a lock, into a temporary folder published by one
rename: `locked_build`) and opens it everywhere; `PredecodedSource` serves the
stored images as PIL images (the loader's augmentation) or uint8 tensors (augmentation on the device).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import stat
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from common.distributed import on_main_rank
from common.errors import UserError
from common.files import write_json
from common.locked_build import (build_lock, discard, free_bytes, human_bytes, new_build_dir, probe_writable, publish,
                                 write_error)
from imagedata.image_sources import ImageSource

PREDECODE_VERSION = "predecoded-v2"  # v2: images decoded by image_sources.to_rgb (16-bit scaled, alpha over white)


def predecoded_fingerprint(source: ImageSource, size: int) -> str:
    """The data fingerprint of a pre-decoded copy. Stored as decoded (size 0) it holds the very pixels the JPEG
    path decodes, so it keeps the source's fingerprint and shares its teacher cache; a downscaled copy does not."""
    return source.fingerprint if size == 0 else f"{source.fingerprint}:predecoded{size}"


def predecoded_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) stored for an image. `size` 0: as decoded. Otherwise short side `size` (aspect kept, as
    torchvision's Resize(size) rounds), or the image as it is when its short side is already <= size (never
    upscaled)."""
    short, long_ = min(width, height), max(width, height)
    if size == 0 or short <= size:
        return width, height
    new_long = int(size * long_ / short)
    return (size, new_long) if width <= height else (new_long, size)


class PredecodedSource(ImageSource):
    """A split whose images were decoded (and, with a size, resized) once (`predecode_split`): rows of `pixels.u8`
    (uint8 HWC, back to back) addressed by `index.npy` ([N, 3] int64: byte offset, height, width). Opening is lazy,
    so the memory map is opened once per DataLoader worker rather than pickled."""

    def __init__(self, base: ImageSource, folder: Path, fingerprint: str):
        self.labels, self.class_names, self.difficulty = base.labels, base.class_names, base.difficulty
        self.base, self.folder, self.fingerprint = base, Path(folder), fingerprint
        self.rows = np.load(self.folder / "index.npy")
        self._pixels = None

    def __getstate__(self):
        return {**self.__dict__, "_pixels": None}

    def array(self, index: int) -> np.ndarray:
        """uint8 [H, W, 3] (a view into the memory map)."""
        if self._pixels is None:
            self._pixels = np.memmap(self.folder / "pixels.u8", dtype=np.uint8, mode="r")
        offset, h, w = (int(v) for v in self.rows[int(index)])
        return self._pixels[offset:offset + h * w * 3].reshape(h, w, 3)

    def tensor(self, index: int) -> torch.Tensor:
        """uint8 [3, H, W], a copy (safe to send to a device or across processes)."""
        return torch.from_numpy(np.array(self.array(index))).permute(2, 0, 1)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.array(index))

    def describe(self, index: int) -> str:
        return f"{self.base.describe(index)} (pre-decoded in {self.folder})"


class _DecodeResize(torch.utils.data.Dataset):
    def __init__(self, source: ImageSource, size: int):
        self.source, self.size = source, size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> np.ndarray:
        img = self.source.load(index)
        w, h = predecoded_size(img.width, img.height, self.size)
        if (w, h) != img.size:
            img = TF.resize(img, [h, w], antialias=True)
        return np.array(img, dtype=np.uint8)  # writable: the loader turns it into a tensor


STORE_WHAT, STORE_KEY = "pre-decoded store", "data.preprocess_dir"


def predecode_split(source: ImageSource, size: int, cache_dir: Path, split: str, workers: int = 0,
                    show_progress: bool = True) -> PredecodedSource:
    """Decode every image of `source` once into `<cache_dir>/<split>-<digest>/`: as decoded when `size` is 0 (the
    JPEG path's pixels, so the same training and evaluation views), else resized to short side `size` (a smaller
    copy whose random crops differ from the JPEG path's). The digest covers the source's fingerprint, its length
    and `size`, so a changed dataset or size gets a new folder; a folder whose files do not match its meta.json
    (a damaged copy) is rebuilt. meta.json records the count, byte size, smallest and largest stored shape and
    build time. The build holds the folder's lock (a second run building the same copy waits for it, then reuses
    it), writes into a temporary folder and publishes it with one rename (`locked_build`), so a build that is
    killed or runs out of disk leaves nothing that a later run reads."""
    fingerprint = {"version": PREDECODE_VERSION, "data": source.fingerprint, "count": len(source), "size": size}
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / f"{split}-{digest}"
    if not _predecoded_valid(folder, fingerprint):  # published, so whole: read without the lock (or write access)
        probe_writable(folder.parent, STORE_KEY, STORE_WHAT)
        with build_lock(folder, STORE_WHAT, STORE_KEY):
            if not _predecoded_valid(folder, fingerprint):  # another run may have published it while this waited
                _build_store(source, size, folder, split, fingerprint, workers, show_progress)
    return PredecodedSource(source, folder, predecoded_fingerprint(source, size))


def _build_store(source: ImageSource, size: int, folder: Path, split: str, fingerprint: dict, workers: int,
                 show_progress: bool) -> None:
    """Decode into a fresh build folder and publish it as `folder` (the caller holds the lock). The size is known
    only once every image is decoded, so space is checked as the images come: a projection from the first ones
    stops a build that clearly cannot fit early, and running out of space (ENOSPC, EDQUOT) mid-way is a UserError
    with the projected need; either way the build folder is deleted."""
    import time

    from tqdm import tqdm
    shutil.rmtree(folder.with_name(folder.name + ".tmp"), ignore_errors=True)  # left by builds before the lock
    build_dir = new_build_dir(folder, STORE_WHAT, STORE_KEY)
    n = len(source)
    rows = np.zeros((n, 3), dtype=np.int64)
    offset, done = 0, 0
    check_after = min(n, max(64, n // 100))  # images decoded before the projected size is checked
    try:
        start = time.perf_counter()
        loader = torch.utils.data.DataLoader(_DecodeResize(source, size), batch_size=None, num_workers=workers,
                                             prefetch_factor=8 if workers > 0 else None)
        how = f"short side {size}" if size else "as decoded"
        with open(build_dir / "pixels.u8", "wb") as f:
            for i, arr in enumerate(tqdm(loader, total=n, desc=f"pre-decoding {split} ({how})",
                                         disable=not show_progress, dynamic_ncols=True, leave=False)):
                arr = np.asarray(arr, dtype=np.uint8)
                rows[i] = (offset, arr.shape[0], arr.shape[1])
                f.write(np.ascontiguousarray(arr).tobytes())
                offset, done = offset + arr.size, i + 1
                if done == check_after and done < n:
                    _check_projected_space(build_dir, offset, done, n)
        np.save(build_dir / "index.npy", rows)
        meta = {"fingerprint": fingerprint, "images": n, "bytes": offset,
                "min_hw": rows[:, 1:].min(0).tolist() if n else [0, 0],
                "max_hw": rows[:, 1:].max(0).tolist() if n else [0, 0],
                "build_s": time.perf_counter() - start}
        write_json(build_dir / "meta.json", meta)  # last: the completion mark
        publish(build_dir, folder, STORE_WHAT, STORE_KEY)
    except OSError as exc:
        discard(build_dir)
        raise write_error(exc, folder.parent, STORE_WHAT, STORE_KEY, _projected(offset, done, n),
                          projected=True) from None
    except BaseException:
        discard(build_dir)
        raise


def _projected(written: int, done: int, total: int) -> int | None:
    """Bytes the whole store will take, projected from the first `done` of `total` images."""
    return int(written / done * total) if done else None


def _check_projected_space(build_dir: Path, written: int, done: int, total: int) -> None:
    """Stop early when the projection exceeds what is free by a clear margin (25%: image sizes vary, and a store
    that would just fit is better tried than refused); a closer call is left to the ENOSPC handler."""
    need, free = _projected(written, done, total), free_bytes(build_dir)
    if free is not None and need - written > 1.25 * free:
        raise UserError(f"not enough space for the {STORE_WHAT} in {build_dir.parent} ({STORE_KEY}): projected from "
                        f"the first {done} of {total} images it needs about {human_bytes(need)}, "
                        f"{human_bytes(free + written)} are free. Free space there, set {STORE_KEY} to a folder on a "
                        "disk with room, or store a smaller copy (data.preprocess_size)")


def _predecoded_valid(folder: Path, fingerprint: dict) -> bool:
    """Whether `folder` holds a whole copy for `fingerprint`: a dict meta.json for it, an int64 index.npy with one
    row per image whose rows tile pixels.u8 back to back, and a pixels.u8 of exactly that size. Anything else
    (missing, truncated, of another kind) is rebuilt, never read in part."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        rows = np.load(folder / "index.npy")
        pixels = (folder / "pixels.u8").stat()
    except (OSError, ValueError):
        return False
    if (not isinstance(meta, dict) or meta.get("fingerprint") != fingerprint or not isinstance(rows, np.ndarray)
            or rows.dtype != np.int64 or rows.shape != (fingerprint["count"], 3) or not stat.S_ISREG(pixels.st_mode)
            or pixels.st_size != meta.get("bytes")):
        return False
    sizes = rows[:, 1] * rows[:, 2] * 3
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return bool((rows[:, 1:] > 0).all() and (rows[:, 0] == starts).all() and sizes.sum() == pixels.st_size)


def predecode_splits(sources: dict[str, ImageSource], size: int, cache_dir: Path, dist, workers: int = 0
                     ) -> dict[str, PredecodedSource]:
    """Every split pre-decoded: the main rank builds what is missing, the others wait and then open it (an error
    on the main rank stops every rank)."""
    def build() -> None:
        for split, src in sources.items():
            predecode_split(src, size, cache_dir, split, workers)

    on_main_rank(build, dist)
    return {split: predecode_split(src, size, cache_dir, split, workers, show_progress=False)
            for split, src in sources.items()}
