"""Data: synthetic determinism, label alignment, views, samplers, bad images, the real mini-ImageNet JPEGs."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import imagedata.augment
import imagedata.image_sources
import imagedata.label_alignment
import imagedata.synthetic_data
from common.errors import UserError
from imagedata.augment import AugSpec, apply_aug_record, eval_view, sample_aug_record
from imagedata.image_sources import load_local
from imagedata.label_alignment import imagenet_class_index
from imagedata.samplers import EpochSampler, ShardSampler
from imagedata.synthetic_data import make_synthetic_dataset
from imagedata.views import EvalViews, TrainViews


def _bytes(ds):
    return [row["image"]["bytes"] for row in ds.cast_column("image", __import__("datasets").Image(decode=False))]


def test_synthetic_is_deterministic_for_a_seed():
    a = make_synthetic_dataset(num_classes=3, images_per_class=5, image_size=24, seed=7)
    b = make_synthetic_dataset(num_classes=3, images_per_class=5, image_size=24, seed=7)
    c = make_synthetic_dataset(num_classes=3, images_per_class=5, image_size=24, seed=8)
    for split in ("train", "validation", "test"):
        assert _bytes(a[split]) == _bytes(b[split])
        assert a[split]["label"] == b[split]["label"]
        assert a[split]["difficulty"] == b[split]["difficulty"]
    assert _bytes(a["train"]) != _bytes(c["train"])


def test_synthetic_form():
    ds = make_synthetic_dataset(num_classes=4, images_per_class=8, image_size=32, seed=0)
    assert set(ds) == {"train", "validation", "test"}
    assert len(ds["train"]) == 32 and len(ds["validation"]) == 8
    assert ds["train"].features["label"].names == imagedata.label_alignment.mini_imagenet_synsets()[:4]
    d = np.asarray(ds["train"]["difficulty"])
    assert d.min() >= 0 and d.max() <= 1
    assert ds["train"][0]["image"].size == (32, 32)
    with pytest.raises(UserError):
        make_synthetic_dataset(num_classes=1)


def test_synthetic_nuisance_grows_with_difficulty():
    attrs = imagedata.synthetic_data.synthetic_class_attributes(1 + 1)[0]
    rng = np.random.default_rng(0)
    easy = [imagedata.synthetic_data.render_synthetic_image(attrs, 0.0, 32, rng).astype(float) for _ in range(20)]
    hard = [imagedata.synthetic_data.render_synthetic_image(attrs, 1.0, 32, rng).astype(float) for _ in range(20)]
    # pixel noise: high-frequency energy (differences of neighbours) is much larger on hard images
    hf = lambda imgs: np.mean([np.abs(np.diff(im, axis=1)).mean() for im in imgs])  # noqa: E731
    assert hf(hard) > 3 * hf(easy)


def test_label_alignment_maps_to_timm_indices():
    synsets = imagedata.label_alignment.mini_imagenet_synsets()
    indices = [int(i) for i in imagedata.label_alignment._timm_info("mini_imagenet_indices.txt")]
    assert imagenet_class_index(synsets) == indices
    imagenet = imagedata.label_alignment._timm_info("imagenet_synsets.txt")
    assert all(imagenet[i] == s for i, s in zip(imagenet_class_index(synsets), synsets))
    # folder names such as n01532829_house_finch are accepted
    assert imagenet_class_index([f"{s}_x" for s in synsets[:3]]) == indices[:3]


def test_label_alignment_fires_on_mismatch():
    synsets = imagedata.label_alignment.mini_imagenet_synsets()
    swapped = [synsets[1], synsets[0]] + synsets[2:]
    with pytest.raises(UserError, match="label alignment failed: dataset label 0"):
        imagenet_class_index(swapped)
    with pytest.raises(UserError, match="label alignment failed"):
        imagenet_class_index(["cat", "dog"])


def test_aug_record_replays_exactly():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    spec = AugSpec(image_size=24)
    rec = sample_aug_record(np.random.default_rng(3), img.width, img.height, spec)
    assert rec.shape == (imagedata.augment.AUG_RECORD_LEN,) and rec.dtype == np.float32
    top, left, h, w = rec[:4]
    assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 50
    assert sorted(rec[8:11].astype(int).tolist()) == [0, 1, 2]
    assert torch.equal(apply_aug_record(img, rec, spec), apply_aug_record(img, rec.copy(), spec))
    assert apply_aug_record(img, rec, spec).shape == (3, 24, 24)
    assert eval_view(img, spec).shape == (3, 24, 24)


def test_training_view_depends_only_on_seed_index_epoch():
    ds = make_synthetic_dataset(num_classes=2, images_per_class=4, image_size=32, seed=0)
    src = imagedata.image_sources.HFImageSource(ds["train"], "train", "synthetic")
    views = TrainViews(src, AugSpec(image_size=32, scale=(0.3, 1.0)), seed=5)
    a, b = views[(3, 1)], views[(3, 1)]
    assert torch.equal(a["image"], b["image"])
    assert not torch.equal(views[(3, 1)]["image"], views[(3, 2)]["image"])
    assert a["label"] == src.labels[3]


@pytest.mark.parametrize("size,world", [(10, 1), (10, 3), (7, 2), (1, 2)])
def test_samplers_shard_and_cover(size, world):
    shards = []
    for rank in range(world):
        s = EpochSampler(size, seed=1, num_replicas=world, rank=rank)
        s.set_epoch(4)
        items = list(s)
        assert len(items) == len(s) and all(e == 4 for _, e in items)
        shards.append([i for i, _ in items])
    assert len({len(sh) for sh in shards}) == 1  # equal length
    assert set().union(*map(set, shards)) == set(range(size))  # covering
    again = EpochSampler(size, seed=1, num_replicas=world, rank=0)
    again.set_epoch(4)
    assert [i for i, _ in again] == shards[0]  # deterministic
    # evaluation shards: every sample exactly once
    eval_items = sorted(i for r in range(world) for i in ShardSampler(size, world, r))
    assert eval_items == list(range(size))


def test_epoch_changes_order():
    s = EpochSampler(50, seed=0)
    s.set_epoch(0)
    first = [i for i, _ in s]
    s.set_epoch(1)
    assert [i for i, _ in s] != first


def _imagefolder(root: Path, files: dict[str, list[Path]]) -> Path:
    for split in ("train", "validation", "test"):
        for cls, paths in files.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for p in paths:
                (root / split / cls / p.name).symlink_to(p)
    return root


def test_corrupt_image_is_named(tmp_path):
    good = tmp_path / "src" / "good.jpg"
    good.parent.mkdir()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(good)
    bad = tmp_path / "src" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    splits = load_local(_imagefolder(tmp_path / "ds", {"n01532829": [good], "n01558993": [bad]}))
    views = EvalViews(splits["train"], AugSpec(image_size=16))
    assert views[0]["image"].shape == (3, 16, 16)
    with pytest.raises(UserError, match="broken.jpg"):
        views[1]


def test_not_a_dataset(tmp_path):
    (tmp_path / "random").mkdir()
    with pytest.raises(UserError, match="is not a dataset"):
        load_local(tmp_path / "random")
    with pytest.raises(UserError, match="does not exist"):
        load_local(tmp_path / "missing")


def test_save_to_disk_folder_round_trip(tmp_path):
    ds = make_synthetic_dataset(num_classes=3, images_per_class=4, image_size=20, seed=1)
    ds.save_to_disk(str(tmp_path / "saved"))
    splits = load_local(tmp_path / "saved")
    assert splits["train"].class_names == ds["train"].features["label"].names
    assert np.array_equal(splits["train"].labels, np.asarray(ds["train"]["label"]))
    assert np.array_equal(np.asarray(splits["train"].load(2)), np.asarray(ds["train"][2]["image"].convert("RGB")))


def test_real_mini_imagenet_images_load_and_align(tmp_path, shared_data):
    files = sorted((shared_data / "mini_imagenet_samples").glob("*.JPEG"))
    assert len(files) == 100
    by_class = {f.name.split("_")[0]: [f] for f in files}
    splits = load_local(_imagefolder(tmp_path / "mini", by_class))
    names = splits["train"].class_names
    assert names == imagedata.label_alignment.mini_imagenet_synsets()  # sorted synsets are timm's label order
    index = imagenet_class_index(names)
    assert index == [int(i) for i in imagedata.label_alignment._timm_info("mini_imagenet_indices.txt")]
    spec = AugSpec(image_size=64)
    views = EvalViews(splits["test"], spec)
    for i in (0, 57, 99):
        item = views[i]
        assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.uint8
        assert names[item["label"]] == Path(splits["test"].describe(i)).name.split("_")[0]
    rec = sample_aug_record(np.random.default_rng(0), *splits["train"].load(5).size, spec)
    assert apply_aug_record(splits["train"].load(5), rec, spec).shape == (3, 64, 64)
