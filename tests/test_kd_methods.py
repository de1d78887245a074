"""KD methods: the pure losses against hand-computed values, the registry seam, and bit-identical kd runs."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import (TINY, TINY_LABEL_ONLY, TINY_ONLINE, assert_clean_error, read_metrics, run_main, run_script,
                      start_script)

import kd_methods
from common.errors import UserError
from models import (FrozenTeacher, dist_loss_terms, dkd_loss_terms, dkd_warmup, hint_loss, kd_loss_terms,
                    standardize_logits)


def _softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


# ---------------------------------------------------------------------------------------------------------------
# DKD
# ---------------------------------------------------------------------------------------------------------------
def test_dkd_hand_computed_value():
    # One sample, three classes, label 0, T = 2.
    zs, zt, T = [1.0, 0.0, -1.0], [3.0, 1.0, 0.0], 2.0
    ps, pt = _softmax([v / T for v in zs]), _softmax([v / T for v in zt])
    tckd = _kl([pt[0], 1 - pt[0]], [ps[0], 1 - ps[0]])
    qs, qt = [v / (1 - ps[0]) for v in ps[1:]], [v / (1 - pt[0]) for v in pt[1:]]  # non-target, renormalised
    nckd = _kl(qt, qs)
    alpha, beta = 0.7, 3.0
    expected = T**2 * (alpha * tckd + beta * nckd)
    terms = dkd_loss_terms(torch.tensor([zs]), torch.tensor([zt]), torch.tensor([0]), T)
    got = alpha * terms["tckd"] + beta * terms["nckd"]  # as kd_methods.DKD weighs them (warm-up 1)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert terms["tckd"].item() == pytest.approx(T**2 * tckd, rel=1e-6)
    assert terms["nckd"].item() == pytest.approx(T**2 * nckd, rel=1e-6)


def test_dkd_equal_logits_give_zero_terms_and_batch_mean():
    z = torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    terms = dkd_loss_terms(z, z.clone(), y, 4.0)
    assert terms["tckd"].item() == 0.0 and terms["nckd"].item() == 0.0
    zs, zt = torch.randn(2, 4), torch.randn(2, 4)
    y = torch.tensor([1, 3])
    both = dkd_loss_terms(zs, zt, y, 4.0)
    single = [dkd_loss_terms(zs[i:i + 1], zt[i:i + 1], y[i:i + 1], 4.0) for i in range(2)]
    for name in ("tckd", "nckd"):
        assert both[name].item() == pytest.approx((single[0][name].item() + single[1][name].item()) / 2, rel=1e-6)


def test_dkd_tckd_sees_only_the_target_probability():
    # Teacher and student agree on p_target but spread the rest differently: TCKD is 0, NCKD is not.
    zs = torch.tensor([[2.0, 0.0, 0.0]])
    zt = torch.tensor([[2.0, math.log(1.5), math.log(0.5)]])  # non-target exp sums equal: 1.5 + 0.5 = 1 + 1
    terms = dkd_loss_terms(zs, zt, torch.tensor([0]), 1.0)
    assert terms["tckd"].item() == pytest.approx(0.0, abs=1e-6)  # float32 rounding of log 1.5, log 0.5
    assert terms["nckd"].item() == pytest.approx(_kl([0.75, 0.25], [0.5, 0.5]), rel=1e-6)


def test_dkd_warmup_is_linear_then_one():
    assert [dkd_warmup(e, 4) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert dkd_warmup(0, 1) == 1.0 and dkd_warmup(0, 0) == 1.0


# ---------------------------------------------------------------------------------------------------------------
# DIST, logit standardisation, hint
# ---------------------------------------------------------------------------------------------------------------
def _pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return num / (math.sqrt(sum((x - ma) ** 2 for x in a)) * math.sqrt(sum((y - mb) ** 2 for y in b)))


def test_dist_hand_computed_value():
    zs = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]
    zt = [[2.0, -1.0, 0.0], [0.0, 1.0, 1.5]]
    tau, beta, gamma = 2.0, 1.5, 0.5
    ys, yt = [_softmax([v / tau for v in r]) for r in zs], [_softmax([v / tau for v in r]) for r in zt]
    inter = 1 - sum(_pearson(a, b) for a, b in zip(ys, yt)) / 2
    intra = 1 - sum(_pearson([r[j] for r in ys], [r[j] for r in yt]) for j in range(3)) / 3
    expected = beta * tau**2 * inter + gamma * tau**2 * intra
    terms = dist_loss_terms(torch.tensor(zs), torch.tensor(zt), tau)
    got = beta * terms["inter"] + gamma * terms["intra"]  # as kd_methods.DIST weighs them
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert terms["inter"].item() == pytest.approx(tau**2 * inter, rel=1e-5)
    # with B = 2 each class's correlation is +-1 (here +1: intra is 0); float32 and the 1e-8 in rho leave ~1e-5
    assert intra == pytest.approx(0.0, abs=1e-12) and terms["intra"].item() == pytest.approx(0.0, abs=1e-4)


def test_dist_perfectly_correlated_predictions_give_zero():
    z = torch.randn(8, 10)
    same = dist_loss_terms(z, z.clone(), 1.0)
    assert (same["inter"] + same["intra"]).item() == pytest.approx(0.0, abs=1e-6)
    # a shift changes no softmax; what remains is the 1e-8 in rho's denominator against |y - mean y|^2
    terms = dist_loss_terms(z, z + 3.0, 1.0)
    assert terms["inter"].item() == pytest.approx(0.0, abs=1e-5)
    assert terms["intra"].item() == pytest.approx(0.0, abs=1e-5)


def test_standardized_logits_hand_values_and_invariance():
    z = torch.tensor([[1.0, 2.0, 3.0], [10.0, 10.0, 16.0]])
    # mean 2, sample std 1 -> (-1, 0, 1); mean 12, sample std sqrt(12) -> (-2, -2, 4) / sqrt(12)
    expected = torch.tensor([[-1.0, 0.0, 1.0], [-2 / math.sqrt(12), -2 / math.sqrt(12), 4 / math.sqrt(12)]])
    assert torch.allclose(standardize_logits(z), expected, atol=1e-6)
    zs, zt, y = torch.randn(4, 6), torch.randn(4, 6), torch.randint(0, 6, (4,))
    # scale and shift of either side's logits do not change the standardised KD term
    a = kd_loss_terms(zs, zt, y, 0.0, 2.0, logit_standardize=True)["kd"]
    b = kd_loss_terms(5 * zs - 1, 0.3 * zt + 7, y, 0.0, 2.0, logit_standardize=True)["kd"]
    assert a.item() == pytest.approx(b.item(), rel=1e-4)
    assert kd_loss_terms(zs, zt, y, 0.0, 2.0)["kd"].item() != pytest.approx(a.item(), rel=1e-3)
    d = dkd_loss_terms(zs, zt, y, 2.0, logit_standardize=True)
    d2 = dkd_loss_terms(3 * zs, zt - 2, y, 2.0, logit_standardize=True)
    assert d["nckd"].item() == pytest.approx(d2["nckd"].item(), rel=1e-4)


def test_hint_loss_hand_value():
    s = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    t = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    assert hint_loss(s, t).item() == pytest.approx((1 + 0 + 1 + 4) / 4)


# ---------------------------------------------------------------------------------------------------------------
# Bit-identical kd runs: metrics.jsonl of `kd.method=kd` equals that of the code before the KD-method registry
# (commit ca6ca4b, exported from git), both run here, one thread, the tiny config below. (Recorded numbers would
# tie the test to one CPU: float reductions differ between CPU models, so both sides run on this machine.)
# ---------------------------------------------------------------------------------------------------------------
PRE_REGISTRY = "ca6ca4b"
KD_CASES = {"cached_alpha_0.5": ["kd.alpha=0.5"], "labels_only": ["kd.alpha=1.0"],
            "online_alpha_0.5": ["kd.alpha=0.5", "teacher.mode=online"]}
COMPARED = ("train/loss", "train/loss_ce", "train/loss_kd", "train/acc1", "val/acc1", "val/loss")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def pre_registry_tree(tmp_path_factory):
    """The repository's files at commit ca6ca4b (`git archive`), or a skip where the checkout lacks that commit."""
    import io
    import tarfile

    from conftest import ROOT
    proc = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", PRE_REGISTRY], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"commit {PRE_REGISTRY} is not in this checkout (a shallow clone?): {proc.stderr[-200:]!r}")
    tree = tmp_path_factory.mktemp("pre_registry")
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        tar.extractall(tree, filter="data")
    return tree


