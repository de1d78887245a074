"""gan_vae: losses against closed forms, FID, expert decisions, forgetting, and the continual script end to end."""
import json
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import (GAN_VAE_FID_CACHE, assert_clean_error, fork_server_with, run_and_sigkill, run_main,
                      run_script, runs_documented_command)

from gan_vae import forgetting
from gan_vae.experts import decide_expert
from gan_vae.fid import FeatureModule, FIDEvaluator
from gan_vae.student import dynamic_temperature, expert_weight
from models import (Critic, Generator, TaskVAE, bernoulli_kl, gaussian_kl, gradient_penalty, nt_xent, relational_kd,
                    vae_loss_terms, wgan_critic_loss, wgan_generator_loss)


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------
class LinearCritic(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, x):
        return (x.flatten(1) * self.w.flatten()).sum(1)


def test_gradient_penalty_on_a_linear_critic():
    # critic(x) = <w, x>: its gradient is w at every point, so GP = lambda (||w|| - 1)^2 exactly
    w = torch.full((1, 2, 2), 0.5) * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 2, 2)
    critic = LinearCritic(w)
    real, fake = torch.randn(5, 1, 2, 2), torch.randn(5, 1, 2, 2)
    expected = 10 * (w.norm().item() - 1) ** 2
    assert gradient_penalty(critic, real, fake, 10.0).item() == pytest.approx(expected, rel=1e-6)
    gp = gradient_penalty(critic, real, fake, 10.0, eps=torch.rand(5, 1, 1, 1))
    gp.backward()  # create_graph: the penalty trains the critic
    assert critic.w.grad is not None and critic.w.grad.abs().sum() > 0


def test_wgan_losses_by_hand():
    real, fake = torch.tensor([1.0, 2.0, 3.0], requires_grad=True), torch.tensor([0.5, 1.5], requires_grad=True)
    # mean D(real) = 2, mean D(fake) = 1: Wasserstein estimate 1, critic loss -1, generator loss -1
    loss_d = wgan_critic_loss(real, fake)
    assert loss_d.item() == pytest.approx(-1.0)
    loss_d.backward()
    assert torch.allclose(real.grad, torch.full((3,), -1 / 3)) and torch.allclose(fake.grad, torch.full((2,), 0.5))
    assert wgan_generator_loss(torch.tensor([0.5, 1.5])).item() == pytest.approx(-1.0)
    assert wgan_generator_loss(torch.tensor([-2.0, 4.0, 1.0])).item() == pytest.approx(-1.0)


def test_nt_xent_on_a_hand_made_batch():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tau = 0.5
    # anchor 0 (a0): sims to a1, b0, b1 are 0, 1, 0 -> /tau: 0, 2, 0; positive b0
    expected = -math.log(math.exp(2) / (math.exp(0) + math.exp(2) + math.exp(0)))
    assert nt_xent(a, b, tau).item() == pytest.approx(expected, rel=1e-6)  # all 4 anchors are alike
    assert nt_xent(a, b, tau).item() < nt_xent(a, b.flip(0), tau).item()  # swapped positives cost more


def test_bernoulli_kl_by_hand():
    # p = sigmoid(0) = 1/2, q = sigmoid(log 3) = 3/4: KL = 1/2 log(2/3) + 1/2 log(2) = 1/2 log(4/3) per pixel
    p = torch.zeros(2, 1, 2, 2)
    q = torch.full((2, 1, 2, 2), math.log(3.0))
    assert torch.allclose(bernoulli_kl(p, q), torch.full((2,), 4 * 0.5 * math.log(4 / 3)), atol=1e-6)
    assert torch.allclose(bernoulli_kl(q, q), torch.zeros(2), atol=1e-6)
    far = torch.full((1, 3), 30.0)  # saturated logits stay finite
    assert bernoulli_kl(far, -far).item() == pytest.approx(90, rel=1e-3)


def test_previous_student_distillation_acts_on_replayed_rows_only():
    """kd.previous_weight: on replayed images the student is pulled to its frozen copy from before the task
    (reconstruction Bernoulli KL + posterior-mean distances); current-task rows contribute nothing."""
    from gan_vae.experts import frozen_copy
    from gan_vae.losses import self_distillation
    torch.manual_seed(0)
    student = TaskVAE(1, 4, 2, 8)
    student.add_task()
    previous = frozen_copy(student)
    student.add_task()
    assert not any(p.requires_grad for p in previous.parameters()) and not previous.training
    x = torch.rand(6, 1, 32, 32) * 2 - 1
    tasks = torch.tensor([0, 0, 0, 1, 1, 1])
    student.eval()
    assert torch.allclose(self_distillation(student, previous, x, tasks != 1), torch.zeros(6), atol=1e-4)
    with torch.no_grad():
        student.decoder[-1].weight.add_(0.5)  # the student drifts
    per = self_distillation(student, previous, x, tasks != 1)
    assert (per[:3] > 0).all() and (per[3:] == 0).all()
    per.sum().backward()
    assert student.decoder[-1].weight.grad.abs().sum() > 0


@pytest.mark.numerics
def test_self_distillation_is_exactly_zero_for_identical_weights_in_train_mode():
    """While training, the student's BatchNorm uses batch statistics and the frozen copy its running statistics;
    the term must compare the two in the same mode, or identical weights give a non-zero loss. Neither the copy's
    running statistics nor the student's training mode change."""
    from gan_vae.experts import frozen_copy
    from gan_vae.losses import self_distillation
    torch.manual_seed(0)
    student = TaskVAE(1, 4, 2, 8)
    student.add_task()
    with torch.no_grad():  # running statistics far from any batch's, as after training on another domain
        for m in student.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.fill_(0.7)
                m.running_var.fill_(3.0)
    previous = frozen_copy(student)
    student.train()  # as in a training step
    x = torch.rand(6, 1, 32, 32) * 2 - 1

    def running_statistics():
        return [v.clone() for m in (previous, student) for k, v in m.state_dict().items() if "running" in k]

    before = running_statistics()
    per = self_distillation(student, previous, x, torch.ones(6, dtype=torch.bool))
    assert torch.equal(per, torch.zeros(6)), per
    assert student.training
    assert all(torch.equal(a, b) for a, b in zip(before, running_statistics()))


