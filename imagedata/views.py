"""Torch datasets of views and their loader. Training items are addressed by (index, epoch), so persistent
workers need no epoch state; images leave the workers as uint8 CHW tensors (`normalization.normalize_batch` turns
them into the model's input on the device), or, augmented on the device, as stored images plus their records.
"""
from __future__ import annotations

import numpy as np
import torch

from common.errors import UserError
from imagedata.augment import (AugSpec, apply_aug_record, cache_view_record, eval_view, replay_view_index,
                               sample_aug_record, train_record_rng)
from imagedata.image_sources import ImageSource
from imagedata.predecode import PredecodedSource


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


class TrainViews(torch.utils.data.Dataset):
    """Training views. With `cache` (a TeacherCache), each item replays one of the K cached views and carries the
    teacher logits computed on exactly that view; without, the view is drawn fresh from (seed, index, epoch). A
    cache that is still being filled (teacher.cache_fill=lazy) adds `teacher_filled` (False: zero placeholders
    that engine.teacher_cache.SlotFiller replaces before the loss), `cache_view` and `record`.

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
        height, width = (img.shape[1], img.shape[2]) if self.device_aug else (img.height, img.width)
        if self.cache is None:
            record = sample_aug_record(train_record_rng(self.seed, index, epoch), width, height, self.spec)
        else:
            view = replay_view_index(self.seed, index, epoch, self.cache.num_views)
            filled = self.cache.is_filled(index, view)
            if filled:
                record, teacher = self.cache.train_view(index, view)
            else:  # a lazily filled cache's empty slot: the record the eager build draws; the trainer scores it
                record = cache_view_record(self.seed, index, view, width, height, self.spec)
                teacher = self.cache.unfilled_view()
            item.update(teacher)  # teacher_logits, and teacher_features when the cache holds them
            if not self.cache.complete:  # fixed for the run: the keys SlotFiller needs
                item.update(teacher_filled=filled, cache_view=view,
                            record=torch.as_tensor(np.asarray(record, dtype=np.float32)))
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


def make_loader(dataset, sampler, batch_size: int | None, workers: int, device: torch.device):
    """A DataLoader whose workers persist across epochs (samplers carry the epoch, the dataset has no state).
    batch_size=None: `sampler` is a batch sampler (e.g. TrainBatchSampler) that yields whole batches."""
    batching = {"batch_sampler": sampler} if batch_size is None else {"sampler": sampler, "batch_size": batch_size}
    return torch.utils.data.DataLoader(
        dataset, **batching, num_workers=workers, collate_fn=collate_views,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None)
