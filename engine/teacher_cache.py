"""The cached teacher: the frozen teacher's outputs on K fixed views of every training image, stored once and replayed.

For every training image the cache holds K augmentation records and the teacher's fp16 logits on exactly those
views; the training loader replays one record per image per epoch (`augment.replay_view_index`), so the student sees
the view the teacher scored. The views are made the way the run makes the student's: with PIL in the loader, or,
when the run augments on the device (`data.augment_on`), with the same tensor operations on the same device
(`augment.apply_aug_records`), so teacher and student see identical pixels either way. It also holds the teacher's
logits on the evaluation view of every train, validation and test image (for difficulty scores and the teacher's
reported accuracy).

Two ways to fill it (teacher.cache_fill), with the same numbers:
- eager: every view is scored before the first training step;
- lazy: nothing is scored up front. A training slot (image, view) is scored the first time a batch replays it, by
  the run itself (`SlotFiller`), written, and then marked filled in `train.filled.npy`; after K epochs every slot is
  filled and an epoch costs what a label-only epoch costs. A split's evaluation views are scored in one pass when a
  run first reads them (`TeacherCache.eval_logits`, `fill_eval`), and marked by `<split>.eval.done`.
Both score through `score_chunks`: exactly `chunk` views per teacher forward, the last forward padded with zero
images. On CPU oneDNN picks convolution and matmul kernels by batch size, which changes float32 rounding (measured:
a resnet's logits differ in the last bit between batches of 8 and 16), so a view's logits must not depend on how
many other views share its forward. With one shape per forward they depend on nothing else (tested at AVX2 and
AVX-512), so a lazily filled slot equals the eagerly built one bit for bit, and `chunk` is part of the fingerprint.

Layout: `<cache_dir>/<fingerprint>/<split>.npy`, one memory-mapped structured array per split, `train.filled.npy`
(uint8 [N, K], 1 = that slot's logits are written and durable) and `meta.json`. Eagerly, every view is scored under
the lock `<cache_dir>/.<fingerprint>.lock` into
`<cache_dir>/.<fingerprint>.building-*`, with the arrays' space reserved first, and published by one rename
(`locked_build`): a second run needing the same cache waits and reuses it, and a build that is killed or runs out of
space leaves nothing a later run reads. A lazy run then fills slots while it holds `<cache_dir>/.<fingerprint>.fill
.lock`; another run of the same cache that finds the fill lock taken does not wait: it reads the slots filled so far
and scores the others with its own teacher without writing them (the same numbers). A slot is marked filled only
after its logits are flushed (msync), so a kill between the two leaves it unfilled, never half-read. The fingerprint
hashes the teacher weights, class restriction and input normalisation (its own mean and std, which it sees whatever
the student's are), the dataset (its content: `content_hash`), the view recipe and where views are made, K, the seed
and the numerics the teacher ran in (device type, autocast dtype, TF32, views per forward), so a changed input lands
in a new directory; a directory whose meta or shapes disagree is rebuilt, never reused.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.distributed import DistInfo, all_gather_objects, barrier, broadcast_object, on_main_rank
from common.errors import UserError
from common.files import write_json
from common.locked_build import (build_lock, check_free_space, discard, new_build_dir, probe_writable, publish, reserve,
                                 write_errors)
from common.rng import trace
from imagedata.augment import (AUG_RECORD_LEN, AugSpec, apply_aug_record, apply_aug_records, cache_view_record,
                               eval_view)
from imagedata.image_sources import SPLITS, ImageSource
from imagedata.normalization import input_norm, normalize_batch
from imagedata.predecode import PredecodedSource
from imagedata.samplers import ShardSampler
from imagedata.views import collate_views, make_loader, unpack_raw

CACHE_VERSION = 3  # 2: images decoded by image_sources.to_rgb (16-bit scaled to 8, alpha over white); 3: fixed-shape
# teacher forwards (score_chunks) and per-slot filled flags (train.filled.npy)
FILL_MODES = ("lazy", "eager")
FILLED_FILE = "train.filled.npy"
EVAL_DONE = "{split}.eval.done"  # written once a split's evaluation-view logits are flushed
CACHE_WHAT, CACHE_KEY = "teacher cache", "teacher.cache_dir"


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over every tensor of the module's state dict (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def teacher_numerics(autocast, device: torch.device, chunk: int | None = None) -> dict:
    """What sets the rounding of the teacher's logits: the device type, the dtype autocast actually gives a
    convolution (float32 when off), on CUDA whether float32 convolutions and matmuls may run in TF32, and the
    views per teacher forward (`chunk`, see `score_chunks`)."""
    probe = torch.ones(1, 1, 1, 1, device=device)
    with torch.no_grad(), autocast():
        dtype = torch.nn.functional.conv2d(probe, probe).dtype
    numerics = {"device": device.type, "autocast": str(dtype).removeprefix("torch.")}
    if device.type == "cuda":
        numerics["tf32"] = {"conv": bool(torch.backends.cudnn.allow_tf32),
                            "matmul": bool(torch.backends.cuda.matmul.allow_tf32)}
    if chunk is not None:
        numerics["views_per_forward"] = chunk
    return numerics


def cache_fingerprint(teacher, sources: dict[str, ImageSource], spec: AugSpec, num_views: int, seed: int,
                      numerics: dict, device_aug: bool = False, feature_dim: int | None = None) -> dict:
    class_index = teacher.class_index.tolist() if getattr(teacher, "restrict", False) else None
    mean, std = teacher.own_norm  # what the teacher's input is normalised with (FrozenTeacher re-expresses it)
    fingerprint = {"version": CACHE_VERSION, "teacher": weights_digest(teacher.model), "class_index": class_index,
                   "teacher_norm": {"mean": mean, "std": std},
                   "data": {s: [src.fingerprint, len(src)] for s, src in sources.items()},
                   "spec": asdict(spec), "views_on": "device" if device_aug else "loader", "num_views": num_views,
                   "seed": seed, "numerics": numerics}
    if feature_dim:  # only then, so that a logits-only cache keeps the key it always had
        fingerprint["features"] = feature_dim
    return json.loads(json.dumps(fingerprint))  # the form it has after a round trip through meta.json


def split_dtype(split: str, num_views: int, num_classes: int, feature_dim: int | None = None) -> np.dtype:
    """One row per image: the eval view's logits; for train also the K views' logits and records, and with
    `feature_dim` the K views' pooled teacher features (fp16, feature_dim x 2 bytes per view)."""
    fields = [("eval_logits", np.float16, (num_classes,))]
    if split == "train":
        fields += [("view_logits", np.float16, (num_views, num_classes)),
                   ("view_records", np.float32, (num_views, AUG_RECORD_LEN))]
        if feature_dim:
            fields += [("view_features", np.float16, (num_views, feature_dim))]
    return np.dtype(fields)


