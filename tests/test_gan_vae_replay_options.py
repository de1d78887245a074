"""The student's replay options (gan_vae.continual StudentConfig): the replay share of a batch, replay of the
student's own samples from before the task, extra steps for later tasks, and fixed priors of finished tasks. Each
test looks inside student steps of an in-process run with untrained experts (test_gan_vae._in_process_run)."""
import pytest
import torch
from test_gan_vae import _args, _in_process_run, domains  # noqa: F401 - a fixture

from common.config import load_config
from common.errors import UserError
from gan_vae.continual import ContinualConfig, validate
from gan_vae.student import replay_counts


@pytest.mark.parametrize("batch,seen,share,expected", [
    (16, 1, 0.0, [16]), (16, 1, 0.75, [16]),            # the first task: nothing to replay
    (16, 2, 0.0, [8, 8]), (17, 2, 0.0, [8, 9]),          # equal shares, the remainder to the current task
    (16, 3, 0.0, [5, 5, 6]),
    (16, 2, 0.75, [12, 4]), (64, 2, 0.75, [48, 16]),     # round(16 x 0.75) = 12 replayed rows
    (16, 3, 0.75, [6, 6, 4]), (10, 2, 0.66, [7, 3]),     # 12 split over two tasks; round(6.6) = 7
])
def test_replay_counts_by_hand(batch, seen, share, expected):
    assert replay_counts(batch, seen, share) == expected
    assert sum(expected) == batch


def test_a_replay_share_puts_that_share_of_the_batch_on_earlier_tasks(domains, tmp_path):  # noqa: F811
    run = _in_process_run(domains, tmp_path, ["discs", "crosses"], "student.replay_share=0.75")
    seen = run.learner.begin_task(1)
    step = run.learner.step_inputs(1, seen, 0)
    assert step.task_ids.tolist() == [0] * 12 + [1] * 4 and step.replayed.sum() == 12


def test_self_replay_draws_that_share_of_replayed_rows_from_the_copy_before_the_task(domains, tmp_path):  # noqa: F811
    """With student.self_replay=0.5 the first half of task 0's replayed rows are the frozen copy's own samples of
    task 0 (drawn from the step's generator), the rest the expert's; the copy exists even with kd.previous_weight=0."""
    run = _in_process_run(domains, tmp_path, ["discs", "crosses"], "student.self_replay=0.5", "kd.previous_weight=0")
    run.train_student(0, 0)
    seen = run.learner.begin_task(1)
    assert run.learner.previous is not None
    g = torch.Generator().manual_seed(5)
    x = run.learner.replay(0, 8, g)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        own = run.learner.previous.sample(torch.zeros(4, dtype=torch.long), g)
    expert = run.pool.of_task(0).sample(4, g)
    assert torch.equal(x[:4], own) and torch.equal(x[4:], expert)
    step = run.learner.step_inputs(1, seen, 0)  # the batch uses it
    assert step.replayed.sum() == 8


def test_later_tasks_train_extra_steps(domains, tmp_path):  # noqa: F811
    run = _in_process_run(domains, tmp_path, ["discs", "crosses", "discs"], "student.steps=1",
                          "student.steps_per_earlier_task=2")
    assert [run.learner.steps(t) for t in (0, 1, 2)] == [1, 3, 5]
    logged = []
    run.after_step = lambda t, phase, step, steps, record: logged.append((t, step, steps))
    run.train_student(1, 0)
    assert logged == [(1, s, 3) for s in range(3)]


@pytest.mark.parametrize("freeze", [True, False])
def test_finished_tasks_priors_stay_fixed_when_frozen(domains, tmp_path, freeze):  # noqa: F811
    run = _in_process_run(domains, tmp_path, ["discs", "crosses"], "student.steps=1",
                          f"student.freeze_old_priors={str(freeze).lower()}")
    run.train_student(0, 0)
    before = [p.detach().clone() for p in (run.learner.student.prior_mu[0], run.learner.student.prior_logvar[0])]
    run.train_student(1, 0)
    s = run.learner.student
    after = [s.prior_mu[0], s.prior_logvar[0]]
    assert all(torch.equal(a, b) for a, b in zip(after, before)) == freeze
    assert not torch.equal(s.prior_mu[1], s.prior_mu[1].detach() * 0)  # the current task's prior trains


@pytest.mark.parametrize("overrides,fragment", [
    (["student.replay_share=0.99", "student.batch_size=16"], "student.replay_share=0.99 gives the 1 replayed"),
    (["student.replay_share=1"], "student.replay_share=1.0 must lie in [0, 1)"),
    (["student.replay_share=0.5", "student.replay=false"], "set it to 0 or student.replay=true"),
    (["student.self_replay=1.5"], "student.self_replay=1.5 must lie in [0, 1]"),
])
def test_bad_replay_options_are_refused(domains, tmp_path, overrides, fragment):  # noqa: F811
    with pytest.raises(UserError) as err:
        validate(load_config(ContinualConfig, None, [*_args(domains, tmp_path, ["discs", "crosses"]), *overrides]))
    assert fragment in str(err.value)


