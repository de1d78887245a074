"""gan_vae: losses against closed forms, FID, expert decisions, forgetting, and the continual script end to end."""
import json
import math

import numpy as np
import pytest
import torch

from conftest import assert_clean_error, run_and_sigkill, run_script
from gan_vae import forgetting
from gan_vae.continual import decide_expert, dynamic_temperature, expert_weight
from gan_vae.fid import FeatureModule, FIDEvaluator
from models import (Critic, Generator, TaskVAE, bernoulli_kl, gaussian_kl, gradient_penalty, nt_xent, relational_kd,
                    vae_loss_terms)


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
    from gan_vae.continual import ContinualRun
    torch.manual_seed(0)
    student = TaskVAE(1, 4, 2, 8)
    student.add_task()
    run = ContinualRun.__new__(ContinualRun)
    run.student, run.previous = student, ContinualRun._frozen_copy(student)
    student.add_task()
    assert not any(p.requires_grad for p in run.previous.parameters()) and not run.previous.training
    x = torch.rand(6, 1, 32, 32) * 2 - 1
    tasks = torch.tensor([0, 0, 0, 1, 1, 1])
    student.eval()  # same mode as the frozen copy: identical networks give zero
    terms = vae_loss_terms(student, x, tasks, 1.0)
    assert torch.allclose(run.previous_kd(x, tasks != 1, terms), torch.zeros(6), atol=1e-4)
    with torch.no_grad():
        student.decoder[-1].weight.add_(0.5)  # the student drifts
    terms = vae_loss_terms(student, x, tasks, 1.0)
    per = run.previous_kd(x, tasks != 1, terms)
    assert (per[:3] > 0).all() and (per[3:] == 0).all()
    per.sum().backward()
    assert student.decoder[-1].weight.grad.abs().sum() > 0


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
    from utils import UserError
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


def test_adaptive_weight_and_dynamic_temperature():
    assert expert_weight(5.0, 10.0, 0.3, 1.0) == 1.0
    assert expert_weight(20.0, 10.0, 0.3, 1.0) == pytest.approx(0.5)
    assert expert_weight(1000.0, 10.0, 0.3, 1.0) == 0.3
    assert dynamic_temperature(0, 11, 4.0, 1.0, 5.0, 10.0, 0.5) == pytest.approx(4.0)
    assert dynamic_temperature(10, 11, 4.0, 1.0, 5.0, 10.0, 0.5) == pytest.approx(1.0)
    assert dynamic_temperature(10, 11, 4.0, 1.0, 15.0, 10.0, 0.5) == pytest.approx(1.25)  # raised by a high FID
    assert dynamic_temperature(10, 11, 4.0, 1.0, 99.0, 10.0, 0.5) == pytest.approx(1.5)


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
def domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("domains")
    for kind in ("discs", "crosses"):
        x, y = _domain(kind, 240, 0 if kind == "discs" else 1)
        np.savez(root / f"{kind}.npz", images=x, labels=y)
    np.savez(root / "wrong_keys.npz", pictures=x, labels=y)
    np.savez(root / "wrong_shape.npz", images=np.zeros((5, 32, 32), np.uint8), labels=np.zeros(5))
    return root


def _tiny(domains, tmp_path, tasks, *extra):
    # tasks: "discs", "crosses", or "inverted" (the discs, inverted: white background) -> npz task specs
    specs = [str(domains / "discs.npz") + ":invert" if t == "inverted" else str(domains / f"{t}.npz") for t in tasks]
    return ["data.tasks=[" + ",".join(specs) + "]", "teacher.steps=40", "teacher.lr=5e-3",
            "student.steps=30", "teacher.width=8", "student.width=8", "teacher.batch_size=32",
            "student.batch_size=32", "fid.samples=48", "fid.classifier_epochs=2", "teacher.fid_threshold=FIDTHR",
            "log.every_steps=10", "log.sample_every=30", "run.checkpoint_every=20", f"run.out_dir={tmp_path}",
            f"fid.cache_dir={tmp_path / 'fid'}", *extra]


