"""Pre-decoded splits (data.preprocessed=true): every image decoded once into one uint8 memory map per split.

`predecode_splits` builds what is missing on the main rank and opens it everywhere; `PredecodedSource` serves the
stored images as PIL images (the loader's augmentation) or uint8 tensors (augmentation on the device).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from image_sources import ImageSource

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


def predecode_split(source: ImageSource, size: int, cache_dir: Path, split: str, workers: int = 0,
                    show_progress: bool = True) -> PredecodedSource:
    """Decode every image of `source` once into `<cache_dir>/<split>-<digest>/`: as decoded when `size` is 0 (the
    JPEG path's pixels, so the same training and evaluation views), else resized to short side `size` (a smaller
    copy whose random crops differ from the JPEG path's). The digest covers the source's fingerprint, its length
    and `size`, so a changed dataset or size gets a new folder; a folder whose files do not match its meta.json
    (an interrupted or damaged build) is rebuilt. meta.json, written last, records the count, byte size, smallest
    and largest stored shape and build time."""
    import shutil
    import time

    from tqdm import tqdm
    fingerprint = {"version": PREDECODE_VERSION, "data": source.fingerprint, "count": len(source), "size": size}
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / f"{split}-{digest}"
    if _predecoded_valid(folder, fingerprint):
        return PredecodedSource(source, folder, predecoded_fingerprint(source, size))
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    rows = np.zeros((len(source), 3), dtype=np.int64)
    loader = torch.utils.data.DataLoader(_DecodeResize(source, size), batch_size=None, num_workers=workers,
                                         prefetch_factor=8 if workers > 0 else None)
    offset = 0
    how = f"short side {size}" if size else "as decoded"
    with open(tmp / "pixels.u8", "wb") as f:
        for i, arr in enumerate(tqdm(loader, total=len(source), desc=f"pre-decoding {split} ({how})",
                                     disable=not show_progress, dynamic_ncols=True, leave=False)):
            arr = np.asarray(arr, dtype=np.uint8)
            rows[i] = (offset, arr.shape[0], arr.shape[1])
            f.write(np.ascontiguousarray(arr).tobytes())
            offset += arr.size
    np.save(tmp / "index.npy", rows)
    meta = {"fingerprint": fingerprint, "images": len(source), "bytes": offset,
            "min_hw": rows[:, 1:].min(0).tolist() if len(rows) else [0, 0],
            "max_hw": rows[:, 1:].max(0).tolist() if len(rows) else [0, 0],
            "build_s": time.perf_counter() - start}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    tmp.rename(folder)
    return PredecodedSource(source, folder, predecoded_fingerprint(source, size))


def _predecoded_valid(folder: Path, fingerprint: dict) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        rows = np.load(folder / "index.npy")
        size = (folder / "pixels.u8").stat().st_size
    except (OSError, ValueError):
        return False
    if meta.get("fingerprint") != fingerprint or rows.shape != (fingerprint["count"], 3) or size != meta["bytes"]:
        return False
    return bool(len(rows) == 0 or rows[-1, 0] + rows[-1, 1] * rows[-1, 2] * 3 == size)


def predecode_splits(sources: dict[str, ImageSource], size: int, cache_dir: Path, dist, workers: int = 0
                     ) -> dict[str, PredecodedSource]:
    """Every split pre-decoded: the main rank builds what is missing, the others wait and then open it."""
    from utils import barrier
    if dist.is_main:
        for split, src in sources.items():
            predecode_split(src, size, cache_dir, split, workers)
    barrier()
    return {split: predecode_split(src, size, cache_dir, split, workers, show_progress=False)
            for split, src in sources.items()}
