"""The cached teacher: run the frozen teacher once, before training, and never during it.

For every training image the cache holds K augmentation records and the teacher's fp16 logits on exactly those
views; the training loader replays one record per image per epoch (`augment.replay_view_index`), so the student sees
the view the teacher scored. The views are made the way the run makes the student's: with PIL in the loader, or,
when the run augments on the device (`data.augment_on`), with the same tensor operations on the same device
(`augment.apply_aug_records`), so teacher and student see identical pixels either way. It also holds the teacher's
logits on the evaluation view of every train, validation and test image (for difficulty scores and the teacher's
reported accuracy).

Layout: `<cache_dir>/<fingerprint>/<split>.npy`, one memory-mapped structured array per split, plus `meta.json`.
It is built under the lock `<cache_dir>/.<fingerprint>.lock` into `<cache_dir>/.<fingerprint>.building-*`, with
the arrays' space reserved first, and published by one rename (`locked_build`): a second run needing the same cache
waits and reuses it, and a build that is killed or runs out of space leaves nothing a later run reads. The
fingerprint hashes the teacher weights, class restriction and input normalisation (its own mean and std, which it
sees whatever the student's are), the dataset (its content: `content_hash`), the view recipe and where views are
made, K, the seed and the numerics the teacher ran in (device type, autocast dtype, TF32), so a changed input lands
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
from imagedata.augment import (AUG_RECORD_LEN, AugSpec, apply_aug_record, apply_aug_records, cache_record_rng,
                               eval_view, sample_aug_record)
from imagedata.image_sources import SPLITS, ImageSource
from imagedata.normalization import input_norm, normalize_batch
from imagedata.predecode import PredecodedSource
from imagedata.samplers import ShardSampler
from imagedata.views import make_loader, unpack_raw

CACHE_VERSION = 2  # 2: images decoded by image_sources.to_rgb (16-bit scaled to 8, alpha over white)


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over every tensor of the module's state dict (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def teacher_numerics(autocast, device: torch.device) -> dict:
    """What sets the rounding of the teacher's logits: the device type, the dtype autocast actually gives a
    convolution (float32 when off), and on CUDA whether float32 convolutions and matmuls may run in TF32."""
    probe = torch.ones(1, 1, 1, 1, device=device)
    with torch.no_grad(), autocast():
        dtype = torch.nn.functional.conv2d(probe, probe).dtype
    numerics = {"device": device.type, "autocast": str(dtype).removeprefix("torch.")}
    if device.type == "cuda":
        numerics["tf32"] = {"conv": bool(torch.backends.cudnn.allow_tf32),
                            "matmul": bool(torch.backends.cuda.matmul.allow_tf32)}
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
        records = np.stack([sample_aug_record(cache_record_rng(self.seed, index, v), img.width, img.height, self.spec)
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
    """Read access to a built cache. Memory maps open lazily, once per process (DataLoader workers included)."""

    def __init__(self, root: Path, meta: dict):
        self.root, self.meta = Path(root), meta
        self.num_views, self.num_classes = meta["num_views"], meta["num_classes"]
        self.feature_dim = meta.get("feature_dim")
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, split: str) -> np.ndarray:
        if split not in self._arrays:
            self._arrays[split] = np.load(self.root / f"{split}.npy", mmap_mode="r")
        return self._arrays[split]

    def __getstate__(self):  # memory maps are reopened in each worker, not pickled
        return {"root": self.root, "meta": self.meta}

    def __setstate__(self, state):
        self.__init__(state["root"], state["meta"])

    def train_view(self, index: int, view: int) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        """(augmentation record float32 [R], {"teacher_logits": float16 [C]} plus "teacher_features": float16 [D]
        when the cache holds features) of training view `view` of image `index`."""
        row = self.array("train")[index]
        teacher = {"teacher_logits": torch.from_numpy(np.array(row["view_logits"][view]))}
        if self.feature_dim:
            teacher["teacher_features"] = torch.from_numpy(np.array(row["view_features"][view]))
        return np.array(row["view_records"][view]), teacher

    def eval_logits(self, split: str) -> np.ndarray:
        """Teacher logits on the evaluation view of every image of `split`: float16 [N, C]."""
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


CACHE_WHAT, CACHE_KEY = "teacher cache", "teacher.cache_dir"


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


def _new_array(path: Path, dtype: np.dtype, rows: int) -> None:
    """A .npy file of `rows` zeroed rows whose blocks are allocated now (see locked_build.reserve)."""
    np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows,)).flush()
    reserve(path, path.stat().st_size)


def build_or_load_cache(teacher, sources: dict[str, ImageSource], spec: AugSpec, num_views: int, seed: int,
                        cache_dir: Path, dist: DistInfo, batch_size: int, workers: int,
                        autocast, device_aug: bool = False, with_features: bool = False) -> tuple[TeacherCache, dict]:
    """The cache for this teacher and data, built now if missing or stale. Returns (cache, info) where info says
    whether it was built and how long that took. Building is sharded over ranks; rank 0 holds the build lock
    (`locked_build`: another run building the same cache is waited for, then reused), checks the free space,
    merges the shards, writes the metadata and publishes the finished cache with one rename.
    `device_aug`: the run augments on its device (`views.TrainViews`), so the training views are made there too.
    `with_features`: also store the teacher's pooled features of every training view (feature KD methods)."""
    if device_aug and not isinstance(sources["train"], PredecodedSource):
        raise UserError("augmentation on the device needs the pre-decoded data path: set data.preprocessed=true")
    num_classes = len(sources["train"].class_names)
    feature_dim = teacher.feature_dim if with_features else None
    if with_features and not feature_dim:
        raise UserError("the teacher exposes no pooled features to cache (no forward_features / forward_head / "
                        "num_features); use a timm classifier as the teacher, or a logit KD method")
    fingerprint = cache_fingerprint(teacher, sources, spec, num_views, seed, teacher_numerics(autocast, dist.device),
                                    device_aug, feature_dim)
    digest = broadcast_object(hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:20])
    root = Path(cache_dir) / digest
    meta = broadcast_object(_valid(root, fingerprint, sources, num_classes, feature_dim) if dist.is_main else None)
    if meta is not None:  # published, so whole: no lock needed to read it (a read-only shared cache works)
        return TeacherCache(root, meta), {"built": False, "path": str(root), "build_s": 0.0}

    return _build_cache(teacher, sources, spec, num_views, seed, root, fingerprint, dist, batch_size, workers,
                        autocast, device_aug, num_classes, feature_dim)


