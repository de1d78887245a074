"""configs/methods/: one file per published setting of a KD method. Each preset's loss, on a hand-written batch,
equals the sum its authors' formula gives with their numbers (written out below in float64, from the sources the
preset files cite); kd's independent weights and their shorthand kd.alpha; DIST's ImageNet defaults."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import ROOT, TINY, assert_clean_error, run_main
from omegaconf import OmegaConf

import kd_methods
from common.config import load_config, parse_config
from engine.schema import Config, validate
from models import kd_loss_terms

METHODS_DIR = ROOT / "configs" / "methods"
PRESETS = sorted(METHODS_DIR.glob("*.yaml"))

# A hand-written batch: 2 samples x 3 classes, the second one's label is not the teacher's top class.
Z_S = [[1.0, 0.0, -1.0], [0.5, 2.0, -0.5]]
Z_T = [[3.0, 1.0, 0.0], [0.0, 1.0, 2.5]]
LABELS = [0, 1]


# ---- the authors' formulas, written out (float64, plain Python) ------------------------------------------------
def softmax(z, t=1.0):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q))


def cross_entropy(zs, labels):
    return sum(-math.log(softmax(z)[y]) for z, y in zip(zs, labels)) / len(zs)


def zscore(z):
    """Sun et al. 2024: (z - mean) / (std + 1e-7), std with Bessel's correction (their normalize())."""
    m = sum(z) / len(z)
    s = math.sqrt(sum((v - m) ** 2 for v in z) / (len(z) - 1))
    return [(v - m) / (s + 1e-7) for v in z]


def hinton_kd(zs, zt, t, standardize=False):
    """T² KL(softmax(z_t / T) || softmax(z_s / T)), averaged over the batch."""
    if standardize:
        zs, zt = [zscore(z) for z in zs], [zscore(z) for z in zt]
    return t * t * sum(kl(softmax(b, t), softmax(a, t)) for a, b in zip(zs, zt)) / len(zs)


def dkd_parts(zs, zt, labels, t, standardize=False):
    """Zhao et al. 2022 Eq. 7: TCKD on [p_y, 1 - p_y], NCKD on the non-target classes renormalised, both T²-scaled,
    averaged over the batch."""
    if standardize:
        zs, zt = [zscore(z) for z in zs], [zscore(z) for z in zt]
    tckd = nckd = 0.0
    for a, b, y in zip(zs, zt, labels):
        ps, pt = softmax(a, t), softmax(b, t)
        tckd += kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        rest = [k for k in range(len(a)) if k != y]
        qs = [ps[k] / (1 - ps[y]) for k in rest]
        qt = [pt[k] / (1 - pt[y]) for k in rest]
        nckd += kl(qt, qs)
    n = len(zs)
    return t * t * tckd / n, t * t * nckd / n


def pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    a, b = [v - ma for v in a], [v - mb for v in b]
    return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
                                              + 1e-8)


def dist_parts(zs, zt, tau):
    """Huang et al. 2022: 1 - mean Pearson over samples (inter) and over classes (intra) of softmax(z / tau), tau²."""
    ys, yt = [softmax(z, tau) for z in zs], [softmax(z, tau) for z in zt]
    inter = 1 - sum(pearson(a, b) for a, b in zip(ys, yt)) / len(ys)
    cols = range(len(ys[0]))
    intra = 1 - sum(pearson([r[j] for r in ys], [r[j] for r in yt]) for j in cols) / len(cols)
    return tau * tau * inter, tau * tau * intra


def dkd_warm(epoch, warmup):
    """mdistiller DKD.py: min(epoch / WARMUP, 1.0) with 1-based epochs."""
    return min((epoch + 1) / warmup, 1.0)


# Each preset with its authors' numbers (not read from the file: the test states what the source says).
def _kd(ce, w, t, ls):
    return lambda epoch: ce * cross_entropy(Z_S, LABELS) + w * hinton_kd(Z_S, Z_T, t, ls)


