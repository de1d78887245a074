"""Image domains for continual generative learning: tasks over MNIST, Fashion-MNIST or .npz arrays.

A task is a spec `source[:classes=...][:invert][:rotate=DEG]` (`parse_task`) loaded into uint8 arrays
(`load_task`); `domain_tensor` turns them into the models' [-1, 1] input. `data_fingerprints` gives the content
digest of every file a task reads, which a run records so that a resume or re-evaluation notices changed data.
"""
from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from common.content_hash import file_digests
from common.errors import UserError

DOMAINS = ("mnist", "fashion_mnist")


@dataclass
class TaskData:
    """One task: uint8 images [N, 28, 28] and labels [N] for train and test, after subset and transform.
    `background` is the grey level of the images' background (0, or 255 after :invert), which pads them."""
    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    background: int = 0


TASK_FORM = "source[:classes=0-4|1,3][:invert][:rotate=DEG]"
DOMAIN_CLASSES = {"mnist": 10, "fashion_mnist": 10}  # labels 0..9


def _bad_task(spec: str, problem: str) -> UserError:
    return UserError(f"task '{spec}' in data.tasks: {problem}. A task is written {TASK_FORM}, e.g. "
                     "mnist:classes=0-4:rotate=30, with source mnist, fashion_mnist or an .npz file")


def _parse_classes(spec: str, value: str, source: str) -> list[int]:
    """`0-4`, `1,3` or a mix (`0-2,7`) -> the sorted labels; each item a non-negative integer or an ascending
    range, and within 0..9 for mnist and fashion_mnist."""
    classes: list[int] = []
    for item in filter(None, (i.strip() for i in value.split(","))):
        lo, dash, hi = item.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise _bad_task(spec, f"cannot read the class subset 'classes={value}' (the item '{item}'): classes "
                                  "are non-negative integer labels or ranges lo-hi, e.g. classes=0-4 or classes=1,3")
        first, last = int(lo), int(hi) if dash else int(lo)
        if last < first:
            raise _bad_task(spec, f"the class range '{item}' is empty (it runs backwards); write it as "
                                  f"{last}-{first}")
        classes += range(first, last + 1)
    known = DOMAIN_CLASSES.get(source)
    if known is not None and max(classes) >= known:
        raise _bad_task(spec, f"{source} has the classes 0-{known - 1}, not {[c for c in classes if c >= known]}")
    return sorted(set(classes))


def parse_task(spec: str) -> dict:
    """`source[:classes=0-4|0,2,4][:invert][:rotate=DEG]` -> {"source", "classes", "invert", "rotate"}.
    source is mnist, fashion_mnist or a path to an .npz file with `images` uint8 [N, 28, 28] and `labels`.
    Every malformed option (unknown, given twice, a missing or unreadable value) is refused, naming the spec."""
    parts = str(spec).split(":")
    out = {"source": parts[0], "classes": None, "invert": False, "rotate": 0.0}
    if not parts[0].endswith(".npz") and parts[0] not in DOMAINS:
        raise UserError(f"unknown task '{parts[0]}' in data.tasks: use {', '.join(DOMAINS)} or an .npz file "
                        f"(images uint8 [N, 28, 28], labels [N]), optionally followed by options: {TASK_FORM}")
    seen: set[str] = set()
    for part in parts[1:]:
        name, has_value, value = part.partition("=")
        if name in seen:
            raise _bad_task(spec, f"the option '{name}' is given twice")
        seen.add(name)
        if name == "invert" and not has_value:
            out["invert"] = True
        elif name == "rotate" and has_value:
            try:
                out["rotate"] = float(value)
            except ValueError:
                out["rotate"] = math.nan
            if not math.isfinite(out["rotate"]):
                raise _bad_task(spec, f"cannot read 'rotate={value}': rotate takes a finite angle in degrees, e.g. "
                                      "rotate=30")
        elif name == "classes" and has_value:
            if not value.strip(" ,"):
                raise _bad_task(spec, "the class subset is empty; write e.g. classes=0-4 or classes=1,3")
            out["classes"] = _parse_classes(spec, value, parts[0])
        elif name in ("invert", "rotate", "classes"):
            raise _bad_task(spec, f"cannot read '{part}': " + ("invert takes no value" if name == "invert" else
                                                               f"{name} needs a value, e.g. {name}=" +
                                                               ("30" if name == "rotate" else "0-4")))
        else:
            raise _bad_task(spec, f"cannot read '{part}'; options are classes=..., invert, rotate=DEG")
    return out