@pytest.mark.parametrize("case", sorted(KD_CASES))
def test_kd_method_kd_is_bit_identical_to_the_code_before_the_registry(tmp_path, case, pre_registry_tree):
    # labels only: without TINY's teacher.* keys; online: without its teacher.cache_views (both unread, refused)
    base = {"labels_only": TINY_LABEL_ONLY, "online_alpha_0.5": TINY_ONLINE}.get(case, TINY)
    args = [*base, *KD_CASES[case]]
    with open(tmp_path / "before.log", "w") as log:
        before = start_script(["train_student.py", *args, f"run.out_dir={tmp_path / 'before'}", "run.name=r"],
                              {**os.environ, **ONE_THREAD}, log, subprocess.STDOUT, cwd=pre_registry_tree)
        assert before.wait(300) == 0, (tmp_path / "before.log").read_text()[-3000:]
    proc = run_script("train_student.py", *args, "kd.method=kd", f"run.out_dir={tmp_path}", "run.name=r",
                      env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = [{k: m[k] for k in COMPARED} for m in read_metrics(tmp_path / "before" / "r")]
    got = [{k: m[k] for k in COMPARED} for m in read_metrics(tmp_path / "r")]
    assert len(got) == 2 and got == expected


# ---------------------------------------------------------------------------------------------------------------
# The seam: a method registered here, in the test file alone, trains end to end with a trainable part of its own.
# ---------------------------------------------------------------------------------------------------------------
class LogitMatch(kd_methods.KDMethod):
    """CE plus the MSE between the student's logits, scaled by a learned factor, and the teacher's."""

    def __init__(self, cfg, student, teacher_feature_dim):
        super().__init__(cfg, student, teacher_feature_dim)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, student, x):
        logits = student(x)
        return {"logits": logits, "scaled": logits * self.scale}

    def loss_terms(self, outputs, teacher, labels, epoch, temperature):
        return {"ce": (1.0, F.cross_entropy(outputs["logits"].float(), labels)),
                "match": (0.5, F.mse_loss(outputs["scaled"].float(), teacher["logits"].float()))}