def _dkd(ce, alpha, beta, t, warmup, ls):
    def loss(epoch):
        tckd, nckd = dkd_parts(Z_S, Z_T, LABELS, t, ls)
        return ce * cross_entropy(Z_S, LABELS) + dkd_warm(epoch, warmup) * (alpha * tckd + beta * nckd)
    return loss


def _dist(ce, beta, gamma, tau):
    def loss(epoch):
        inter, intra = dist_parts(Z_S, Z_T, tau)
        return ce * cross_entropy(Z_S, LABELS) + beta * inter + gamma * intra
    return loss


AUTHORS = {
    "kd_hinton": _kd(0.0, 1.0, 4.0, False),                         # this repository's reference recipe
    "kd_mdistiller_imagenet": _kd(0.5, 0.5, 1.0, False),            # mdistiller configs/imagenet/*/kd.yaml
    "kd_dist_baseline": _kd(0.9, 1.0, 4.0, False),                  # DIST's KD (T=4) baseline
    "kd_ls_cifar100": _kd(0.1, 9.0, 2.0, True),                     # logit-standardization-KD cfg.py (master)
    "kd_ls_cifar100_ce1": _kd(1.0, 9.0, 2.0, True),                 # same, cfg.py at 2ba3954
    "dkd_mdistiller_imagenet_r50_mv1": _dkd(1.0, 1.0, 2.0, 1.0, 1, False),
    "dkd_mdistiller_imagenet_r34_r18": _dkd(1.0, 1.0, 0.5, 1.0, 1, False),
    "dkd_ls_cifar100_r32x4_r8x4": _dkd(1.0, 1.0 * 9, 8.0 * 9, 2.0, 20, True),
    "dkd_ls_imagenet_r50_mv1": _dkd(1.0, 1.0 * 9, 2.0 * 9, 2.0, 1, True),
    "dist_imagenet": _dist(1.0, 2 * 1.0, 2 * 1.0, 1.0),             # CE 1 + 2 x DIST(beta 1, gamma 1)
}


def preset_config(path: Path, *overrides: str):
    cfg = load_config(Config, [str(path)], list(overrides))
    validate(cfg)
    return cfg


def our_loss(cfg, epoch: int) -> float:
    """Sum of weight x term of the configured method on the hand-written batch (what the training loop sums)."""
    cls = kd_methods.method_class(cfg)
    method = cls(cfg, nn.Identity(), None)
    terms = method.loss_terms({"logits": torch.tensor(Z_S)}, {"logits": torch.tensor(Z_T)}, torch.tensor(LABELS),
                              epoch, cls.temperature(cfg))
    return sum(float(w) * float(v) for w, v in terms.values())


def test_every_published_setting_has_a_preset_and_a_reference():
    assert sorted(p.stem for p in PRESETS) == sorted(AUTHORS)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
@pytest.mark.parametrize("epoch", [0, 99])
def test_preset_loss_is_the_authors_formula(path, epoch):
    expected = AUTHORS[path.stem](epoch)
    got = our_loss(preset_config(path), epoch)
    assert got == pytest.approx(expected, rel=2e-6, abs=1e-6), (path.stem, got, expected)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_cites_its_source_and_loads_alone_or_after_a_data_config(path):
    text = path.read_text()
    assert "\n# Source: " in text, path
    preset_config(path)  # alone: the schema defaults for everything but kd.*
    cfg = parse_config(Config, ["--config", "configs/quickstart.yaml", "--config", str(path)], prog="t")
    validate(cfg)
    assert cfg.data.name == "synthetic"  # the data config's keys stay
    written = OmegaConf.load(path)
    assert list(written) == ["kd"]  # a preset is a method setting only: it stacks on any data config
    for key, value in _leaves(OmegaConf.to_container(written)):
        assert OmegaConf.select(cfg, key) == value, key  # the preset's keys win over the data config's


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_config_files_merge_in_order():
    ls = METHODS_DIR / "kd_ls_cifar100.yaml"
    after = parse_config(Config, ["--config", "configs/quickstart.yaml", "--config", str(ls)], prog="t")
    before = parse_config(Config, ["--config", str(ls), "--config", "configs/quickstart.yaml"], prog="t")
    assert after.kd.temperature == 2.0 and before.kd.temperature == 4.0  # quickstart.yaml sets 4.0
    for cfg in (after, before):  # merged, not replaced: each file's other keys survive the other file
        assert cfg.data.name == "synthetic" and cfg.train.epochs == 15 and cfg.kd.baseline  # quickstart.yaml only
        assert (cfg.kd.ce_weight, cfg.kd.kd_weight, cfg.kd.logit_standardize) == (0.1, 9.0, True)  # kd_ls only
    last = parse_config(Config, ["--config", "configs/quickstart.yaml", "--config", str(ls), "kd.temperature=3"],
                        prog="t")
    assert last.kd.temperature == 3.0  # key=value overrides come after every file