def test_posterior_kl_self_distillation_by_hand(monkeypatch):
    """kd.previous_posterior=kl: the latent part of the self-distillation is KL(q' || q) of the diagonal
    Gaussians, here on hand-set posteriors: z (1 dim) N(0, 1) vs N(1, e^2): 0.5 (2 + (1 + 1) / e^2 - 1);
    u N(2, e^-2) vs N(2, 1): 0.5 (0 + e^-2 - (-2) - 1). means: (0 - 1)^2 + 0 = 1."""
    import math

    import gan_vae.losses as losses
    from models import TaskVAE

    posteriors = {"previous": ((torch.tensor([[0.0]]), torch.tensor([[0.0]])),
                               (torch.tensor([[2.0]]), torch.tensor([[-2.0]]))),
                  "student": ((torch.tensor([[1.0]]), torch.tensor([[2.0]])),
                              (torch.tensor([[2.0]]), torch.tensor([[0.0]])))}

    class Fixed(TaskVAE):
        def __init__(self, who):
            super().__init__(1, 1, 1, 4)
            self.who = who

        def encode(self, x):
            return None, *posteriors[self.who]

        def decode_logits(self, z, u):
            return torch.zeros(len(z), 1, 2, 2)  # equal reconstructions: the Bernoulli KL is 0

    x, replayed = torch.zeros(1, 1, 32, 32), torch.tensor([True])
    kl = losses.self_distillation(Fixed("student"), Fixed("previous"), x, replayed, "kl")
    by_hand = 0.5 * (2 + 2 / math.e ** 2 - 1) + 0.5 * (math.e ** -2 + 2 - 1)
    assert kl.item() == pytest.approx(by_hand, rel=1e-6)
    means = losses.self_distillation(Fixed("student"), Fixed("previous"), x, replayed, "means")
    assert means.item() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.numerics