@pytest.fixture
def logit_match():
    kd_methods.KD_METHODS.register("logit_match", help="CE + MSE to the teacher's logits, learned scale")(LogitMatch)
    yield
    kd_methods.KD_METHODS.unregister("logit_match")


def test_a_method_registered_in_a_test_file_trains_end_to_end(tmp_path, logit_match):
    from common.checkpoint import load_checkpoint
    from common.config import load_config
    from common.distributed import DistInfo
    from engine.schema import Config, validate
    from engine.run import run_training
    cfg = load_config(Config, None, [*TINY, "kd.method=logit_match", f"run.out_dir={tmp_path}", "run.name=r"])
    validate(cfg)
    results = run_training(cfg, DistInfo())
    metrics = read_metrics(tmp_path / "r")
    assert len(metrics) == 2 and all({"train/loss_ce", "train/loss_match"} <= set(m) for m in metrics)
    for m in metrics:  # the loop summed the method's weighted terms
        assert m["train/loss"] == pytest.approx(m["train/loss_ce"] + 0.5 * m["train/loss_match"], rel=1e-6)
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    assert set(ckpt["method"]) == {"scale"} and ckpt["method"]["scale"].item() != 1.0  # optimised and saved
    assert results["kd/method"] == "logit_match" and "teacher/test_acc1" in results
    # a resume brings the method's parameter and its optimizer state back with the student
    from engine.trainer import Trainer
    trainer = Trainer(cfg, DistInfo(), tmp_path / "r")
    assert trainer.method.scale.item() == 1.0
    trainer.load_state(ckpt, tmp_path / "r" / "checkpoints" / "last.pt")
    assert trainer.method.scale.item() == ckpt["method"]["scale"].item()
    assert len(trainer.optimizer.state_dict()["state"]) == len(list(trainer.distiller.parameters()))