def test_vae_loss_terms_return_the_reconstruction_behind_recon():
    """x_hat, the reconstruction a loss term can read, is the Bernoulli mean whose negative log-likelihood of x is
    `recon`, and it carries the gradient to the student."""
    torch.manual_seed(0)
    vae = TaskVAE(1, 4, 2, 8)
    vae.add_task()
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    out = vae_loss_terms(vae, x, torch.zeros(3, dtype=torch.long), 1.0)
    assert out["x_hat"].shape == x.shape and out["x_hat"].requires_grad
    assert out["x_hat"].min() >= -1 and out["x_hat"].max() <= 1
    p, target = ((out["x_hat"] + 1) / 2).double(), ((x + 1) / 2).double()
    nll = -(target * p.log() + (1 - target) * (1 - p).log()).flatten(1).sum(1)
    assert torch.allclose(nll.float(), out["recon"], rtol=1e-4)


def test_kl_to_task_prior_matches_closed_form():
    mu, logvar = torch.randn(4, 3), torch.randn(4, 3)
    pmu, plogvar = torch.randn(3), torch.randn(3)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(pmu, (0.5 * plogvar).exp())
    expected = torch.distributions.kl_divergence(q, p).sum(-1)
    assert torch.allclose(gaussian_kl(mu, logvar, pmu, plogvar), expected, atol=1e-5)
    assert torch.allclose(gaussian_kl(mu, logvar), torch.distributions.kl_divergence(
        q, torch.distributions.Normal(0.0, 1.0)).sum(-1), atol=1e-5)


def test_relational_kd_is_zero_for_identical_similarities():
    f = torch.randn(6, 10)
    assert relational_kd(f, f * 3.0, 2.0).item() == pytest.approx(0.0, abs=1e-6)  # cosine: scale-free
    assert relational_kd(f, torch.randn(6, 4), 2.0).item() > 0


def test_relational_kd_compares_rows_of_the_same_group_only():
    """Rows taught by different experts live in different critics' feature spaces: a row's similarity distribution
    covers only the rows of its own group, so changing how the groups sit relative to each other changes nothing."""
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(10, 6, generator=g), torch.randn(10, 4, generator=g)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    rotation = torch.linalg.qr(torch.randn(6, 6, generator=g))[0]
    moved = torch.cat([teacher[:4], teacher[4:] @ rotation])  # group 1 rotated: cosines to group 0 change
    together = relational_kd(teacher, student, 2.0, groups=groups)
    assert relational_kd(moved, student, 2.0, groups=groups).item() == pytest.approx(together.item(), rel=1e-5)
    assert relational_kd(moved, student, 2.0).item() != pytest.approx(relational_kd(teacher, student, 2.0).item(),
                                                                      rel=1e-3)  # without groups it would change
    # the mean over all rows of the per-group row KLs (4 rows in group 0, 6 in group 1)
    parts = 4 * relational_kd(teacher[:4], student[:4], 2.0) + 6 * relational_kd(teacher[4:], student[4:], 2.0)
    assert together.item() == pytest.approx(parts.item() / 10, rel=1e-5)
    lonely = relational_kd(teacher, student, 2.0, groups=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 2]))
    assert math.isfinite(lonely.item())  # a row alone in its group contributes 0, not NaN


def test_relational_kd_weights_scale_each_row():
    """The adaptive expert weight scales the relational term row by row, like every other distillation term."""
    g = torch.Generator().manual_seed(1)
    teacher, student = torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g, requires_grad=True)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    plain = relational_kd(teacher, student, 1.5, groups=groups)
    half = relational_kd(teacher, student, 1.5, groups=groups, weights=torch.full((8,), 0.5))
    assert half.item() == pytest.approx(0.5 * plain.item(), rel=1e-6)
    w = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.3, 0.3, 0.3, 0.3])
    per_group = 4 * relational_kd(teacher[:4], student[:4], 1.5) + 0.3 * 4 * relational_kd(teacher[4:], student[4:],
                                                                                          1.5)
    weighted = relational_kd(teacher, student, 1.5, groups=groups, weights=w)
    assert weighted.item() == pytest.approx(per_group.item() / 8, rel=1e-5)
    weighted.backward()
    assert torch.isfinite(student.grad).all()


def test_networks_shapes_and_task_priors():
    g, c = Generator(16, 1, 8, attention=True), Critic(1, 8, attention=True)
    x = g(torch.randn(3, 16))
    assert x.shape == (3, 1, 32, 32) and x.abs().max() <= 1 and c(x).shape == (3,)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in c.modules())
    assert all(hasattr(m, "parametrizations") for m in g.modules() if isinstance(m, (torch.nn.ConvTranspose2d,
                                                                                      torch.nn.Linear)))
    vae = TaskVAE(1, 4, 3, 8)
    vae.add_task()
    vae.add_task()
    mu, lv = vae.task_prior(torch.tensor([0, 1]), mix=(torch.tensor([1, 0]), torch.tensor([1.0, 0.25])))
    assert torch.allclose(mu[0], vae.prior_mu[0]) and torch.allclose(mu[1], 0.25 * vae.prior_mu[1] + 0.75 *
                                                                      vae.prior_mu[0])
    assert vae.sample(torch.tensor([0, 1, 1])).shape == (3, 1, 32, 32)


# ---------------------------------------------------------------------------------------------------------------
# FID
# ---------------------------------------------------------------------------------------------------------------
def _identity_fid(num_samples):
    return FIDEvaluator(FeatureModule(torch.nn.Flatten(), 4), num_samples)


def test_fid_of_a_set_against_itself_is_zero():
    x = torch.randn(3000, 4, 1, 1, generator=torch.Generator().manual_seed(0))
    ev = _identity_fid(3000)
    ev.add_real("a", x)
    result = ev.fid("a", iter([x[:1000], x[1000:]]))
    assert result["fid"] == pytest.approx(0.0, abs=1e-6) and result["n_fake"] == 3000 and result["n_real"] == 3000


