"""kd_loss_terms (the kd method's loss) against hand-computed values and its defining properties."""
import math

import pytest
import torch
import torch.nn.functional as F

from models import kd_loss_terms


def test_equal_logits_give_zero_kl():
    z = torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    terms = kd_loss_terms(z, z.clone(), y, alpha=0.0, temperature=3.0)
    assert terms["kd"].item() == pytest.approx(0.0, abs=1e-6)


def test_alpha_one_is_cross_entropy_and_needs_no_teacher():
    z = torch.randn(7, 4)
    y = torch.randint(0, 4, (7,))
    terms = kd_loss_terms(z, None, y, alpha=1.0, temperature=4.0)
    assert torch.allclose(terms["loss"], F.cross_entropy(z, y)) and torch.allclose(terms["ce"], F.cross_entropy(z, y))
    assert terms["kd"].item() == 0.0


def test_temperature_squared_scaling():
    # Logits scaled by T keep softmax(z/T) fixed, so KL is the same and kd grows exactly as T^2.
    zs, zt = torch.randn(5, 6), torch.randn(5, 6)
    y = torch.zeros(5, dtype=torch.long)
    k1 = kd_loss_terms(zs, zt, y, 0.0, 1.0)["kd"]
    k3 = kd_loss_terms(3 * zs, 3 * zt, y, 0.0, 3.0)["kd"]
    assert k3.item() == pytest.approx(9 * k1.item(), rel=1e-5)


def test_hand_computed_value():
    # One sample, two classes. Student logits (0, 0), teacher logits (2, 0), label 0, alpha 0.5, T 2.
    #   p_s(T=2) = (1/2, 1/2);  p_t(T=2) = softmax(1, 0) = (e/(e+1), 1/(e+1))
    #   KL = sum p_t log(p_t / p_s);  CE = -log softmax(0, 0)[0] = log 2
    #   L = 0.5 * log 2 + 0.5 * 4 * KL
    a = math.e / (math.e + 1)
    kl = a * math.log(a / 0.5) + (1 - a) * math.log((1 - a) / 0.5)
    expected = 0.5 * math.log(2) + 0.5 * 4 * kl
    got = kd_loss_terms(torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([0]), 0.5, 2.0)
    assert got["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert got["ce"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert got["kd"].item() == pytest.approx(4 * kl, rel=1e-6)


def test_batch_mean_and_direction_of_kl():
    # KL(p_t || p_s), averaged over the batch: a two-sample batch equals the mean of the two single samples.
    zs, zt, y = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1])
    both = kd_loss_terms(zs, zt, y, 0.0, 1.0)["loss"]
    single = [kd_loss_terms(zs[i:i + 1], zt[i:i + 1], y[i:i + 1], 0.0, 1.0)["loss"] for i in range(2)]
    assert both.item() == pytest.approx(sum(s.item() for s in single) / 2, rel=1e-6)
    p_t, p_s = zt.softmax(1), zs.softmax(1)
    manual = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    assert both.item() == pytest.approx(manual.item(), rel=1e-5)
