"""Datasets with train and test only get a seeded validation split carved from train; one split-name rule for
DatasetDict keys and ImageFolder trees; CIFAR-style columns (`img`, ClassLabel `label`) load as they are."""
from pathlib import Path

import datasets
import numpy as np
import pytest
from conftest import TINY, TINY_LABEL_ONLY, read_metrics, run_script
from PIL import Image

from common.config import load_config
from common.errors import UserError
from engine.schema import Config
from imagedata.image_sources import SPLIT_ALIASES, carve_validation, find_split, load_local, load_splits

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
    args = [a for a in TINY_LABEL_ONLY if not a.startswith("data.synthetic") and a != "data.name=synthetic"]
    proc = run_script("train_student.py", *args, f"data.path={path}", "train.epochs=1",
                      "data.val_fraction=0.25", f"run.out_dir={tmp_path / 'runs'}", "run.name=cifar")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "has no validation split: carved 6 of its 24 training images" in proc.stdout
    assert read_metrics(tmp_path / "runs" / "cifar")[0]["train/samples"] == 18


# ---------------------------------------------------------------------------------------------------------------
# Decoding: every Pillow mode to 8-bit RGB (16-bit: the high byte; alpha: composited over white), or a named refusal
# ---------------------------------------------------------------------------------------------------------------
def _png(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A PNG by hand (Pillow writes no 16-bit colour, and no header without its pixels): `raw` holds the filtered
    scanlines; color_type 0 grey, 2 RGB, 4 grey + alpha, 6 RGBA."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _png16(values, color_type: int) -> bytes:
    """A 16-bit PNG of `values` (uint16 [H, W, C])."""
    values = np.asarray(values, dtype=">u2")
    return _png(values.shape[1], values.shape[0], 16, color_type,
                b"".join(b"\0" + values[y].tobytes() for y in range(values.shape[0])))


WIDE = [0, 255, 257 * 200, 4100, 65535]  # 16-bit values; their 8-bit values are v >> 8: 0, 0, 200, 16, 255
WIDE_8 = [v >> 8 for v in WIDE]


def _grey(values):
    return [[v, v, v] for v in values]


def _image_files():
    """{file name: (bytes or a writer, expected RGB pixels of row 0 as [[r, g, b], ...])}."""
    def saved(img, fmt, **kw):
        def write(path):
            img.save(path, format=fmt, **kw)
        return write
    row = np.array([WIDE], dtype=np.uint16)
    palette = Image.new("P", (3, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50, 1, 2, 3] + [0] * 759)
    palette.putdata([0, 1, 2])
    la = Image.new("LA", (3, 1))
    la.putdata([(90, 255), (90, 0), (90, 255)])
    rgba = Image.new("RGBA", (2, 1))
    rgba.putdata([(10, 20, 30, 255), (0, 0, 0, 0)])  # black under a transparent pixel: white after compositing
    frames = [Image.new("RGB", (4, 1), (255, 0, 0)), Image.new("RGB", (4, 1), (0, 0, 255))]

    def multi(fmt):
        def write(path):
            frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:])
        return write
    return {
        "one_bit.png": (saved(Image.frombytes("1", (8, 1), bytes([0b10100000])), "PNG"),
                        _grey([255, 0, 255, 0, 0, 0, 0, 0])),
        "grey.png": (saved(Image.fromarray(np.array([[0, 7, 255]], np.uint8)), "PNG"), _grey([0, 7, 255])),
        "palette.png": (saved(palette, "PNG"), [[10, 20, 30], [200, 100, 50], [1, 2, 3]]),
        "palette_transparent.png": (saved(palette, "PNG", transparency=1), [[10, 20, 30], [255, 255, 255], [1, 2, 3]]),
        "grey_alpha.png": (saved(la, "PNG"), _grey([90, 255, 90])),
        "rgba.png": (saved(rgba, "PNG"), [[10, 20, 30], [255, 255, 255]]),
        "cmyk.tiff": (saved(Image.new("CMYK", (1, 1), (0, 255, 255, 0)), "TIFF"), [[255, 0, 0]]),
        "grey16.png": (saved(Image.fromarray(row), "PNG"), _grey(WIDE_8)),  # opens as I;16
        "grey16_big_endian.tiff": (saved(Image.frombytes("I;16B", (5, 1), row.astype(">u2").tobytes()), "TIFF"),
                                   _grey(WIDE_8)),
        "rgb16.png": (_png16(np.stack([row, row, row], -1), 2), _grey(WIDE_8)),  # Pillow keeps the high byte
        "grey_alpha16.png": (_png16(np.stack([row, np.full_like(row, 65535)], -1), 4), _grey(WIDE_8)),
        "int32.tiff": (saved(Image.fromarray(row.astype(np.int32)), "TIFF"), _grey(WIDE_8)),  # mode I
        # mode I holding 8-bit values: taken as they are (v >> 8 made it black)
        "int32_8bit.tiff": (saved(Image.fromarray(np.array([[0, 7, 128, 255]], np.int32)), "TIFF"),
                            _grey([0, 7, 128, 255])),
        "float.tiff": (saved(Image.fromarray(np.array([[0, 0.5, 1]], np.float32)), "TIFF"), _grey([0, 128, 255])),
        "two_frames.gif": (multi("GIF"), [[255, 0, 0]] * 4),  # the first frame
        "two_frames.tiff": (multi("TIFF"), [[255, 0, 0]] * 4),
    }


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    """Every file of `_image_files` written into one ImageFolder class, decoded through FolderImageSource."""
    from imagedata.image_sources import FolderImageSource
    root = tmp_path_factory.mktemp("modes")
    (root / "c").mkdir()
    files = _image_files()
    for name, (content, _) in files.items():
        content(root / "c" / name) if callable(content) else (root / "c" / name).write_bytes(content)
    source = FolderImageSource(root, ["c"])
    return {Path(p).name: np.asarray(source.load(i)) for i, p in enumerate(source.paths)}, files


