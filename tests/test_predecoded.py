"""The pre-decoded data path (data.preprocessed=true): by default the same training and evaluation views as
decoding the JPEGs, augmentation on uint8 tensors (the device path) matching the PIL path, stale and damaged copies
rebuilt."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import load_config
from engine.schema import Config
from engine.teacher_cache import CacheViews
from imagedata.augment import AugSpec, apply_aug_record, apply_aug_records, sample_aug_record, train_record_rng
from imagedata.image_sources import load_local
from imagedata.predecode import PredecodedSource, predecode_split, predecoded_size
from imagedata.synthetic_data import write_synthetic_jpeg_folder
from imagedata.views import EvalViews, TrainViews, collate_views, unpack_raw


@pytest.fixture(scope="module")
def jpeg_tree(tmp_path_factory):
    return write_synthetic_jpeg_folder(tmp_path_factory.mktemp("jpeg"), num_classes=3, images_per_class=4,
                                       height=120)


def _diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    d = (a.int() - b.int()).abs()
    return d.float().mean().item(), d.max().item()


def real_jpeg_tree(root: Path, shared_data: Path, count: int | None = None) -> Path:
    """An ImageFolder tree of the real mini-ImageNet JPEGs (one per class, original size), the same in every split."""
    files = sorted((shared_data / "mini_imagenet_samples").glob("*.JPEG"))[:count]
    for split in ("train", "validation", "test"):
        for f in files:
            (root / split / f.name.split("_")[0]).mkdir(parents=True, exist_ok=True)
            (root / split / f.name.split("_")[0] / f.name).symlink_to(f.resolve())
    return root


def test_predecoded_size_keeps_aspect_and_never_upscales():
    assert predecoded_size(500, 375, 256) == (341, 256)  # torchvision Resize(256): int(256 * 500 / 375)
    assert predecoded_size(375, 500, 256) == (256, 341)
    assert predecoded_size(200, 150, 256) == (200, 150)
    assert predecoded_size(500, 375, 0) == (500, 375)  # 0: as decoded


def test_training_crops_equal_the_jpeg_path_at_the_defaults(tmp_path, shared_data):
    """The recommended fast path trains on the reference recipe: at the real defaults (224 px, crop scale 0.08-1,
    flip, jitter, data.preprocess_size as configured by default) on the real JPEGs, every training crop, every
    replayed teacher-cache view and every evaluation view of the pre-decoded copy equals the JPEG path's."""
    cfg = load_config(Config, None, [])
    spec = AugSpec.from_cfg(cfg.data)
    assert spec == AugSpec(image_size=224, scale=(0.08, 1.0), flip=True, jitter=(0.2, 0.2, 0.2))
    src = load_local(real_jpeg_tree(tmp_path / "mini", shared_data))["train"]
    pre = predecode_split(src, cfg.data.preprocess_size, tmp_path / "pre", "train", show_progress=False)
    jpeg_views, pre_views = TrainViews(src, spec, seed=0), TrainViews(pre, spec, seed=0)
    for i in range(len(src)):
        a, b = jpeg_views[(i, 0)]["image"], pre_views[(i, 0)]["image"]
        assert torch.equal(a, b), (src.describe(i), _diff(a, b))
        img = src.load(i)
        assert np.array_equal(pre.array(i), np.asarray(img))  # stored as decoded
        # the JPEG path's record, replayed on the stored copy, gives the JPEG path's crop
        record = sample_aug_record(train_record_rng(0, i, 0), img.width, img.height, spec)
        assert torch.equal(apply_aug_record(pre.load(i), record, spec), a)
    jpeg_cache, pre_cache = CacheViews(src, spec, 0, 2), CacheViews(pre, spec, 0, 2)
    for i in range(0, len(src), 7):  # the views the teacher cache scores
        a, b = jpeg_cache[i], pre_cache[i]
        assert torch.equal(a["records"], b["records"]) and torch.equal(a["views"], b["views"])
        assert torch.equal(a["eval"], b["eval"])
    assert pre.fingerprint == src.fingerprint  # so a JPEG run's teacher cache is reused, and vice versa


def test_eval_views_equal_the_jpeg_path(jpeg_tree, tmp_path):
    src = load_local(jpeg_tree)["test"]
    # eval resize (56 / 0.875 = 64) equals the pre-decoded short side: the same resize happens once, so equal
    spec = AugSpec(image_size=56)
    pre = predecode_split(src, 64, tmp_path, "test", show_progress=False)
    assert isinstance(pre, PredecodedSource) and pre.array(0).shape == (64, 85, 3)
    for i in range(len(src)):
        a, b = EvalViews(src, spec)[i]["image"], EvalViews(pre, spec)[i]["image"]
        assert a.shape == b.shape == (3, 56, 56)
        assert torch.equal(a, b), _diff(a, b)
    # a larger stored size: two resizes instead of one, equal up to resize rounding
    pre96 = predecode_split(src, 96, tmp_path, "test", show_progress=False)
    diffs = [_diff(EvalViews(src, spec)[i]["image"], EvalViews(pre96, spec)[i]["image"]) for i in range(len(src))]
    assert max(m for m, _ in diffs) < 2.0, diffs


