"""Index of the data modules: the image-classification input pipeline lives in one module per concern.

| concern | module |
| --- | --- |
| image sources: hub, `save_to_disk` folder, ImageFolder tree; split names; validation carved from train | `image_sources.py` |
| label alignment: dataset label -> ImageNet-1k logit, from timm's lists | `label_alignment.py` |
| the synthetic generator (`data.name=synthetic`) and its JPEG-tree writer | `synthetic_data.py` |
| augmentation records, their replay RNGs, PIL and on-device application, the evaluation view | `augment.py` |
| input normalisation with each model's own mean and std | `normalization.py` |
| pre-decoding (`data.preprocessed=true`) into uint8 memory maps | `predecode.py` |
| torch datasets of views (`TrainViews`, `EvalViews`), collation and the loader | `views.py` |
| samplers, sharding over ranks (`pad_and_shard`) and training batches | `samplers.py` |
| tasks of continual generative learning (MNIST, Fashion-MNIST, .npz) | `gan_vae/tasks.py` |

New code imports from those modules. This module only re-exports the names older code and the tests import
(`from data import AugSpec`), so it holds no code of its own.
"""
from augment import (AUG_FIELDS, AUG_RECORD_LEN, AugSpec, apply_aug_record, apply_aug_records, cache_record_rng,
                     eval_view, replay_view_index, sample_aug_record, train_record_rng)
from gan_vae.tasks import DOMAINS, TaskData, domain_tensor, load_task, parse_task
from image_sources import (MINI_IMAGENET_HUB_ID, SPLIT_ALIASES, SPLITS, FolderImageSource, HFImageSource,
                           ImageSource, SubsetSource, _hf_splits, carve_validation, load_hub, load_local, load_splits)
from label_alignment import _timm_info, imagenet_class_index, mini_imagenet_synsets
from normalization import IMAGENET_MEAN, IMAGENET_STD, input_norm, normalize_batch
from predecode import PredecodedSource, predecode_split, predecode_splits, predecoded_fingerprint, predecoded_size
from samplers import EpochSampler, ShardSampler, TrainBatchSampler, pad_and_shard
from synthetic_data import (flip_labels, make_synthetic_dataset, render_synthetic_image, synthetic_class_attributes,
                            write_synthetic_jpeg_folder)
from views import EvalViews, TrainViews, collate_views, make_loader, unpack_raw

__all__ = [
    "AUG_FIELDS", "AUG_RECORD_LEN", "AugSpec", "apply_aug_record", "apply_aug_records", "cache_record_rng", "eval_view",
    "replay_view_index", "sample_aug_record", "train_record_rng",
    "DOMAINS", "TaskData", "domain_tensor", "load_task", "parse_task",
    "MINI_IMAGENET_HUB_ID", "SPLIT_ALIASES", "SPLITS", "FolderImageSource", "HFImageSource", "ImageSource",
    "SubsetSource", "_hf_splits", "carve_validation", "load_hub", "load_local", "load_splits",
    "_timm_info", "imagenet_class_index", "mini_imagenet_synsets",
    "IMAGENET_MEAN", "IMAGENET_STD", "input_norm", "normalize_batch",
    "PredecodedSource", "predecode_split", "predecode_splits", "predecoded_fingerprint", "predecoded_size",
    "EpochSampler", "ShardSampler", "TrainBatchSampler", "pad_and_shard",
    "flip_labels", "make_synthetic_dataset", "render_synthetic_image", "synthetic_class_attributes",
    "write_synthetic_jpeg_folder",
    "EvalViews", "TrainViews", "collate_views", "make_loader", "unpack_raw",
]
