"""Image sources: where a dataset's images come from (the hub, a `save_to_disk` folder, an ImageFolder tree or the
synthetic generator), as one `ImageSource` per split: index -> PIL image, plus labels and class names.

Split names: the one table SPLIT_ALIASES says which folder or DatasetDict key serves each split (`validation` is
also found as `val` or `valid`). A dataset with train and test but no validation split (CIFAR-10 as
`save_to_disk`, say) gets a validation split carved from its training split by `carve_validation`
(data.val_fraction, data.val_seed).
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.content_hash import changed_since_hashed, folder_fingerprint
from common.errors import UserError
from imagedata.synthetic_data import make_synthetic_dataset

SPLITS = ("train", "validation", "test")
# The names each split may go by, in order of preference: the one alias rule for DatasetDict keys and folders.
SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "val", "valid"), "test": ("test",)}
MINI_IMAGENET_HUB_ID = "timm/mini-imagenet"
VAL_FRACTION = 0.1  # default data.val_fraction: the share of train carved out when a dataset has no validation


# ----------------------------------------------------------------------------------------------------------------
# Image sources: index -> PIL image, plus labels and class names.
# ----------------------------------------------------------------------------------------------------------------
class ImageSource:
    """One split of an image-classification dataset."""

    labels: np.ndarray          # int64 [N]
    class_names: list[str]
    fingerprint: str
    difficulty: np.ndarray | None = None  # float32 [N], ground truth (synthetic data only)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        raise NotImplementedError

    def changed_files(self) -> list[str]:
        """Files of this split written since they were last hashed (`content_hash.changed_since_hashed`): which
        files a changed fingerprint comes from, when that is known. Call it before `fingerprint`, which re-hashes
        them. [] for data that is not read from files."""
        return []

    def _open(self, fp, index: int) -> Image.Image:
        """The image in `fp` (a path or a file object) as 8-bit RGB (`to_rgb`): the first frame of a multi-frame
        file (GIF, TIFF, WebP), the one Image.open selects. A file that cannot be decoded is a UserError naming it."""
        try:
            with Image.open(fp) as img:
                img.load()
                return to_rgb(img)
        except Image.DecompressionBombError as exc:  # not an OSError: Pillow refuses before decoding anything
            raise UserError(f"image {self.describe(index)} is too large to decode: {exc} Pillow refuses images above "
                            f"{2 * Image.MAX_IMAGE_PIXELS:,} px as a guard against decompression bombs. If the image "
                            "is genuine, store it downscaled (training resizes every image to data.image_size anyway, "
                            "so a short side of a few hundred px loses nothing); otherwise remove it (and its "
                            "dataset row)") from None
        except (UnidentifiedImageError, UndecodableImage, OSError, SyntaxError, ValueError, EOFError) as exc:
            raise UserError(f"cannot read image {self.describe(index)}: {exc}. "
                            "Remove or replace the file (and its dataset row) and run again") from None


# ----------------------------------------------------------------------------------------------------------------
# Decoding: every Pillow mode a dataset image can arrive in, as 8-bit RGB.
# ----------------------------------------------------------------------------------------------------------------
# torchvision's ImageFolder extensions, plus GIF (its first frame)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited over white, as a viewer on a page shows them
RGB_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")  # Pillow's own conversion is exact enough
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class UndecodableImage(ValueError):
    """An image in a mode (or value range) that `to_rgb` does not turn into 8-bit RGB; the message says why."""


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as an 8-bit RGB image (a new image; `img` is left as it is). Pillow's convert("RGB") clips wider
    integer and float pixels to 255 (a 16-bit PNG came out 99.75% white), so:

    - 16-bit grey (I;16, I;16L, I;16B, I;16N, and mode I, a 32-bit int, with values in 0..65535: what a 16-bit PNG
      or TIFF opens as): v >> 8, the high byte. That is what Pillow itself does with 16-bit RGB, RGBA and LA PNGs
      (it opens them as 8-bit RGB / RGBA), so a 16-bit image decodes alike in every band layout, and 8-bit data
      stored as 16 bits (v = 257 k) comes back as k exactly. Mode I with values outside 0..65535 is refused.
    - mode I whose values all lie in 0..255: 8-bit grey kept in a 32-bit container (an int32 TIFF written from 8-bit
      data), taken as is; its high byte would be 0, a black image. (Mode I declares no bit depth, so the values tell;
      a 16-bit image that dark, under 0.4% of full scale, would read alike, and is black either way to the eye.)
    - float (F): values in [0, 1] are scaled by 255 and rounded; others (or NaN) are refused, their scale is unknown.
    - alpha (LA, La, PA, RGBA, RGBa, and 1, L, P or RGB with a `transparency` entry): composited over
      ALPHA_BACKGROUND (white), never dropped: the colour under a transparent pixel is whatever the encoder left there
      (often black). A 16-bit grey image's `transparency` entry is the one thing ignored.
    - 1, L, P, RGB, RGBX, CMYK, YCbCr, LAB, HSV: Pillow's convert("RGB").
    Any other mode raises UndecodableImage."""
    mode = img.mode
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(img)
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if low < 0 or high > 65535:
            raise UndecodableImage(f"its pixels are 32-bit integers (mode {mode}) ranging over {low}..{high}, beyond "
                                   "the 16-bit range 0..65535 that is scaled to 8 bits; store it as an 8- or 16-bit "
                                   "image")
        shift = 0 if mode == "I" and high <= 255 else 8  # mode I: the value range says whether it is 8-bit data
        return Image.fromarray((values.astype(np.int64) >> shift).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        values = np.asarray(img, dtype=np.float32)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise UndecodableImage(f"its pixels are floats (mode F) ranging over {np.nanmin(values):g}.."
                                   f"{np.nanmax(values):g}; only [0, 1] is read (scaled by 255), other ranges have no "
                                   "known scale. Store it as an 8- or 16-bit image")
        return Image.fromarray(np.rint(values * 255).astype(np.uint8), "L").convert("RGB")
    if mode in ALPHA_MODES or (mode in ("1", "L", "P", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA") if mode != "La" else img.convert("LA").convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (*ALPHA_BACKGROUND, 255)), rgba).convert("RGB")
    if mode in RGB_MODES:
        return img.convert("RGB")
    raise UndecodableImage(f"its pixel mode '{mode}' is not one this pipeline decodes ({', '.join(RGB_MODES)}, "
                           f"{', '.join(ALPHA_MODES)}, {', '.join(SIXTEEN_BIT_MODES)}, I, F); convert it to RGB")


def check_labels(labels: np.ndarray, num_classes: int, where: str, column: str = "label") -> None:
    """Every label (int64 [N]) indexes one of the `num_classes` class names. Checked when a split is loaded: a label
    outside [0, C) would otherwise crash the loss at the first batch that draws it (or index garbage on a GPU)."""
    bad = (labels < 0) | (labels >= num_classes)
    if not bad.any():
        return
    rows = np.flatnonzero(bad)
    hint = (" Hugging Face datasets use -1 for 'no label', e.g. in the test split of a competition dataset: such a "
            "split cannot be trained or scored on. Replace it with a labelled split (for example save_to_disk a "
            "DatasetDict whose test split is a labelled part of train)" if (labels[rows] == -1).any() else "")
    raise UserError(f"{where}: {len(rows)} of {len(labels)} `{column}` values lie outside 0..{num_classes - 1} (its "
                    f"{num_classes} classes), e.g. row {rows[0]} has {labels[rows[0]]} (values "
                    f"{np.unique(labels[rows])[:5].tolist()}).{hint}")


def _hf_column(ds, preferred: str, kind) -> str | None:
    """The column named `preferred`, else the only column whose feature is a `kind` (e.g. CIFAR-10's `img`)."""
    if preferred in ds.column_names:
        return preferred
    of_kind = [name for name, feature in ds.features.items() if isinstance(feature, kind)]
    return of_kind[0] if len(of_kind) == 1 else None


class HFImageSource(ImageSource):
    """A split of a Hugging Face dataset with an image column and a ClassLabel label column: `image` and `label`,
    or else the only Image and the only ClassLabel column (CIFAR-10's `img` and `label`)."""

    def __init__(self, ds, split: str, origin: str):
        from datasets import ClassLabel
        from datasets import Image as HFImage
        image_col, label_col = _hf_column(ds, "image", HFImage), _hf_column(ds, "label", ClassLabel)
        missing = [name for name, col in (("image", image_col), ("label", label_col)) if col is None]
        if missing:
            raise UserError(f"{origin} split '{split}' lacks column(s) {missing}; it has {ds.column_names}. "
                            "Expected an `image` (or a single Image-typed) column and a ClassLabel `label` column")
        self.split, self.origin = split, origin
        if not hasattr(ds.features[label_col], "names"):
            raise UserError(f"{origin} split '{split}': the `{label_col}` column is {ds.features[label_col]}, not a "
                            "ClassLabel, so the class names (needed to align the teacher's outputs) are unknown. "
                            f"Cast it with ds.cast_column('{label_col}', datasets.ClassLabel(names=[...]))")
        self.class_names = list(ds.features[label_col].names)
        try:
            self.labels = np.asarray(ds[label_col], dtype=np.int64)
        except (TypeError, ValueError):  # None: a row without a label
            raise UserError(f"{origin} split '{split}': the `{label_col}` column has empty (None) labels; every row "
                            "needs a class") from None
        check_labels(self.labels, len(self.class_names), f"{origin} split '{split}'", label_col)
        self.difficulty = np.asarray(ds["difficulty"], dtype=np.float32) if "difficulty" in ds.column_names else None
        # Decode ourselves so a corrupt file is reported by name instead of deep inside `datasets`.
        self.ds = ds.cast_column(image_col, HFImage(decode=False)).select_columns([image_col])
        self.image_col = image_col
        self.hf_fingerprint = getattr(ds, "_fingerprint", None) or f"{origin}:{split}:{len(ds)}"
        self.data_files = [f["filename"] for f in ds.cache_files]  # arrow files; none for a dataset in memory

    @functools.cached_property
    def fingerprint(self) -> str:
        """`datasets`' own fingerprint, which hashes the table for a dataset built in memory (the synthetic one) but
        for one read from arrow files (save_to_disk, the hub cache) says how it was made: the hub revision, or the
        paths and mtimes of the image files it was built from, which an image changed in place can keep. So the
        arrow files' bytes are hashed in too (`content_hash`, once per file)."""
        if not self.data_files:
            return self.hf_fingerprint
        return folder_fingerprint(self._files_root(), self.data_files, salt=self.hf_fingerprint)

    def _files_root(self) -> str:
        return os.path.commonpath([os.path.dirname(f) for f in self.data_files])

    def changed_files(self) -> list[str]:
        return changed_since_hashed(self._files_root(), self.data_files) if self.data_files else []

    def describe(self, index: int) -> str:
        path = (self.ds[int(index)][self.image_col] or {}).get("path")
        return f"{self.origin} split '{self.split}' row {index}" + (f" ({path})" if path else "")

    def load(self, index: int) -> Image.Image:
        cell = self.ds[int(index)][self.image_col]
        fp = io.BytesIO(cell["bytes"]) if cell and cell.get("bytes") else (cell or {}).get("path")
        if fp is None:
            raise UserError(f"{self.describe(index)} has no image (an empty `{self.image_col}` cell). Remove the row "
                            "or give it an image")
        return self._open(fp, index)


class FolderImageSource(ImageSource):
    """A split stored as an ImageFolder tree: `<root>/<class>/<image>`."""

    def __init__(self, root: Path, class_names: list[str]):
        from torchvision.datasets.folder import make_dataset
        self.root, self.class_names = root, class_names
        skipped = []  # files below a class folder that are not images by their extension: said, not dropped silently

        def is_image(path: str) -> bool:
            if path.lower().endswith(IMAGE_EXTENSIONS):
                return True
            if not Path(path).name.startswith("."):  # .DS_Store and the like
                skipped.append(path)
            return False
        items = make_dataset(str(root), {c: i for i, c in enumerate(class_names)}, is_valid_file=is_image,
                             allow_empty=True)
        if not items:
            raise UserError(f"{root} holds no images (expected <class>/<image>.jpg below it; image files end in "
                            f"{', '.join(IMAGE_EXTENSIONS)})")
        if skipped and int(os.environ.get("RANK", 0)) == 0:
            kinds = sorted({Path(p).suffix.lower() or "(none)" for p in skipped})
            print(f"warning: {root}: skipped {len(skipped)} file(s) that are not images by their extension "
                  f"({', '.join(kinds[:5])}), e.g. {skipped[0]}; images end in {', '.join(IMAGE_EXTENSIONS)}")
        self.paths = [p for p, _ in items]
        self.labels = np.asarray([y for _, y in items], dtype=np.int64)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Of the files' relative paths and bytes (`content_hash`), computed when a cache or pre-decoded copy first
        asks: a changed image gets new ones even when it keeps its name and byte size."""
        return folder_fingerprint(self.root, self.paths)

    def changed_files(self) -> list[str]:
        return changed_since_hashed(self.root, self.paths)

    def describe(self, index: int) -> str:
        return self.paths[int(index)]

    def load(self, index: int) -> Image.Image:
        return self._open(self.paths[int(index)], index)


# ----------------------------------------------------------------------------------------------------------------
# Loading a dataset by config.
# ----------------------------------------------------------------------------------------------------------------
def load_splits(data_cfg) -> dict[str, ImageSource]:
    """The train / validation / test splits named by `data.name` and `data.path`."""
    if data_cfg.name == "synthetic":
        ds = make_synthetic_dataset(num_classes=data_cfg.synthetic.num_classes,
                                    images_per_class=data_cfg.synthetic.images_per_class,
                                    image_size=data_cfg.synthetic.image_size, seed=data_cfg.synthetic.seed,
                                    eval_images_per_class=data_cfg.synthetic.eval_images_per_class or None,
                                    label_noise=data_cfg.synthetic.label_noise)
        return {s: HFImageSource(ds[s], s, "synthetic") for s in SPLITS}
    if data_cfg.path:
        return load_local(Path(data_cfg.path), data_cfg.val_fraction, data_cfg.val_seed)
    return load_hub(data_cfg.name, data_cfg.val_fraction, data_cfg.val_seed)


def load_hub(name: str, val_fraction: float = VAL_FRACTION, val_seed: int = 0) -> dict[str, ImageSource]:
    import datasets
    try:
        ds = datasets.load_dataset(name)
    except Exception as exc:  # network, auth, missing repo: many exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"cannot load dataset '{name}' from the Hugging Face hub ({type(exc).__name__}: {first[:300]}). "
            f"Offline? On a machine with internet run `python -c \"import datasets; "
            f"datasets.load_dataset('{name}').save_to_disk('mini-imagenet')\"`, copy the folder here and pass "
            "data.path=mini-imagenet (an ImageFolder tree <split>/<synset>/<image> works too). To try the whole "
            "pipeline offline first: python train_student.py --config configs/quickstart.yaml (generated data, "
            "a few minutes on a CPU)") from None
    return _hf_splits(ds, f"hub dataset {name}", val_fraction, val_seed)


def find_split(split: str, available) -> str | None:
    """The name under which `split` appears among `available` (DatasetDict keys or folder names), by
    SPLIT_ALIASES; None when it is absent."""
    return next((name for name in SPLIT_ALIASES[split] if name in available), None)


def _hf_splits(ds, origin: str, val_fraction: float = VAL_FRACTION, val_seed: int = 0) -> dict[str, ImageSource]:
    out = {}
    for split in SPLITS:
        found = find_split(split, ds)
        if found is None and split == "validation" and val_fraction > 0:
            continue  # carved from train below
        if found is None:
            raise UserError(f"{origin} has splits {list(ds.keys())}; need train, test and validation (or "
                            "data.val_fraction > 0 to carve validation from train)")
        if len(ds[found]) == 0:  # training would divide by zero; evaluation would report 0% of nothing
            raise UserError(f"{origin} split '{found}' has no rows; every split needs images")
        out[split] = HFImageSource(ds[found], split, origin)
    train_names = out["train"].class_names
    for split, src in out.items():  # a label indexes its own split's ClassLabel: other names, other classes
        if src.class_names != train_names:
            raise UserError(f"{origin} split '{split}' has the {len(src.class_names)} classes "
                            f"{_shown(src.class_names)}, train the {len(train_names)} classes {_shown(train_names)}; "
                            "every split needs the "
                            "training split's ClassLabel (the same names in the same order), or its labels would mean "
                            "other classes")
    return _with_validation(out, origin, val_fraction, val_seed)


def _shown(names: list[str], first: int = 5) -> str:
    return ", ".join(names[:first]) + (", ..." if len(names) > first else "")


ARCHIVE_EXTRACT = {".zip": "unzip {path} -d data/", ".tar": "tar -xf {path} -C data/",
                   ".tar.gz": "tar -xzf {path} -C data/", ".tgz": "tar -xzf {path} -C data/",
                   ".tar.bz2": "tar -xjf {path} -C data/", ".tar.xz": "tar -xJf {path} -C data/",
                   ".7z": "7z x {path} -odata/", ".rar": "unrar x {path} data/"}


def check_data_path(path: Path) -> None:
    """data.path names an existing folder (cheap: a config check may call it before anything is built)."""
    if not path.exists():
        raise UserError(f"data.path={path} does not exist")
    if not path.is_dir():
        extract = next((cmd for ext, cmd in ARCHIVE_EXTRACT.items() if path.name.lower().endswith(ext)), None)
        raise UserError(f"data.path={path} is a file; it must be a folder: a `save_to_disk` dataset folder or an "
                        "ImageFolder tree <split>/<class>/<image>"
                        + (f". It looks like an archive: extract it first (e.g. `{extract.format(path=path)}`) and "
                           "pass the extracted folder" if extract else ""))


def load_local(path: Path, val_fraction: float = VAL_FRACTION, val_seed: int = 0) -> dict[str, ImageSource]:
    """A `save_to_disk` DatasetDict folder, or an ImageFolder tree `<path>/{train,validation,test}/<class>/<img>`
    (validation may be named val or valid, or be absent: then it is carved from train, see `carve_validation`)."""
    check_data_path(path)
    if (path / "dataset_dict.json").is_file():
        import datasets
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise UserError(f"data.path={path} looks like a save_to_disk folder but cannot be read: {exc}") from None
        return _hf_splits(ds, f"dataset at {path}", val_fraction, val_seed)
    folders = [d.name for d in path.iterdir() if d.is_dir()]
    split_dirs = {split: path / found for split in SPLITS if (found := find_split(split, folders)) is not None}
    if "train" not in split_dirs or "test" not in split_dirs or ("validation" not in split_dirs and val_fraction <= 0):
        raise UserError(f"data.path={path} is not a dataset: expected a `save_to_disk` folder (with "
                        "dataset_dict.json) or an ImageFolder tree with train/, test/ and validation/ (or val/, "
                        "valid/; absent, it is carved from train by data.val_fraction) folders of <class>/<image> "
                        "files")
    class_names = sorted(d.name for d in split_dirs["train"].iterdir() if d.is_dir())
    for split, folder in split_dirs.items():  # images of a class the model does not have would be skipped silently
        unknown = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name not in class_names)
        if unknown:
            raise UserError(f"{folder} has class folder(s) {unknown[:5]} that {split_dirs['train']} lacks; every "
                            "split must use the training split's classes")
    sources = {s: FolderImageSource(d, class_names) for s, d in split_dirs.items()}
    return _with_validation(sources, f"data.path={path}", val_fraction, val_seed)


# ----------------------------------------------------------------------------------------------------------------
# A validation split carved from train, for datasets that ship only train and test.
# ----------------------------------------------------------------------------------------------------------------
class SubsetSource(ImageSource):
    """Rows `indices` (int64 [M], into `base`) of another source, under their own fingerprint."""

    def __init__(self, base: ImageSource, indices: np.ndarray, fingerprint: str):
        self.base, self.indices, self.fingerprint = base, np.asarray(indices, dtype=np.int64), fingerprint
        self.labels, self.class_names = base.labels[self.indices], base.class_names
        self.difficulty = base.difficulty[self.indices] if base.difficulty is not None else None

    def load(self, index: int) -> Image.Image:
        return self.base.load(int(self.indices[index]))

    def describe(self, index: int) -> str:
        return self.base.describe(int(self.indices[index]))

    def changed_files(self) -> list[str]:
        return self.base.changed_files()


def carve_validation(train: ImageSource, fraction: float, seed: int) -> tuple[SubsetSource, SubsetSource]:
    """(remaining train, validation): M = round(fraction * N) of the N training images, drawn uniformly without
    replacement by a permutation seeded with `seed` alone, form validation; the other N - M stay in train. Both keep
    the original order and get fingerprints derived from train's, `fraction` and `seed`, so the split, and any
    teacher cache or pre-decoded copy built on it, is the same on every call and every rank."""
    if not 0 < fraction < 1:
        raise UserError(f"data.val_fraction={fraction} must lie in (0, 1) to carve a validation split from train")
    n = len(train)
    m = int(round(fraction * n))
    if not 0 < m < n:
        raise UserError(f"data.val_fraction={fraction} of {n} training images leaves {m} for validation and "
                        f"{n - m} for training; both need at least one")
    order = np.random.default_rng(seed).permutation(n)

    def part(name: str, indices: np.ndarray) -> SubsetSource:
        key = [train.fingerprint, n, "carved-validation-v1", fraction, seed, name]
        return SubsetSource(train, np.sort(indices), hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16])

    return part("train", order[m:]), part("validation", order[:m])


def _with_validation(sources: dict[str, ImageSource], origin: str, fraction: float, seed: int
                     ) -> dict[str, ImageSource]:
    """`sources` in SPLITS order, with validation carved from train (and said so on rank 0) when it is missing."""
    if "validation" not in sources:
        sources["train"], sources["validation"] = carve_validation(sources["train"], fraction, seed)
        if int(os.environ.get("RANK", 0)) == 0:
            n_val, n_train = len(sources["validation"]), len(sources["train"])
            print(f"{origin} has no validation split: carved {n_val} of its {n_val + n_train} training images "
                  f"as validation (data.val_fraction={fraction}, data.val_seed={seed}); training uses the other "
                  f"{n_train}")
    return {s: sources[s] for s in SPLITS}


# ----------------------------------------------------------------------------------------------------------------
# What a run read: each split's content fingerprint, recorded in the run and its checkpoints.
# ----------------------------------------------------------------------------------------------------------------
def data_record(sources: dict[str, ImageSource]) -> dict[str, dict]:
    """{split: {"fingerprint", "images", "classes"}} of the splits as loaded (before any pre-decoding): the content
    fingerprint (`content_hash` for files), the number of images and a digest of the class names. A run records
    it in run.json and its checkpoints, so that a resume or an evaluation can tell that the data changed."""
    return {split: {"fingerprint": src.fingerprint, "images": len(src),
                    "classes": hashlib.sha256(json.dumps(list(src.class_names)).encode()).hexdigest()[:16]}
            for split, src in sources.items()}


def data_changes(recorded: dict, sources: dict[str, ImageSource], splits=SPLITS) -> list[str]:
    """One line per split of `splits` whose data differs from the `recorded` `data_record`: its images (with the
    files written since they were last hashed, when the digest index knows them), their number or its classes.
    Splits the record lacks are not compared."""
    changes = []
    for split in splits:
        if not isinstance(recorded.get(split), dict) or split not in sources:
            continue
        src, then = sources[split], recorded[split]
        suspects = src.changed_files()  # before the fingerprint, which hashes them again
        now = {"fingerprint": src.fingerprint, "images": len(src),
               "classes": hashlib.sha256(json.dumps(list(src.class_names)).encode()).hexdigest()[:16]}
        if then.get("images") not in (None, now["images"]):
            changes.append(f"the {split} split had {then['images']} images, it has {now['images']} now")
        elif then.get("classes") not in (None, now["classes"]):
            changes.append(f"the {split} split's class names changed")
        elif then.get("fingerprint") != now["fingerprint"]:
            named = (f"; written since they were last read: {', '.join(suspects[:5])}"
                     f"{f' and {len(suspects) - 5} more' if len(suspects) > 5 else ''}" if suspects else "")
            changes.append(f"the {split} split's images changed (content fingerprint {then.get('fingerprint')} in "
                           f"the run, {now['fingerprint']} now{named})")
    return changes