class CacheViews(torch.utils.data.Dataset):
    """For cache building: image `index` with its K records and its eval view (uint8 [3, S, S]). The K training
    views come made (`views`, uint8 [K, 3, S, S], PIL as in `views.TrainViews`), or, with `device_aug`, as the stored
    image (`raw`, uint8 [3, H, W]) for `batch_views` to augment on the device as the trainer does."""

    def __init__(self, source: ImageSource, spec: AugSpec, seed: int, num_views: int, device_aug: bool = False):
        self.source, self.spec, self.seed, self.num_views, self.device_aug = source, spec, seed, num_views, device_aug

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        img = self.source.load(index)
        records = np.stack([cache_view_record(self.seed, index, v, img.width, img.height, self.spec)
                            for v in range(self.num_views)]) if self.num_views else np.zeros((0, AUG_RECORD_LEN),
                                                                                             np.float32)
        item = {"eval": eval_view(img, self.spec), "records": torch.from_numpy(records), "index": index}
        if self.num_views and self.device_aug:
            item["raw"] = self.source.tensor(index)
        elif self.num_views:
            item["views"] = torch.stack([apply_aug_record(img, r, self.spec) for r in records])
        return item


def batch_views(batch: dict, spec: AugSpec, device: torch.device) -> torch.Tensor:
    """The views the teacher scores for a batch of `CacheViews` items: uint8 [B, V, 3, S, S] on `device`, V = K
    training views then the eval view. Device-side views come from `apply_aug_records` on `device`, the function
    and device the trainer uses, so they equal the student's views pixel for pixel."""
    eval_views = batch["eval"].to(device, non_blocking=True)[:, None]
    if "raw" in batch:
        train_views = apply_aug_records(unpack_raw(batch, device), batch["records"], spec)
    elif "views" in batch:
        train_views = batch["views"].to(device, non_blocking=True)
    else:
        return eval_views
    return torch.cat([train_views, eval_views], dim=1)


