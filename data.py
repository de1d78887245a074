"""Data: mini-ImageNet (hub, save_to_disk folder or ImageFolder tree), the synthetic stand-in, views and samplers.

Every training view is a pure function of (seed, epoch, index): its augmentation record (crop box, flip, jitter
factors and order) is drawn from `np.random.default_rng([seed, index, epoch, ...])`. So data loading carries no
hidden RNG state, resume is exact, worker count does not change the numbers, and the cached-teacher mode can
store a record and replay exactly the view the teacher scored.

Images leave the workers as uint8 CHW tensors; `normalize_batch` turns them into normalised floats on the device.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError

from utils import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "validation", "test")
MINI_IMAGENET_HUB_ID = "timm/mini-imagenet"

# Layout of one augmentation record (float32): crop box, flip, ColorJitter factors, ColorJitter order.
AUG_FIELDS = ("top", "left", "height", "width", "flip", "brightness", "contrast", "saturation",
              "order0", "order1", "order2")
AUG_RECORD_LEN = len(AUG_FIELDS)


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

    def _open(self, fp, index: int) -> Image.Image:
        try:
            img = Image.open(fp)
            img.load()
            return img.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise UserError(f"cannot read image {self.describe(index)}: {exc}. "
                            "Remove or replace the file (and its dataset row) and run again") from None


class HFImageSource(ImageSource):
    """A split of a Hugging Face dataset with an `image` column and a ClassLabel `label` column."""

    def __init__(self, ds, split: str, origin: str):
        from datasets import Image as HFImage
        missing = {"image", "label"} - set(ds.column_names)
        if missing:
            raise UserError(f"{origin} split '{split}' lacks column(s) {sorted(missing)}; "
                            f"it has {ds.column_names}. Expected an `image` and a ClassLabel `label` column")
        self.split, self.origin = split, origin
        if not hasattr(ds.features["label"], "names"):
            raise UserError(f"{origin} split '{split}': the `label` column is {ds.features['label']}, not a "
                            "ClassLabel, so the class names (needed to align the teacher's outputs) are unknown. "
                            "Cast it with ds.cast_column('label', datasets.ClassLabel(names=[...]))")
        self.class_names = list(ds.features["label"].names)
        self.labels = np.asarray(ds["label"], dtype=np.int64)
        self.difficulty = np.asarray(ds["difficulty"], dtype=np.float32) if "difficulty" in ds.column_names else None
        # Decode ourselves so a corrupt file is reported by name instead of deep inside `datasets`.
        self.ds = ds.cast_column("image", HFImage(decode=False)).select_columns(["image"])
        self.fingerprint = getattr(ds, "_fingerprint", None) or f"{origin}:{split}:{len(ds)}"

    def describe(self, index: int) -> str:
        path = self.ds[int(index)]["image"].get("path")
        return f"{self.origin} split '{self.split}' row {index}" + (f" ({path})" if path else "")

    def load(self, index: int) -> Image.Image:
        cell = self.ds[int(index)]["image"]
        fp = io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell.get("path")
        return self._open(fp, index)


class FolderImageSource(ImageSource):
    """A split stored as an ImageFolder tree: `<root>/<class>/<image>`."""

    def __init__(self, root: Path, class_names: list[str]):
        from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
        self.root, self.class_names = root, class_names
        items = make_dataset(str(root), {c: i for i, c in enumerate(class_names)}, IMG_EXTENSIONS,
                             allow_empty=True)
        if not items:
            raise UserError(f"{root} holds no images (expected <class>/<image>.jpg below it)")
        self.paths = [p for p, _ in items]
        self.labels = np.asarray([y for _, y in items], dtype=np.int64)
        listing = "\n".join(f"{Path(p).relative_to(root)}:{Path(p).stat().st_size}" for p in self.paths)
        self.fingerprint = hashlib.sha256(listing.encode()).hexdigest()[:16]

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
        return load_local(Path(data_cfg.path))
    return load_hub(data_cfg.name)


def load_hub(name: str) -> dict[str, ImageSource]:
    import datasets
    try:
        ds = datasets.load_dataset(name)
    except Exception as exc:  # network, auth, missing repo: many exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"cannot load dataset '{name}' from the Hugging Face hub ({type(exc).__name__}: {first[:300]}). "
            f"Offline? On a machine with internet run `python -c \"import datasets; "
            f"datasets.load_dataset('{name}').save_to_disk('mini-imagenet')\"`, copy the folder here and pass "
            "data.path=mini-imagenet (an ImageFolder tree <split>/<synset>/<image> works too), "
            "or try the pipeline offline with data.name=synthetic") from None
    return _hf_splits(ds, f"hub dataset {name}")


def _hf_splits(ds, origin: str) -> dict[str, ImageSource]:
    names = {"train": ["train"], "validation": ["validation", "val", "valid"], "test": ["test"]}
    out = {}
    for split, candidates in names.items():
        found = next((c for c in candidates if c in ds), None)
        if found is None:
            raise UserError(f"{origin} has splits {list(ds.keys())}; need train, validation and test")
        if len(ds[found]) == 0:  # training would divide by zero; evaluation would report 0% of nothing
            raise UserError(f"{origin} split '{found}' has no rows; every split needs images")
        out[split] = HFImageSource(ds[found], split, origin)
    return out


def load_local(path: Path) -> dict[str, ImageSource]:
    """A `save_to_disk` DatasetDict folder, or an ImageFolder tree `<path>/{train,validation,test}/<class>/<img>`."""
    if not path.exists():
        raise UserError(f"data.path={path} does not exist")
    if (path / "dataset_dict.json").is_file():
        import datasets
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise UserError(f"data.path={path} looks like a save_to_disk folder but cannot be read: {exc}") from None
        return _hf_splits(ds, f"dataset at {path}")
    split_dirs = {}
    for split, candidates in {"train": ["train"], "validation": ["validation", "val"], "test": ["test"]}.items():
        split_dirs[split] = next((path / c for c in candidates if (path / c).is_dir()), None)
    if any(d is None for d in split_dirs.values()):
        raise UserError(f"data.path={path} is not a dataset: expected a `save_to_disk` folder (with "
                        "dataset_dict.json) or an ImageFolder tree with train/, validation/ (or val/) and test/ "
                        "folders of <class>/<image> files")
    class_names = sorted(d.name for d in split_dirs["train"].iterdir() if d.is_dir())
    for split, folder in split_dirs.items():  # images of a class the model does not have would be skipped silently
        unknown = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name not in class_names)
        if unknown:
            raise UserError(f"{folder} has class folder(s) {unknown[:5]} that {split_dirs['train']} lacks; every "
                            "split must use the training split's classes")
    return {s: FolderImageSource(d, class_names) for s, d in split_dirs.items()}


# ----------------------------------------------------------------------------------------------------------------
# Label alignment: dataset label k -> ImageNet-1k output index, from the lists timm ships.
# ----------------------------------------------------------------------------------------------------------------
def _timm_info(name: str) -> list[str]:
    import timm.data
    path = Path(timm.data.__file__).parent / "_info" / name
    return path.read_text().split()


def mini_imagenet_synsets() -> list[str]:
    return _timm_info("mini_imagenet_synsets.txt")


def imagenet_class_index(class_names: list[str]) -> list[int]:
    """ImageNet-1k logit index of each dataset label, checked against timm's mini-ImageNet synset and index lists.

    Dataset label k must be named timm's k-th mini-ImageNet synset (or `<synset>_<anything>`); then it maps to the
    k-th entry of `mini_imagenet_indices.txt`. Any other naming or order raises UserError at start-up."""
    synsets = mini_imagenet_synsets()
    indices = [int(i) for i in _timm_info("mini_imagenet_indices.txt")]
    imagenet = _timm_info("imagenet_synsets.txt")
    if len(class_names) > len(synsets):
        raise UserError(f"the dataset has {len(class_names)} classes; a 1000-way ImageNet teacher can only be "
                        f"restricted to (a prefix of) the {len(synsets)} mini-ImageNet classes")
    for k, name in enumerate(class_names):
        if name.split("_")[0] != synsets[k]:
            raise UserError(f"label alignment failed: dataset label {k} is named '{name}' but timm's mini-ImageNet "
                            f"list has '{synsets[k]}' at position {k}. The teacher's ImageNet logits would be "
                            "read for the wrong classes: use the timm/mini-imagenet label order (synsets sorted)")
        assert imagenet[indices[k]] == synsets[k], "timm's mini-ImageNet index file disagrees with its synsets"
    return indices[: len(class_names)]


# ----------------------------------------------------------------------------------------------------------------
# Synthetic data: learnable classes (shape x colour x texture), nuisance driven by a stored per-sample difficulty.
# ----------------------------------------------------------------------------------------------------------------
_SHAPES = ("disc", "square", "triangle", "cross", "ring", "diamond", "hbar", "vbar")
_COLOURS = ((230, 40, 40), (40, 200, 60), (50, 90, 235), (240, 210, 30), (200, 50, 220), (30, 210, 220))
_TEXTURES = ("solid", "stripes", "checker", "dots")


def synthetic_class_attributes(num_classes: int) -> list[tuple[int, int, int]]:
    """(shape, colour, texture) per class. The first 24 classes differ in all three where possible."""
    total = len(_SHAPES) * len(_COLOURS) * len(_TEXTURES)
    if not 2 <= num_classes <= min(total, 100):
        raise UserError(f"data.synthetic.num_classes={num_classes}: must be between 2 and 100")
    combos = [(c % 8, c % 6, c % 4) for c in range(24)]
    combos += [t for t in np.ndindex(8, 6, 4) if t not in combos]
    return [tuple(int(v) for v in t) for t in combos[:num_classes]]


def _shape_mask(shape: int, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    name = _SHAPES[shape]
    if name == "disc":
        return dx**2 + dy**2 <= r**2
    if name == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if name == "triangle":
        return (dy <= 0.8 * r) & (dy >= -r + 2 * np.abs(dx))
    if name == "cross":
        w = 0.33 * r
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    if name == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if name == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.1 * r
    if name == "hbar":
        return (np.abs(dx) <= r) & (np.abs(dy) <= 0.35 * r)
    return (np.abs(dy) <= r) & (np.abs(dx) <= 0.35 * r)  # vbar


def _texture(texture: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative brightness pattern in [0.45, 1]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = max(3.0, size / 6.0)
    phase = rng.uniform(0, period)
    name = _TEXTURES[texture]
    if name == "solid":
        return np.ones((size, size), np.float32)
    if name == "stripes":
        return np.where(((xx + yy + phase) // (period / 2)) % 2 == 0, 1.0, 0.45).astype(np.float32)
    if name == "checker":
        return np.where(((xx + phase) // (period / 2) + (yy + phase) // (period / 2)) % 2 == 0, 1.0, 0.45
                        ).astype(np.float32)
    return np.where(((xx + phase) % period - period / 2) ** 2 + ((yy + phase) % period - period / 2) ** 2
                    <= (period / 3.2) ** 2, 0.45, 1.0).astype(np.float32)  # dots


def render_synthetic_image(attrs: tuple[int, int, int], difficulty: float, size: int,
                           rng: np.random.Generator) -> np.ndarray:
    """One uint8 [size, size, 3] image of a class. Difficulty d in [0, 1] scales every nuisance:
    object scale (shrinks), position offset, background clutter, contrast loss, pixel noise and occlusion."""
    shape, colour, texture = attrs
    d = float(difficulty)
    bg = rng.uniform(70, 150, size=3).astype(np.float32)
    img = np.broadcast_to(bg, (size, size, 3)).copy()
    # background clutter: a few soft random blobs, stronger with difficulty
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(int(round(1 + 4 * d))):
        bx, by, bs = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0.08, 0.25) * size
        blob = np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * bs**2))[..., None]
        img += blob * rng.uniform(-60, 60, size=3) * (0.3 + d)
    r = size * (0.34 - 0.16 * d) * rng.uniform(0.9, 1.1)
    max_off = (size / 2 - r) * (0.15 + 0.85 * d)
    cx, cy = size / 2 + rng.uniform(-max_off, max_off), size / 2 + rng.uniform(-max_off, max_off)
    mask = _shape_mask(shape, size, cx, cy, r)
    col = np.asarray(_COLOURS[colour], np.float32)
    col = (1 - 0.55 * d) * col + 0.55 * d * bg  # contrast loss towards the background
    obj = col[None, None, :] * _texture(texture, size, rng)[..., None]
    img[mask] = obj[mask]
    if d > 0.05:  # occluder: a grey patch over part of the object
        side = max(1, int(round(size * 0.45 * d * rng.uniform(0.7, 1.0))))
        ox = int(np.clip(cx + rng.uniform(-r, r) - side / 2, 0, size - side))
        oy = int(np.clip(cy + rng.uniform(-r, r) - side / 2, 0, size - side))
        img[oy:oy + side, ox:ox + side] = rng.uniform(60, 180)
    img += rng.normal(0, 40 * d, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_synthetic_dataset(num_classes: int = 10, images_per_class: int = 100, image_size: int = 32,
                           seed: int = 0, eval_images_per_class: int | None = None, label_noise: float = 0.0):
    """A `datasets.DatasetDict` with train / validation / test splits, columns image, label (ClassLabel),
    clean_label (ClassLabel: the class the image was drawn from) and difficulty (float, the true difficulty in
    [0, 1] that drove each image's nuisance). Deterministic in its arguments. Class names are the first
    `num_classes` mini-ImageNet synsets, so a 1000-way ImageNet teacher can be restricted to them exactly as on the
    real data.

    `label_noise` = eta in [0, 1): symmetric label noise on the TRAINING split only (validation and test stay
    clean). Exactly round(eta * N) training samples, chosen uniformly without replacement, get their label
    replaced by a different class drawn uniformly from the other C - 1, so that P(label = j | clean = i) =
    eta / (C - 1) for every j != i (the "symmetric" noise of e.g. Wu, Dyer and Neyshabur, "When do curricula
    work?", ICLR 2021). The flips come from their own stream, seeded by (seed, split): the images, difficulties
    and clean labels are those of label_noise = 0."""
    import datasets
    if images_per_class < 1 or image_size < 16:
        raise UserError("data.synthetic needs images_per_class >= 1 and image_size >= 16")
    if not 0.0 <= label_noise < 1.0:
        raise UserError(f"data.synthetic.label_noise={label_noise} must lie in [0, 1) (the fraction of training "
                        "labels replaced by another class; 0 = clean)")
    attrs = synthetic_class_attributes(num_classes)
    per_split = {"train": images_per_class,
                 "validation": eval_images_per_class or max(1, images_per_class // 4),
                 "test": eval_images_per_class or max(1, images_per_class // 4)}
    names = mini_imagenet_synsets()[:num_classes]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names),
                                  "clean_label": datasets.ClassLabel(names=names),
                                  "difficulty": datasets.Value("float32")})
    out = {}
    for split_id, (split, n) in enumerate(per_split.items()):
        rng = np.random.default_rng([seed, split_id])
        labels = np.repeat(np.arange(num_classes), n)
        rng.shuffle(labels)
        difficulty = rng.uniform(0, 1, size=len(labels)).astype(np.float32)
        images = []
        for y, d in zip(labels, difficulty):
            arr = render_synthetic_image(attrs[y], d, image_size, rng)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
            images.append({"bytes": buf.getvalue(), "path": None})
        noisy = flip_labels(labels, label_noise, num_classes, np.random.default_rng([seed, split_id, 1009])) \
            if split == "train" and label_noise > 0 else labels
        out[split] = datasets.Dataset.from_dict(
            {"image": images, "label": noisy.tolist(), "clean_label": labels.tolist(),
             "difficulty": difficulty.tolist()}, features=features)
        key = ["synthetic-v1", num_classes, images_per_class, image_size, seed, split, per_split[split]]
        if split == "train" and label_noise > 0:  # clean data keep their fingerprint (and their teacher caches)
            key.append(label_noise)
        fp = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
        out[split]._fingerprint = fp
    return datasets.DatasetDict(out)


def flip_labels(labels: np.ndarray, fraction: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Symmetric label noise: a copy of `labels` in which exactly round(fraction * N) entries, chosen uniformly
    without replacement, are moved to a different class drawn uniformly from the other C - 1 (class y + s mod C,
    s uniform in 1..C-1)."""
    noisy = np.array(labels, copy=True)
    flip = rng.choice(len(noisy), size=int(round(fraction * len(noisy))), replace=False)
    noisy[flip] = (noisy[flip] + rng.integers(1, num_classes, size=len(flip))) % num_classes
    return noisy


def write_synthetic_jpeg_folder(root: Path, num_classes: int = 10, images_per_class: int = 20, height: int = 375,
                                seed: int = 0, quality: int = 90) -> Path:
    """An ImageFolder tree `<root>/{train,validation,test}/<synset>/<n>.JPEG` of synthetic images stored as
    full-resolution 4:3 JPEGs (height x 4/3 height, like mini-ImageNet's 500 x 375 photos), for measuring the
    JPEG-decoding input path offline. Validation and test get a quarter of `images_per_class` each."""
    root = Path(root)
    attrs = synthetic_class_attributes(num_classes)
    names = mini_imagenet_synsets()[:num_classes]
    width = int(round(height * 4 / 3))
    for split_id, (split, n) in enumerate({"train": images_per_class, "validation": max(1, images_per_class // 4),
                                           "test": max(1, images_per_class // 4)}.items()):
        rng = np.random.default_rng([seed, split_id, 7])
        for c, name in enumerate(names):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = render_synthetic_image(attrs[c], float(rng.uniform()), height, rng)
                Image.fromarray(arr).resize((width, height), Image.BILINEAR).save(
                    root / split / name / f"{name}_{i:05d}.JPEG", quality=quality)
    return root


# ----------------------------------------------------------------------------------------------------------------
# Views: recordable training augmentation, deterministic evaluation view.
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AugSpec:
    """RandomResizedCrop(size, scale, ratio) + horizontal flip + ColorJitter(b, c, s), as torchvision defines them."""
    image_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    jitter: tuple[float, float, float] = (0.2, 0.2, 0.2)
    eval_crop_ratio: float = 0.875  # Resize(size / 0.875) + CenterCrop(size): 256 -> 224

    @classmethod
    def from_cfg(cls, data_cfg) -> "AugSpec":
        return cls(image_size=data_cfg.image_size, scale=(data_cfg.crop_scale_min, 1.0),
                   flip=data_cfg.hflip, jitter=tuple(data_cfg.color_jitter), eval_crop_ratio=data_cfg.eval_crop_ratio)


def sample_aug_record(rng: np.random.Generator, width: int, height: int, spec: AugSpec) -> np.ndarray:
    """Draw one augmentation record (see AUG_FIELDS) for an image of the given size.

    The crop follows RandomResizedCrop's rule: up to 10 tries of area ~ U(scale) * area and log-uniform aspect
    ratio; failing that, the largest centred crop whose ratio lies within `ratio`."""
    area = width * height
    box = None
    log_ratio = (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*spec.scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            box = (int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)
            break
    if box is None:
        in_ratio = width / height
        if in_ratio < spec.ratio[0]:
            w, h = width, int(round(width / spec.ratio[0]))
        elif in_ratio > spec.ratio[1]:
            h, w = height, int(round(height * spec.ratio[1]))
        else:
            w, h = width, height
        box = ((height - h) // 2, (width - w) // 2, h, w)
    flip = float(spec.flip and rng.uniform() < 0.5)
    factors = [rng.uniform(max(0.0, 1 - j), 1 + j) if j > 0 else 1.0 for j in spec.jitter]
    order = rng.permutation(3)
    return np.asarray([*box, flip, *factors, *order], dtype=np.float32)


def apply_aug_record(img: Image.Image, record: np.ndarray, spec: AugSpec) -> torch.Tensor:
    """The uint8 [3, S, S] training view that `record` describes."""
    top, left, h, w = (int(v) for v in record[:4])
    out = TF.resized_crop(img, top, left, h, w, [spec.image_size, spec.image_size], antialias=True)
    if record[4] > 0.5:
        out = TF.hflip(out)
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for k in record[8:11].astype(int):
        if record[5 + k] != 1.0:
            out = adjust[k](out, float(record[5 + k]))
    return TF.pil_to_tensor(out)


def eval_view(img: Image.Image, spec: AugSpec) -> torch.Tensor:
    """Resize the short side to size / eval_crop_ratio (256 for 224), centre-crop size: uint8 [3, S, S]."""
    resize = int(round(spec.image_size / spec.eval_crop_ratio))
    out = TF.center_crop(TF.resize(img, resize, antialias=True), [spec.image_size, spec.image_size])
    return TF.pil_to_tensor(out)


def train_record_rng(seed: int, index: int, epoch: int) -> np.random.Generator:
    """The RNG behind the fresh (uncached) training view of `index` at `epoch`."""
    return np.random.default_rng([seed, index, epoch, 0])


def cache_record_rng(seed: int, index: int, view: int) -> np.random.Generator:
    """The RNG behind cached view `view` of `index`."""
    return np.random.default_rng([seed, index, view, 1])


def replay_view_index(seed: int, index: int, epoch: int, num_views: int) -> int:
    """Which of the K cached views `index` replays at `epoch`: each view once per K epochs, in a seeded order."""
    cycle, pos = divmod(epoch, num_views)
    return int(np.random.default_rng([seed, index, cycle, 2]).permutation(num_views)[pos])


def normalize_batch(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 normalised with ImageNet mean and std, on `device`."""
    x = images.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    return (x.float() - mean) / std


# ----------------------------------------------------------------------------------------------------------------
# Pre-decoded splits (data.preprocessed=true): every image decoded once into one uint8 memory map.
# ----------------------------------------------------------------------------------------------------------------
PREDECODE_VERSION = "predecoded-v1"


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


def _grey(x: torch.Tensor) -> torch.Tensor:
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _grey_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean grey level per image, float32 [B, 1, 1, 1]. Summed in float64, where it is exact (each grey value is 0 or
    a float32 >= 0.1, so a multiple of 2^-27, and a sum of up to 512 x 512 of them fits in 53 bits): the result does
    not depend on the summation order, so an image gets the same contrast jitter whatever batch it is in. That is
    what lets the teacher cache score exactly the pixels the student later trains on (`teacher_cache`)."""
    grey = _grey(x).double()
    return (grey.sum(dim=(1, 2, 3), keepdim=True) / grey[0].numel()).float()


def apply_aug_records(images: torch.Tensor | list[torch.Tensor], records: torch.Tensor, spec: AugSpec
                      ) -> torch.Tensor:
    """`apply_aug_record` for a batch, on the images' device (e.g. the GPU). `images` is a list of uint8
    [3, H_i, W_i] (`unpack_raw`) or a uint8 batch [B, 3, H, W]; `records` [B, 11], or [B, K, 11] for K views of
    each image. Returns uint8 [B, 3, S, S] (or [B, K, 3, S, S]).

    Crop + resize: torchvision's antialiased bilinear `resized_crop` per view (boxes differ in size). Then, for
    the whole batch at once, the flip, then brightness, contrast and saturation in each record's own order, with
    torchvision's formulas (blend with black, with the mean grey level, with the grey image), truncated to
    integers after each step as torchvision does on uint8. Matches the PIL path up to resampling differences
    (under one grey level on average). Every view depends only on its image and record, never on the rest of the
    batch, so on one device the same record gives the same pixels in any batch."""
    views = records.shape[1] if records.dim() == 3 else None
    records = records.reshape(-1, records.shape[-1])
    owner = torch.arange(len(images)).repeat_interleave(views) if views else torch.arange(len(images))
    device, size = images[0].device, spec.image_size
    rec = records.to(device=device, dtype=torch.float32)
    boxes = records.detach().cpu().numpy().astype(int)[:, :4]
    x = torch.stack([TF.resized_crop(images[i], int(t), int(le), int(h), int(w), [size, size], antialias=True)
                     for i, (t, le, h, w) in zip(owner.tolist(), boxes)]).float()
    flip = rec[:, 4] > 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    rows = torch.arange(len(rec), device=device)
    for k in range(3):  # the k-th jitter of each sample: op order[k] with its factor
        op = rec[:, 8 + k].long()
        f = rec[rows, 5 + op].view(-1, 1, 1, 1)
        op = op.view(-1, 1, 1, 1)
        mean = _grey_mean(x)
        other = torch.where(op == 0, torch.zeros_like(mean), torch.where(op == 1, mean, _grey(x)))
        x = torch.where(f == 1.0, x, (x * f + other * (1 - f)).clamp_(0, 255).floor_())
    x = x.to(torch.uint8)
    return x.view(len(images), views, *x.shape[1:]) if views else x


def collate_views(items: list[dict]) -> dict:
    """default_collate, except for `raw` images (different sizes, augmented later on the device): their bytes travel
    back to back in one flat uint8 tensor `raw`, with each image's [C, H, W] in `raw_shape` (int64 [B, 3]). One
    tensor to move between processes and to the device, and no padding: padded to its largest photo (e.g. one
    1600 x 1200 among 500 x 375 ones), a batch of originals would weigh several times its images."""
    raw = [item.pop("raw") for item in items] if items and "raw" in items[0] else None
    batch = torch.utils.data.default_collate(items)
    if raw is not None:
        batch["raw"] = torch.cat([img.reshape(-1) for img in raw])
        batch["raw_shape"] = torch.tensor([list(img.shape) for img in raw], dtype=torch.int64)
    return batch


def unpack_raw(batch: dict, device: torch.device) -> list[torch.Tensor]:
    """The `raw` images of a `collate_views` batch as uint8 [C, H_i, W_i] views into one copy on `device`."""
    flat = batch["raw"].to(device, non_blocking=True)
    images, offset = [], 0
    for c, h, w in batch["raw_shape"].tolist():
        images.append(flat[offset:offset + c * h * w].view(c, h, w))
        offset += c * h * w
    return images


# ----------------------------------------------------------------------------------------------------------------
# Torch datasets. Training items are addressed by (index, epoch) so persistent workers need no epoch state.
# ----------------------------------------------------------------------------------------------------------------
class TrainViews(torch.utils.data.Dataset):
    """Training views. With `cache` (a TeacherCache), each item replays one of the K cached views and carries the
    teacher logits computed on exactly that view; without, the view is drawn fresh from (seed, index, epoch).

    With `device_aug` (a PredecodedSource only), an item carries the stored image (`raw`, uint8 [3, H, W]) and its
    augmentation `record` instead of the view; the trainer applies the record on its device (`unpack_raw`, then
    `apply_aug_records`), replayed cached-teacher views included."""

    def __init__(self, source: ImageSource, spec: AugSpec, seed: int, cache=None, device_aug: bool = False):
        if device_aug and not isinstance(source, PredecodedSource):
            raise UserError("augmentation on the device needs the pre-decoded data path: set data.preprocessed=true")
        self.source, self.spec, self.seed, self.cache, self.device_aug = source, spec, seed, cache, device_aug

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple) -> dict:
        """key: (index, epoch) or (index, epoch, valid) from TrainBatchSampler; `valid` (default True) is False for
        a padded duplicate that must not reach the loss."""
        index, epoch = key[0], key[1]
        img = self.source.tensor(index) if self.device_aug else self.source.load(index)
        item = {"label": int(self.source.labels[index]), "index": index,
                "valid": bool(key[2]) if len(key) > 2 else True}
        if self.cache is None:
            height, width = (img.shape[1], img.shape[2]) if self.device_aug else (img.height, img.width)
            record = sample_aug_record(train_record_rng(self.seed, index, epoch), width, height, self.spec)
        else:
            view = replay_view_index(self.seed, index, epoch, self.cache.num_views)
            record, teacher = self.cache.train_view(index, view)
            item.update(teacher)  # teacher_logits, and teacher_features when the cache holds them
        if self.device_aug:
            item["raw"], item["record"] = img, torch.as_tensor(np.asarray(record, dtype=np.float32))
        else:
            item["image"] = apply_aug_record(img, record, self.spec)
        return item


class EvalViews(torch.utils.data.Dataset):
    """Evaluation views (resize + centre crop)."""

    def __init__(self, source: ImageSource, spec: AugSpec):
        self.source, self.spec = source, spec

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return {"image": eval_view(self.source.load(index), self.spec),
                "label": int(self.source.labels[index]), "index": index}


def pad_and_shard(order: np.ndarray, num_replicas: int, rank: int) -> np.ndarray:
    """Rank `rank`'s shard of a global order: pad the order by wrapping to a multiple of num_replicas, then take
    every num_replicas-th entry from `rank`. Shard position j holds global position rank + j * num_replicas, which
    is a padded duplicate exactly when it is >= len(order): padding (fewer than num_replicas items over all
    ranks) only ever sits at a shard's end. `TrainBatchSampler` marks those items invalid."""
    total = math.ceil(len(order) / num_replicas) * num_replicas
    if total > len(order):
        order = np.concatenate([order, np.resize(order, total - len(order))])
    return order[rank:total:num_replicas]


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled (index, epoch) pairs, sharded over ranks like DistributedSampler: every rank derives the same
    permutation from (seed, epoch), pads it by wrapping to a multiple of the world size and takes every
    `num_replicas`-th entry from `rank` (`pad_and_shard`). Call `set_epoch` before each epoch."""

    def __init__(self, size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0, shuffle: bool = True):
        self.size, self.seed, self.num_replicas, self.rank, self.shuffle = size, seed, num_replicas, rank, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=g).numpy()

    def num_selected(self) -> int:
        """Distinct samples this epoch uses over all ranks (padding excluded): the whole set."""
        return self.size

    def __len__(self) -> int:
        return math.ceil(self.size / self.num_replicas)

    def __iter__(self):
        for i in pad_and_shard(self.global_order(), self.num_replicas, self.rank):
            yield int(i), self.epoch


class TrainBatchSampler(torch.utils.data.Sampler):
    """Batches of keys (index, epoch, valid) over one rank's shard of a training sampler (EpochSampler or
    curriculum_dataloader.CurriculumSampler), so that every selected sample reaches the loss exactly once per epoch:

    - nothing is dropped: the last batch may be smaller than batch_size;
    - a last batch of ONE item is merged into the previous batch (which then holds batch_size + 1), because
      BatchNorm in train mode cannot normalise a single sample whose features are 1x1 (and a 1-sample batch
      statistic is meaningless). A shard of a single item (selection <= world size) gets one masked duplicate;
    - padded duplicates (`pad_and_shard`: the last shard position of some ranks when the selection size M is not
      a multiple of the world size W) carry valid = False. The trainer runs them through the forward pass, so
      every rank takes the same steps with non-empty batches, but masks them out of the loss and of every count.

    Every rank holds the same number of batches with the same bounds. Batch k covers the global positions
    [a_k W, b_k W) of the padded order (shard positions [a_k, b_k) on every rank), so the number of valid samples
    in step k over all ranks, `global_valid(k)` = min(b_k W, M) - a_k W, is known without communication."""

    def __init__(self, sampler, batch_size: int):
        if batch_size < 1:
            raise UserError(f"batch size {batch_size} must be >= 1")
        self.sampler, self.batch_size = sampler, batch_size

    def bounds(self) -> list[tuple[int, int]]:
        """[(a_k, b_k)]: shard positions of each batch this epoch."""
        n, b = len(self.sampler), self.batch_size
        out = [(a, min(a + b, n)) for a in range(0, n, b)]
        if b > 1 and len(out) > 1 and out[-1][1] - out[-1][0] == 1:
            out[-2:] = [(out[-2][0], n)]
        return out

    def global_valid(self, step: int) -> int:
        """Valid samples in batch `step` summed over all ranks."""
        a, b = self.bounds()[step]
        w = self.sampler.num_replicas
        return max(0, min(b * w, self.sampler.num_selected()) - a * w)

    def __len__(self) -> int:
        return len(self.bounds())

    def __iter__(self):
        m, w, r = self.sampler.num_selected(), self.sampler.num_replicas, self.sampler.rank
        keys = [(int(i), int(e), r + j * w < m) for j, (i, e) in enumerate(self.sampler)]
        for a, b in self.bounds():
            batch = keys[a:b]
            if len(batch) == 1 and self.batch_size > 1:
                batch = batch + [(batch[0][0], batch[0][1], False)]
            yield batch


class ShardSampler(torch.utils.data.Sampler):
    """Indices rank, rank + W, rank + 2W, ...: over all ranks every sample exactly once (no padding)."""

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, size, num_replicas))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


def make_loader(dataset, sampler, batch_size: int | None, workers: int, device: torch.device):
    """A DataLoader whose workers persist across epochs (samplers carry the epoch, the dataset has no state).
    batch_size=None: `sampler` is a batch sampler (e.g. TrainBatchSampler) that yields whole batches."""
    batching = {"batch_sampler": sampler} if batch_size is None else {"sampler": sampler, "batch_size": batch_size}
    return torch.utils.data.DataLoader(
        dataset, **batching, num_workers=workers, collate_fn=collate_views,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None)


# ----------------------------------------------------------------------------------------------------------------
# Image domains for continual generative learning (gan_vae/): MNIST, Fashion-MNIST or .npz arrays.
# ----------------------------------------------------------------------------------------------------------------
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


def parse_task(spec: str) -> dict:
    """`source[:classes=0-4|0,2,4][:invert][:rotate=DEG]` -> {"source", "classes", "invert", "rotate"}.
    source is mnist, fashion_mnist or a path to an .npz file with `images` uint8 [N, 28, 28] and `labels`."""
    parts = str(spec).split(":")
    out = {"source": parts[0], "classes": None, "invert": False, "rotate": 0.0}
    if not parts[0].endswith(".npz") and parts[0] not in DOMAINS:
        raise UserError(f"unknown task '{parts[0]}' in data.tasks: use {', '.join(DOMAINS)} or an .npz file "
                        "(images uint8 [N, 28, 28], labels [N])")
    for part in parts[1:]:
        if part == "invert":
            out["invert"] = True
        elif part.startswith("rotate="):
            out["rotate"] = float(part.split("=", 1)[1])
        elif part.startswith("classes="):
            classes: list[int] = []
            for item in filter(None, part.split("=", 1)[1].split(",")):
                lo, _, hi = item.partition("-")
                classes += list(range(int(lo), int(hi or lo) + 1))
            if not classes:
                raise UserError(f"task '{spec}': the class subset is empty; write e.g. classes=0-4 or classes=1,3")
            out["classes"] = sorted(set(classes))
        else:
            raise UserError(f"task '{spec}': cannot read '{part}'; options are classes=..., invert, rotate=DEG")
    return out


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise UserError(f"task file {path} does not exist")
    try:
        arrays = np.load(path)
        missing = [k for k in ("images", "labels") if k not in arrays.files]
        if missing:
            raise UserError(f"{path} lacks the array(s) {missing} (it has {arrays.files}); it needs `images` uint8 "
                            "[N, 28, 28] and `labels` [N]")
        images, labels = arrays["images"], arrays["labels"]
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise UserError(f"{path}: `images` is {images.dtype} {list(images.shape)}, expected uint8 [N, 28, 28]")
    if labels.shape != (len(images),):
        raise UserError(f"{path}: `labels` has shape {list(labels.shape)}, expected [{len(images)}]")
    return images, labels.astype(np.int64)


def _load_torchvision(name: str, root: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    import torchvision
    cls = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST}[name]
    try:
        ds = cls(str(root), train=train, download=True)
    except Exception as exc:
        raise UserError(f"cannot download {name} into data.root={root} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200] if str(exc) else ''}). Offline? Put the torchvision files "
                        f"under {root}, or use .npz tasks, e.g. data.tasks=[../shared/data/mnist_test.npz,"
                        "../shared/data/fashion_mnist_test_part.npz]") from None
    return ds.data.numpy().astype(np.uint8), ds.targets.numpy().astype(np.int64)


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
        if not (keep_tr.any() or keep_te.any()):
            raise UserError(f"task '{spec}': no images of classes {t['classes']} (labels present: "
                            f"{sorted(set(tr_y.tolist()) | set(te_y.tolist()))})")
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
