"""Teacher and student construction, logit restriction, the frozen teacher, weight files."""
import pytest
import torch
from conftest import TINY, assert_clean_error, fork_server_with, run_script

import imagedata.label_alignment
from common.config import load_config
from common.errors import UserError
from engine.schema import Config
from engine.report import save_student_safetensors
from models import FrozenTeacher, create_student, create_teacher, load_state_file

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_real_defaults_build_and_run_at_64px():
    cfg = load_config(Config, None, ["teacher.pretrained=false"])
    assert cfg.teacher.name == "resnet152.tv_in1k" and cfg.student.name == "mobilenetv2_100"
    names = imagedata.label_alignment.mini_imagenet_synsets()
    teacher = create_teacher(cfg, names)
    student = create_student(cfg, len(names))
    x = torch.randn(2, 3, 64, 64)
    t_logits, s_logits = teacher(x), student(x)
    assert t_logits.shape == (2, 100) and s_logits.shape == (2, 100)
    full = teacher.model(x)
    assert full.shape == (2, 1000)
    index = [int(i) for i in imagedata.label_alignment._timm_info("mini_imagenet_indices.txt")]
    assert torch.equal(t_logits, full[:, index])  # label k reads ImageNet logit index[k]
    assert sum(p.numel() for p in teacher.model.parameters()) > 50e6  # really ResNet-152
    assert sum(p.numel() for p in student.parameters()) < 3e6  # MobileNetV2 with a 100-way head


def test_teacher_stays_frozen_in_eval_mode():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(5))
    model(torch.randn(2, 3, 8, 8))
    teacher = FrozenTeacher(model, class_index=[4, 0])
    wrapper = torch.nn.ModuleDict({"t": teacher})
    wrapper.train()
    teacher.train(True)
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    running = model[1].running_mean.clone()
    out = teacher(torch.randn(3, 3, 8, 8))
    assert out.shape == (3, 2) and not out.requires_grad
    assert torch.equal(running, model[1].running_mean)  # BatchNorm statistics untouched


def test_teacher_checkpoint_from_this_repository(tmp_path):
    cfg = load_config(Config, None, ["teacher.name=resnet10t", "student.name=resnet10t"])
    student = create_student(cfg, 4)
    save_student_safetensors(student, tmp_path / "student.safetensors")
    cfg.teacher.checkpoint = str(tmp_path / "student.safetensors")
    teacher = create_teacher(cfg, imagedata.label_alignment.mini_imagenet_synsets()[:4])
    assert not teacher.restrict  # 4 outputs for 4 classes: used as is
    x = torch.randn(2, 3, 32, 32)
    student.eval()
    assert torch.allclose(teacher(x), student(x))
    # the same file under the wrong architecture
    cfg.teacher.name = "resnet18"
    with pytest.raises(UserError, match="does not match the model"):
        create_teacher(cfg, imagedata.label_alignment.mini_imagenet_synsets()[:4])


def test_wrong_number_of_teacher_outputs(tmp_path):
    cfg = load_config(Config, None, ["student.name=resnet10t", "teacher.name=resnet10t"])
    save_student_safetensors(create_student(cfg, 7), tmp_path / "t.safetensors")
    cfg.teacher.checkpoint = str(tmp_path / "t.safetensors")
    with pytest.raises(UserError, match="7 outputs but the dataset has 4 classes"):
        create_teacher(cfg, imagedata.label_alignment.mini_imagenet_synsets()[:4])


def test_student_safetensors_loads_with_timm(tmp_path):
    import timm
    cfg = load_config(Config, None, ["student.name=mobilenetv2_035"])
    student = create_student(cfg, 10).eval()
    path = tmp_path / "student.safetensors"
    save_student_safetensors(student, path)
    loaded = timm.create_model("mobilenetv2_035", num_classes=10, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), student(x))
    assert set(load_state_file(path)) == set(student.state_dict())


def test_unknown_model_name():
    cfg = load_config(Config, None, ["student.name=not_a_model_xyz"])
    with pytest.raises(UserError, match="not a timm model"):
        create_student(cfg, 3)


def test_unreachable_hub_weights_and_dataset(tmp_path):
    # the three offline runs: forked from one server started offline (the variables are read when huggingface_hub
    # and datasets are imported), one interpreter start-up instead of three
    with fork_server_with(OFFLINE):
        proc = run_script("train_student.py", *TINY, "teacher.pretrained=true", f"run.out_dir={tmp_path}",
                          env=OFFLINE)
        assert_clean_error(proc, "cannot get pretrained weights for teacher 'resnet10t'", "teacher.checkpoint=PATH")
        proc = run_script("train_student.py", "data.name=timm/mini-imagenet", f"run.out_dir={tmp_path}",
                          env=OFFLINE)
        assert_clean_error(proc, "cannot load dataset 'timm/mini-imagenet'", "data.path=")
        # plain `python train_student.py` (the defaults; only the output folder moved) offline names both ways
        # forward: a local copy and the offline quickstart
        proc = run_script("train_student.py", f"run.out_dir={tmp_path}", env=OFFLINE)
        assert_clean_error(proc, "cannot load dataset 'timm/mini-imagenet'", "data.path=mini-imagenet",
                           "python train_student.py --config configs/quickstart.yaml")
    proc = run_script("train_student.py", f"data.path={tmp_path}", f"run.out_dir={tmp_path}")
    assert_clean_error(proc, "is not a dataset")


class HeadNet(torch.nn.Module):
    """A custom model as a newcomer writes one for timm: its classifier is `head.fc`, and it carries a timm
    config under one name only (`pretrained_cfg`, or the older `default_cfg`), not both as timm's builder sets."""

    def __init__(self, num_classes: int = 1000, cfg_attr: str = "pretrained_cfg"):
        super().__init__()
        self.num_classes = num_classes
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.head = torch.nn.ModuleDict({"fc": torch.nn.Linear(8, num_classes)})
        setattr(self, cfg_attr, {"classifier": "head.fc", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)})

    def forward(self, x):
        return self.head["fc"](self.body(x))


@pytest.mark.parametrize("cfg_attr", ["pretrained_cfg", "default_cfg"])
def test_teacher_loader_and_normalisation_read_the_same_timm_config(tmp_path, monkeypatch, cfg_attr):
    """Issue 24, item 6: a teacher from a local checkpoint whose model has no default_cfg (or only default_cfg):
    its classifier is found from the config normalisation reads, so the checkpoint's 4-way head loads."""
    import models
    monkeypatch.setattr(models, "_create", lambda name, pretrained, num_classes, what:
                        HeadNet(1000 if num_classes is None else num_classes, cfg_attr))
    trained = HeadNet(4, cfg_attr)
    assert not hasattr(trained, {"pretrained_cfg": "default_cfg", "default_cfg": "pretrained_cfg"}[cfg_attr])
    torch.save(trained.state_dict(), tmp_path / "teacher.pt")
    cfg = load_config(Config, None, ["student.name=resnet10t", f"teacher.checkpoint={tmp_path / 'teacher.pt'}"])
    teacher = create_teacher(cfg, imagedata.label_alignment.mini_imagenet_synsets()[:4])
    assert not teacher.restrict and teacher.model.num_classes == 4
    assert teacher.own_norm == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))  # the same config's mean and std
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(teacher.model(x), trained.eval()(x))