FID_THRESHOLD = "120"  # between the in-domain (about 80) and cross-domain (about 180) FIDs of these tiny experts
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _args(domains, tmp_path, tasks, *extra):
    return [a.replace("FIDTHR", FID_THRESHOLD) for a in _tiny(domains, tmp_path, tasks, *extra)]


def test_repeated_domain_reuses_expert_and_new_domain_adds_one(domains, tmp_path):
    same = run_script("-m", "gan_vae.continual", *_args(domains, tmp_path, ["discs", "discs"]), "run.name=same",
                      env=ONE_THREAD)
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
    refused = run_script("-m", "gan_vae.continual", *_args(domains, tmp_path, ["inverted", "discs"]),
                         "run.name=killed", "run.resume=auto")
    assert_clean_error(refused, "was made with data.tasks")

    # re-evaluation from the saved task checkpoints reproduces the matrices
    again = run_script("-m", "gan_vae.evaluate", str(run), env=ONE_THREAD)
    assert again.returncode == 0, again.stderr[-3000:]
    re_res = json.loads((run / "results.json").read_text())
    for key in ("teacher_fid", "recon_mse"):
        assert np.allclose(np.array(re_res[key], dtype=float), np.array(other_res[key], dtype=float), rtol=1e-4,
                           equal_nan=True)  # None (not yet seen) on both sides


@pytest.mark.parametrize("override,fragment", [
    ("data.tasks=[mnistt]", "unknown task 'mnistt'"),
    ("data.tasks=[DOM/wrong_keys.npz]", "lacks the array(s) ['images']"),
])
def test_continual_bad_input_on_the_command_line(domains, tmp_path, override, fragment):
    proc = run_script("-m", "gan_vae.continual", *_args(domains, tmp_path, ["discs"]),
                      override.replace("DOM", str(domains)), "run.name=bad")
    assert_clean_error(proc, fragment)


@pytest.mark.parametrize("override,fragment", [
    ("data.tasks=[DOM/wrong_shape.npz]", "expected uint8 [N, 28, 28]"),
    ("data.tasks=[DOM/discs.npz:classes=]", "class subset is empty"),
    ("data.tasks=[DOM/discs.npz:classes=7]", "no images of classes [7]"),
    ("data.tasks=[DOM/discs.npz:blur]", "cannot read 'blur'"),
    ("teacher.fid_threshold=0", "teacher.fid_threshold=0.0 must be > 0"),
    ("teacher.max_experts=0", "teacher.max_experts=0 must be >= 1"),
    ("fid.samples=2", "fid.samples=2"),
])
def test_continual_bad_input(domains, tmp_path, override, fragment):
    from data import load_task
    from gan_vae.continual import ContinualConfig, validate
    from utils import UserError, load_config
    cfg = load_config(ContinualConfig, None, [*_args(domains, tmp_path, ["discs"]), override.replace("DOM",
                                                                                                     str(domains))])
    with pytest.raises(UserError) as err:
        validate(cfg)
        for spec in cfg.data.tasks:
            load_task(spec, cfg.data.root, 0)
    assert fragment in str(err.value)


def test_real_data_run_on_shared_arrays(shared_data, tmp_path):
    """The offline config on the real MNIST / Fashion-MNIST arrays, with a short budget."""
    proc = run_script("-m", "gan_vae.continual", "--config", "configs/gan_vae_shared_data.yaml", "teacher.steps=40",
                      "student.steps=30", "fid.samples=300", "fid.classifier_epochs=1", "log.sample_every=100",
                      f"run.out_dir={tmp_path}", "run.name=real", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "real" / "results.json").read_text())
    assert res["tasks"][0].endswith("mnist_test.npz") and res["tasks_done"] == 2
    assert res["experts"] in (1, 2) and len(res["task_to_expert"]) == 2
    assert all(v is not None for v in res["recon_mse"][1]) and res["fid"]["samples"] == 300
    acc = res["fid"]["classifier_test_acc"]
    assert acc[res["tasks"][0]] > 90  # one epoch is enough for a usable digit classifier
    ref = res["fid"]["real_train_vs_test"]
    assert ref[0][0] < ref[0][1] and ref[1][1] < ref[1][0]  # in-domain real FIDs below cross-domain ones