def test_fid_of_two_gaussians_matches_the_closed_form():
    g = torch.Generator().manual_seed(1)
    n = 200_000
    mu1, sd1 = torch.tensor([0.0, 1.0, -1.0, 2.0]), torch.tensor([1.0, 2.0, 0.5, 1.0])
    mu2, sd2 = torch.tensor([1.0, 1.0, 0.0, 2.0]), torch.tensor([1.0, 1.0, 1.5, 3.0])
    a = (mu1 + sd1 * torch.randn(n, 4, generator=g)).view(n, 4, 1, 1)
    b = (mu2 + sd2 * torch.randn(n, 4, generator=g)).view(n, 4, 1, 1)
    # diagonal covariances: FID = |mu1 - mu2|^2 + sum (sd1 - sd2)^2
    closed = float(((mu1 - mu2) ** 2).sum() + ((sd1 - sd2) ** 2).sum())
    ev = _identity_fid(n)
    ev.add_real("a", a)
    assert ev.fid("a", iter([b]))["fid"] == pytest.approx(closed, rel=0.02)


def test_fid_sample_count_must_exceed_two():
    from common.errors import UserError
    with pytest.raises(UserError, match="more than 2"):
        _identity_fid(2)


# ---------------------------------------------------------------------------------------------------------------
# Expert decisions, weights, temperature, forgetting
# ---------------------------------------------------------------------------------------------------------------
def test_expert_decisions_with_stubbed_fids():
    assert decide_expert([], 10.0, 3) == ("new", 0)
    assert decide_expert([4.0], 10.0, 3) == ("reuse", 0)
    assert decide_expert([40.0], 10.0, 3) == ("new", 1)
    assert decide_expert([40.0, 12.0], 10.0, 3) == ("new", 2)
    assert decide_expert([40.0, 12.0, 30.0], 10.0, 3) == ("reuse", 1)  # at the cap: the nearest expert
    assert decide_expert([40.0, 8.0], 10.0, 3) == ("reuse", 1)


def test_expansion_rules_are_a_registry_whose_default_is_the_fid_threshold_rule():
    from common.config import load_config
    from gan_vae.continual import ContinualConfig
    from gan_vae.experts import EXPANSION_RULES, ExpansionChoice
    cfg = load_config(ContinualConfig, None, ["teacher.fid_threshold=10", "teacher.max_experts=3"])
    assert cfg.teacher.expansion == "fid_threshold"
    rule = EXPANSION_RULES["fid_threshold"]
    for fids in ([], [4.0], [40.0], [40.0, 12.0], [40.0, 12.0, 30.0], [40.0, 8.0]):
        decision = rule(ExpansionChoice(len(fids), fids, [1.0] * len(fids), 3, cfg))
        assert decision[:2] == decide_expert(fids, 10.0, 3)
        assert decision.values == {"teacher.fid_threshold": 10.0, "teacher.max_experts": 3}  # what it decided with


@pytest.mark.parametrize("decision,fragment", [
    (("new", 1), "decided ('new', expert 1) for task 1 with 1 expert(s) and teacher.max_experts=1"),  # at the cap
    (("new", 3), "decided ('new', expert 3)"),  # not the next index
    (("reuse", 1), "decided ('reuse', expert 1)"),  # no such expert
    (("grow", 0), "decided ('grow', expert 0)"),
])
def test_an_expansion_rule_that_breaks_the_pool_bounds_stops_the_run(decision, fragment):
    from common.config import load_config
    from common.errors import UserError
    from gan_vae.continual import ContinualConfig
    from gan_vae.experts import EXPANSION_RULES, Expansion, ExpertPool
    EXPANSION_RULES.register("broken")(lambda choice: Expansion(*decision, {}))
    try:
        cfg = load_config(ContinualConfig, None, ["teacher.expansion=broken", "teacher.max_experts=1"])
        pool = ExpertPool(cfg, torch.device("cpu"))
        pool.experts = [SimpleNamespace(latest_fid=3.0)]  # one expert exists: the pool reads only its latest FID
        with pytest.raises(UserError, match=re.escape(f"teacher.expansion=broken {fragment}")):
            pool.decide(1, [5.0])
    finally:
        EXPANSION_RULES.unregister("broken")


def test_adaptive_weight_and_dynamic_temperature():
    assert expert_weight(5.0, 10.0, 0.3, 1.0) == 1.0
    assert expert_weight(20.0, 10.0, 0.3, 1.0) == pytest.approx(0.5)
    assert expert_weight(1000.0, 10.0, 0.3, 1.0) == 0.3
    assert dynamic_temperature(0, 11, 4.0, 1.0, 5.0, 10.0, 0.5) == pytest.approx(4.0)
    assert dynamic_temperature(10, 11, 4.0, 1.0, 5.0, 10.0, 0.5) == pytest.approx(1.0)
    assert dynamic_temperature(10, 11, 4.0, 1.0, 15.0, 10.0, 0.5) == pytest.approx(1.25)  # raised by a high FID
    assert dynamic_temperature(10, 11, 4.0, 1.0, 99.0, 10.0, 0.5) == pytest.approx(1.5)


def test_forgetting_percent_is_null_when_the_best_value_is_zero():
    r = [[0.0, None], [0.5, 2.0]]
    assert forgetting.forgetting(r) == [0.5, None]
    assert forgetting.forgetting_percent(r) == [None, None]  # no percentage of 0: JSON null, never Infinity
    json.dumps(forgetting.forgetting_percent(r), allow_nan=False)


def _hand_results():
    m = [[10.0, None], [12.0, 20.0]]
    counts = [[[48, 40], None], [[48, 40], [889, 889]]]
    out = {"experts": 2, "task_to_expert": [0, 1], "fid": {"backend": "domain", "samples": 2000},
           "forgetting": {}, "forgetting_percent": {}, "bwt": {}}
    for key in ("teacher_fid", "student_fid", "recon_mse", "recon_fid"):
        out[key] = m
        if key != "recon_mse":
            out[f"{key}_samples"] = counts
        out["forgetting"][key] = forgetting.forgetting(m)
        out["forgetting_percent"][key] = forgetting.forgetting_percent(m)
        out["bwt"][key] = forgetting.backward_transfer(m)
    return out