@pytest.mark.parametrize("posterior", ["means", "kl"])
def test_self_distillation_sums_its_parts_left_to_right(posterior):
    """Per row, (Bernoulli KL + z part) + u part in that order, the order before the refactor (a338ef7). Float
    addition is not associative: KL + (z + u) differs in the last bit on some rows, which made the gan_vae case of
    test_refactor_identity.py fail on CPUs whose data hit such a row at a logged step (issue 23). Two students with
    different random weights on 256 random images; the other order differs on some row, so the check has teeth."""
    import gan_vae.losses as losses
    from models import TaskVAE, bernoulli_kl, gaussian_kl

    def vae(seed):
        torch.manual_seed(seed)
        model = TaskVAE(1, 4, 2, 8)
        model.add_task()
        return model.eval()

    student, previous = vae(0), vae(1)
    x = torch.rand(256, 1, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        per = losses.self_distillation(student, previous, x, torch.ones(256, dtype=torch.bool), posterior)
        (_, (p_mu_z, p_lv_z), (p_mu_u, p_lv_u)), (_, (mu_z, lv_z), (mu_u, lv_u)) = previous.encode(x), student.encode(x)
        kl = bernoulli_kl(previous.decode_logits(p_mu_z, p_mu_u), student.decode_logits(mu_z, mu_u))
    if posterior == "kl":
        z, u = gaussian_kl(p_mu_z, p_lv_z, mu_z, lv_z), gaussian_kl(p_mu_u, p_lv_u, mu_u, lv_u)
    else:
        z, u = (mu_z - p_mu_z).pow(2).sum(1), (mu_u - p_mu_u).pow(2).sum(1)
    assert torch.equal(per, (kl + z) + u)
    assert not torch.equal(per, kl + (z + u))

def test_a_run_saved_before_self_replay_existed_is_not_resumed_with_the_new_default(domains, tmp_path):  # noqa: F811
    """A run saved before issue 18 has no student.self_replay and replayed from the experts alone (0); resuming it
    with today's default 0.5 would change it midway, so it is refused naming the key, and resumes with 0."""
    from common.config import to_plain
    from gan_vae.continual import check_config_matches_checkpoint
    cfg = load_config(ContinualConfig, None, _args(domains, tmp_path, ["discs", "crosses"]))
    saved = to_plain(cfg)
    del saved["student"]["self_replay"]
    run_dir = tmp_path / "old_run"
    ckpt = {"config": saved, "progress": {"task": 1, "phase": "student", "step": 20}}
    with pytest.raises(UserError, match=r"student\.self_replay = 0\.0 \(this run: 0\.5\)"):
        check_config_matches_checkpoint(ckpt, run_dir / "checkpoints" / "last.pt", cfg, run_dir)
    same = load_config(ContinualConfig, None, [*_args(domains, tmp_path, ["discs", "crosses"]), "student.self_replay=0"])
    check_config_matches_checkpoint(ckpt, run_dir / "checkpoints" / "last.pt", same, run_dir)


# The reference rows (issue 26): oracle replay from the real training images, and joint training
# ---------------------------------------------------------------------------------------------------------------
def test_oracle_replay_draws_earlier_tasks_from_their_real_training_images(domains, tmp_path):  # noqa: F811
    """student.replay_source=real: task 0's replayed rows are its own training images, drawn by the step's seeded
    generator exactly as the current task's rows are, each weighted 1 (no expert FID weight), and the copy from
    before the task is still kept for self-distillation (kd.previous_weight=8 by default)."""
    from gan_vae.experts import step_seed
    run = _in_process_run(domains, tmp_path, ["discs", "crosses"], "student.replay_source=real")
    run.train_student(0, 0)
    seen = run.learner.begin_task(1)
    assert seen == [0, 1] and run.learner.previous is not None
    step = run.learner.step_inputs(1, seen, 0)
    g = torch.Generator().manual_seed(step_seed(run.cfg.train.seed, 1, 1, 0))
    old = run.train_x[0][torch.randint(0, len(run.train_x[0]), (8,), generator=g)]
    new = run.train_x[1][torch.randint(0, len(run.train_x[1]), (8,), generator=g)]
    assert torch.equal(step.x, torch.cat([old, new]))
    assert step.task_ids.tolist() == [0] * 8 + [1] * 8 and step.replayed.sum() == 8
    assert step.row_weight.tolist() == [1.0] * 16  # an expert at FID 240 would weigh its rows 1/2
    generated = _in_process_run(domains, tmp_path, ["discs", "crosses"])  # the default: the expert's, weight 1/2
    generated.train_student(0, 0)
    step_g = generated.learner.step_inputs(1, generated.learner.begin_task(1), 0)
    assert not torch.equal(step_g.x[:8], old) and step_g.row_weight[:8].tolist() == [0.5] * 8


def test_joint_training_sees_every_task_from_the_first_step(domains, tmp_path):  # noqa: F811
    """student.joint=true: in task 0's student phase the batch already holds real images of task 1 (equal shares,
    the current task last), the student has both task priors, and task 1's rows, which have no expert yet
    (expert_of -1), add nothing to the distillation terms (weight 0 there) but train the VAE term (weight 1)."""
    run = _in_process_run(domains, tmp_path, ["discs", "crosses"], "student.joint=true")
    run.pool.task_to_expert = [0]  # task 1's expert does not exist before task 1's teacher phase
    seen = run.learner.begin_task(0)
    assert seen == [1, 0] and run.learner.student.num_tasks == 2
    step = run.learner.step_inputs(0, seen, 0)
    assert step.task_ids.tolist() == [1] * 8 + [0] * 8
    assert step.expert_of.tolist() == [-1] * 8 + [0] * 8 and step.taught_experts == [0]
    assert step.row_weight.tolist() == [1.0] * 16 and step.distill_weight.tolist() == [0.0] * 8 + [1.0] * 8
    assert torch.equal(step.critic_features[:8], torch.zeros_like(step.critic_features[:8]))
    record = run.learner.update(0, seen, 0)
    assert all(torch.isfinite(torch.tensor(v)) for v in record.values())
    run.pool.task_to_expert = [0, 1]  # task 1: both tasks have experts; a new optimiser, the copy, no new prior
    seen = run.learner.begin_task(1)
    assert seen == [0, 1] and run.learner.student.num_tasks == 2 and run.learner.previous.num_tasks == 2
    assert run.learner.step_inputs(1, seen, 0).expert_of.tolist() == [0] * 8 + [1] * 8


def test_a_learner_resumed_within_a_joint_task_does_not_begin_it_again(domains, tmp_path):  # noqa: F811
    """The learner records the last task it began (student_began): a joint student has every prior from task 0
    on, so the prior count can no longer tell whether task 1 has begun. A checkpoint from before the record
    counts its priors, as before."""
    run = _in_process_run(domains, tmp_path, ["discs", "crosses"], "student.joint=true")
    run.learner.begin_task(0)
    state = run.learner.state()
    assert state["student_began"] == 0
    again = _in_process_run(domains, tmp_path, ["discs", "crosses"], "student.joint=true")
    again.learner.load(state)
    assert again.learner.began == 0
    again.learner.begin_task(1)  # task 1 begins after the load: a copy is taken
    assert again.learner.began == 1 and again.learner.previous is not None
    resumed = _in_process_run(domains, tmp_path, ["discs", "crosses"], "student.joint=true")
    resumed.learner.load(again.learner.state())
    resumed.learner.begin_task(1)  # resuming within task 1: no new copy, the optimiser's state kept
    assert resumed.learner.previous is not None and resumed.learner.opt.state_dict() == again.learner.opt.state_dict()
    old = {k: v for k, v in state.items() if k != "student_began"}
    sequential = _in_process_run(domains, tmp_path, ["discs", "crosses"])
    sequential.learner.load(old)
    assert sequential.learner.began == 1  # two priors: before the record, that meant task 1 had begun


@pytest.mark.parametrize("overrides,named", [
    (["student.replay_source=real", "student.self_replay=0"], "student.self_replay=0.0 (student.replay_source=real"),
    (["student.replay_source=real", "kd.weight_floor=0.5"], "kd.weight_floor=0.5 (student.replay_source=real"),
    (["student.joint=true", "student.replay_source=real"], "student.replay_source=real (student.joint=true"),
    (["student.joint=true", "kd.weight_ceiling=0.9"], "kd.weight_ceiling=0.9 (student.joint=true"),
    (["student.replay_source=real", "student.replay_truncation=1"],
     "student.replay_truncation=1.0 (student.replay_source=real"),
    (["student.self_replay=1", "student.replay_truncation=1"],
     "student.replay_truncation=1.0 (student.self_replay=1: the student's copy draws every replayed row"),
])
def test_the_generated_replays_keys_are_refused_in_the_reference_rows(domains, tmp_path, overrides, named):  # noqa: F811
    with pytest.raises(UserError, match="A key that would do nothing is refused") as err:
        validate(load_config(ContinualConfig, None, [*_args(domains, tmp_path, ["discs", "crosses"]), *overrides]))
    assert named in str(err.value)


def test_a_branch_cannot_turn_joint_training_on_or_off(domains, tmp_path):  # noqa: F811
    """A joint run trains every task from the first one on: a new run from a sequential run's task checkpoint
    cannot be one (student.joint is fixed across branches), while the oracle's student.replay_source may differ."""
    from common.config import to_plain
    from gan_vae.continual import changed_config_keys
    args = _args(domains, tmp_path, ["discs", "crosses"])
    saved = to_plain(load_config(ContinualConfig, None, args))
    joint = load_config(ContinualConfig, None, [*args, "student.joint=true"])
    oracle = load_config(ContinualConfig, None, [*args, "student.replay_source=real"])
    assert [k for k, *_ in changed_config_keys(saved, joint, branching=True)] == ["student.joint"]
    assert changed_config_keys(saved, oracle, branching=True) == []


def test_draw_z_truncates_every_coordinate_and_leaves_the_untruncated_stream_alone():
    """psi = 0 is torch.randn's stream, bit for bit (runs without truncation keep their numbers); psi > 0 draws
    from the same generator every coordinate within [-psi, psi], with the truncated normal's variance
    1 - 2 psi phi(psi) / (2 Phi(psi) - 1) (0.2911 at psi = 1, by hand from phi(1) = 0.24197, Phi(1) = 0.84134)."""
    from gan_vae.experts import draw_z
    assert torch.equal(draw_z(5, 7, torch.Generator().manual_seed(3)),
                       torch.randn(5, 7, generator=torch.Generator().manual_seed(3)))
    z = draw_z(20_000, 8, torch.Generator().manual_seed(3), truncation=1.0)
    assert z.abs().max() <= 1.0 and z.shape == (20_000, 8)
    assert torch.equal(z, draw_z(20_000, 8, torch.Generator().manual_seed(3), truncation=1.0))
    assert z.var().item() == pytest.approx(1 - 2 * 0.24197 / (2 * 0.84134 - 1), abs=0.005)
    assert z.mean().item() == pytest.approx(0.0, abs=0.005)


def test_replay_truncation_truncates_the_experts_replay_and_nothing_else(domains, tmp_path):  # noqa: F811
    """student.replay_truncation=0.5: every z the expert's generator receives for the student's replay lies in
    [-0.5, 0.5]; its other samples (FID, images) stay untruncated."""
    run = _in_process_run(domains, tmp_path, ["discs", "crosses"], "student.self_replay=0",
                          "student.replay_truncation=0.5")
    seen = run.learner.begin_task(1)
    zs = []
    handle = run.pool.of_task(0).generator.register_forward_pre_hook(lambda m, args: zs.append(args[0].clone()))
    run.learner.step_inputs(1, seen, 0)
    assert len(zs) == 1 and len(zs[0]) == 8 and zs[0].abs().max() <= 0.5
    run.pool.of_task(0).sample(256, torch.Generator().manual_seed(0))
    handle.remove()
    assert zs[1].abs().max() > 0.5