def _not_npz(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not a valid .npz file ({why}); it may be truncated or another kind of file. "
                     "Copy or download it again, or write it with numpy.savez(path, images=..., labels=...)")


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise UserError(f"task file {path} does not exist")
    if not zipfile.is_zipfile(path):  # np.load would try a non-zip file as a pickle and talk of allow_pickle
        raise _not_npz(path, "not a zip archive")
    try:
        with np.load(path) as arrays:
            missing = [k for k in ("images", "labels") if k not in arrays.files]
            if missing:
                raise UserError(f"{path} lacks the array(s) {missing} (it has {arrays.files}); it needs `images` "
                                "uint8 [N, 28, 28] and `labels` [N]")
            images, labels = arrays["images"], arrays["labels"]
    except UserError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc) or "Object arrays" in str(exc):
            raise UserError(f"{path}: `images` or `labels` is an array of Python objects; it needs `images` uint8 "
                            "[N, 28, 28] and integer `labels` [N]") from None
        raise _not_npz(path, f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:  # a damaged member: zlib, zipfile and numpy errors alike
        raise _not_npz(path, f"{type(exc).__name__}: {exc}") from None
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise UserError(f"{path}: `images` is {images.dtype} {list(images.shape)}, expected uint8 [N, 28, 28]")
    if labels.shape != (len(images),):
        raise UserError(f"{path}: `labels` has shape {list(labels.shape)}, expected [{len(images)}]")
    integral = np.issubdtype(labels.dtype, np.integer) or (
        np.issubdtype(labels.dtype, np.floating) and np.isfinite(labels).all() and (labels == np.round(labels)).all())
    if not integral:
        raise UserError(f"{path}: `labels` ({labels.dtype}) must hold integer class labels")
    return images, labels.astype(np.int64)


# what torchvision's MNIST and FashionMNIST read from <root>/<class name>/raw once downloaded and unpacked
TORCHVISION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                     "t10k-labels-idx1-ubyte")


def _load_torchvision(name: str, root: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    import torchvision
    cls = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST}[name]
    raw = root / cls.__name__ / "raw"
    try:
        ds = cls(str(root), train=train, download=True)
    except Exception as exc:
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if all((raw / f).is_file() for f in TORCHVISION_FILES):  # all there: torchvision read them, downloaded nothing
            raise UserError(f"cannot read {name} from data.root={root} ({detail}): the files under {raw} are damaged "
                            "or incomplete (an interrupted download, a bad copy). Delete that folder to download "
                            "them again, or copy them over again") from None
        raise UserError(f"cannot download {name} into data.root={root} ({detail}). Offline? Put the torchvision "
                        f"files under {root}, or use .npz tasks, e.g. data.tasks=[../shared/data/mnist_test.npz,"
                        "../shared/data/fashion_mnist_test_part.npz]") from None
    return ds.data.numpy().astype(np.uint8), ds.targets.numpy().astype(np.int64)


TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}  # torchvision's class names


def task_files(spec: str, root: str) -> dict[str, Path]:
    """The files task `spec` reads, by a name that does not depend on data.root (a key that may change between
    start and resume): an .npz task's path as the spec gives it, or torchvision's raw files as
    `<class name>/raw/<file>` under data.root."""
    source = parse_task(spec)["source"]
    if source.endswith(".npz"):
        return {source: Path(source)}
    folder = f"{TORCHVISION_FOLDERS[source]}/raw"
    return {f"{folder}/{name}": Path(root) / folder / name for name in TORCHVISION_FILES}