def test_report_prints_sample_counts_and_reads_bwt_right(tmp_path):
    """Every FID cell shows the numbers of real and generated images it used; BWT is Lopez-Paz and Ranzato's formula
    (not sign flipped), and positive means worse."""
    text = forgetting.report(_hand_results(), ["a", "b"], tmp_path)
    assert "| a | 10 (48/40) | - |" in text and "| b | 12 (48/40) | 20 (889/889) |" in text
    assert "| b | 12 | 20 |" in text  # recon MSE has no sample counts
    assert "sign flipped" not in text and "positive means the earlier task got worse" in text
    assert "BWT: +2" in text
    results = _hand_results()
    results["forgetting_percent"]["recon_mse"] = [None, None]  # best value 0
    assert "a +2 (-)" in forgetting.report(results, ["a", "b"], tmp_path)


def test_forgetting_and_bwt_on_a_hand_made_matrix():
    r = [[10.0, None, None],
         [12.0, 20.0, None],
         [15.0, 18.0, 30.0]]
    # task 0: final 15, best before the last task min(10, 12) = 10 -> +5 (+50%); task 1: 18 - 20 = -2
    assert forgetting.forgetting(r) == [5.0, -2.0, None]
    assert forgetting.forgetting_percent(r) == [50.0, -10.0, None]
    # BWT = ((15 - 10) + (18 - 20)) / 2
    assert forgetting.backward_transfer(r) == pytest.approx(1.5)
    assert forgetting.backward_transfer([[3.0]]) is None


# ---------------------------------------------------------------------------------------------------------------
# python -m gan_vae.continual end to end
# ---------------------------------------------------------------------------------------------------------------
def _domain(kind: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images, labels = np.zeros((n, 28, 28), np.uint8), rng.integers(0, 2, n)
    yy, xx = np.mgrid[0:28, 0:28]
    for i in range(n):
        cx, cy = rng.uniform(10, 18, 2)
        r = rng.uniform(5, 8)
        mask = ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r) if kind == "discs" else \
            ((np.abs(yy - cy) <= 2) | (np.abs(xx - cx) <= 2)) & (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
        images[i][mask] = 255
    return images, labels


@pytest.fixture(scope="module")
def domains():
    """The tiny domains' task files, in one folder of the test session that every worker shares: the same task
    paths in every test, so that the tiny runs' FID domain classifier (keyed by them) is trained once per task list
    in the session's cache (GAN_VAE_FID_CACHE), not once per test. Tests read these files; one that changes a task
    file works on a copy."""
    from filelock import FileLock
    root = Path(os.environ["KD_TEST_HOME"]) / "gan_vae_domains"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if not (root / "complete").is_file():
            for kind in ("discs", "crosses"):
                x, y = _domain(kind, 240, 0 if kind == "discs" else 1)
                np.savez(root / f"{kind}.npz", images=x, labels=y)
            np.savez(root / "wrong_keys.npz", pictures=x, labels=y)
            np.savez(root / "wrong_shape.npz", images=np.zeros((5, 32, 32), np.uint8), labels=np.zeros(5))
            (root / "complete").write_text("")
    return root


def _tiny(domains, tmp_path, tasks, *extra):
    # tasks: "discs", "crosses", or "inverted" (the discs, inverted: white background) -> npz task specs. The FID
    # classifier comes from the session's cache, unless `extra` names a fid.cache_dir of the test's own (a test
    # that changes the cached file must: another worker may be reading the shared one)
    specs = [str(domains / "discs.npz") + ":invert" if t == "inverted" else str(domains / f"{t}.npz") for t in tasks]
    own_cache = any(a.startswith("fid.cache_dir=") for a in extra)
    return ["data.tasks=[" + ",".join(specs) + "]", "teacher.steps=40", "teacher.lr=5e-3",
            "student.steps=30", "teacher.width=8", "student.width=8", "teacher.batch_size=32",
            "student.batch_size=32", "fid.samples=48", "fid.classifier_epochs=2", "teacher.fid_threshold=FIDTHR",
            "log.every_steps=10", "log.sample_every=30", "run.checkpoint_every=20", f"run.out_dir={tmp_path}",
            *([] if own_cache else [f"fid.cache_dir={GAN_VAE_FID_CACHE}"]), *extra]


# between the in-domain and cross-domain FIDs of these tiny experts in test_repeated_domain_...: 115.17 and 220.17 on
# a 2-core Xeon under ATEN_CPU_CAPABILITY=avx2, in-domain 115.2 under its AVX-512 (2026-12-07)
FID_THRESHOLD = "120"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _args(domains, tmp_path, tasks, *extra):
    return [a.replace("FIDTHR", FID_THRESHOLD) for a in _tiny(domains, tmp_path, tasks, *extra)]


def _in_process_run(domains, tmp_path, tasks, *extra, experts=(0, 1), replay_fid=240.0):
    """A ContinualRun in this process with untrained experts (task j -> experts[j]) and no FID features: enough to
    run student steps and look inside them. An expert at FID 240 (twice the threshold) gets weight 1/2."""
    from common.config import load_config
    from gan_vae.continual import ContinualConfig, ContinualRun
    from gan_vae.experts import Expert
    cfg = load_config(ContinualConfig, None, [*_args(domains, tmp_path, tasks), "student.batch_size=16",
                                              "student.steps=1", *extra])
    torch.manual_seed(0)
    run = ContinualRun(cfg, None, torch.device("cpu"))
    run.pool.experts = [Expert(cfg, 1, run.device) for _ in range(max(experts) + 1)]
    run.pool.task_to_expert = list(experts)
    for j, e in enumerate(experts):
        run.experts[e].tasks.append(j)
        run.experts[e].latest_fid = replay_fid
    return run


def _toy_fid(run, samples):
    """A fast FID for in-process tests: features are a fixed random projection of the pixels to 8 dimensions."""
    features = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 8))
    torch.nn.init.normal_(features[1].weight, generator=torch.Generator().manual_seed(3))
    run.evaluation.evaluator = FIDEvaluator(FeatureModule(features, 8), samples)
    for j, x in enumerate(run.test_x):
        run.evaluation.evaluator.add_real(f"test{j}", x)