def test_real_jpegs_downscaled_copy_keeps_eval_views(tmp_path, shared_data):
    """The real mini-ImageNet JPEGs, 224 px views, the explicit lossy copy (short side 256): evaluation views stay
    those of the JPEG path (the one resize to 256 happens either way)."""
    src = load_local(real_jpeg_tree(tmp_path / "mini", shared_data, 12))["test"]
    pre = predecode_split(src, 256, tmp_path / "pre", "test", show_progress=False)
    for i in range(len(src)):  # stored at short side 256, aspect kept (never upscaled)
        w, h = src.load(i).size
        assert tuple(pre.rows[i, 1:]) == predecoded_size(w, h, 256)[::-1]
    spec = AugSpec(image_size=224)
    for i in range(len(src)):
        a, b = EvalViews(src, spec)[i]["image"], EvalViews(pre, spec)[i]["image"]
        assert torch.equal(a, b), _diff(a, b)
    meta = json.loads(next((tmp_path / "pre").glob("test-*/meta.json")).read_text())
    assert meta["images"] == 12 and meta["bytes"] == int((pre.rows[:, 1] * pre.rows[:, 2] * 3).sum())


def test_device_augmentation_matches_the_pil_path(jpeg_tree, tmp_path):
    pre = predecode_split(load_local(jpeg_tree)["train"], 64, tmp_path, "train", show_progress=False)
    spec = AugSpec(image_size=48, scale=(0.25, 1.0))
    rng = np.random.default_rng(0)
    records = np.stack([sample_aug_record(rng, pre.load(i).width, pre.load(i).height, spec) for i in range(len(pre))])
    pil = torch.stack([apply_aug_record(pre.load(i), records[i], spec) for i in range(len(pre))])
    tensor = apply_aug_records([pre.tensor(i) for i in range(len(pre))], torch.from_numpy(records), spec)
    assert tensor.dtype == torch.uint8 and tensor.shape == pil.shape == (len(pre), 3, 48, 48)
    mean, _ = _diff(pil, tensor)
    assert mean < 3.0, mean  # PIL and tensor resampling round differently; the views are the same
    # the dataset hands the stored image and its record to the device path; collate packs raw images back to back
    items = [TrainViews(pre, spec, seed=0, device_aug=True)[(i, 0)] for i in range(3)]
    batch = collate_views(items)
    assert batch["raw"].dtype == torch.uint8 and batch["raw"].dim() == 1 and batch["record"].shape == (3, 11)
    assert batch["raw"].numel() == sum(pre.tensor(i).numel() for i in range(3))  # no padding
    raw = unpack_raw(batch, torch.device("cpu"))
    assert all(torch.equal(raw[i], pre.tensor(i)) for i in range(3))
    again = apply_aug_records(raw, batch["record"], spec)
    fresh = torch.stack([TrainViews(pre, spec, seed=0)[(i, 0)]["image"] for i in range(3)])
    assert _diff(again, fresh)[0] < 3.0


def test_stale_or_damaged_copies_are_rebuilt(jpeg_tree, tmp_path):
    src = load_local(jpeg_tree)["validation"]
    pre = predecode_split(src, 64, tmp_path, "validation", show_progress=False)
    folder = pre.folder
    built = json.loads((folder / "meta.json").read_text())["build_s"]
    again = predecode_split(src, 64, tmp_path, "validation", show_progress=False)
    assert json.loads((again.folder / "meta.json").read_text())["build_s"] == built  # reused
    with open(folder / "pixels.u8", "r+b") as f:  # an interrupted copy: truncated pixels
        f.truncate(100)
    rebuilt = predecode_split(src, 64, tmp_path, "validation", show_progress=False)
    assert (folder / "pixels.u8").stat().st_size == json.loads((folder / "meta.json").read_text())["bytes"] > 100
    assert np.array_equal(np.asarray(rebuilt.load(1)), np.asarray(pre.load(1)))
    other = predecode_split(src, 72, tmp_path, "validation", show_progress=False)  # another size: another copy
    assert other.folder != folder and other.fingerprint != pre.fingerprint
    assert sorted(p.name for p in Path(tmp_path).iterdir() if p.name.startswith("validation-")) == \
        sorted([folder.name, other.folder.name])


def test_training_on_the_predecoded_path_with_device_augmentation_and_profile(tmp_path):
    """Cached teacher, views augmented in the main process from the pre-decoded copy (the GPU path, run on CPU),
    a profiler trace, and the epoch time split into data wait, forward/backward and the rest."""
    from conftest import TINY, read_metrics, run_script
    proc = run_script("train_student.py", *TINY, "teacher.mode=cached", "data.preprocessed=true",
                      "data.augment_on=device", "data.preprocess_size=40", "train.profile=true",
                      f"run.out_dir={tmp_path}", "run.name=pre")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "pre"
    assert list((tmp_path / "predecoded").glob("train-*/pixels.u8"))
    traces = list((run / "profile").glob("*.pt.trace.json"))
    assert traces and json.loads(traces[0].read_text())["traceEvents"]
    for r in read_metrics(run):
        parts = r["time/data_s"] + r["time/compute_s"] + r["time/other_s"]
        assert r["time/compute_s"] > 0 and abs(parts - r["time/epoch_s"]) < 1e-6 * r["time/epoch_s"] + 1e-9
    assert "data wait" in proc.stdout + proc.stderr
