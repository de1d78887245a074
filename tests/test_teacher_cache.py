"""The cached teacher serves exactly what a fresh teacher computes on the replayed view; stale caches rebuild."""
import json

import numpy as np
import pytest
import torch

from data import AugSpec, EvalViews, TrainViews, load_splits, normalize_batch, replay_view_index
from models import create_teacher
from teacher_cache import build_or_load_cache
from train_student import Config
from utils import DistInfo, load_config

ARGS = ["data.name=synthetic", "data.synthetic.num_classes=4", "data.synthetic.images_per_class=6",
        "data.synthetic.image_size=32", "data.image_size=32", "teacher.name=resnet10t", "teacher.pretrained=false"]


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(Config, None, ARGS)
    torch.manual_seed(0)
    splits = load_splits(cfg.data)
    teacher = create_teacher(cfg, splits["train"].class_names)  # 1000-way, restricted to the 4 synsets
    return cfg, splits, teacher, AugSpec.from_cfg(cfg.data)


def _build(setup, tmp, views=3, seed=0):
    cfg, splits, teacher, spec = setup
    import contextlib
    return build_or_load_cache(teacher, splits, spec, views, seed, tmp, DistInfo(), batch_size=8, workers=0,
                               autocast=contextlib.nullcontext)


def test_cached_logits_equal_fresh_teacher_on_replayed_view(setup, tmp_path):
    cfg, splits, teacher, spec = setup
    cache, info = _build(setup, tmp_path)
    assert info["built"]
    views = TrainViews(splits["train"], spec, seed=0, cache=cache)
    for index in range(len(splits["train"])):
        for epoch in (0, 1, 5):
            item = views[(index, epoch)]
            assert item["teacher_logits"].dtype == torch.float16 and item["teacher_logits"].shape == (4,)
            fresh = teacher(normalize_batch(item["image"][None], torch.device("cpu"), channels_last=True))[0]
            # equal up to the fp16 storage rounding (relative 2^-11) and batch-composition noise
            assert torch.allclose(item["teacher_logits"].float(), fresh, rtol=2e-3, atol=2e-3), (index, epoch)
    for split in ("train", "validation", "test"):
        ev = EvalViews(splits[split], spec)
        logits = torch.from_numpy(np.asarray(cache.eval_logits(split), dtype=np.float32))
        fresh = torch.cat([teacher(normalize_batch(ev[i]["image"][None], torch.device("cpu"), True))
                           for i in range(len(ev))])
        assert torch.allclose(logits, fresh, rtol=2e-3, atol=2e-3)


def test_each_view_replays_once_per_cycle():
    for index in range(5):
        seen = [replay_view_index(0, index, e, 4) for e in range(8)]
        assert sorted(seen[:4]) == [0, 1, 2, 3] and sorted(seen[4:]) == [0, 1, 2, 3]


def test_reused_then_rebuilt_when_stale(setup, tmp_path):
    cache, info = _build(setup, tmp_path)
    assert info["built"]
    again, info = _build(setup, tmp_path)
    assert not info["built"] and again.root == cache.root
    other, info = _build(setup, tmp_path, views=2)  # a different K lands elsewhere
    assert info["built"] and other.root != cache.root
    other_seed, info = _build(setup, tmp_path, seed=1)
    assert info["built"] and other_seed.root not in (cache.root, other.root)
    # a damaged cache (meta from another build, or a truncated array) is rebuilt, never reused
    meta = json.loads((cache.root / "meta.json").read_text())
    meta["fingerprint"]["num_views"] = 99
    (cache.root / "meta.json").write_text(json.dumps(meta))
    _, info = _build(setup, tmp_path)
    assert info["built"]
    arr_path = cache.root / "validation.npy"
    arr_path.write_bytes(arr_path.read_bytes()[:-40])
    _, info = _build(setup, tmp_path)
    assert info["built"]
    _, info = _build(setup, tmp_path)
    assert not info["built"]


def test_changed_teacher_weights_change_the_key(setup, tmp_path):
    cfg, splits, teacher, spec = setup
    cache, _ = _build(setup, tmp_path)
    with torch.no_grad():
        p = next(teacher.model.parameters())
        p.add_(1.0)
    try:
        changed, info = _build(setup, tmp_path)
    finally:
        with torch.no_grad():
            p.sub_(1.0)
    assert info["built"] and changed.root != cache.root