def test_evaluation_draws_from_its_own_seeded_generators(domains, tmp_path):
    """Evaluation must not depend on (or advance) the global RNG, so that re-evaluation reproduces every matrix,
    and each FID comes with the numbers of real and generated images it used."""
    run = _in_process_run(domains, tmp_path, ["discs", "crosses"], "fid.samples=100")
    _toy_fid(run, 100)
    run.train_student(1, 0)  # the student has both task priors
    torch.manual_seed(1)
    first = run.evaluate(1)
    state = torch.get_rng_state()
    torch.manual_seed(2)
    torch.rand(5)
    second = run.evaluate(1)
    assert first == second
    torch.manual_seed(2)
    torch.rand(5)
    run.evaluate(1)
    assert not torch.equal(state, torch.get_rng_state())  # (the global stream is the caller's, untouched)
    # 48 test images per task (20% of 240), fewer than fid.samples=100: the counts say what was used
    for key in ("teacher_fid", "student_fid", "recon_fid"):
        assert first[f"{key}_samples"] == [[48, 48], [48, 48]], key
    assert "recon_mse_samples" not in first


def test_mixup_pairs_critic_and_student_features_of_the_same_images(domains, tmp_path, monkeypatch):
    """With student.mixup=true, the critic features that feature and relational KD regress onto must describe the
    mixed images the student encodes, not the images before mixing."""
    run = _in_process_run(domains, tmp_path, ["discs", "crosses"], "student.mixup=true")
    seen_by_critic, seen_by_student = [], []
    for expert in run.experts:
        features = expert.critic.features
        expert.critic.features = lambda x, f=features: (seen_by_critic.append(x.detach().clone()), f(x))[1]
    encode = TaskVAE.encode

    def recording_encode(self, x):
        if self is run.learner.student and self.training:
            seen_by_student.append(x.detach().clone())
        return encode(self, x)

    monkeypatch.setattr(TaskVAE, "encode", recording_encode)
    run.train_student(1, 0)
    student_x, critic_x = seen_by_student[0], torch.cat(seen_by_critic)  # the first training encode: the VAE loss
    assert len(critic_x) == len(student_x) == 16
    current = student_x[8:]  # rows of the current task, mixed with replayed ones
    assert not any(torch.equal(row, raw) for row in current for raw in run.train_x[1])  # they are mixed
    for row in critic_x:
        assert (student_x == row).flatten(1).all(1).any(), "a critic feature of an image the student never saw"


def test_each_expert_has_its_own_projection_and_relational_group(domains, tmp_path, monkeypatch):
    """Two experts: feature KD goes through a projection per expert, relational KD compares only rows taught by
    the same expert, and the expert weight scales the relational rows like the others. The projections are part
    of the checkpoint."""
    import gan_vae.losses as losses
    calls = []
    relational_kd_ = losses.relational_kd
    monkeypatch.setattr(losses, "relational_kd", lambda *a, **k: (calls.append(k), relational_kd_(*a, **k))[1])
    run = _in_process_run(domains, tmp_path, ["discs", "crosses"])
    learner = run.learner
    assert len(learner.projections) == 0
    run.train_student(1, 0)
    assert len(learner.projections) == 2 and learner.projections[0] is not learner.projections[1]
    # rows 0-7 replay task 0 (expert 0, FID 240 -> weight 0.5), rows 8-15 are task 1 (expert 1, weight 1)
    assert calls[0]["groups"].tolist() == [0] * 8 + [1] * 8
    assert calls[0]["weights"].tolist() == [0.5] * 8 + [1.0] * 8
    params = {id(p) for group in learner.opt.param_groups for p in group["params"]}
    assert all(id(p) in params for p in learner.projections.parameters())

    restored = _in_process_run(domains, tmp_path, ["discs", "crosses"])
    restored.load(run.state(), tmp_path / "state.pt")
    assert len(restored.learner.projections) == 2
    for k, v in learner.projections.state_dict().items():
        assert torch.equal(restored.learner.projections.state_dict()[k], v), k
    assert len(restored.learner.opt.state_dict()["state"]) == len(learner.opt.state_dict()["state"])

    calls.clear()
    reused = _in_process_run(domains, tmp_path, ["discs", "discs"], experts=(0, 0))  # one expert for both tasks
    reused.train_student(1, 0)
    assert len(reused.learner.projections) == 1 and calls[0]["groups"].tolist() == [0] * 16


@pytest.fixture
def scratch_losses(monkeypatch):
    """gan_vae's loss registry, its entries restored after the test: what a test registers leaves with it."""
    from gan_vae.losses import STUDENT_LOSSES
    monkeypatch.setattr(STUDENT_LOSSES, "_entries", dict(STUDENT_LOSSES._entries))
    return STUDENT_LOSSES


def test_student_loss_sums_the_registered_terms_weighted_in_order(scratch_losses, monkeypatch):
    """student_loss adds every registered term times its config weight, in registration order: the key its
    `weight_key` names, else its own section's `weight` (student.<name>.weight), else 1. A term that returns None is
    neither added nor logged; every prepare runs before the first compute; logged values default to the name."""
    from dataclasses import dataclass
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from common.config import opt
    from gan_vae.losses import LossTerm, TermValue, student_loss
    monkeypatch.setattr(scratch_losses, "_entries", {})
    calls = []

    @dataclass
    class Own:
        weight: float = opt(0.125, "w", ge=0)

    def constant(name, value, logged=None):
        return staticmethod(lambda step: (calls.append(name), TermValue(torch.tensor(value), logged))[1])

    scratch_losses.register("plain")(lambda step: (calls.append("plain"), TermValue(torch.tensor(2.0)))[1])
    scratch_losses.register("weighted")(type("W", (LossTerm,), {"weight_key": "kd.w", "compute": constant(
        "weighted", 3.0, {"a": torch.tensor(7.0)})}))
    scratch_losses.register("off")(type("O", (LossTerm,), {"weight_key": "kd.w", "compute": staticmethod(
        lambda step: (calls.append("off"), None)[1])}))
    scratch_losses.register("prepared")(type("P", (LossTerm,), {
        "weight_key": "kd.v", "prepare": staticmethod(lambda step: (calls.append("prepare"), torch.tensor(5.0))[1]),
        "compute": staticmethod(lambda step, early: (calls.append("prepared"), TermValue(early * 2))[1])}))
    scratch_losses.register("own", config=Own)(lambda step: (calls.append("own"), TermValue(torch.tensor(8.0)))[1])
    step = SimpleNamespace(cfg=OmegaConf.create({"kd": {"w": 0.5, "v": 0.25}, "student": {"own": {"weight": 0.125}}}))
    loss, logged = student_loss(step)
    assert loss.item() == pytest.approx(2.0 + 0.5 * 3.0 + 0.25 * 10.0 + 0.125 * 8.0)
    assert {k: v.item() for k, v in logged.items()} == {"plain": 2.0, "a": 7.0, "prepared": 10.0, "own": 8.0}
    assert calls == ["prepare", "plain", "weighted", "off", "prepared", "own"]


