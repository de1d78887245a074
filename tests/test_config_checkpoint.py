"""Config schema (typos, types, ranges, --help) and checkpoint plumbing (atomic writes, strict loads)."""
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import TINY, assert_clean_error, run_main, run_script, runs_documented_command

import common.config
import common.files
from common.checkpoint import load_state_strict, save_checkpoint
from common.config import load_config
from common.errors import UserError
from engine.schema import Config, validate


def test_defaults_reproduce_the_reference_recipe():
    cfg = load_config(Config)
    assert cfg.teacher.name == "resnet152.tv_in1k" and cfg.student.name == "mobilenetv2_100"
    assert cfg.data.name == "timm/mini-imagenet" and cfg.data.image_size == 224
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay, cfg.train.min_lr) == ("adam", 1e-3, 1e-4, 1e-6)
    assert cfg.train.batch_size == 128 and cfg.kd.temperature == 4.0
    assert cfg.data.crop_scale_min == 0.08 and list(cfg.data.color_jitter) == [0.2, 0.2, 0.2]
    assert cfg.data.eval_crop_ratio == 0.875  # Resize 256 + CenterCrop 224


def test_overrides_and_yaml(tmp_path):
    yaml = tmp_path / "c.yaml"
    yaml.write_text("kd:\n  temperature: 2.5\ntrain:\n  epochs: 3\n")
    cfg = load_config(Config, str(yaml), ["train.epochs=5", "teacher.mode=online"])
    assert cfg.kd.temperature == 2.5 and cfg.train.epochs == 5 and cfg.teacher.mode == "online"


@pytest.mark.parametrize("override,fragment", [
    ("kd.temprature=2", "unknown config key 'kd.temprature'"),
    ("nosuch.key=1", "unknown config key 'nosuch"),
    ("train.epochs=many", "bad value for config key 'train.epochs'"),
    ("teacher.pretrained=maybe", "bad value for config key 'teacher.pretrained'"),
])
def test_rejects_unknown_keys_and_wrong_types(override, fragment):
    with pytest.raises(UserError, match=fragment.replace(".", r"\.")):
        load_config(Config, None, [override])


def test_rejects_unknown_keys_in_yaml(tmp_path):
    yaml = tmp_path / "c.yaml"
    yaml.write_text("kd:\n  alhpa: 0.5\n")
    with pytest.raises(UserError, match="kd.alhpa"):
        load_config(Config, str(yaml), [])


@pytest.mark.parametrize("override,fragment", [
    ("kd.alpha=1.5", "kd.alpha"), ("kd.alpha=-0.1", "kd.alpha"), ("kd.temperature=0", "kd.temperature"),
    ("train.batch_size=0", "train.batch_size"), ("teacher.cache_views=0", "teacher.cache_views"),
    ("teacher.mode=sometimes", "teacher.mode"),
    ("data.augment_on=device", "needs data.preprocessed=true"), ("data.augment_on=gpu", "data.augment_on"),
    ("data.preprocess_size=100", "data.preprocess_size=100 must be >= data.image_size=224"),
])
def test_rejects_out_of_range_values(override, fragment):
    with pytest.raises(UserError, match=fragment):
        validate(load_config(Config, None, [override]))


def test_cli_errors_are_clean():
    assert_clean_error(run_main("train_student.py", "kd.temprature=2"), "kd.temprature")
    assert_clean_error(run_main("train_student.py", "kd.alpha=2"), "kd.alpha=2.0 must lie in [0, 1]")


def test_help_lists_every_key():
    proc = run_script("train_student.py", "--help")
    assert proc.returncode == 0
    for key, *_ in common.config.iter_schema(Config):
        assert key in proc.stdout, key
    for key in ["data.name", "data.path", "data.image_size", "teacher.name", "teacher.pretrained",
                "teacher.checkpoint", "teacher.mode", "teacher.cache_views", "student.name", "kd.alpha",
                "kd.temperature", "train.epochs", "train.batch_size", "train.lr", "train.seed", "run.out_dir",
                "run.name", "run.resume"]:
        assert f"  {key} (" in proc.stdout, key


def test_saved_config_is_rerunnable(tmp_path):
    cfg = load_config(Config, None, ["kd.temperature=3", "data.name=synthetic"])
    common.files.save_config(cfg, tmp_path)
    again = load_config(Config, str(tmp_path / "config.yaml"), [])
    assert again == cfg


def test_atomic_save_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint({"step": 1}, path)
    real_save = torch.save

    def crash(obj, fh):
        real_save(obj, fh)
        fh.truncate(5)  # half-written
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint({"step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(path.parent)) == ["last.pt"]
    assert torch.load(path)["step"] == 1  # the old checkpoint survived intact
    save_checkpoint({"step": 3}, path)
    assert torch.load(path)["step"] == 3
    assert sorted(os.listdir(path.parent)) == ["last.pt"]  # no temp file left behind


def test_strict_load_names_the_mismatch():
    a, b = nn.Linear(4, 3), nn.Linear(4, 5)
    with pytest.raises(UserError, match="does not match the model"):
        load_state_strict(b, a.state_dict(), "checkpoint x.pt")
    with pytest.raises(UserError, match="does not match the model"):
        load_state_strict(nn.Sequential(nn.Linear(4, 3)), a.state_dict(), "checkpoint x.pt")
    load_state_strict(nn.Linear(4, 3), a.state_dict(), "ok")


def test_resume_auto_with_nothing_to_resume(tmp_path):
    proc = run_script("train_student.py", *TINY, f"run.out_dir={tmp_path}", "run.name=nothing", "run.resume=auto")
    assert_clean_error(proc, "nothing to resume")


@runs_documented_command("python -m pytest -q")
def test_docs_document_every_key_and_the_ci_runs_the_readme_test_command():
    """docs/configuration.md holds every key's table as scripts/config_reference.py generates it (stale tables fail,
    naming the command that regenerates them); the README's test command is the one CI runs."""
    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "configuration.md").read_text()
    readme = (root / "README.md").read_text()
    import importlib.util
    spec = importlib.util.spec_from_file_location("config_reference", root / "scripts" / "config_reference.py")
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    for name, table in reference.tables().items():  # every key of every schema, registries' sections included
        assert f"<!-- config:{name} -->\n{table}\n<!-- /config:{name} -->" in page, \
            "docs/configuration.md's configuration tables are out of date: run `python scripts/config_reference.py`"
    assert "python -m pytest -q" in readme and "python -m pytest -q" in (root / ".ci" / "run").read_text()