def data_fingerprints(specs: list[str], root: str) -> list[dict[str, str]]:
    """For each task of `specs`, {file name (task_files): SHA-256 of its bytes}. The digests come from
    common.content_hash (memoised per folder: an unchanged file costs one stat), one call per folder, so that tasks
    whose files share a folder keep each other's digests in its index."""
    files = [task_files(spec, root) for spec in specs]
    by_folder: dict[Path, list[Path]] = {}
    for path in (p.resolve() for task in files for p in task.values()):
        if path not in by_folder.setdefault(path.parent, []):
            by_folder[path.parent].append(path)
    digests: dict[Path, str] = {}
    for folder, paths in by_folder.items():
        digests.update(zip(paths, file_digests(folder, [str(p) for p in paths])))
    return [{name: digests[path.resolve()] for name, path in task.items()} for task in files]


MIN_TRAIN_IMAGES, MIN_TEST_IMAGES = 1, 3  # a task trains on something and has a test FID (more than 2 images)


def load_task(spec: str, root: str, seed: int, test_fraction: float = 0.2) -> TaskData:
    """A task by its spec (see parse_task). npz tasks get a seeded train/test split."""
    t = parse_task(spec)
    if t["source"].endswith(".npz"):
        images, labels = _load_npz(Path(t["source"]))
        order = np.random.default_rng([seed, 17]).permutation(len(images))
        n_test = max(1, int(round(test_fraction * len(images))))
        te, tr = order[:n_test], order[n_test:]
        splits = (images[tr], labels[tr], images[te], labels[te])
    else:
        splits = (*_load_torchvision(t["source"], Path(root), True), *_load_torchvision(t["source"], Path(root), False))
    tr_x, tr_y, te_x, te_y = splits
    if t["classes"] is not None:
        keep_tr, keep_te = np.isin(tr_y, t["classes"]), np.isin(te_y, t["classes"])
        present = sorted(set(tr_y.tolist()) | set(te_y.tolist()))
        absent = [c for c in t["classes"] if c not in present]
        if absent:  # a subset naming a class the data lacks is a typo, not a smaller task
            raise UserError(f"task '{spec}': no images of classes {absent} (labels present: {present}); name only "
                            "classes the data holds")
        tr_x, tr_y, te_x, te_y = tr_x[keep_tr], tr_y[keep_tr], te_x[keep_te], te_y[keep_te]

    if len(tr_x) < MIN_TRAIN_IMAGES or len(te_x) < MIN_TEST_IMAGES:
        raise UserError(f"task '{spec}' has {len(tr_x)} training and {len(te_x)} test images after its class subset "
                        f"and the data.test_fraction={test_fraction} split; a task needs at least {MIN_TRAIN_IMAGES} "
                        f"training and {MIN_TEST_IMAGES} test images (FID needs more than 2). Lower "
                        "data.test_fraction or widen the class subset")
    # MNIST-like sources have a black (0) background; inverted, it is white. Rotation fills the corners it uncovers
    # with that background, and domain_tensor pads with it, so no frame of the other colour appears.
    background = 255 if t["invert"] else 0

    def transform(x: np.ndarray) -> np.ndarray:
        if t["invert"]:
            x = 255 - x
        if t["rotate"]:
            x = TF.rotate(torch.from_numpy(x)[:, None], t["rotate"], fill=[float(background)]).squeeze(1).numpy()
        return np.ascontiguousarray(x)

    return TaskData(str(spec), transform(tr_x), tr_y, transform(te_x), te_y, background)


def domain_tensor(images: np.ndarray, channels: int = 1, background: int = 0) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, channels, 32, 32] in [-1, 1], padded by 2 pixels of the `background` grey
    level (exact, no resize)."""
    x = torch.from_numpy(images).float().div_(127.5).sub_(1.0)[:, None]
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=background / 127.5 - 1.0)
    return x.repeat(1, channels, 1, 1) if channels > 1 else x
