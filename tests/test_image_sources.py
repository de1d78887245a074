"""Datasets with train and test only get a seeded validation split carved from train; one split-name rule for
DatasetDict keys and ImageFolder trees; CIFAR-style columns (`img`, ClassLabel `label`) load as they are."""
import datasets
import numpy as np
import pytest
from PIL import Image

from conftest import TINY, read_metrics, run_script
from image_sources import SPLIT_ALIASES, carve_validation, find_split, load_local, load_splits
from train_student import Config
from utils import UserError, load_config

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_like(root, n_train=40, n_test=10, size=8, image_col="img"):
    """A CIFAR-10-shaped DatasetDict (train and test only) saved with save_to_disk; image i has grey level i."""
    features = datasets.Features({image_col: datasets.Image(), "label": datasets.ClassLabel(names=CIFAR_NAMES)})

    def split(n, offset):
        images = [Image.new("RGB", (size, size), (offset + i, 0, 0)) for i in range(n)]
        return datasets.Dataset.from_dict({image_col: images, "label": [i % 10 for i in range(n)]}, features=features)

    datasets.DatasetDict({"train": split(n_train, 0), "test": split(n_test, 100)}).save_to_disk(str(root))
    return root


def _red(source, index) -> int:
    return np.asarray(source.load(index))[0, 0, 0].item()


def test_train_test_only_dataset_gets_a_seeded_disjoint_validation_split(tmp_path, capsys):
    path = _cifar_like(tmp_path / "cifar")
    splits = load_local(path, val_fraction=0.25, val_seed=3)
    assert list(splits) == ["train", "validation", "test"]
    assert "no validation split: carved 10 of its 40 training images" in capsys.readouterr().out
    train, val = splits["train"], splits["validation"]
    assert (len(train), len(val), len(splits["test"])) == (30, 10, 10)
    assert set(train.indices).isdisjoint(val.indices) and sorted([*train.indices, *val.indices]) == list(range(40))
    # the rows are the original rows: pixels and labels follow the carved indices
    assert [_red(val, i) for i in range(len(val))] == val.indices.tolist()
    assert val.labels.tolist() == [i % 10 for i in val.indices] and val.class_names == CIFAR_NAMES
    assert [_red(splits["test"], i) for i in range(3)] == [100, 101, 102]
    again = load_local(path, val_fraction=0.25, val_seed=3)  # the same on every call
    assert np.array_equal(again["validation"].indices, val.indices) and np.array_equal(again["train"].indices,
                                                                                       train.indices)
    assert again["validation"].fingerprint == val.fingerprint and again["train"].fingerprint == train.fingerprint
    assert len({train.fingerprint, val.fingerprint, splits["test"].fingerprint}) == 3
    other = load_local(path, val_fraction=0.25, val_seed=4)
    assert not np.array_equal(other["validation"].indices, val.indices)
    assert other["validation"].fingerprint != val.fingerprint


def test_carving_by_config_defaults_and_its_limits(tmp_path):
    path = _cifar_like(tmp_path / "cifar", n_train=30)
    cfg = load_config(Config, None, [f"data.path={path}"])
    assert (cfg.data.val_fraction, cfg.data.val_seed) == (0.1, 0)
    splits = load_splits(cfg.data)
    assert (len(splits["train"]), len(splits["validation"])) == (27, 3)
    with pytest.raises(UserError, match="need train, test and validation"):
        load_local(path, val_fraction=0.0)
    with pytest.raises(UserError, match="must lie in"):
        load_local(path, val_fraction=1.0)
    with pytest.raises(UserError, match="both need at least one"):
        load_local(path, val_fraction=0.01)
    with pytest.raises(UserError, match="need train, test and validation"):  # no test split: nothing to carve
        load_local(_only_train(tmp_path / "t"))
    once, twice = carve_validation(splits["train"], 0.5, 0), carve_validation(splits["train"], 0.5, 0)
    assert [part.indices.tolist() for part in once] == [part.indices.tolist() for part in twice]


def _only_train(root):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))] * 2, "label": [0, 1]}, features=features)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(root))
    return root


def test_one_split_alias_rule_for_datasetdicts_and_folders(tmp_path):
    assert SPLIT_ALIASES["validation"] == ("validation", "val", "valid")
    assert find_split("validation", ["train", "valid", "test"]) == "valid"
    assert find_split("validation", ["train", "test"]) is None
    # a DatasetDict whose validation split is called `valid`: used as it is, nothing carved
    path = _cifar_like(tmp_path / "hf", image_col="image")
    ds = datasets.load_from_disk(str(path))
    datasets.DatasetDict({"train": ds["train"], "valid": ds["test"], "test": ds["test"]}).save_to_disk(
        str(tmp_path / "hf_valid"))
    assert len(load_local(tmp_path / "hf_valid")["validation"]) == 10
    # an ImageFolder tree with valid/, and one with train/ and test/ only (carved)
    for split in ("train", "valid", "test"):
        for c in ("n01532829", "n01558993"):
            (tmp_path / "tree" / split / c).mkdir(parents=True)
            for i in range(5):
                Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "tree" / split / c / f"{i}.png")
    assert len(load_local(tmp_path / "tree")["validation"]) == 10
    (tmp_path / "tree" / "valid").rename(tmp_path / "spare")
    splits = load_local(tmp_path / "tree", val_fraction=0.2, val_seed=0)
    assert (len(splits["train"]), len(splits["validation"])) == (8, 2)
    assert splits["validation"].describe(0).startswith(str(tmp_path / "tree" / "train"))


def test_train_student_runs_on_a_train_test_only_save_to_disk_folder(tmp_path):
    path = _cifar_like(tmp_path / "cifar", n_train=24, n_test=8, size=32)
    args = [a for a in TINY if not a.startswith("data.synthetic") and a != "data.name=synthetic"]
    proc = run_script("train_student.py", *args, f"data.path={path}", "kd.alpha=1", "train.epochs=1",
                      "data.val_fraction=0.25", f"run.out_dir={tmp_path}", "run.name=cifar")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "has no validation split: carved 6 of its 24 training images" in proc.stdout
    assert read_metrics(tmp_path / "cifar")[0]["train/samples"] == 18
