"""Label alignment: dataset label k -> ImageNet-1k output index, from the lists timm ships.

A 1000-way ImageNet teacher is restricted to a dataset's classes by reading, for dataset label k, the logit at
position k of timm's `mini_imagenet_indices.txt`; `imagenet_class_index` checks the class names first.
"""
from __future__ import annotations

from pathlib import Path

from common.errors import UserError


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
