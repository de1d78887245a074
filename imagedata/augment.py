"""Augmentation records and their replay RNGs: the one place that says which training view an image gets.

Every training view is a pure function of (seed, epoch, index): its augmentation record (crop box, flip, jitter
factors and order, see AUG_FIELDS) is drawn from `np.random.default_rng([seed, index, epoch, ...])`. So data loading
carries no hidden RNG state, resume is exact, worker count does not change the numbers, and the cached-teacher mode
(`engine/teacher_cache.py`) can store a record and replay exactly the view the teacher scored. A record is applied with PIL
in the loader (`apply_aug_record`) or to uint8 tensors on the device (`apply_aug_records`); `eval_view` is the
deterministic evaluation view.

The three RNG streams (`train_record_rng`, `cache_record_rng`, `replay_view_index`) differ in the last seed word,
so fresh views, cached views and the replay order never share draws.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

# Layout of one augmentation record (float32): crop box, flip, ColorJitter factors, ColorJitter order.
AUG_FIELDS = ("top", "left", "height", "width", "flip", "brightness", "contrast", "saturation",
              "order0", "order1", "order2")
AUG_RECORD_LEN = len(AUG_FIELDS)


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


def cache_view_record(seed: int, index: int, view: int, width: int, height: int, spec) -> np.ndarray:
    """The augmentation record of teacher-cache slot (index, view) of an image of `width` x `height`: what the
    eager build scores and what a lazily filled slot is scored on."""
    return sample_aug_record(cache_record_rng(seed, index, view), width, height, spec)


def replay_view_index(seed: int, index: int, epoch: int, num_views: int) -> int:
    """Which of the K cached views `index` replays at `epoch`: each view once per K epochs, in a seeded order."""
    cycle, pos = divmod(epoch, num_views)
    return int(np.random.default_rng([seed, index, cycle, 2]).permutation(num_views)[pos])


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