class TeacherCache:
    """Read access to a published cache, and with `write_slots` the lazy fill's writes. Memory maps open lazily,
    once per process (DataLoader workers included)."""

    def __init__(self, root: Path, meta: dict):
        self.root, self.meta = Path(root), meta
        self.num_views, self.num_classes = meta["num_views"], meta["num_classes"]
        self.feature_dim = meta.get("feature_dim")
        self._arrays: dict[str, np.ndarray] = {}
        self._writable: dict[str, np.ndarray] = {}
        self._eval_memory: dict[str, np.ndarray] = {}
        self.eval_filler = None  # split -> None (scored and written) or the logits (scored, not written)
        self.complete = None  # set by `count_filled`; a complete cache is only read (no flag per item)

    def array(self, split: str) -> np.ndarray:
        if split not in self._arrays:
            self._arrays[split] = np.load(self.root / f"{split}.npy", mmap_mode="r")
        return self._arrays[split]

    def filled(self) -> np.ndarray:
        """uint8 [N, K]: 1 where the slot (image, view) holds the teacher's logits."""
        if "filled" not in self._arrays:
            self._arrays["filled"] = np.load(self.root / FILLED_FILE, mmap_mode="r")
        return self._arrays["filled"]

    def count_filled(self) -> tuple[int, int]:
        """(filled slots, all slots); also sets `complete`."""
        flags = np.asarray(self.filled())
        done, total = int(flags.sum(dtype=np.int64)), int(flags.size)
        self.complete = done == total
        return done, total

    def __getstate__(self):  # memory maps are reopened in each worker, not pickled
        return {"root": self.root, "meta": self.meta, "complete": self.complete}

    def __setstate__(self, state):
        self.__init__(state["root"], state["meta"])
        self.complete = state.get("complete")

    def is_filled(self, index: int, view: int) -> bool:
        return bool(self.complete) or bool(self.filled()[index, view])

    def train_view(self, index: int, view: int) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        """(augmentation record float32 [R], {"teacher_logits": float16 [C]} plus "teacher_features": float16 [D]
        when the cache holds features) of training view `view` of image `index`, a filled slot (`is_filled`)."""
        row = self.array("train")[index]
        teacher = {"teacher_logits": torch.from_numpy(np.array(row["view_logits"][view]))}
        if self.feature_dim:
            teacher["teacher_features"] = torch.from_numpy(np.array(row["view_features"][view]))
        return np.array(row["view_records"][view]), teacher

    def unfilled_view(self) -> dict[str, torch.Tensor]:
        """Zero placeholders of `train_view`'s teacher outputs for a slot not filled yet: the batch carries
        teacher_filled = False for it, and `SlotFiller.complete` replaces them before any loss reads them."""
        teacher = {"teacher_logits": torch.zeros(self.num_classes, dtype=torch.float16)}
        if self.feature_dim:
            teacher["teacher_features"] = torch.zeros(self.feature_dim, dtype=torch.float16)
        return teacher

    def write_slots(self, index: np.ndarray, view: np.ndarray, logits: np.ndarray, records: np.ndarray,
                    features: np.ndarray | None) -> None:
        """Store the teacher's outputs of training slots (index[i], view[i]), flush them to disk, and only then
        mark the slots filled (and flush the flags): a kill between the two leaves a slot unfilled, never a flag
        over logits that are not there."""
        if "train" not in self._writable:
            self._writable["train"] = np.load(self.root / "train.npy", mmap_mode="r+")
            self._writable["filled"] = np.load(self.root / FILLED_FILE, mmap_mode="r+")
        arr = self._writable["train"]
        with write_errors(self.root.parent, CACHE_WHAT, CACHE_KEY):
            arr["view_logits"][index, view] = logits  # field views of the memory map: written in place
            arr["view_records"][index, view] = records
            if features is not None:
                arr["view_features"][index, view] = features
            arr.flush()
        self._mark_filled(index, view)

    def _mark_filled(self, index: np.ndarray, view: np.ndarray) -> None:
        """The second half of `write_slots`, once the slots' outputs are flushed."""
        flags = self._writable["filled"]
        with write_errors(self.root.parent, CACHE_WHAT, CACHE_KEY):
            flags[index, view] = 1
            flags.flush()

    def eval_ready(self, split: str) -> bool:
        """Whether `split`'s evaluation-view logits are stored (an eager build stores them all; a lazy cache scores
        a split's the first time a run reads them)."""
        return (self.root / EVAL_DONE.format(split=split)).exists()

    def eval_logits(self, split: str) -> np.ndarray:
        """Teacher logits on the evaluation view of every image of `split`: float16 [N, C]. A lazily filled cache
        scores them here, on first read, through the `eval_filler` the run attached (`open_filler`); every rank of
        a run calls this at the same point (it may hold collectives)."""
        if split in self._eval_memory:
            return self._eval_memory[split]
        if not broadcast_object(self.eval_ready(split)):  # rank 0's view, so that every rank takes one branch
            if self.eval_filler is None:
                raise RuntimeError(f"teacher cache {self.root}: the {split} evaluation views are not scored and no "
                                   "teacher is attached to score them")
            logits = self.eval_filler(split)
            if logits is not None:  # scored but not written (another run fills this cache): kept for this run
                self._eval_memory[split] = logits
                return logits
        return self.array(split)["eval_logits"]