def test_the_builtin_terms_keep_their_order_and_weight_keys():
    """The registry holds the built-in terms in the order the student's loss sums them, each weighted by the key
    it had before the registry (bit-identical runs depend on both)."""
    from gan_vae.losses import STUDENT_LOSSES, weight_key
    builtin = [(e.name, weight_key(e)) for e in STUDENT_LOSSES.entries()][:5]
    assert builtin == [("vae", None), ("contrastive", "student.contrastive_weight"),
                       ("feature_kd", "kd.feature_weight"), ("relational_kd", "kd.relational_weight"),
                       ("previous_kd", "kd.previous_weight")]


def test_a_student_loss_weighted_by_a_missing_key_is_refused(domains, tmp_path, scratch_losses):
    import gan_vae.continual as continual
    from common.config import load_config
    from common.errors import UserError
    from gan_vae.losses import LossTerm
    scratch_losses.register("orphan")(type("Orphan", (LossTerm,), {"weight_key": "kd.orphan_weight",
                                                                     "compute": staticmethod(lambda step: None)}))
    cfg = load_config(continual.ContinualConfig, None, _args(domains, tmp_path, ["discs"]))
    with pytest.raises(UserError, match="'orphan' is weighted by kd.orphan_weight"):
        continual.validate(cfg)


def test_a_student_loss_registered_from_a_test_file_trains_and_is_logged(domains, tmp_path, scratch_losses):
    """The seam: one term registered here, not in the package, takes part in a whole continual run (replay, two
    experts) and is logged under its name at every logged student step."""
    import gan_vae.continual as continual
    from gan_vae.losses import TermValue
    seen = []

    @scratch_losses.register("latent_l1", help="sparsity of the z-means")
    def latent_l1(step):
        """Sparsity of the z-means, rows weighted like a distillation term: mean_b w_b ||mu_z,b||_1."""
        seen.append(step.row_weight.detach().clone())
        return TermValue((step.row_weight * step.vae["mu_z"].abs().sum(1)).mean())

    continual.main([*_args(domains, tmp_path, ["discs", "inverted"]), "teacher.steps=4", "student.steps=5",
                    "log.every_steps=1", "log.sample_every=5", "run.name=seam"])
    lines = [json.loads(x) for x in (tmp_path / "seam" / "metrics.jsonl").read_text().splitlines()]
    student = [r for r in lines if r["phase"] == "student"]
    assert len(student) == 10 and len(seen) == 10  # 5 steps per task, every one logged
    assert all(r["student/latent_l1"] > 0 and math.isfinite(r["student/latent_l1"]) for r in student)
    assert all("student/relational_kd" in r for r in student)  # the built-in terms are still there
    assert all("kd/weight_task0" in r for r in student if r["task"] == 1)  # task 1 replays task 0
    assert json.loads((tmp_path / "seam" / "results.json").read_text())["tasks_done"] == 2


def test_tasks_are_padded_with_their_own_background(domains, tmp_path):
    """An inverted task has a white background: its 2-pixel padding and the corners a rotation uncovers must be
    white too (no black frame); a plain task stays black."""
    from common.config import load_config
    from gan_vae.continual import ContinualConfig, ContinualRun
    specs = [f"{domains / 'discs.npz'}:invert", f"{domains / 'discs.npz'}:invert:rotate=30",
             f"{domains / 'discs.npz'}:rotate=30"]
    cfg = load_config(ContinualConfig, None, [*_args(domains, tmp_path, ["discs"]), f"data.tasks=[{','.join(specs)}]"])
    run = ContinualRun(cfg, None, torch.device("cpu"))
    for x, background in zip(run.test_x, (1.0, 1.0, -1.0)):
        frame = torch.cat([x[..., :2, :].flatten(), x[..., -2:, :].flatten(), x[..., 2:-2, :2].flatten(),
                           x[..., 2:-2, -2:].flatten()])
        assert (frame == background).all()
        assert (x[..., 2, 2] == background).all() and (x[..., -3, -3] == background).all()  # image corners
    assert (run.test_x[0][..., 16, 16] == -1.0).any()  # the discs are black on white


