"""The cached teacher serves exactly what a fresh teacher computes on the replayed view, on exactly the pixels the
student trains on (device augmentation included); stale caches, and caches built in another precision, rebuild."""
import contextlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import load_config
from common.distributed import DistInfo
from engine.schema import Config
from engine.optim import autocast_for
from engine.teacher_cache import build_or_load_cache
from imagedata.augment import AugSpec, apply_aug_record, apply_aug_records, replay_view_index
from imagedata.image_sources import load_local, load_splits
from imagedata.label_alignment import mini_imagenet_synsets
from imagedata.normalization import normalize_batch
from imagedata.predecode import predecode_split
from imagedata.views import EvalViews, TrainViews, collate_views, unpack_raw
from models import create_teacher

ARGS = ["data.name=synthetic", "data.synthetic.num_classes=4", "data.synthetic.images_per_class=6",
        "data.synthetic.image_size=32", "data.image_size=32", "teacher.name=resnet10t", "teacher.pretrained=false"]


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(Config, None, ARGS)
    torch.manual_seed(0)
    splits = load_splits(cfg.data)
    teacher = create_teacher(cfg, splits["train"].class_names)  # 1000-way, restricted to the 4 synsets
    return cfg, splits, teacher, AugSpec.from_cfg(cfg.data)


def _build(setup, tmp, views=3, seed=0, autocast=contextlib.nullcontext):
    cfg, splits, teacher, spec = setup
    return build_or_load_cache(teacher, splits, spec, views, seed, tmp, DistInfo(), batch_size=8, workers=0,
                               autocast=autocast)


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


def test_precision_is_part_of_the_key(setup, tmp_path):
    """A cache built in one precision is never served to a run in another: train.amp=off and train.amp=bf16 (which
    CPU autocast supports) differ only in the numerics the teacher ran in, and get separate caches."""
    cpu = torch.device("cpu")
    fp32, info = _build(setup, tmp_path, views=1, autocast=autocast_for("off", cpu))
    assert info["built"]
    bf16, info = _build(setup, tmp_path, views=1, autocast=autocast_for("bf16", cpu))
    assert info["built"] and bf16.root != fp32.root
    assert fp32.meta["fingerprint"]["numerics"] == {"device": "cpu", "autocast": "float32", "views_per_forward": 8}
    assert bf16.meta["fingerprint"]["numerics"] == {"device": "cpu", "autocast": "bfloat16", "views_per_forward": 8}
    logits = [np.asarray(c.eval_logits("test"), dtype=np.float32) for c in (fp32, bf16)]
    assert not np.array_equal(*logits)  # the reason: bf16 logits are not the fp32 ones
    again, info = _build(setup, tmp_path, views=1, autocast=autocast_for("auto", cpu))  # auto on CPU: fp32
    assert not info["built"] and again.root == fp32.root


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_device_augmented_run_gets_teacher_views_equal_to_the_students(setup, tmp_path, device):
    """data.augment_on=device: the cache is built from the same tensor augmentation on the same device, so every
    replayed view the student trains on is, pixel for pixel, the view the teacher scored, whatever the batch
    (images of different sizes, in another order and batch size)."""
    import copy
    teacher, device = copy.deepcopy(setup[2]).to(device), torch.device(device)
    rng = np.random.default_rng(0)
    sizes = [(40, 60), (75, 50), (64, 64), (90, 45), (52, 70), (48, 48), (66, 40)]
    for split in ("train", "validation", "test"):
        for i, (w, h) in enumerate(sizes):
            folder = tmp_path / "tree" / split / mini_imagenet_synsets()[i % 4]  # the teacher's 4 classes
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    splits = {s: predecode_split(src, 0, tmp_path / "pre", s, show_progress=False)
              for s, src in load_local(tmp_path / "tree").items()}
    spec, k = AugSpec(image_size=32, scale=(0.25, 1.0)), 3
    scored = []
    hook = teacher.register_forward_pre_hook(lambda module, args: scored.append(args[0].clone()))
    try:
        cache, _ = build_or_load_cache(teacher, splits, spec, k, 0, tmp_path / "cache", DistInfo(device=device),
                                       batch_size=8, workers=0, autocast=contextlib.nullcontext, device_aug=True)
    finally:
        hook.remove()
    n, per = len(sizes), 8 // k  # the train split's forwards: its evaluation views (one forward of 8), then its
    # training views, `per` images x k views per loader batch, each forward padded to 8 views
    train_forwards = scored[1:1 + -(-n // per)]
    teacher_views = torch.cat([f[:min(per, n - i * per) * k] for i, f in enumerate(train_forwards)]
                              ).view(n, k, 3, 32, 32)  # index order
    views = TrainViews(splits["train"], spec, seed=0, cache=cache, device_aug=True)
    pil_differs = False
    for epoch in range(k):  # every cached view replayed once
        order = np.random.default_rng(epoch).permutation(n).tolist()
        for start in range(0, n, 3):
            batch = collate_views([views[(i, epoch)] for i in order[start:start + 3]])
            student = normalize_batch(apply_aug_records(unpack_raw(batch, device), batch["record"], spec), device,
                                      channels_last=True)  # what Trainer.batch_images computes
            for row, i in enumerate(batch["index"].tolist()):
                view = replay_view_index(0, i, epoch, k)
                assert torch.equal(student[row], teacher_views[i, view]), (i, epoch, view)
                pil = apply_aug_record(splits["train"].load(i), batch["record"][row].numpy(), spec)
                pil_differs |= not torch.equal(normalize_batch(pil[None], device, True)[0], student[row])
    assert pil_differs  # the PIL views (what the cache held before) are not the pixels the student sees
    assert cache.meta["fingerprint"]["views_on"] == "device"