# ---------------------------------------------------------------------------------------------------------------
# pooled_hint: features cached per view, and the same run online
# ---------------------------------------------------------------------------------------------------------------
def test_cache_stores_the_teachers_pooled_features_of_each_replayed_view(tmp_path):
    from common.config import load_config
    from common.distributed import DistInfo
    from engine.schema import Config
    from engine.optim import autocast_for
    from engine.teacher_cache import build_or_load_cache
    from imagedata.augment import AugSpec, replay_view_index
    from imagedata.image_sources import load_splits
    from imagedata.views import TrainViews
    from models import create_teacher
    cfg = load_config(Config, None, [*TINY, "teacher.cache_views=2"])
    splits = load_splits(cfg.data)
    teacher = create_teacher(cfg, splits["train"].class_names)
    spec, auto = AugSpec.from_cfg(cfg.data), autocast_for("off", torch.device("cpu"))
    plain, _ = build_or_load_cache(teacher, splits, spec, 2, 0, tmp_path, DistInfo(), 8, 0, auto)
    feats, info = build_or_load_cache(teacher, splits, spec, 2, 0, tmp_path, DistInfo(), 8, 0, auto,
                                      with_features=True)
    assert info["built"] and plain.root != feats.root and "features" not in plain.meta["fingerprint"]
    assert feats.meta["fingerprint"]["features"] == teacher.feature_dim == 512
    views = TrainViews(splits["train"], spec, 0, feats)
    for index in (0, 5):
        item = views[(index, 3)]
        assert replay_view_index(0, index, 3, 2) in (0, 1)
        from imagedata.normalization import normalize_batch
        x = normalize_batch(item["image"][None], torch.device("cpu"), True)
        logits, pooled = teacher.logits_and_features(x)
        assert item["teacher_features"].dtype == torch.float16 and item["teacher_features"].shape == (512,)
        assert torch.allclose(item["teacher_features"].float(), pooled[0], atol=2e-3, rtol=1e-3)
        assert torch.allclose(item["teacher_logits"].float(), logits[0], atol=2e-3, rtol=1e-3)
    assert np.array_equal(np.asarray(plain.eval_logits("test")), np.asarray(feats.eval_logits("test")))


def test_pooled_hint_trains_cached_and_online(tmp_path):
    for mode in ("cached", "online"):
        base = TINY_ONLINE if mode == "online" else TINY
        proc = run_script("train_student.py", *base, "train.epochs=1", "kd.method=pooled_hint", f"teacher.mode={mode}",
                          f"run.out_dir={tmp_path}", f"run.name={mode}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        (m,) = read_metrics(tmp_path / mode)
        assert m["train/loss_hint"] > 0 and m["train/loss"] == pytest.approx(m["train/loss_kd"] + m["train/loss_hint"],
                                                                              rel=1e-6)
        assert "regressor.weight" in torch.load(tmp_path / mode / "checkpoints" / "last.pt",
                                                weights_only=False)["method"]


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, fragments", [
    (["kd.method=crd"], ["unknown kd.method 'crd'", "kd, dkd, dist, pooled_hint, fitnet"]),
    (["kd.method=dkd", "kd.dkd.beta=-1"], ["kd.dkd.beta=-1.0 must be >= 0"]),
    (["kd.method=dist", "kd.dist.temperature=0"], ["kd.dist.temperature=0.0 must be > 0"]),
    (["kd.method=pooled_hint", "teacher.cache_features=false"], ["teacher.cache_features=false", "teacher.mode=online"]),
])
def test_bad_method_settings_are_refused(tmp_path, args, fragments):
    proc = run_main("train_student.py", *TINY, *args, f"run.out_dir={tmp_path}")
    assert_clean_error(proc, *fragments)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_a_feature_method_with_a_teacher_without_features_is_refused():
    from common.config import load_config
    from engine.schema import Config

    class LogitsOnly(nn.Module):  # e.g. a scripted or wrapped model: logits, no forward_head / num_features
        def forward(self, x):
            return x.mean((2, 3))

    cfg = load_config(Config, None, [*TINY, "kd.method=pooled_hint"])
    teacher = FrozenTeacher(LogitsOnly(), None)
    assert teacher.feature_dim is None
    with pytest.raises(UserError, match="exposes none"):
        kd_methods.build_method(cfg, nn.Linear(3, 4), teacher)