def _valid(root: Path, fingerprint: dict, sources: dict[str, ImageSource], num_classes: int,
           feature_dim: int | None = None) -> dict | None:
    """meta.json of the published cache at `root` when every file is there, whole and of the expected kind (a
    dict meta for this fingerprint, one structured array per split with this dtype and one row per image); else
    None, and the cache is rebuilt rather than read in part."""
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if (not isinstance(meta, dict) or meta.get("fingerprint") != fingerprint or meta.get("num_classes") != num_classes
            or meta.get("num_views") != fingerprint["num_views"] or meta.get("feature_dim") != feature_dim):
        return None
    for split, src in sources.items():
        try:
            arr = np.load(root / f"{split}.npy", mmap_mode="r")
        except (OSError, ValueError):
            return None
        if arr.shape != (len(src),) or arr.dtype != split_dtype(split, fingerprint["num_views"], num_classes,
                                                                feature_dim):
            return None
    try:
        flags = np.load(root / FILLED_FILE, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if flags.shape != (len(sources["train"]), fingerprint["num_views"]) or flags.dtype != np.uint8:
        return None
    return meta


def merge_shards(root: Path, world_size: int, chunk: int = 4096) -> None:
    """Rank 0, after every rank has scored its shard: copy each rank's rows (<split>.rank<r>.npy, their image
    indices in <split>.rank<r>.index.npy) into <split>.npy, then delete the shard files. Every row must come from
    exactly one shard: a row left unwritten would be served as all-zero teacher logits."""
    for split in SPLITS:
        out = np.load(root / f"{split}.npy", mmap_mode="r+")
        written = np.zeros(len(out), dtype=np.int64)
        for rank in range(world_size):
            part_path, index_path = root / f"{split}.rank{rank}.npy", root / f"{split}.rank{rank}.index.npy"
            part, index = np.load(part_path, mmap_mode="r"), np.load(index_path)
            np.add.at(written, index, 1)
            for i in range(0, len(index), chunk):
                out[index[i:i + chunk]] = part[i:i + chunk]
            del part
            part_path.unlink()
            index_path.unlink()
        if not (written == 1).all():
            raise RuntimeError(f"teacher cache {split}: rows {np.flatnonzero(written != 1)[:10].tolist()} were "
                               "scored by no rank or by several")
        out.flush()
        del out



def _all_ranks(step, dist: DistInfo) -> None:
    """Run `step()` on every rank, then agree (one collective) on whether every rank finished it, so that no rank
    waits at a later collective for a rank that stopped. A UserError on any rank is raised on all of them. Any other
    exception is re-raised on its own rank (with its traceback), and the other ranks stop with a UserError naming
    that rank and the error. `step` itself must hold no collective: a rank that failed would never reach it."""
    failure, error = None, None
    try:
        step()
    except UserError as exc:
        failure, error = exc, ("user", str(exc))
    except Exception as exc:  # a bug, or an error of a library: the ranks must still agree that this one stopped
        failure, error = exc, ("other", f"{type(exc).__name__}: {exc}")
    errors = [(rank, e) for rank, e in enumerate(all_gather_objects(error)) if e is not None]
    if not errors:
        return
    if failure is not None and not isinstance(failure, UserError):
        raise failure
    user = [message for _, (kind, message) in errors if kind == "user"]
    if user and len(user) == len(errors):
        raise UserError(user[0])
    rank, (_, message) = next((r, e) for r, e in errors if e[0] == "other")
    raise UserError(f"rank {rank} stopped while building the {CACHE_WHAT} ({message}); see its traceback above. "
                    "This rank stopped with it")


def _new_flags(path: Path, rows: int, num_views: int) -> None:
    """train.filled.npy: uint8 [rows, K], every slot unfilled."""
    np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(rows, num_views)).flush()
    reserve(path, path.stat().st_size)


def _new_array(path: Path, dtype: np.dtype, rows: int) -> None:
    """A .npy file of `rows` zeroed rows whose blocks are allocated now (see locked_build.reserve)."""
    np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows,)).flush()
    reserve(path, path.stat().st_size)


def build_or_load_cache(teacher, sources: dict[str, ImageSource], spec: AugSpec, num_views: int, seed: int,
                        cache_dir: Path, dist: DistInfo, batch_size: int, workers: int,
                        autocast, device_aug: bool = False, with_features: bool = False,
                        fill: str = "eager") -> tuple[TeacherCache, dict]:
    """The cache for this teacher and data, built now if missing or stale. Returns (cache, info) where info says
    whether it was built and how long that took. Building is sharded over ranks; rank 0 holds the build lock
    (`locked_build`: another run building the same cache is waited for, then reused), checks the free space,
    merges the shards, writes the metadata and publishes the finished cache with one rename.
    `device_aug`: the run augments on its device (`views.TrainViews`), so the training views are made there too.
    `with_features`: also store the teacher's pooled features of every training view (feature KD methods).
    `batch_size`: views per teacher forward (`score_chunks`; part of the fingerprint).
    `fill`: "eager" scores every view now; "lazy" none, leaving the training slots to `SlotFiller` and the
    evaluation views to `fill_eval`. Either way a published cache is returned, and `count_filled` says how full
    it is."""
    if fill not in FILL_MODES:
        raise ValueError(f"fill={fill!r}: one of {FILL_MODES}")
    if device_aug and not isinstance(sources["train"], PredecodedSource):
        raise UserError("augmentation on the device needs the pre-decoded data path: set data.preprocessed=true")
    num_classes = len(sources["train"].class_names)
    feature_dim = teacher.feature_dim if with_features else None
    if with_features and not feature_dim:
        raise UserError("the teacher exposes no pooled features to cache (no forward_features / forward_head / "
                        "num_features); use a timm classifier as the teacher, or a logit KD method")
    fingerprint = cache_fingerprint(teacher, sources, spec, num_views, seed,
                                    teacher_numerics(autocast, dist.device, batch_size), device_aug, feature_dim)
    digest = broadcast_object(hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:20])
    root = Path(cache_dir) / digest
    meta = broadcast_object(_valid(root, fingerprint, sources, num_classes, feature_dim) if dist.is_main else None)
    if meta is not None:  # published, so whole: no lock needed to read it (a read-only shared cache works)
        cache, info = TeacherCache(root, meta), {"built": False, "path": str(root), "build_s": 0.0}
    else:
        cache, info = _build_cache(teacher, sources, spec, num_views, seed, root, fingerprint, dist, batch_size,
                                   workers, autocast, device_aug, num_classes, feature_dim, fill)
    done, total = cache.count_filled()
    return cache, {**info, "fill": fill, "filled_slots": done, "slots": total}


