"""Curriculum: difficulty score, reward, sampler, Gymnasium environment, agents, train_student_rl.py end to end."""
import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import (TINY, TINY_ONLINE, assert_clean_error, read_metrics, run_and_sigkill, run_main, run_script,
                      runs_documented_command)

from common.errors import UserError
from curriculum_dataloader import STRATEGIES, STRATEGY_REGISTRY, CurriculumSampler, allocate, pacing_fraction
from models import difficulty_score
from rl_curriculum_env import curriculum_reward, curriculum_reward_terms, decode_action


# ---------------------------------------------------------------------------------------------------------------
# difficulty_score
# ---------------------------------------------------------------------------------------------------------------
def test_difficulty_hand_computed():
    # C = 2, p_t = (0.75, 0.25), p_s = (0.5, 0.5)
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    student = torch.tensor([[0.0, 0.0]])
    d_conf = 0.25
    d_ent = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    expected = 0.3 * d_conf + 0.3 * d_ent + 0.4 * min(kl / 5, 1)
    assert difficulty_score(teacher, student).item() == pytest.approx(expected, rel=1e-6)


def test_uniform_teacher_has_entropy_one():
    c = 7
    d = difficulty_score(torch.zeros(3, c), torch.zeros(3, c))  # agreeing uniform student: KL = 0
    assert torch.allclose(d, torch.full((3,), 0.3 * (1 - 1 / c) + 0.3 * 1.0), atol=1e-6)