# ---- kd's weights ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_kd_alpha_shorthand_gives_todays_terms(alpha):
    cfg = load_config(Config, None, [f"kd.alpha={alpha}"])
    validate(cfg)
    assert kd_methods.kd_weights(cfg) == (alpha, 1.0 - alpha)
    assert kd_methods.uses_teacher(cfg) == (alpha < 1.0)
    s, t, y = torch.tensor(Z_S), torch.tensor(Z_T), torch.tensor(LABELS)
    terms = kd_methods.KD(cfg, nn.Identity(), None).loss_terms({"logits": s}, {"logits": t}, y, 0, 4.0)
    before = kd_loss_terms(s, t, y, alpha, 4.0)  # what the kd entry returned before the weights were split
    assert terms["ce"][0] == alpha and terms["kd"][0] == 1.0 - alpha
    assert torch.equal(terms["ce"][1], before["ce"]) and torch.equal(terms["kd"][1], before["kd"])


def test_explicit_weights_are_used():
    cfg = load_config(Config, None, ["kd.ce_weight=0.1", "kd.kd_weight=9", "kd.temperature=2"])
    validate(cfg)
    assert kd_methods.kd_weights(cfg) == (0.1, 9.0)
    assert our_loss(cfg, 0) == pytest.approx(0.1 * cross_entropy(Z_S, LABELS) + 9 * hinton_kd(Z_S, Z_T, 2.0),
                                             rel=2e-6)


def test_kd_weight_zero_builds_no_teacher():
    cfg = load_config(Config, None, ["kd.ce_weight=1", "kd.kd_weight=0"])
    validate(cfg)
    assert not kd_methods.uses_teacher(cfg)
    terms = kd_methods.KD(cfg, nn.Identity(), None).loss_terms({"logits": torch.tensor(Z_S)}, {},
                                                               torch.tensor(LABELS), 0, 4.0)
    assert terms["kd"][0] == 0.0 and float(terms["kd"][1]) == 0.0
    assert float(terms["ce"][1]) == pytest.approx(cross_entropy(Z_S, LABELS), rel=1e-6)


@pytest.mark.parametrize("args, fragment", [
    (["kd.alpha=0.5", "kd.ce_weight=1", "kd.kd_weight=9"], "both set the kd weights"),
    (["kd.kd_weight=9"], "set the two together"),
    (["kd.ce_weight=0.5"], "set the two together"),
])
def test_conflicting_weights_are_refused_before_any_work(tmp_path, args, fragment):
    out = tmp_path / "runs"
    proc = run_main("train_student.py", *TINY, *args, f"run.out_dir={out}")
    assert_clean_error(proc, fragment)
    assert len(proc.stderr.strip().splitlines()) == 1  # a one-line error
    assert not out.exists()


def test_the_label_only_baseline_drops_explicit_weights():
    from train_student import baseline_config
    cfg = load_config(Config, None, ["kd.ce_weight=0.1", "kd.kd_weight=9", "kd.baseline=true"])
    base = baseline_config(cfg)
    validate(base)
    assert kd_methods.kd_weights(base) == (1.0, 0.0) and not kd_methods.uses_teacher(base)


# ---- DIST's defaults --------------------------------------------------------------------------------------------
def test_dist_defaults_are_the_authors_imagenet_setting():
    d = load_config(Config, None, []).kd.dist
    assert (d.beta, d.gamma, d.temperature, d.ce_weight) == (2.0, 2.0, 1.0, 1.0)