def _build_cache(teacher, sources: dict[str, ImageSource], spec: AugSpec, num_views: int, seed: int, root: Path,
                 fingerprint: dict, dist: DistInfo, batch_size: int, workers: int, autocast, device_aug: bool,
                 num_classes: int, feature_dim: int | None, fill: str) -> tuple[TeacherCache, dict]:
    """`build_or_load_cache` once no valid cache is published at `root`: under rank 0's build lock, reuse one
    another run published meanwhile, or make a fresh build directory, score every view into it when fill="eager"
    (lazy: none), and publish it."""
    import time
    dtypes = {split: split_dtype(split, num_views, num_classes, feature_dim) for split in SPLITS}
    sharded = dist.world_size > 1
    # the merged arrays, and while they are merged the ranks' shard files as well
    need = (sum(dtypes[s].itemsize * len(sources[s]) for s in SPLITS) * (2 if sharded else 1)
            + len(sources["train"]) * num_views)  # + the filled flags
    lock, build_dir = contextlib.ExitStack(), None
    try:
        def prepare() -> tuple[dict | None, str | None]:
            """Rank 0: take the lock; reuse what another run published meanwhile, or start a build directory."""
            nonlocal build_dir
            probe_writable(root.parent, CACHE_KEY, CACHE_WHAT)  # only now: reading a published cache needs no write access
            lock.enter_context(build_lock(root, CACHE_WHAT, CACHE_KEY))
            published = _valid(root, fingerprint, sources, num_classes, feature_dim)
            if published is not None:
                return published, None
            check_free_space(root.parent, need, CACHE_WHAT, CACHE_KEY)
            build_dir = new_build_dir(root, CACHE_WHAT, CACHE_KEY)
            with write_errors(root.parent, CACHE_WHAT, CACHE_KEY, need):
                for split, src in sources.items():
                    _new_array(build_dir / f"{split}.npy", dtypes[split], len(src))
                _new_flags(build_dir / FILLED_FILE, len(sources["train"]), num_views)
            return None, str(build_dir)

        start = time.perf_counter()
        meta, path = on_main_rank(prepare, dist)
        if meta is not None:
            return TeacherCache(root, meta), {"built": False, "path": str(root), "build_s": 0.0}
        if fill == "eager":  # lazy: nothing is scored before training (SlotFiller, and eval_logits on first read)
            _score_all(teacher, sources, spec, num_views, seed, Path(path), dist, batch_size, workers, autocast,
                       device_aug, feature_dim, dtypes, need)
        meta = {"fingerprint": fingerprint, "num_views": num_views, "num_classes": num_classes,
                "feature_dim": feature_dim}

        meta = on_main_rank(lambda: _finish_build(build_dir, root, meta, sources, dist.world_size, need, start,
                                                  fill == "eager"), dist)
    except BaseException:
        discard(build_dir)  # rank 0's unfinished build (None elsewhere): nothing partial stays
        raise
    finally:
        lock.close()
    return TeacherCache(root, meta), {"built": True, "path": str(root), "build_s": meta["build_s"]}