@pytest.mark.parametrize("name", list(_image_files()))
def test_each_image_mode_decodes_to_its_8_bit_rgb_values(decoded, name):
    images, files = decoded
    image = images[name]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image[0].tolist() == files[name][1]


def test_modes_that_no_file_format_writes_decode_through_pillow():
    from imagedata.image_sources import to_rgb
    assert to_rgb(Image.new("HSV", (1, 1), (0, 255, 255))).getpixel((0, 0)) == (255, 0, 0)
    for mode, colour in (("YCbCr", (90, 100, 200)), ("LAB", (60, 100, 170))):
        img = Image.new(mode, (1, 1), colour)
        assert to_rgb(img).getpixel((0, 0)) == img.convert("RGB").getpixel((0, 0))
    premultiplied = Image.new("RGBa", (1, 1), (0, 0, 0, 0))
    assert to_rgb(premultiplied).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("La", (1, 1), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    little = Image.frombytes("I;16L", (2, 1), np.array([513, 65535], "<u2").tobytes())
    assert np.asarray(to_rgb(little))[0, :, 0].tolist() == [2, 255]


@pytest.mark.parametrize("name, write, fragment", [
    ("int32_wide.tiff", lambda p: Image.fromarray(np.array([[0, 70000]], np.int32)).save(p), "0..70000"),
    ("float_255.tiff", lambda p: Image.fromarray(np.array([[0, 3.5]], np.float32)).save(p), "only [0, 1]"),
    ("float_nan.tiff", lambda p: Image.fromarray(np.array([[0, np.nan]], np.float32)).save(p), "floats"),
    ("truncated.png", lambda p: p.write_bytes(_png_bytes(Image.effect_noise((64, 64), 50))[:400]), "truncated"),
    ("truncated.jpg", lambda p: p.write_bytes(_png_bytes(Image.effect_noise((64, 64), 50), "JPEG")[:300]),
     "runcated"),
    ("empty.png", lambda p: p.write_bytes(b""), "cannot identify"),
    ("zero_width.png", lambda p: p.write_bytes(_png(0, 5, 8, 0, b"")), "cannot identify"),
    # a header claiming 20,000 x 20,000 px: Pillow's DecompressionBombError, which is not an OSError
    ("bomb.png", lambda p: p.write_bytes(_png_header(20_000, 20_000)), "too large to decode"),
])
def test_an_image_that_cannot_be_decoded_is_refused_by_name(tmp_path, name, write, fragment):
    from imagedata.image_sources import FolderImageSource
    (tmp_path / "c").mkdir()
    write(tmp_path / "c" / name)
    source = FolderImageSource(tmp_path, ["c"])
    with pytest.raises(UserError, match=name) as err:
        source.load(0)
    assert fragment in str(err.value)


def _png_bytes(img, fmt="PNG") -> bytes:
    import io
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A grey PNG whose header claims width x height px, with a few bytes of pixels."""
    return _png(width, height, 8, 0, b"\0" * 64)


# ---------------------------------------------------------------------------------------------------------------
# Data checks when a split is loaded: files, labels, classes, data.path
# ---------------------------------------------------------------------------------------------------------------
def test_a_gif_is_an_image_and_other_files_are_reported_not_dropped_silently(tmp_path, capsys):
    from imagedata.image_sources import FolderImageSource
    (tmp_path / "c").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "c" / "a.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "c" / "b.gif")
    for name in ("notes.txt", "photo.heic", ".DS_Store"):
        (tmp_path / "c" / name).write_bytes(b"x")
    source = FolderImageSource(tmp_path, ["c"])
    assert sorted(Path(p).name for p in source.paths) == ["a.png", "b.gif"]
    out = capsys.readouterr().out
    assert "skipped 2 file(s) that are not images by their extension (.heic, .txt)" in out and "DS_Store" not in out


def test_unlabelled_rows_are_refused_when_the_split_is_loaded(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})

    def split(labels):
        return datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))] * len(labels), "label": labels},
                                          features=features)
    # Hugging Face's "no label": -1, as in the test split of a competition dataset
    datasets.DatasetDict({"train": split([0, 1, 0, 1]), "validation": split([0, 1]),
                          "test": split([0, -1])}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(UserError, match=r"split 'test': 1 of 2 `label` values lie outside 0..1.*row 1 has -1") as err:
        load_local(tmp_path / "ds")
    assert "-1 for 'no label'" in str(err.value)


def test_a_row_without_an_image_is_named():
    from imagedata.image_sources import HFImageSource
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4)), None], "label": [0, 1]}, features=features)
    source = HFImageSource(ds, "train", "dataset x")
    assert source.load(0).size == (4, 4)
    with pytest.raises(UserError, match=r"dataset x split 'train' row 1 has no image"):
        source.load(1)


def test_check_labels_refuses_a_class_index_past_the_class_names():
    from imagedata.image_sources import check_labels
    check_labels(np.array([0, 2, 1]), 3, "x")
    with pytest.raises(UserError, match=r"x: 1 of 3 `label` values lie outside 0..2 .*row 2 has 3") as err:
        check_labels(np.array([0, 2, 3]), 3, "x")
    assert "no label" not in str(err.value)


def test_splits_with_other_class_names_are_refused(tmp_path):
    def split(names):
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
        return datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))] * 2, "label": [0, 1]},
                                          features=features)
    datasets.DatasetDict({"train": split(["cat", "dog"]), "validation": split(["cat", "dog"]),
                          "test": split(["dog", "cat"])}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(UserError, match="split 'test' has the 2 classes dog, cat, train the 2 classes cat, dog"):
        load_local(tmp_path / "ds")


@pytest.mark.parametrize("name, hint", [("train.zip", "unzip"), ("images.tar.gz", "tar -xzf"), ("list.txt", None)])
def test_a_data_path_that_is_a_file_is_refused(tmp_path, name, hint):
    from conftest import assert_clean_error, run_main
    (tmp_path / name).write_bytes(b"PK")
    tiny = [a for a in TINY if not a.startswith("data.synthetic.")]  # read with data.name=synthetic only
    proc = run_main("train_student.py", *tiny, "data.name=custom", f"data.path={tmp_path / name}",
                    f"run.out_dir={tmp_path / 'runs'}")
    assert_clean_error(proc, f"data.path={tmp_path / name} is a file; it must be a folder")
    assert (hint in proc.stderr) if hint else "extract" not in proc.stderr