def test_repeated_domain_reuses_expert_and_new_domain_adds_one(domains, tmp_path):
    same = run_script("-m", "gan_vae.continual", *_args(domains, tmp_path, ["discs", "discs"]), "run.name=same",
                      "student.steps=4", "log.sample_every=4", env=ONE_THREAD)
    assert same.returncode == 0, same.stderr[-3000:]
    other = run_script("-m", "gan_vae.continual", *_args(domains, tmp_path, ["discs", "inverted"]), "run.name=other",
                       env=ONE_THREAD)
    assert other.returncode == 0, other.stderr[-3000:]
    same_res = json.loads((tmp_path / "same" / "results.json").read_text())
    other_res = json.loads((tmp_path / "other" / "results.json").read_text())
    same_dec = json.loads((tmp_path / "same" / "experts.json").read_text())["decisions"]
    other_dec = json.loads((tmp_path / "other" / "experts.json").read_text())["decisions"]
    print("in-domain FID", same_dec[1]["fid_per_expert"], "cross-domain FID", other_dec[1]["fid_per_expert"])
    assert same_res["experts"] == 1 and same_res["task_to_expert"] == [0, 0] and same_dec[1]["action"] == "reuse"
    assert other_res["experts"] == 2 and other_res["task_to_expert"] == [0, 1] and other_dec[1]["action"] == "new"
    run = tmp_path / "other"
    for name in ("config.yaml", "metrics.jsonl", "forgetting_report.md", "heatmap_teacher_fid.png",
                 "heatmap_recon_mse.png", "loss_teacher.png", "loss_student.png", "checkpoints/task_0.pt",
                 "checkpoints/task_1.pt", "mixed_samples/same_noise_per_expert.png",
                 "mixed_samples/mixup_expert0_expert1.png", "mixed_samples/student_prior_interp_task0_to_task1.png",
                 "samples/task1_end_expert1.png"):
        assert (run / name).is_file(), name
    for key in ("teacher_fid", "student_fid", "recon_mse", "recon_fid"):
        m = other_res[key]
        assert m[0][1] is None and all(v is not None for v in m[1])
    for key in ("teacher_fid", "student_fid", "recon_fid"):  # 48 test images, 48 generated per FID
        assert other_res[f"{key}_samples"] == [[[48, 48], None], [[48, 48], [48, 48]]], key
    assert other_res["fid"]["real_train_vs_test_samples"] == [[[48, 48], [48, 48]], [[48, 48], [48, 48]]]
    assert "(48/48)" in (run / "forgetting_report.md").read_text()
    assert other_res["forgetting"]["recon_mse"][0] == pytest.approx(
        other_res["recon_mse"][1][0] - other_res["recon_mse"][0][0])
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("kd/weight_task0" in r for r in logged) and any("kd/temperature" in r for r in logged)

    # killed mid-run and resumed: the same matrices as the uninterrupted run, no finished task lost
    args = _args(domains, tmp_path, ["discs", "inverted"])
    watch = tmp_path / "killed" / "metrics.jsonl"
    run_and_sigkill("-m", *args, "run.name=killed", watch=watch, after_lines=12, settle=0.0,
                    module="gan_vae.continual", env=ONE_THREAD)
    assert not (tmp_path / "killed" / "forgetting_report.md").exists()
    resumed = run_script("-m", "gan_vae.continual", *args, "run.name=killed", "run.resume=auto", env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    killed_res = json.loads((tmp_path / "killed" / "results.json").read_text())
    for key in ("teacher_fid", "student_fid", "recon_mse", "recon_fid", "task_to_expert"):
        assert killed_res[key] == other_res[key], key
    # the three refusals below stop before any work: in this process (run_main), as the bad-input tests do
    refused = run_main("-m", "gan_vae.continual", *_args(domains, tmp_path, ["inverted", "discs"]),
                       "run.name=killed", "run.resume=auto")
    assert_clean_error(refused, "was made with data.tasks")
    # a key that changes results: named, with the way to a new run; a new run may branch from a finished task
    # with other training keys, but not with another architecture
    changed = run_main("-m", "gan_vae.continual", *args, "run.name=killed", "run.resume=auto", "kd.previous_weight=2")
    assert_clean_error(changed, "was made with kd.previous_weight = 8.0 (this run: 2.0)", "another run.name")
    task_1 = tmp_path / "killed" / "checkpoints" / "task_1.pt"
    wider = run_main("-m", "gan_vae.continual", *args, "run.name=wider", f"run.resume={task_1}", "student.width=16")
    assert_clean_error(wider, "student.width = 8 (this run: 16)")
    assert not (tmp_path / "wider").exists()  # refused before its run directory was made
    branch = run_script("-m", "gan_vae.continual", *args, "run.name=branch", f"run.resume={task_1}",
                        "kd.previous_weight=2", env=ONE_THREAD)
    assert branch.returncode == 0, branch.stderr[-3000:]

    # re-evaluation from the saved task checkpoints reproduces all four matrices exactly, and keeps the wall time
    again = run_script("-m", "gan_vae.evaluate", str(run), env=ONE_THREAD)
    assert again.returncode == 0, again.stderr[-3000:]
    re_res = json.loads((run / "results.json").read_text())
    for key in ("teacher_fid", "student_fid", "recon_mse", "recon_fid", "teacher_fid_samples", "student_fid_samples",
                "recon_fid_samples", "forgetting", "bwt"):
        assert re_res[key] == other_res[key], key
    assert re_res["time/wall_s"] == other_res["time/wall_s"]


@pytest.mark.parametrize("override,fragment", [
    ("data.tasks=[mnistt]", "unknown task 'mnistt'"),
    ("data.tasks=[DOM/wrong_keys.npz]", "lacks the array(s) ['images']"),
    ("data.test_fraction=0.999", "has 0 training and 240 test images"),
    ("run.out_dir=DOM/discs.npz/runs", "cannot write to DOM/discs.npz/runs (run.out_dir)"),
])
def test_continual_bad_input_on_the_command_line(domains, tmp_path, override, fragment):
    proc = run_main("-m", "gan_vae.continual", *_args(domains, tmp_path, ["discs"]),
                    override.replace("DOM", str(domains)), "run.name=bad")
    assert_clean_error(proc, fragment.replace("DOM", str(domains)))
    assert not (tmp_path / "bad").exists()  # refused before anything was written


@pytest.mark.parametrize("override,fragment", [
    ("data.tasks=[DOM/wrong_shape.npz]", "expected uint8 [N, 28, 28]"),
    ("data.tasks=[DOM/discs.npz:classes=]", "class subset is empty"),
    ("data.tasks=[DOM/discs.npz:classes=7]", "no images of classes [7]"),
    ("data.tasks=[DOM/discs.npz:blur]", "cannot read 'blur'"),
    ("teacher.fid_threshold=0", "teacher.fid_threshold=0.0 must be > 0"),
    ("teacher.max_experts=0", "teacher.max_experts=0 must be >= 1"),
    ("teacher.ema_decay=1", "teacher.ema_decay=1.0 must lie in [0, 1)"),
    ("fid.samples=2", "fid.samples=2"),
    ("data.test_fraction=1", "data.test_fraction=1.0 must lie in (0, 1)"),
    ("data.tasks=[DOM/discs.npz:classes=1] data.test_fraction=0.999", "a task needs at least 1 training and 3 test"),
])
def test_continual_bad_input(domains, tmp_path, override, fragment):
    from common.config import load_config
    from common.errors import UserError
    from gan_vae.continual import ContinualConfig, validate
    from gan_vae.tasks import load_task
    overrides = override.replace("DOM", str(domains)).split(" ")
    with pytest.raises(UserError) as err:  # a key's own range is checked when the config is loaded
        cfg = load_config(ContinualConfig, None, [*_args(domains, tmp_path, ["discs"]), *overrides])
        validate(cfg)
        for spec in cfg.data.tasks:
            load_task(spec, cfg.data.root, 0, cfg.data.test_fraction)
    assert fragment in str(err.value)


def _random_inception_weights(path):
    """torch-fidelity's FID Inception-v3 with random values, saved in the layout of its weights file (the network
    is built with loading switched off, then its state_dict written)."""
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as fe
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), path)