def teacher_acc1(eval_logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy (%) of the stored fp16 evaluation-view logits: what a cached run reports as the teacher's."""
    return float((np.asarray(eval_logits, dtype=np.float32).argmax(1) == np.asarray(labels)).mean() * 100)


def _finish_build(build_dir: Path, root: Path, meta: dict, sources: dict[str, ImageSource], world_size: int,
                  need: int, start: float, all_views: bool) -> dict:
    """Rank 0, after every rank scored its shard (`all_views`, the eager build: merge the shards, mark every slot
    and evaluation split scored, record the teacher's accuracy) or straight away (lazy): write the metadata,
    publish."""
    import time
    with write_errors(root.parent, CACHE_WHAT, CACHE_KEY, need):
        if all_views:
            if world_size > 1:
                merge_shards(build_dir, world_size)
            flags = np.load(build_dir / FILLED_FILE, mmap_mode="r+")
            flags[:] = 1
            flags.flush()
            del flags
            for split in SPLITS:  # the teacher's accuracy on each split's evaluation view, for the record
                logits = np.load(build_dir / f"{split}.npy", mmap_mode="r")["eval_logits"]
                meta[f"teacher/{split}_acc1"] = teacher_acc1(logits, sources[split].labels)
                (build_dir / EVAL_DONE.format(split=split)).touch()
        meta["build_s"] = time.perf_counter() - start
        write_json(build_dir / "meta.json", meta)  # last: the completion mark
    publish(build_dir, root, CACHE_WHAT, CACHE_KEY)
    return meta


def _score_all(teacher, sources: dict[str, ImageSource], spec: AugSpec, num_views: int, seed: int, build_dir: Path,
               dist: DistInfo, batch_size: int, workers: int, autocast, device_aug: bool, feature_dim: int | None,
               dtypes: dict[str, np.dtype], need: int) -> None:
    """Every rank scores its shard of every split into `build_dir` (rank 0 created the merged arrays there).
    Several ranks write into files of their own, merged by rank 0 afterwards: ranks on different nodes never
    write pages of one file (a shared filesystem such as NFS writes back whole pages, which could undo another
    node's rows that share a page)."""
    sharded = dist.world_size > 1
    samplers = {split: ShardSampler(len(sources[split]), dist.world_size, dist.rank) for split in SPLITS}
    shard_path = {split: build_dir / f"{split}.rank{dist.rank}.npy" for split in SPLITS}

    def allocate_shards() -> None:
        with write_errors(build_dir.parent, CACHE_WHAT, CACHE_KEY, need):
            for split in SPLITS:
                _new_array(shard_path[split], dtypes[split], len(samplers[split]))

    if sharded:  # every rank's space reserved before any rank scores; a rank that cannot stops them all
        _all_ranks(allocate_shards, dist)

    def score_splits() -> None:
        for split in SPLITS:
            _score_split(teacher, sources[split], split, spec, num_views if split == "train" else 0, seed, build_dir,
                         shard_path[split] if sharded else build_dir / f"{split}.npy", samplers[split], dist,
                         batch_size, workers, autocast, device_aug, feature_dim, need)

    # an error on one rank (an unreadable image, a failed forward) stops every rank, instead of leaving the others
    # at the barrier for good
    _all_ranks(score_splits, dist)
    barrier()


def forward_chunks(teacher, images: torch.Tensor, chunk: int, device: torch.device, autocast,
                   with_features: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's outputs on uint8 views [N, 3, S, S]: (logits [N, C], pooled features [N, D] with
    `with_features`, else None), as the teacher computes them. The views run `chunk` at a time, the last forward
    padded with zero images to `chunk`: every forward has one shape, so each view's numbers are the same whatever
    views share its forward, which lets the lazy fill score any subset of slots and store what the eager build
    stores."""
    logits_out, features_out = [], []
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk]
        rows = len(part)
        if rows < chunk:
            part = torch.cat([part, part.new_zeros((chunk - rows, *part.shape[1:]))])
        with autocast():
            x = normalize_batch(part, device, True, input_norm(teacher))
            logits, features = teacher.logits_and_features(x) if with_features else (teacher(x), None)
        logits_out.append(logits[:rows])
        if features is not None:
            features_out.append(features[:rows])
    return torch.cat(logits_out), (torch.cat(features_out) if with_features else None)


def score_chunks(teacher, images: torch.Tensor, chunk: int, device: torch.device, autocast,
                 with_features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """`forward_chunks` as the cache stores it: (fp16 logits [N, C], fp16 pooled features [N, D] or None)."""
    logits, features = forward_chunks(teacher, images, chunk, device, autocast, with_features)
    return (logits.float().cpu().numpy().astype(np.float16),
            None if features is None else features.float().cpu().numpy().astype(np.float16))


def _eval_pass(teacher, src: ImageSource, spec: AugSpec, sampler, chunk: int, workers: int, dist: DistInfo,
               autocast, desc: str):
    """The evaluation views of `src` in `sampler`'s order, `chunk` images per loader batch, through `score_chunks`:
    yields (image indices, fp16 logits [B, C]) per batch. The eager build and the lazy fill (`fill_eval`) both
    score evaluation views here."""
    loader = make_loader(CacheViews(src, spec, 0, 0), sampler, chunk, workers, dist.device)
    for batch in tqdm(loader, desc=desc, disable=not dist.is_main, dynamic_ncols=True, leave=False):
        images = batch_views(batch, spec, dist.device)[:, -1]
        yield batch["index"].numpy(), score_chunks(teacher, images, chunk, dist.device, autocast)[0]


def _score_split(teacher, src: ImageSource, split: str, spec: AugSpec, k: int, seed: int, build_dir: Path,
                 out_path: Path, sampler: ShardSampler, dist: DistInfo, batch_size: int, workers: int, autocast,
                 device_aug: bool, feature_dim: int | None, need: int) -> None:
    """This rank's shard of one split into `out_path`: the merged array (one process) or this rank's shard file,
    with the image indices it scored beside it. Two passes over the shard in the sampler's order: the evaluation
    views (`batch_size` images per loader batch), then, when `k` > 0, the K training views (batch_size // K
    images per loader batch); every view through `score_chunks` with `batch_size` views per forward. No
    collective."""
    device, sharded = dist.device, dist.world_size > 1
    with write_errors(build_dir.parent, CACHE_WHAT, CACHE_KEY, need):
        out = np.load(out_path, mmap_mode="r+")
    scored = []  # the indices this rank scored, in order (KD_TRACE_DIR: tests check the ranks partition them)
    # rows of `out`: the images' own (one shared file) or the next ones of this rank's shard file, in sampler order
    for index, logits in _eval_pass(teacher, src, spec, sampler, batch_size, workers, dist, autocast,
                                    f"teacher cache [{split}, evaluation views]"):
        out["eval_logits"][np.arange(len(scored), len(scored) + len(index)) if sharded else index] = logits
        scored += index.tolist()
    if k:
        loader = make_loader(CacheViews(src, spec, seed, k, device_aug), sampler, max(1, batch_size // k), workers,
                             device)
        position = 0
        for batch in tqdm(loader, desc=f"teacher cache [{split}, training views]", disable=not dist.is_main,
                          dynamic_ncols=True):
            n = len(batch["index"])
            idx = np.arange(position, position + n) if sharded else batch["index"].numpy()
            position += n
            images = batch_views(batch, spec, device)[:, :k]  # [B, K, 3, S, S]
            logits, features = score_chunks(teacher, images.flatten(0, 1), batch_size, device, autocast,
                                            bool(feature_dim))
            out["view_logits"][idx] = logits.reshape(n, k, -1)
            out["view_records"][idx] = batch["records"].numpy()
            if features is not None:
                out["view_features"][idx] = features.reshape(n, k, -1)
    with write_errors(build_dir.parent, CACHE_WHAT, CACHE_KEY, need):
        out.flush()
    del out
    if sharded:
        _save_index(build_dir / f"{split}.rank{dist.rank}.index.npy", scored, need)
    trace("cache_shard", {"split": split, "indices": scored})


def _save_index(path: Path, scored: list[int], need: int) -> None:
    with write_errors(path.parent.parent, CACHE_WHAT, CACHE_KEY, need):
        np.save(path, np.asarray(scored, dtype=np.int64))


def several_nodes(dist: DistInfo) -> bool:
    """Whether the ranks span several machines (torchrun's LOCAL_WORLD_SIZE: the ranks on this one)."""
    import os
    return dist.world_size > int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))


