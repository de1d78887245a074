"""The synthetic stand-in for mini-ImageNet: learnable classes (shape x colour x texture), nuisance driven by a
stored per-sample difficulty, as a `datasets.DatasetDict` (`make_synthetic_dataset`, `data.name=synthetic`) or as a
full-resolution JPEG ImageFolder tree for measuring the decoding path (`write_synthetic_jpeg_folder`).
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from common.errors import UserError
from imagedata.label_alignment import mini_imagenet_synsets

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


def _png(arr: np.ndarray) -> dict:
    """An image as a `datasets.Image` value: PNG bytes, compress_level=1 (fast to write)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return {"bytes": buf.getvalue(), "path": None}


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
        images = [_png(render_synthetic_image(attrs[y], d, image_size, rng)) for y, d in zip(labels, difficulty)]
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