def test_inception_backend_runs_offline_with_a_local_weights_file(domains, tmp_path):
    """fid.backend=inception with fid.inception_path, offline; a missing file or a failed download says what
    helps (fix the path, copy the file, or use the domain features)."""
    weights = tmp_path / "inception.pth"
    _random_inception_weights(weights)
    proxy = "http://127.0.0.1:9"  # nothing listens there: any download fails at once, as offline
    offline = {**ONE_THREAD, "TORCH_HOME": str(tmp_path / "torch_home"), "HTTPS_PROXY": proxy, "https_proxy": proxy,
               "HTTP_PROXY": proxy, "http_proxy": proxy}
    domain_keys = ("fid.cache_dir=", "fid.classifier_epochs=")  # the domain classifier's: refused with inception
    tiny = [*(a for a in _args(domains, tmp_path, ["discs"]) if not a.startswith(domain_keys)),
            "fid.backend=inception", "fid.samples=3", "teacher.steps=2",
            "student.steps=2"]
    # the two offline runs (the documented run, the failed download): forked from one server started with their
    # environment, one interpreter start-up instead of two
    with fork_server_with(offline):
        proc = run_script("-m", "gan_vae.continual", *tiny, f"fid.inception_path={weights}", "run.name=inception",
                          env=offline)
        assert proc.returncode == 0, proc.stderr[-3000:]
        res = json.loads((tmp_path / "inception" / "results.json").read_text())
        assert res["fid"]["backend"] == "inception" and res["teacher_fid_samples"] == [[[3, 3]]]
        assert math.isfinite(res["teacher_fid"][0][0])

        # refused when the config is checked, before any work or download: in this process (run_main)
        missing = run_main("-m", "gan_vae.continual", *tiny, f"fid.inception_path={tmp_path / 'absent.pth'}",
                           "run.name=missing")
        assert_clean_error(missing, "absent.pth: no such file", "copy it from a machine with network access",
                           "fid.backend=domain")
        assert not (tmp_path / "missing").exists()
        download = run_script("-m", "gan_vae.continual", *tiny, "run.name=download", env=offline)
        assert_clean_error(download, "cannot download the FID Inception-v3 weights", "fid.inception_path=PATH")


def test_unwritable_directories_are_named(tmp_path):
    from common.errors import UserError
    from common.rundir import make_dirs
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match=r"cannot write to .*a_file/runs \(fid.cache_dir\)"):
        make_dirs({"fid.cache_dir": blocker / "runs"}, probe=True)
    make_dirs({"run.out_dir": tmp_path / "new" / "runs"}, probe=True)  # created when it can be
    assert (tmp_path / "new" / "runs").is_dir() and not any((tmp_path / "new" / "runs").iterdir())


@runs_documented_command("python -m gan_vae.continual --config configs/gan_vae_shared_data.yaml teacher.steps=100 "
                         "student.steps=100 fid.samples=500 run.name=gan_vae_small")
def test_real_data_run_on_shared_arrays(shared_data, tmp_path):
    """The offline config on the real MNIST / Fashion-MNIST arrays (classes 0-2 of each, to cut the domain
    classifier's training to a third; experts of width 16), with a short budget: the documented small run, smaller
    still (46 s alone with one thread on a 2-core Xeon, against 78 s with classes 0-4 and width 32; 2 teacher and 2
    student steps a task, not 10: nothing below depends on how far the experts and the student have trained, as
    either expert decision is accepted, and that cut about 10 s more). What is checked on the real data is the
    domain classifier and the real-image FIDs, which the steps do not touch."""
    tasks = (f"data.tasks=[{shared_data}/mnist_test.npz:classes=0-2,"
             f"{shared_data}/fashion_mnist_test_part.npz:classes=0-2]")
    proc = run_script("-m", "gan_vae.continual", "--config", "configs/gan_vae_shared_data.yaml", tasks,
                      "teacher.steps=2", "teacher.width=16",
                      "student.steps=2", "fid.samples=300", "fid.classifier_epochs=1", "log.sample_every=100",
                      f"run.out_dir={tmp_path}", "run.name=real", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "real" / "results.json").read_text())
    assert res["tasks"][0].endswith("mnist_test.npz:classes=0-2") and res["tasks_done"] == 2
    assert res["experts"] in (1, 2) and len(res["task_to_expert"]) == 2
    assert all(v is not None for v in res["recon_mse"][1]) and res["fid"]["samples"] == 300
    acc = res["fid"]["classifier_test_acc"]
    digits = next(k for k in acc if Path(k).name.startswith("mnist_test"))
    assert acc[digits] > 90  # one epoch is enough for a usable digit classifier
    ref = res["fid"]["real_train_vs_test"]
    assert ref[0][0] < ref[0][1] and ref[1][1] < ref[1][0]  # in-domain real FIDs below cross-domain ones


def test_run_stopped_before_its_first_checkpoint_restarts_with_its_own_config(domains, tmp_path):
    """A run killed before its first checkpoint (it holds only config.yaml and some metrics lines) restarts from the
    beginning with run.resume=auto, dropping the stale lines; a different result-changing key is refused, named."""
    from common.config import load_config
    from common.files import save_config
    from gan_vae.continual import ContinualConfig
    args = _args(domains, tmp_path, ["discs"], "teacher.steps=4", "student.steps=4", "log.sample_every=4")
    cfg = load_config(ContinualConfig, None, [*args, "run.name=stopped"])
    run_dir = Path(cfg.run.out_dir) / "stopped"
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir)
    (run_dir / "metrics.jsonl").write_text('{"task": 0, "phase": "teacher", "step": 999, "stale": true}\n')
    changed = run_script("-m", "gan_vae.continual", *args, "run.name=stopped", "run.resume=auto", "student.lr=0.5")
    assert_clean_error(changed, "student.lr", "another run.name")
    again = run_script("-m", "gan_vae.continual", *args, "run.name=stopped", "run.resume=auto")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "starting it from the beginning" in again.stdout + again.stderr
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines and not any(r.get("stale") for r in lines)
    assert (run_dir / "results.json").exists()