def _build_cache(teacher, sources: dict[str, ImageSource], spec: AugSpec, num_views: int, seed: int, root: Path,
                 fingerprint: dict, dist: DistInfo, batch_size: int, workers: int, autocast, device_aug: bool,
                 num_classes: int, feature_dim: int | None) -> tuple[TeacherCache, dict]:
    """`build_or_load_cache` once no valid cache is published at `root`: under rank 0's build lock, reuse one
    another run published meanwhile, or score every view into a fresh build directory and publish it."""
    import time
    dtypes = {split: split_dtype(split, num_views, num_classes, feature_dim) for split in SPLITS}
    sharded = dist.world_size > 1
    # the merged arrays, and while they are merged the ranks' shard files as well
    need = sum(dtypes[s].itemsize * len(sources[s]) for s in SPLITS) * (2 if sharded else 1)
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
            return None, str(build_dir)

        start = time.perf_counter()
        meta, path = on_main_rank(prepare, dist)
        if meta is not None:
            return TeacherCache(root, meta), {"built": False, "path": str(root), "build_s": 0.0}
        _score_all(teacher, sources, spec, num_views, seed, Path(path), dist, batch_size, workers, autocast,
                   device_aug, feature_dim, dtypes, need)
        meta = {"fingerprint": fingerprint, "num_views": num_views, "num_classes": num_classes,
                "feature_dim": feature_dim}

        meta = on_main_rank(lambda: _finish_build(build_dir, root, meta, sources, dist.world_size, need, start),
                            dist)
    except BaseException:
        discard(build_dir)  # rank 0's unfinished build (None elsewhere): nothing partial stays
        raise
    finally:
        lock.close()
    return TeacherCache(root, meta), {"built": True, "path": str(root), "build_s": meta["build_s"]}