def test_one_hot_teacher_with_agreeing_student_is_easy():
    t = torch.tensor([[60.0, 0.0, 0.0, 0.0]])  # p_t = one-hot up to e^-60: exp underflows, 0 log 0 must be 0
    d = difficulty_score(t, t.clone())
    assert torch.isfinite(d).all() and d.item() == pytest.approx(0.0, abs=1e-6)
    t = torch.tensor([[1000.0, 0.0, 0.0]])  # p_t exactly one-hot in float32
    assert difficulty_score(t, t.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_above_five_is_clipped():
    t = torch.tensor([[50.0, 0.0]])
    s = torch.tensor([[0.0, 50.0]])  # KL ~ 50 > 5
    assert difficulty_score(t, s).item() == pytest.approx(0.4, abs=1e-5)


def test_difficulty_lies_in_unit_interval():
    g = torch.Generator().manual_seed(0)
    d = difficulty_score(torch.randn(500, 10, generator=g) * 5, torch.randn(500, 10, generator=g) * 5)
    assert d.shape == (500,) and d.min() >= 0 and d.max() <= 1


def test_difficulty_scores_are_a_registry_whose_default_is_the_builtin_score():
    from common.config import load_config
    from engine.curriculum_hook import score_difficulty
    from engine.rl_schema import RLConfig
    from models import DIFFICULTY_SCORES
    cfg = load_config(RLConfig)
    assert cfg.difficulty.score == "confidence_entropy_kl"
    assert DIFFICULTY_SCORES["confidence_entropy_kl"] is difficulty_score
    g = torch.Generator().manual_seed(1)
    teacher, student = torch.randn(64, 5, generator=g) * 4, torch.randn(64, 5, generator=g) * 4
    d = score_difficulty(cfg, teacher, student)
    assert d.dtype == np.float32 and np.array_equal(d, difficulty_score(teacher, student).numpy())


@pytest.mark.parametrize("returned,message", [
    (lambda t: torch.full((len(t),), 1.5), "returned 1.5 for some image; a difficulty score must be a finite number "
                                          "in [0, 1]"),
    (lambda t: torch.full((len(t),), math.nan), "returned nan"),
    (lambda t: torch.zeros(len(t), 1), "returned (8, 1), not a tensor of 8 scores"),
    (lambda t: [0.5] * len(t), "returned list, not a tensor of 8 scores"),
])
def test_a_score_that_is_not_one_number_in_0_1_per_image_stops_the_run(returned, message):
    from common.config import load_config
    from engine.curriculum_hook import score_difficulty
    from engine.rl_schema import RLConfig
    from models import DIFFICULTY_SCORES
    DIFFICULTY_SCORES.register("broken")(lambda teacher, student: returned(teacher))
    try:
        cfg = load_config(RLConfig, None, ["difficulty.score=broken"])
        with pytest.raises(UserError, match=re.escape(f"difficulty.score=broken {message}")):
            score_difficulty(cfg, torch.zeros(8, 3), torch.zeros(8, 3))
    finally:
        DIFFICULTY_SCORES.unregister("broken")


# ---------------------------------------------------------------------------------------------------------------
# curriculum_reward
# ---------------------------------------------------------------------------------------------------------------
def test_reward_first_step():
    assert curriculum_reward(50.0, 0.0, 1.0, math.inf, 0, 10) == 0.0


def test_reward_accuracy_and_loss_decrease():
    t = curriculum_reward_terms(55.0, 50.0, 0.9, 1.0, 5, 10)
    assert t == {"acc": 10.0, "loss": 0.0, "early": 0.0, "abs": 0.0}
    assert curriculum_reward(45.0, 50.0, 0.9, 1.0, 5, 10) == pytest.approx(-10.0)


def test_reward_loss_increase_and_its_cap():
    assert curriculum_reward_terms(50.0, 50.0, 1.1, 1.0, 5, 10)["loss"] == pytest.approx(-0.5)
    assert curriculum_reward_terms(50.0, 50.0, 9.0, 1.0, 5, 10)["loss"] == -5.0


def test_reward_early_bonus_on_both_sides_of_03E():
    assert curriculum_reward_terms(61.0, 0.0, 1.0, math.inf, 2, 10)["early"] == 2.0  # e = 2 < 3
    assert curriculum_reward_terms(61.0, 0.0, 1.0, math.inf, 3, 10)["early"] == 0.0  # e = 3 = 0.3 E
    assert curriculum_reward_terms(60.0, 0.0, 1.0, math.inf, 0, 10)["early"] == 0.0  # a_t must exceed 60


def test_reward_absolute_bonus_and_sum():
    t = curriculum_reward_terms(80.0, 75.0, 0.5, 0.4, 9, 10)
    assert t["abs"] == pytest.approx(1.0) and t["acc"] == pytest.approx(10.0) and t["loss"] == pytest.approx(-0.5)
    assert curriculum_reward(80.0, 75.0, 0.5, 0.4, 9, 10) == pytest.approx(10.5)


def test_decode_action_clips_temperature():
    assert decode_action([0, 0], 2.0) == (0.0, 2.0)
    assert decode_action([4, 2], 8.0) == (1.0, 8.0)
    assert decode_action([2, 2], 4.0) == (0.5, 4.5)


# ---------------------------------------------------------------------------------------------------------------
# CurriculumSampler
# ---------------------------------------------------------------------------------------------------------------
N = 103
DIFF = np.random.default_rng(0).random(N)


def _chosen(sampler):
    return sampler.select()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("target", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_sampler_size_and_membership(strategy, target):
    s = CurriculumSampler(DIFF, strategy, fraction=0.7, target=target, seed=3, start_fraction=0.4, pacing_epochs=10)
    s.set_epoch(2)
    chosen = _chosen(s)
    assert len(set(chosen.tolist())) == len(chosen)  # no duplicates
    m = math.ceil(0.7 * N)
    if strategy == "all":
        assert sorted(chosen) == list(range(N))
    elif strategy in ("random_subset", "adaptive", "mixed"):
        assert len(chosen) == m
    else:
        g = pacing_fraction(2, 0.4, 10)
        assert len(chosen) == math.ceil(g * N)
    if strategy == "adaptive":  # the m nearest to the target
        dist = np.abs(DIFF - target)
        assert dist[chosen].max() <= np.sort(dist)[m - 1] + 1e-12
    if strategy == "easy_to_hard":
        assert DIFF[chosen].max() <= np.sort(DIFF)[len(chosen) - 1]
    if strategy == "hard_to_easy":
        assert DIFF[chosen].min() >= np.sort(DIFF)[::-1][len(chosen) - 1]
    if strategy == "mixed":
        groups = s.quintiles()
        q = s.target_quintile(groups)
        per_group = [len(set(chosen) & set(g.tolist())) for g in groups]
        assert per_group[q] == max(per_group)


def test_mixed_weights_and_shortfall():
    s = CurriculumSampler(DIFF, "mixed", fraction=0.5, target=0.0, seed=0)
    groups = s.quintiles()
    per_group = [len(set(s.select()) & set(g.tolist())) for g in groups]
    assert sum(per_group) == math.ceil(0.5 * N)
    assert per_group == sorted(per_group, reverse=True)  # weights 5, 3, 2, 1, 1 from the easiest quintile
    # the target's quintile (weight 5/12 of 94 = 39) holds only 21: the shortfall goes to the others
    s = CurriculumSampler(DIFF, "mixed", fraction=0.9, target=1.0, seed=0)
    per_group = [len(set(s.select()) & set(g.tolist())) for g in s.quintiles()]
    assert sum(per_group) == math.ceil(0.9 * N) and per_group[4] == len(s.quintiles()[4])
    assert list(allocate(10, np.array([5.0, 3, 2, 1, 1]), np.array([2, 10, 10, 10, 10]))) == [2, 4, 2, 1, 1]


def test_pacing_grows_linearly():
    assert pacing_fraction(0, 0.4, 10) == pytest.approx(0.4)
    assert pacing_fraction(5, 0.4, 10) == pytest.approx(0.7)
    assert pacing_fraction(12, 0.4, 10) == 1.0


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sampler_shards(strategy, world):
    shards = []
    for rank in range(world):
        s = CurriculumSampler(DIFF, strategy, fraction=0.7, target=0.25, seed=5, num_replicas=world, rank=rank)
        s.set_epoch(1)
        items = list(s)
        assert all(e == 1 for _, e in items) and len(items) == len(s)
        shards.append([i for i, _ in items])
    assert len({len(sh) for sh in shards}) == 1  # equal length
    ref = CurriculumSampler(DIFF, strategy, fraction=0.7, target=0.25, seed=5)
    ref.set_epoch(1)
    chosen = set(ref.select().tolist())
    flat = [i for sh in shards for i in sh]
    assert set(flat) == chosen  # covering, nothing dropped
    assert len(flat) - len(chosen) < world  # disjoint up to the < world padding items
    if len(chosen) % world == 0:
        assert len(flat) == len(chosen)  # exactly disjoint


def test_sampler_is_deterministic_and_reshuffles():
    a = CurriculumSampler(DIFF, "adaptive", seed=1)
    b = CurriculumSampler(DIFF, "adaptive", seed=1)
    assert list(a) == list(b)
    first = [i for i, _ in a]
    a.set_epoch(1)
    second = [i for i, _ in a]
    assert first != second and sorted(first) == sorted(second)  # same set (same target), new order


def test_sampler_bad_input():
    with pytest.raises(UserError, match="unknown curriculum.strategy 'hardest'"):
        CurriculumSampler(DIFF, "hardest")
    with pytest.raises(UserError, match="fraction"):
        CurriculumSampler(DIFF, "adaptive", fraction=0.0)
    with pytest.raises(UserError, match="fraction"):
        CurriculumSampler(DIFF, "adaptive", fraction=1.5)
    s = CurriculumSampler(DIFF, "adaptive")
    with pytest.raises(UserError, match="target difficulty"):
        s.set_target(1.2)
    with pytest.raises(UserError, match="103 samples"):
        s.update_difficulty(np.zeros(5))


# ---------------------------------------------------------------------------------------------------------------
# The environment on a tiny trainer
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_trainer(tmp_path):
    from common.config import load_config
    from common.distributed import DistInfo
    from engine.curriculum_run import CurriculumRun
    from engine.rl_schema import RLConfig
    cfg = load_config(RLConfig, None, [*TINY, "kd.alpha=0.5", "train.epochs=4", "difficulty.warmup_epochs=1",
                                       "difficulty.refresh_every=1", "agent.name=random",
                                       f"teacher.cache_dir={tmp_path / 'cache'}"])
    return CurriculumRun(cfg, DistInfo(), None)


def test_env_passes_gymnasium_checker(tiny_trainer):
    from gymnasium.utils.env_checker import check_env
    check_env(tiny_trainer.env, skip_render_check=True)


def test_step_t_trains_with_action_t(tiny_trainer, monkeypatch):
    env, trainer = tiny_trainer.env, tiny_trainer.trainer
    env.reset(seed=0)
    seen = []
    real = trainer.train_epoch

    def spy(epoch):
        seen.append((epoch, trainer.train_sampler.target, trainer.temperature))
        return real(epoch)

    monkeypatch.setattr(trainer, "train_epoch", spy)
    actions = [np.array([4, 2]), np.array([0, 0]), np.array([1, 2])]
    temperature = trainer.temperature
    for t, action in enumerate(actions):
        target, temperature = decode_action(action, temperature)
        obs, reward, terminated, truncated, info = env.step(action)
        assert seen[-1] == (t, target, temperature)  # the epoch step t trained used action t
        assert env.last_record["kd/temperature"] == temperature and info["target"] == target
        assert info["epoch"] == t and set(info["reward_terms"]) == {"acc", "loss", "early", "abs"}
        assert obs[10] == pytest.approx(target)  # the observation reports the action's target
    assert not terminated
    env.step(np.array([2, 1]))
    assert env.epoch == 4


def test_student_back_in_train_mode_after_refresh(tiny_trainer):
    from common.rng import rng_state, state_digest
    trainer, curriculum = tiny_trainer.trainer, tiny_trainer.curriculum
    trainer.student.train()
    before = state_digest(rng_state())
    curriculum.refresh_difficulty(1)
    assert state_digest(rng_state()) == before  # a refresh (its loader draws a seed) leaves training's streams alone
    assert trainer.student.training
    assert all(m.training for m in trainer.student.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert curriculum.difficulty.shape == (len(trainer.splits["train"]),)
    assert not trainer.train_sampler.use_all
    # and it was scored in eval mode: the same as a direct eval-mode forward over the evaluation views
    trainer.student.eval()
    logits = curriculum.student_train_logits()
    trainer.student.train()
    assert np.allclose(logits, curriculum.student_train_logits())


def test_agents_round_trip_their_state(tiny_trainer):
    from omegaconf import OmegaConf

    from agents import BanditAgent, PPOAgent, RandomAgent
    obs, _ = tiny_trainer.env.reset(seed=0)
    bandit = BanditAgent(OmegaConf.create({"discount": 0.9, "reward_std": 5.0, "prior_std": 10.0}), seed=0)
    for agent in (bandit, RandomAgent(0)):
        a = agent.act(obs)
        agent.observe(obs, a, 1.0, obs, False)
        state = agent.state_dict()
        next_a = agent.act(obs)
        agent.load_state_dict(state)
        assert np.array_equal(agent.act(obs), next_a)
    ppo = PPOAgent(tiny_trainer.env, OmegaConf.create(PPO_SMALL), seed=0)
    before = [p.clone() for p in ppo.policy.parameters()]
    for _ in range(2):
        a = ppo.act(obs)
        assert tiny_trainer.env.action_space.contains(a)
        ppo.observe(obs, a, 3.0, obs, False)
    assert ppo.updates == 1 and any(not torch.equal(b, p) for b, p in zip(before, ppo.policy.parameters()))


PPO_SMALL = {"n_steps": 2, "batch_size": 2, "n_epochs": 1, "lr": 3e-4, "gamma": 0.99, "gae_lambda": 0.95,
             "clip_range": 0.2, "vf_coef": 1.0, "ent_coef": 0.01}


def test_ppo_agent_leaves_each_ranks_random_streams_alone():
    """stable-baselines3's PPO(seed=...) seeds Python's, NumPy's and torch's global generators with one seed on every
    rank, and its policy samples and shuffles from them. Building the agent, acting and learning must leave each
    rank's streams (seed_everything(seed, rank)) where they were, so that a student with dropout draws different
    masks on each shard; the agent's own draws come from the seed alone, whatever the process drew before (a run
    that builds the teacher cache and one that reuses it act alike), and a state round trip continues them."""
    import random
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from agents import PPOAgent
    from common.rng import rng_state, seed_everything
    from rl_curriculum_env import CurriculumEnv
    env = CurriculumEnv(SimpleNamespace(temperature=4.0, target=0.5, num_classes=4), num_epochs=3)
    obs = np.linspace(0, 1, 12, dtype=np.float32)

    def unmoved(before: dict) -> bool:
        return (torch.equal(torch.get_rng_state(), before["torch"]) and random.getstate() == before["python"]
                and np.random.get_state()[1].tolist() == before["numpy"][1].tolist())

    torch_after, runs = [], []
    for rank in (0, 1):
        seed_everything(5, rank)
        before = rng_state()
        agent = PPOAgent(env, OmegaConf.create(PPO_SMALL), seed=5)
        actions = []
        for _ in range(3):  # n_steps=2: the second observe runs a PPO update
            actions.append(agent.act(obs).tolist())
            agent.observe(obs, np.asarray(actions[-1]), 1.0, obs, False)
        assert agent.updates == 1 and unmoved(before), f"rank {rank}: the agent moved the global streams"
        torch_after.append(torch.get_rng_state())
        runs.append(actions)
    assert not torch.equal(torch_after[0], torch_after[1])  # the ranks' streams still differ, as they did before
    assert runs[0] == runs[1]  # the agent's draws: from its seed, not from the process's streams
    state = agent.state_dict()
    following = [agent.act(obs).tolist() for _ in range(4)]
    agent.load_state_dict(state)
    assert [agent.act(obs).tolist() for _ in range(4)] == following


# ---------------------------------------------------------------------------------------------------------------
# train_student_rl.py end to end
# ---------------------------------------------------------------------------------------------------------------
RL_TINY = [*TINY, "kd.alpha=0.5", "difficulty.warmup_epochs=1", "difficulty.refresh_every=1", "train.epochs=3",
           "agent.ppo.n_steps=2", "agent.ppo.batch_size=2"]


@runs_documented_command("python train_student_rl.py --config configs/curriculum_synthetic.yaml")
@pytest.mark.parametrize("agent", ["ppo", "bandit"])
def test_tiny_agent_runs(tmp_path, agent):
    """Each agent end to end; the bandit case runs the documented offline command, configs/curriculum_synthetic.yaml,
    at tiny size: TINY's data, models and epochs, and a random teacher instead of the quickstart teacher."""
    args = RL_TINY if agent == "ppo" else [a for a in RL_TINY if not a.startswith("agent.ppo.")]  # PPO's keys
    if agent == "bandit":
        args = ["--config", "configs/curriculum_synthetic.yaml", *args, "data.synthetic.eval_images_per_class=0",
                "teacher.checkpoint=''", "teacher.prepare=''"]
    proc = run_script("train_student_rl.py", *args, f"agent.name={agent}", f"run.out_dir={tmp_path}", "run.name=r")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "r"
    for name in ("curriculum.jsonl", "curriculum.png", "metrics.jsonl", "results.json", "checkpoints/last.pt",
                 "difficulty/epoch_001.npy", "difficulty/epoch_001.png", "difficulty/epoch_002.npy"):
        assert (run / name).is_file(), name
    lines = [json.loads(x) for x in (run / "curriculum.jsonl").read_text().splitlines()]
    assert [ln["epoch"] for ln in lines] == [0, 1, 2]
    for ln in lines:
        for key in ("action", "target", "temperature", "strategy", "num_samples", "reward", "reward_acc",
                    "reward_loss", "reward_early", "reward_abs", "difficulty_mean", "difficulty_std"):
            assert key in ln
        assert ln["reward"] == pytest.approx(ln["reward_acc"] + ln["reward_loss"] + ln["reward_early"]
                                             + ln["reward_abs"])
    assert lines[0]["num_samples"] == 48  # whole set before the first refresh
    for ln in lines:  # each epoch's console line shows the action that shaped it
        assert (f"epoch {ln['epoch'] + 1}/3  action {ln['action']}: target {ln['target']:.2f}, "
                f"T {ln['temperature']:.2f}, {ln['num_samples']}/48 samples  loss (kd: 0.5 CE + 0.5 T² KL)") in proc.stdout
    assert lines[1]["num_samples"] == math.ceil(0.7 * 48)
    metrics = read_metrics(run)
    assert [m["rl/reward"] for m in metrics] == [ln["reward"] for ln in lines]


def test_rl_resume_after_kill_matches_uninterrupted(tmp_path):
    args = [*RL_TINY, "data.synthetic.images_per_class=40", "train.epochs=5", "agent.name=ppo",
            f"run.out_dir={tmp_path}"]
    full = run_script("train_student_rl.py", *args, "run.name=full")
    assert full.returncode == 0, full.stderr[-3000:]
    log = tmp_path / "killed" / "curriculum.jsonl"
    run_and_sigkill("train_student_rl.py", *args, "run.name=killed", watch=log, after_lines=3, settle=0.2)
    resumed = run_script("train_student_rl.py", *args, "run.name=killed", "run.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def strip(rows):
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]

    a = [json.loads(x) for x in (tmp_path / "full" / "curriculum.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in log.read_text().splitlines()]
    assert a == b  # same actions, rewards, targets, temperatures: the agent resumed where it stopped
    assert strip(read_metrics(tmp_path / "full")) == strip(read_metrics(tmp_path / "killed"))


@pytest.mark.parametrize("override,fragment", [
    ("curriculum.strategy=hardest", "unknown curriculum.strategy 'hardest'"),
    ("teacher.mode=online", "teacher.mode=online does not build"),
])
def test_rl_bad_input_on_the_command_line(override, fragment):
    assert_clean_error(run_main("train_student_rl.py", *RL_TINY, override), fragment)


@pytest.mark.parametrize("override,fragment", [
    ("agent.name=sarsa", "unknown agent.name 'sarsa'"),
    ("curriculum.fraction=0", "curriculum.fraction=0.0 must lie in (0, 1]"),
    ("curriculum.fraction=1.2", "must lie in (0, 1]"),
    ("curriculum.target=-0.5", "curriculum.target=-0.5 must lie in [0, 1]"),
    ("kd.alpha=1", "needs a teacher"),
    ("agent.name=fixed agent.fixed_actions=[[5,1]]", "agent.fixed_actions entry [5, 1]"),
])
def test_rl_bad_input(override, fragment):
    from common.config import load_config
    from engine.rl_schema import RLConfig, validate_rl
    with pytest.raises(UserError) as err:
        args = RL_TINY if "agent.name=" not in override else [a for a in RL_TINY if not a.startswith("agent.ppo.")]
        validate_rl(load_config(RLConfig, None, [*args, *override.split()]))
    assert fragment in str(err.value)


def test_difficulty_tracks_the_true_difficulty(tmp_path):
    """With a trained teacher, difficulty_score ranks the synthetic images like their stored true difficulty."""
    from scipy.stats import spearmanr

    from imagedata.synthetic_data import make_synthetic_dataset
    data = ["data.name=synthetic", "data.synthetic.num_classes=6", "data.image_size=32", "data.crop_scale_min=0.35",
            "data.workers=0", "train.batch_size=32", "eval.latency=false", f"run.out_dir={tmp_path}"]
    teacher = run_script("train_student.py", *data, "data.synthetic.images_per_class=100", "data.synthetic.seed=1",
                         "student.name=resnet10t", "kd.alpha=1", "train.epochs=3", "run.name=teacher")
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    rl = run_script("train_student_rl.py", *data, "data.synthetic.images_per_class=50", "teacher.name=resnet10t",
                    f"teacher.checkpoint={tmp_path / 'teacher' / 'student.safetensors'}", "student.name=test_resnet",
                    "kd.alpha=0", "train.epochs=3", "difficulty.warmup_epochs=2", "agent.name=fixed", "run.name=rl")
    assert rl.returncode == 0, rl.stderr[-3000:]
    scores = np.load(tmp_path / "rl" / "difficulty" / "epoch_002.npy")
    truth = np.asarray(make_synthetic_dataset(6, 50, 32, 0)["train"]["difficulty"])
    rho = spearmanr(scores, truth).statistic
    print(f"Spearman(difficulty_score, true difficulty) = {rho:.3f}")
    assert rho >= 0.5


# ---------------------------------------------------------------------------------------------------------------
# Sample accounting: every selected sample reaches the loss exactly once per epoch, and the logs say so
# ---------------------------------------------------------------------------------------------------------------
def _expected_size(strategy: str, epoch: int, n: int, fraction: float, start: float, pacing: int,
                   warmup: int) -> int:
    """docs/curriculum.md's contract: N (all, and before the first difficulty refresh), ceil(g(e) N) (pacing) or
    ceil(f N) (adaptive, mixed, random_subset)."""
    from fractions import Fraction
    if strategy in ("all", "train_student") or (strategy != "random_subset" and epoch < warmup):
        return n
    if strategy in ("easy_to_hard", "hard_to_easy"):  # in exact rational arithmetic
        s = Fraction(str(start))
        return math.ceil(min(Fraction(1), s + (1 - s) * Fraction(epoch, pacing)) * n)
    return math.ceil(Fraction(str(fraction)) * n)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_selection_size_is_the_exact_ceiling(strategy):
    """ceil(g(e) N) as a mathematician computes it: g(4) = 0.4 + 0.6 * 4 / 15 = 0.56 and 0.56 * 600 = 336, not the
    337 that a floating-point ceil gives; likewise 0.68 * 600 = 408 and 0.84 * 600 = 504."""
    for fraction in (0.7, 0.556, 0.6, 0.35):
        s = CurriculumSampler(np.zeros(600), strategy, fraction=fraction, start_fraction=0.4, pacing_epochs=15)
        for epoch in range(17):
            s.set_epoch(epoch)
            assert s.selection_size() == _expected_size(strategy, epoch, 600, fraction, 0.4, 15, 0), (fraction, epoch)


def _batched(strategy, n, fraction, start, world, rank, batch=64, epoch=0):
    from imagedata.samplers import TrainBatchSampler
    s = CurriculumSampler(np.random.default_rng(1).random(n), strategy, fraction=fraction, target=0.25, seed=5,
                          num_replicas=world, rank=rank, start_fraction=start, pacing_epochs=15)
    s.set_epoch(epoch)
    return s, TrainBatchSampler(s, batch)


# (N, fraction = start_fraction): 600 leaves a partial last batch of 64 for every strategy (the case);
# 513 = 8 * 64 + 1 and ceil(0.8743 * 513) = 449 = 7 * 64 + 1 leave a last batch of exactly one sample.
SIZES = {"partial": (600, 0.7), "batch_of_1": (513, 0.8743)}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", SIZES)
def test_batches_hold_the_selection_exactly_once(strategy, case):
    n, f = SIZES[case]
    s, batches = _batched(strategy, n, f, f, 1, 0)
    m = _expected_size(strategy, 0, n, f, f, 15, 0)
    assert s.num_selected() == m and (m % 64 == 1) == (case == "batch_of_1")
    got = list(batches)
    assert len(got) == len(batches) and min(len(b) for b in got) > 1  # the batch of one was merged
    keys = [k for b in got for k in b]
    assert all(valid for _, _, valid in keys)  # one process: nothing padded
    assert [i for i, _, _ in keys] == s.select().tolist()  # the selection, in its order, each sample once
    assert [batches.global_valid(k) for k in range(len(got))] == [len(b) for b in got]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("n,world", [(600, 2), (601, 2), (513, 2), (103, 3), (129, 4)])
def test_ranks_valid_samples_partition_the_selection(strategy, n, world):
    """2-4 ranks at the sampler level (no torchrun): the union of the ranks' valid samples is the selection,
    each sample exactly once; padded duplicates are marked invalid; every rank takes the same steps."""
    per_rank = [list(_batched(strategy, n, 0.7, 0.4, world, r, epoch=1)[1]) for r in range(world)]
    s, batches = _batched(strategy, n, 0.7, 0.4, 1, 0, epoch=1)
    chosen = s.select().tolist()
    assert len({len(b) for b in per_rank}) == 1  # same number of steps on every rank
    valid = [i for rank in per_rank for b in rank for i, _, ok in b if ok]
    assert sorted(valid) == sorted(chosen) and len(set(valid)) == len(valid)
    padded = [k for rank in per_rank for b in rank for k in b if not k[2]]
    assert len(padded) == math.ceil(len(chosen) / world) * world - len(chosen)
    ranked = _batched(strategy, n, 0.7, 0.4, world, 0, epoch=1)[1]
    for step in range(len(per_rank[0])):  # the step's valid count over ranks, known to each rank alone
        assert ranked.global_valid(step) == sum(ok for rank in per_rank for _, _, ok in rank[step])
        assert min(len(rank[step]) for rank in per_rank) > 1


@pytest.fixture(scope="module")
def online_kd_trainer():
    """A single-process Trainer with an online teacher (no cache to build), for unit tests of its steps."""
    from common.config import load_config
    from common.distributed import DistInfo
    from engine.schema import Config
    from engine.trainer import Trainer
    return Trainer(load_config(Config, None, [*TINY_ONLINE, "kd.alpha=0.5"]), DistInfo(), None)


@pytest.mark.parametrize("online", [False, True], ids=["cached_teacher", "online_teacher"])
def test_training_step_gives_ddp_the_mean_over_valid_samples(online_kd_trainer, monkeypatch, online):
    """The loop's own step (Trainer.step_loss) on three simulated ranks of one DDP step: rank 1's last sample is a
    padded duplicate and rank 2 holds only padding. The average of the ranks' gradients (what DDP applies) equals
    the gradient of the same step in one process over the valid samples alone, and the logged train/loss is their
    mean. The student is in eval mode so that each sample's output depends on it alone (in train mode BatchNorm
    also sees the duplicates, as DDP's forward does)."""
    from common.distributed import DistInfo
    trainer = online_kd_trainer
    trainer.model.eval()
    params = [p for p in trainer.distiller.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 32, 32, generator=g)
    y = torch.randint(0, trainer.num_classes, (7,), generator=g)
    teacher = torch.randn(7, trainer.num_classes, generator=g)
    # rank r's rows of the 7 (a padded row repeats a valid sample of the selection, as pad_and_shard does)
    rows = [[0, 1, 2], [3, 4, 0], [5, 6, 1]]
    valid = [torch.tensor([True, True, True]), torch.tensor([True, True, False]), torch.tensor([False] * 3)]
    keep = [0, 1, 2, 3, 4]  # the step's valid samples over all ranks, each once
    x[5:], y[5:], teacher[5:] = x[[0, 1]], y[[0, 1]], teacher[[0, 1]]

    def step(index: list, mask: torch.Tensor, world: int, step_valid: int):
        trainer.dist = DistInfo(world_size=world)
        monkeypatch.setattr(trainer.train_batches, "global_valid", lambda k: step_valid)
        _, terms, mean_loss, loss = trainer.step_loss(x[index], y[index], {"teacher_logits": teacher[index]}, mask,
                                                      step=0, epoch=0, online=online)
        return mean_loss, torch.autograd.grad(loss, params, allow_unused=True)

    try:
        per_rank = [step(r, v, world=3, step_valid=len(keep)) for r, v in zip(rows, valid)]
        ref_loss, ref_grads = step(keep, torch.ones(len(keep), dtype=torch.bool), world=1, step_valid=len(keep))
    finally:
        trainer.dist = DistInfo()
    if online:  # teacher logits come from the teacher itself
        assert all(torch.isfinite(m) for m, _ in per_rank)
    for i, ref in enumerate(ref_grads):  # float32 sums in another order: equal up to 1e-5 of the largest entry
        if ref is not None:
            ddp = sum(grads[i] for _, grads in per_rank) / 3
            assert (ddp - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-8, (i, (ddp - ref).abs().max())
    logged = sum(m.item() * int(v.sum()) for (m, _), v in zip(per_rank, valid)) / len(keep)
    assert logged == pytest.approx(ref_loss.item(), rel=1e-5)


def _tiny_student(cfg, num_classes):
    # BatchNorm1d on [B, 8]: a training batch of one sample raises, so a last batch of 1 must not reach it
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8), torch.nn.BatchNorm1d(8),
                               torch.nn.ReLU(), torch.nn.Linear(8, num_classes))


@pytest.fixture(scope="module")
def accounting_cache(tmp_path_factory):
    """A teacher-cache folder and generated datasets shared by the parametrized runs below."""
    return tmp_path_factory.mktemp("accounting_cache"), {}


@pytest.mark.parametrize("strategy", ("train_student",) + STRATEGIES)
@pytest.mark.parametrize("case", SIZES)
def test_every_selected_sample_reaches_the_loss(tmp_path, monkeypatch, accounting_cache, strategy, case):
    """train_student.py / train_student_rl.py in process (a tiny BatchNorm student): the samples that reach the
    loss each epoch are exactly the selection, each once; metrics.jsonl's train/samples and curriculum.jsonl's
    num_samples both equal that count and docs/curriculum.md's formula. On the old code (drop_last fixed from the full
    set) 600 images at batch 64 trained 576 per whole-set epoch and 384 of adaptive's 420."""
    from common.config import load_config
    from common.distributed import DistInfo
    from engine import build, curriculum_hook, curriculum_run, run
    from engine.schema import Config
    from engine.curriculum_run import CurriculumRun
    from engine.rl_schema import RLConfig
    from engine.run import run_training
    from engine.trainer import Trainer
    n, f = SIZES[case]
    cache_dir, datasets = accounting_cache
    classes, per_class = (10, 60) if n == 600 else (3, 171)
    epochs, warmup = 2, 1 if case == "partial" else 0
    args = ["data.name=synthetic", f"data.synthetic.num_classes={classes}",
            f"data.synthetic.images_per_class={per_class}", "data.synthetic.eval_images_per_class=4",
            "data.synthetic.image_size=16", "data.image_size=16", "data.workers=0", "teacher.name=test_resnet",
            "teacher.pretrained=false", "teacher.cache_views=1", f"teacher.cache_dir={cache_dir}",
            "kd.alpha=0.5", "train.batch_size=64", f"train.epochs={epochs}", "train.channels_last=false",
            "eval.latency=false", f"run.out_dir={tmp_path}", "run.name=r"]
    if strategy != "train_student":
        shared = {"curriculum.fraction": f, "curriculum.start_fraction": f, "curriculum.pacing_epochs": 15}
        reads = STRATEGY_REGISTRY.entry(strategy).obj.reads  # a key the strategy does not read is refused
        args += [f"curriculum.strategy={strategy}", *(f"{k}={v}" for k, v in shared.items() if k in reads),
                 f"difficulty.warmup_epochs={warmup}", "difficulty.refresh_every=5", "agent.name=fixed"]
    cfg = load_config(Config if strategy == "train_student" else RLConfig, None, args)
    monkeypatch.setattr(build, "create_student", _tiny_student)
    real_load_splits = build.load_splits

    def load_splits(data_cfg):  # generated once per size for the whole module
        if n not in datasets:
            datasets[n] = real_load_splits(data_cfg)
        return datasets[n]

    monkeypatch.setattr(build, "load_splits", load_splits)
    for module, name in ((run, "plot_run"), (curriculum_run, "plot_curriculum"),
                         (curriculum_hook, "save_difficulty_snapshot")):
        monkeypatch.setattr(module, name, lambda *a: None)  # figures cost more than this test's training
    seen: dict[int, list[int]] = {}
    real_batch_images = Trainer.batch_images

    def spy(self, batch, filler=None):  # the samples of each step that are meant to reach the loss
        valid = batch.get("valid", torch.ones(len(batch["index"]), dtype=torch.bool))
        seen.setdefault(self.train_sampler.epoch, []).extend(batch["index"][valid].tolist())
        return real_batch_images(self, batch, filler)

    monkeypatch.setattr(Trainer, "batch_images", spy)
    run_training(cfg, DistInfo(), Trainer if strategy == "train_student" else CurriculumRun)
    expected = [_expected_size(strategy, e, n, f, f, 15, warmup) for e in range(epochs)]
    trained = [len(seen[e]) for e in range(epochs)]
    assert trained == expected
    assert all(len(set(seen[e])) == len(seen[e]) for e in range(epochs))  # each sample once
    assert [m["train/samples"] for m in read_metrics(tmp_path / "r")] == expected
    if strategy != "train_student":
        lines = [json.loads(x) for x in (tmp_path / "r" / "curriculum.jsonl").read_text().splitlines()]
        assert [ln["num_samples"] for ln in lines] == expected
        assert [m["curriculum/num_samples"] for m in read_metrics(tmp_path / "r")] == expected


# ---------------------------------------------------------------------------------------------------------------
# data.synthetic.label_noise
# ---------------------------------------------------------------------------------------------------------------
def test_label_noise_flips_exactly_that_fraction_of_training_labels():
    from imagedata.synthetic_data import make_synthetic_dataset
    clean = make_synthetic_dataset(num_classes=5, images_per_class=40, image_size=16, seed=3)
    noisy = make_synthetic_dataset(num_classes=5, images_per_class=40, image_size=16, seed=3, label_noise=0.2)
    again = make_synthetic_dataset(num_classes=5, images_per_class=40, image_size=16, seed=3, label_noise=0.2)
    other = make_synthetic_dataset(num_classes=5, images_per_class=40, image_size=16, seed=4, label_noise=0.2)
    train = noisy["train"]
    labels, true = np.asarray(train["label"]), np.asarray(train["clean_label"])
    assert (labels != true).sum() == round(0.2 * 200)  # exactly the fraction, each flip to another class
    assert np.array_equal(true, clean["train"]["label"]) and np.array_equal(true, clean["train"]["clean_label"])
    assert set(labels[labels != true] - true[labels != true]) <= {-4, -3, -2, -1, 1, 2, 3, 4}
    assert len(set(zip(true[labels != true], labels[labels != true]))) > 10  # spread over the other classes
    assert train["image"] == clean["train"]["image"] and train["difficulty"] == clean["train"]["difficulty"]
    for split in ("validation", "test"):  # never the evaluation splits
        assert noisy[split]["label"] == noisy[split]["clean_label"] == clean[split]["label"]
        assert noisy[split]._fingerprint == clean[split]._fingerprint
    assert again["train"]["label"] == train["label"]  # a pure function of the keys
    assert other["train"]["label"] != train["label"]
    assert noisy["train"]._fingerprint != clean["train"]._fingerprint


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_label_noise_bad_values(value):
    from common.config import load_config
    from engine.schema import Config, validate
    from imagedata.synthetic_data import make_synthetic_dataset
    with pytest.raises(UserError, match="data.synthetic.label_noise"):
        validate(load_config(Config, None, [*TINY, f"data.synthetic.label_noise={value}"]))
    with pytest.raises(UserError, match="data.synthetic.label_noise"):
        make_synthetic_dataset(num_classes=2, images_per_class=2, label_noise=value)


# ---------------------------------------------------------------------------------------------------------------
# summarize.py: exact sample totals and paired per-seed differences
# ---------------------------------------------------------------------------------------------------------------
def test_summarize_sample_totals_and_paired_differences(tmp_path, monkeypatch, capsys):
    import summarize
    acc = {"x_ppo": [70.0, 72.0, 71.0], "x_random_subset": [69.0, 70.0, 70.5], "x_all": [71.0, 71.0, 73.0]}
    samples = {"x_ppo": [600, 420, 420], "x_random_subset": [420, 420, 420], "x_all": [600, 600]}
    for row, values in acc.items():
        for seed, value in enumerate(values):
            run = tmp_path / f"{row}_s{seed}"
            run.mkdir()
            (run / "results.json").write_text(json.dumps({"test/acc1": value}))
            (run / "config.yaml").write_text(f"train:\n  seed: {seed}\n")
            (run / "metrics.jsonl").write_text("".join(
                json.dumps({"epoch": e, "val/acc1": 50.0, "train/samples": n}) + "\n"
                for e, n in enumerate(samples[row])))
    monkeypatch.setattr("sys.argv", ["summarize.py", *map(str, sorted(tmp_path.iterdir())), "--keys", "test/acc1",
                                     "--paired", "random_subset", "x_all"])
    summarize.main()
    out = capsys.readouterr().out
    assert "| x_ppo | 3 | 71.00 ± 1.00 | 1440 |" in out and "| x_all | 3 | 71.67 ± 1.15 | 1200 |" in out
    # ppo - random_subset per seed: +1.0, +2.0, +0.5; ppo - all: -1.0, +1.0, -2.0
    assert "| x_ppo | +1.17 ± 0.76 (3) | -0.67 ± 1.53 (3) |" in out
    assert "| x_random_subset | - | -1.83 ± 0.76 (3) |" in out  # -2.0, -1.0, -2.5
