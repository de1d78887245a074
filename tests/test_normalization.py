"""Inputs are normalised with each model's own timm mean and std: the student's batch is normalised with the
student's statistics, and the teacher, fed that batch, sees exactly the pixels normalised with its own."""
import contextlib
import copy

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

from common.config import load_config
from common.distributed import DistInfo
from engine.schema import Config
from engine.teacher_cache import build_or_load_cache, cache_fingerprint
from imagedata.normalization import IMAGENET_MEAN, IMAGENET_NORM, IMAGENET_STD, input_norm, named_norm, normalize_batch
from models import FrozenTeacher, create_student, create_teacher

CPU = torch.device("cpu")
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
ODD = ((0.1, 0.6, 0.35), (0.9, 0.15, 0.41))


class Recorder(nn.Module):
    """Stands in for a timm model: records its input, returns 3 'logits' per image."""

    def __init__(self, pretrained_cfg=None):
        super().__init__()
        self.seen = []
        if pretrained_cfg is not None:
            self.pretrained_cfg = pretrained_cfg

    def forward(self, x):
        self.seen.append(x.clone())
        return x.mean(dim=(2, 3))


def _all_pixel_values() -> torch.Tensor:
    """uint8 [2, 3, 16, 16] holding every value 0..255 in every channel."""
    values = torch.arange(256, dtype=torch.uint8).view(16, 16)
    return torch.stack([values, values.flip(0)]).unsqueeze(1).repeat(1, 3, 1, 1)


@pytest.mark.parametrize("student, teacher", [(IMAGENET_NORM, HALF), (HALF, IMAGENET_NORM), (ODD, IMAGENET_NORM),
                                              (IMAGENET_NORM, ODD)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_teacher_sees_exactly_its_own_normalisation(student, teacher, channels_last):
    pixels = _all_pixel_values()
    model = Recorder({"mean": teacher[0], "std": teacher[1]})
    frozen = FrozenTeacher(model, None, input_norm=student)
    assert (frozen.input_norm, frozen.own_norm) == (student, teacher)
    frozen(normalize_batch(pixels, CPU, channels_last, student))
    assert torch.equal(model.seen[0], normalize_batch(pixels, CPU, channels_last, teacher))


def test_default_pair_is_bit_identical_to_the_imagenet_constants():
    pixels = _all_pixel_values()
    # the formula data.py used before: ImageNet constants, whatever the models
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    before = (pixels.float() - mean) / std
    cfg = load_config(Config, None, ["teacher.name=resnet10t", "teacher.pretrained=false",
                                     "student.name=mobilenetv2_035"])
    student = create_student(cfg, 4)
    teacher = create_teacher(cfg, [f"c{i}" for i in range(1000)])  # 1000 classes: no restriction, no alignment
    assert input_norm(student) == IMAGENET_NORM == teacher.input_norm == teacher.own_norm
    x = normalize_batch(pixels, CPU, False, input_norm(student))
    assert torch.equal(x, before) and torch.equal(normalize_batch(pixels, CPU, False), before)
    model = Recorder(teacher.model.pretrained_cfg)
    FrozenTeacher(model, None, teacher.input_norm)(x)
    assert torch.equal(model.seen[0], x)  # passed on untouched


def test_stats_come_from_pretrained_cfg_with_an_imagenet_fallback():
    assert input_norm(Recorder()) == IMAGENET_NORM  # no pretrained_cfg
    assert input_norm(Recorder({"mean": None, "std": None})) == IMAGENET_NORM
    assert input_norm(Recorder({"mean": (0.5,) * 3, "std": (0.5,) * 3})) == HALF
    for name in ("test_resnet", "mobilenetv2_035", "vit_tiny_patch16_224"):  # by name = on the built model
        assert named_norm(name) == input_norm(timm.create_model(name, pretrained=False, num_classes=3))
    assert named_norm("test_resnet") == HALF and named_norm("not_a_model_xyz") == IMAGENET_NORM
    cfg = load_config(Config, None, ["teacher.name=test_resnet", "teacher.pretrained=false",
                                     "student.name=mobilenetv2_035"])
    teacher = create_teacher(cfg, [f"c{i}" for i in range(1000)])
    assert (teacher.input_norm, teacher.own_norm) == (IMAGENET_NORM, HALF)


def test_teacher_cache_covers_and_applies_the_teachers_normalisation(tmp_path):
    from imagedata.augment import AugSpec
    from imagedata.image_sources import load_splits
    from imagedata.views import EvalViews
    cfg = load_config(Config, None, ["data.name=synthetic", "data.synthetic.num_classes=2",
                                     "data.synthetic.images_per_class=3", "data.synthetic.image_size=16",
                                     "data.image_size=16"])
    splits, spec = load_splits(cfg.data), AugSpec.from_cfg(cfg.data)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=2).eval()
    half = FrozenTeacher(model, None, IMAGENET_NORM)
    relabelled = copy.deepcopy(model)
    relabelled.pretrained_cfg = {**model.pretrained_cfg, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    plain = FrozenTeacher(relabelled, None, IMAGENET_NORM)
    numerics = {"device": "cpu", "autocast": "float32"}
    fingerprints = [cache_fingerprint(t, splits, spec, 1, 0, numerics) for t in (half, plain, half)]
    assert fingerprints[0] == fingerprints[2] != fingerprints[1]  # same weights, other normalisation: new cache
    assert fingerprints[0]["teacher_norm"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    cache, _ = build_or_load_cache(half, splits, spec, 1, 0, tmp_path, DistInfo(), batch_size=4, workers=0,
                                   autocast=contextlib.nullcontext)
    ev = EvalViews(splits["test"], spec)
    with torch.no_grad():  # the teacher model on the eval views normalised with ITS statistics
        direct = torch.cat([model(normalize_batch(ev[i]["image"][None], CPU, True, HALF)) for i in range(len(ev))])
    cached = torch.from_numpy(np.asarray(cache.eval_logits("test"), dtype=np.float32))
    assert torch.allclose(cached, direct, rtol=2e-3, atol=2e-3)