def _finish_build(build_dir: Path, root: Path, meta: dict, sources: dict[str, ImageSource], world_size: int,
                  need: int, start: float) -> dict:
    """Rank 0, after every rank scored its shard: merge the shards, record the teacher's accuracy and the
    metadata, publish."""
    import time
    with write_errors(root.parent, CACHE_WHAT, CACHE_KEY, need):
        if world_size > 1:
            merge_shards(build_dir, world_size)
        cache = TeacherCache(build_dir, meta)
        for split in SPLITS:  # the teacher's accuracy on each split's evaluation view, for the record
            pred = np.asarray(cache.eval_logits(split), dtype=np.float32).argmax(1)
            meta[f"teacher/{split}_acc1"] = float((pred == sources[split].labels).mean() * 100)
        del cache
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


def _score_split(teacher, src: ImageSource, split: str, spec: AugSpec, k: int, seed: int, build_dir: Path,
                 out_path: Path, sampler: ShardSampler, dist: DistInfo, batch_size: int, workers: int, autocast,
                 device_aug: bool, feature_dim: int | None, need: int) -> None:
    """This rank's shard of one split (`k` training views per image, 0 for validation and test) into `out_path`:
    the merged array (one process) or this rank's shard file, with the image indices it scored beside it. No
    collective."""
    device, sharded = dist.device, dist.world_size > 1
    with write_errors(build_dir.parent, CACHE_WHAT, CACHE_KEY, need):
        out = np.load(out_path, mmap_mode="r+")
    views = CacheViews(src, spec, seed, k, device_aug)
    loader = make_loader(views, sampler, max(1, batch_size // (k + 1)), workers, device)
    scored = []  # the indices this rank scored, in order (KD_TRACE_DIR: tests check the ranks partition them)
    for batch in tqdm(loader, desc=f"teacher cache [{split}]", disable=not dist.is_main, dynamic_ncols=True):
        # rows of `out`: the images' own (one shared file) or the next ones of this rank's shard file
        idx = np.arange(len(scored), len(scored) + len(batch["index"])) if sharded else batch["index"].numpy()
        scored += batch["index"].tolist()
        images = batch_views(batch, spec, device)  # [B, V, 3, S, S]
        b, v = images.shape[:2]
        with autocast():
            x = normalize_batch(images.flatten(0, 1), device, True, input_norm(teacher))
            logits, features = teacher.logits_and_features(x) if feature_dim and k else (teacher(x), None)
        logits = logits.float().view(b, v, -1).cpu().numpy().astype(np.float16)
        out["eval_logits"][idx] = logits[:, -1]
        if k:
            out["view_logits"][idx] = logits[:, :k]
            out["view_records"][idx] = batch["records"].numpy()
        if features is not None:
            out["view_features"][idx] = features.float().view(b, v, -1)[:, :k].cpu().numpy().astype(np.float16)
    with write_errors(build_dir.parent, CACHE_WHAT, CACHE_KEY, need):
        out.flush()
    del out
    if sharded:
        _save_index(build_dir / f"{split}.rank{dist.rank}.index.npy", scored, need)
    trace("cache_shard", {"split": split, "indices": scored})


def _save_index(path: Path, scored: list[int], need: int) -> None:
    with write_errors(path.parent.parent, CACHE_WHAT, CACHE_KEY, need):
        np.save(path, np.asarray(scored, dtype=np.int64))