def fill_lock_path(root: Path) -> Path:
    return Path(root).with_name(f".{Path(root).name}.fill.lock")


class SlotFiller:
    """teacher.cache_fill=lazy while training: `complete(batch, views)` scores the rows of a batch whose slot is
    not filled (batch["teacher_filled"] False), on the views the student trains on (uint8, the same pixels the
    eager build scores: same record, same function, same device), puts their logits (and features) into the batch
    as the stored fp16 values, and, when this run holds the fill lock (`writer`), writes them to the cache.

    Every rank fills the rows of its own batches; ranks of one machine write disjoint rows of one file through its
    page cache. Several machines are refused (`open_filler`): a shared filesystem such as NFS writes back whole
    pages, which could undo another node's slots that share a page."""

    def __init__(self, cache: TeacherCache, teacher, chunk: int, device: torch.device, autocast, writer: bool,
                 lock=None):
        self.cache, self.teacher, self.chunk, self.device, self.autocast = cache, teacher, chunk, device, autocast
        self.writer, self.lock = writer, lock
        self.scored = 0  # slots this process scored (written or not)

    @torch.no_grad()
    def complete(self, batch: dict, views: torch.Tensor) -> None:
        filled = batch.get("teacher_filled")
        if filled is None or bool(filled.all()):
            return
        rows = torch.nonzero(~filled).flatten()
        logits, features = score_chunks(self.teacher, views[rows.to(views.device)], self.chunk, self.device,
                                        self.autocast, bool(self.cache.feature_dim))
        batch["teacher_logits"][rows] = torch.from_numpy(logits)
        if features is not None:
            batch["teacher_features"][rows] = torch.from_numpy(features)
        self.scored += len(rows)
        if self.writer:
            self.cache.write_slots(batch["index"][rows].numpy(), batch["cache_view"][rows].numpy(), logits,
                                   batch["record"][rows].numpy().astype(np.float32), features)

    def close(self) -> None:
        """Give the fill lock back (the end of training; a killed process's lock goes with it)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def fill_eval(cache: TeacherCache, teacher, source: ImageSource, split: str, spec: AugSpec, chunk: int,
              dist: DistInfo, autocast, workers: int, writer: bool) -> np.ndarray | None:
    """The evaluation-view logits of `split` for a lazily filled cache, scored the way the eager build scores them
    (`score_chunks`, `chunk` views per forward). `writer`: every rank scores its shard into the cache file, then
    rank 0 marks the split done (returns None; holds collectives, so every rank calls it). Otherwise this rank
    scores the whole split alone and returns the fp16 logits [N, C] without writing."""
    sampler = ShardSampler(len(source), dist.world_size if writer else 1, dist.rank if writer else 0)
    out = np.zeros((len(source), cache.num_classes), dtype=np.float16)

    def score() -> None:
        target = np.load(cache.root / f"{split}.npy", mmap_mode="r+")["eval_logits"] if writer else out
        with write_errors(cache.root.parent, CACHE_WHAT, CACHE_KEY):
            for index, logits in _eval_pass(teacher, source, spec, sampler, chunk, workers, dist, autocast,
                                            f"teacher cache [{split}, evaluation views]"):
                target[index] = logits
            if writer:
                target.flush()

    if not writer:
        score()
        return out
    _all_ranks(score, dist)
    barrier()
    if dist.is_main:
        with write_errors(cache.root.parent, CACHE_WHAT, CACHE_KEY):
            (cache.root / EVAL_DONE.format(split=split)).touch()
    barrier()
    return None


def fill_remaining(filler: SlotFiller, source: ImageSource, spec: AugSpec, seed: int, dist: DistInfo,
                   device_aug: bool) -> int:
    """teacher.cache_fill=eager on a cache a lazy run started: score and write every slot still unfilled now, each
    rank the images of its shard, through the same `score_chunks` (so the same bytes). Returns the slots this rank
    scored. Holds collectives (every rank calls it)."""
    flags = np.asarray(filler.cache.filled())
    todo = np.flatnonzero(~flags.all(1))
    sampler = ShardSampler(len(todo), dist.world_size, dist.rank)
    chunk, k = filler.chunk, filler.cache.num_views
    images = max(1, chunk // k)
    views = CacheViews(source, spec, seed, k, device_aug)
    scored = 0

    def score() -> None:
        nonlocal scored
        positions = list(sampler)
        for start in tqdm(range(0, len(positions), images), desc="teacher cache [train, unfilled views]",
                          disable=not dist.is_main, dynamic_ncols=True):
            index = todo[positions[start:start + images]]
            batch = collate_views([views[int(i)] for i in index])
            made = batch_views(batch, spec, dist.device)[:, :k]  # [B, K, 3, S, S]
            rows, slots = np.nonzero(~flags[index].astype(bool))
            flat = torch.from_numpy(rows * k + slots)
            logits, features = score_chunks(filler.teacher, made.flatten(0, 1)[flat.to(made.device)], chunk,
                                            dist.device, filler.autocast, bool(filler.cache.feature_dim))
            filler.cache.write_slots(index[rows], slots, logits, batch["records"].numpy()[rows, slots], features)
            scored += len(rows)

    _all_ranks(score, dist)
    barrier()
    return scored


def open_filler(cache: TeacherCache, teacher, chunk: int, dist: DistInfo, autocast, sources: dict | None = None,
                spec: AugSpec | None = None, workers: int = 0) -> tuple[SlotFiller | None, str]:
    """The SlotFiller of a lazily filled cache that has unfilled slots (None when it is complete), and what this
    run does with it: "fills" (rank 0 took the fill lock for every rank of the run), or "reads" (another run holds
    the lock, or the cache folder cannot be written: slots it lacks are scored by this run's teacher, not
    written). With `sources`, also attaches the scorer of evaluation views not stored yet (`fill_eval`), which
    `cache.eval_logits` calls on first read, writing them only when this run fills. Raises a UserError on several
    machines."""
    ready = all(cache.eval_ready(split) for split in SPLITS)
    if cache.complete and ready:
        return None, "reads"
    if several_nodes(dist):
        raise UserError(
            f"teacher.cache_fill=lazy on {dist.world_size} ranks over several machines: every rank would write slots "
            "into one cache file, which a shared filesystem (NFS, Lustre) writes back page by page, so one node "
            "could undo another's slots. Build the cache up front with teacher.cache_fill=eager (each rank scores "
            "its shard into a file of its own, merged by rank 0), or run on one machine")

    def take():
        from filelock import FileLock, Timeout
        lock = FileLock(fill_lock_path(cache.root))
        try:
            lock.acquire(timeout=0)
        except (Timeout, OSError):  # another run fills it, or a read-only cache folder: read and score, never write
            return None
        return lock
    lock = take() if dist.is_main else None
    writer = bool(broadcast_object(lock is not None))
    if sources is not None:
        cache.eval_filler = lambda split: fill_eval(cache, teacher, sources[split], split, spec, chunk, dist,
                                                    autocast, workers, writer)
    filler = SlotFiller(cache, teacher, chunk, dist.device, autocast, writer, lock)
    return filler, ("fills" if writer else "reads")
