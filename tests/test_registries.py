"""Registries of curriculum strategies and agents: a new entry registered from this file alone runs end to end
through train_student_rl.py; the built-in entries select exactly what they selected before the registries; the
environment needs only its small interface (rl_curriculum_env.CurriculumTraining)."""
import hashlib
import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY, read_metrics
from omegaconf import OmegaConf

from common.errors import UserError
from curriculum_dataloader import STRATEGY_REGISTRY, CurriculumSampler, Strategy


# ---------------------------------------------------------------------------------------------------------------
# The built-in strategies and agents, bit for bit as before the registries
# ---------------------------------------------------------------------------------------------------------------
def _digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a, dtype=np.int64)).tobytes())
    return h.hexdigest()[:16]


# sha256 prefixes of the selections, shards and sizes below, computed with the if/elif sampler and the agents of
# commit ca6ca4b (before the registries)
BEFORE_REGISTRIES = {"all": "17cbb717549c8cd1", "random_subset": "562bcacdbcc57a07", "adaptive": "dc1c2f31b73b0579",
                     "easy_to_hard": "69c6b5fd58330969", "hard_to_easy": "263d6a56f183e8b0",
                     "mixed": "46eb9c2612f770fa", "random": "95d7e874f024e992", "bandit": "02a0ea8d008410a7",
                     "fixed": "d06b89f5312f5d11"}


@pytest.mark.parametrize("strategy", ["all", "random_subset", "adaptive", "easy_to_hard", "hard_to_easy", "mixed"])
def test_builtin_strategies_select_as_before(strategy):
    difficulty = np.random.default_rng(0).random(257)
    difficulty[::7] = 0.5  # ties, which the random tie-break orders
    arrays = []
    for target in (0.0, 0.25, 0.5, 0.75, 1.0):
        for fraction in (0.3, 0.7, 1.0):
            for world, rank in ((1, 0), (3, 2)):
                s = CurriculumSampler(difficulty, strategy, fraction, target, 4, world, rank, 0.4, 6)
                for epoch in range(8):
                    s.set_epoch(epoch)
                    s.use_all = epoch == 0  # the warm-up before the first refresh
                    arrays += [s.select(), s.shard(), [s.selection_size(), len(s)]]
    assert _digest(arrays) == BEFORE_REGISTRIES[strategy]


def test_builtin_agents_act_as_before():
    from agents import BanditAgent, FixedAgent, RandomAgent
    obs = np.zeros(12, dtype=np.float32)
    random_agent = RandomAgent(3)
    assert _digest([random_agent.act(obs) for _ in range(50)]) == BEFORE_REGISTRIES["random"]
    bandit, actions = BanditAgent(OmegaConf.create({"discount": 0.9, "reward_std": 5.0, "prior_std": 10.0}), 3), []
    for _ in range(60):
        actions.append(bandit.act(obs))
        bandit.observe(obs, actions[-1], float((actions[-1][0] * 3 + actions[-1][1]) % 4) - 1.0, obs, False)
    assert _digest(actions) == BEFORE_REGISTRIES["bandit"]
    fixed, actions = FixedAgent([[1, 2], [4, 0]]), []
    for _ in range(3):
        actions.append(fixed.act(obs))
        fixed.observe(obs, actions[-1], 0.0, obs, False)
    assert _digest(actions) == BEFORE_REGISTRIES["fixed"]


def test_agents_declare_their_keys_beside_them_in_the_registry():
    import agents
    from common.config import config_help, iter_schema
    from train_student_rl import RLConfig
    assert list(agents.AGENT_REGISTRY) == ["ppo", "bandit", "fixed", "random"]
    assert agents.AGENT_REGISTRY.entry("ppo").config is agents.PPOConfig
    assert agents.AGENT_REGISTRY.entry("bandit").config is agents.BanditConfig
    assert agents.AGENT_REGISTRY.entry("fixed").config is None and agents.AGENT_REGISTRY["random"] is agents.RandomAgent
    keys = [key for key, *_ in iter_schema(RLConfig) if key.startswith("agent.")]
    assert keys[:2] == ["agent.name", "agent.fixed_actions"] and "agent.ppo.n_steps" in keys
    assert "agent.bandit.prior_std" in keys and not hasattr(agents.AgentConfig(), "ppo")  # composed, not typed in
    text = config_help(RLConfig, "train_student_rl.py", "")
    assert "agent.name choices: ppo: stable-baselines3 PPO" in text and "; random: a control" in text


def test_agents_take_their_actions_from_the_action_space():
    from agents import BanditAgent, RandomAgent
    obs = np.zeros(12, dtype=np.float32)
    nvec = (2, 4, 3)  # not the curriculum environment's (5, 3): nothing may assume it
    random_agent = RandomAgent(1, nvec)
    random_actions = np.stack([random_agent.act(obs) for _ in range(200)])
    assert (random_actions >= 0).all() and (random_actions < np.asarray(nvec)).all()
    assert [len(set(random_actions[:, i])) for i in range(3)] == list(nvec)  # every value of every component
    bandit = BanditAgent(OmegaConf.create({"discount": 1.0, "reward_std": 5.0, "prior_std": 10.0}), 0, nvec)
    assert len(bandit.n) == 24
    seen = set()
    for _ in range(300):
        a = bandit.act(obs)
        assert a.shape == (3,) and (a < np.asarray(nvec)).all()
        bandit.observe(obs, a, 0.0, obs, False)
        seen.add(tuple(int(x) for x in a))
    assert bandit.n.sum() == pytest.approx(300) and len(seen) == 24  # every joint action is one arm


# ---------------------------------------------------------------------------------------------------------------
# The environment depends on CurriculumTraining alone
# ---------------------------------------------------------------------------------------------------------------
class FakeTraining:
    """rl_curriculum_env.CurriculumTraining, with no trainer behind it."""

    num_classes = 4

    def __init__(self):
        self.target, self.temperature, self.trained, self.prepared = 0.5, 4.0, [], []

    def apply_curriculum(self, target, temperature):
        self.target, self.temperature = target, temperature

    def train_and_validate(self, epoch):
        self.trained.append((epoch, self.target, self.temperature))
        return {"val/acc1": 20.0 + 5 * epoch, "train/loss": 2.0 - 0.1 * epoch}, True

    def prepare_epoch(self, epoch):
        self.prepared.append(epoch)

    def difficulty_stats(self):
        return {"mean": 0.5, "std": 0.1, "q25": 0.4, "q50": 0.5, "q75": 0.6}

    def snapshot(self):
        return {"target": self.target, "temperature": self.temperature, "trained": list(self.trained)}

    def restore(self, snap):
        self.target, self.temperature, self.trained = snap["target"], snap["temperature"], list(snap["trained"])


def test_env_needs_only_its_interface():
    from gymnasium.utils.env_checker import check_env

    from rl_curriculum_env import CurriculumEnv
    check_env(CurriculumEnv(FakeTraining(), 6), skip_render_check=True)
    training = FakeTraining()
    env = CurriculumEnv(training, 3)
    obs, _ = env.reset(seed=0)
    assert training.prepared == [0] and obs[10] == pytest.approx(0.5)
    for t, action in enumerate([np.array([4, 2]), np.array([0, 0]), np.array([1, 1])]):
        obs, reward, terminated, _, info = env.step(action)
        assert training.trained[-1][0] == t and info["target"] == training.trained[-1][1]
    assert terminated and training.trained == [(0, 1.0, 4.5), (1, 0.0, 4.0), (2, 0.25, 4.0)]
    env.reset()
    assert env.epoch == 0 and training.trained == [] and training.target == 0.5  # restored from the snapshot


# ---------------------------------------------------------------------------------------------------------------
# A strategy and an agent registered here, run through train_student_rl.py's training path
# ---------------------------------------------------------------------------------------------------------------
class MedianBand(Strategy):
    """The M = ceil(f N) samples whose difficulty is nearest the median difficulty (the target is ignored)."""

    def choose(self, pool, m, rng, tie_break):
        return np.lexsort((tie_break, np.abs(pool.difficulty - np.median(pool.difficulty))))[:m]


class TryEachTarget:
    """Tries every target once, temperature step kept at the middle one, then repeats the target that earned the
    best reward; the action sizes come from env.action_space."""

    def __init__(self, nvec):
        self.nvec, self.rewards = [int(n) for n in nvec], []

    @classmethod
    def from_config(cls, cfg, env):
        return cls(env.action_space.nvec)

    def act(self, obs):
        untried = len(self.rewards)
        target = untried if untried < self.nvec[0] else int(np.argmax(self.rewards[: self.nvec[0]]))
        return np.asarray([target, self.nvec[1] // 2], dtype=np.int64)

    def observe(self, obs, action, reward, next_obs, done):
        self.rewards.append(float(reward))

    def state_dict(self):
        return {"rewards": list(self.rewards)}

    def load_state_dict(self, state):
        self.rewards = list(state["rewards"])


@pytest.fixture
def registered(monkeypatch):
    # a copy of the registry's entries, restored after the test, holds the test's strategy
    monkeypatch.setattr(STRATEGY_REGISTRY, "_entries", dict(STRATEGY_REGISTRY._entries))
    STRATEGY_REGISTRY.register("median_band", help="the samples nearest the median difficulty")(MedianBand)
    import agents
    agents.AGENT_REGISTRY.register("try_each_target", help="each target once, then the best")(TryEachTarget)
    yield
    agents.AGENT_REGISTRY.unregister("try_each_target")


RL_ARGS = [*TINY, "kd.alpha=0.5", "difficulty.warmup_epochs=1", "difficulty.refresh_every=1", "train.epochs=3",
           "curriculum.fraction=0.5"]


def test_registered_strategy_and_agent_pass_config_validation(registered):
    from common.config import load_config
    from engine.rl_config import RLConfig, validate_rl
    validate_rl(load_config(RLConfig, None, [*RL_ARGS, "curriculum.strategy=median_band", "agent.name=try_each_target"]))
    with pytest.raises(UserError, match="choose one of .*median_band"):
        validate_rl(load_config(RLConfig, None, [*RL_ARGS, "curriculum.strategy=median"]))
    with pytest.raises(UserError, match="choose one of .*try_each_target"):
        validate_rl(load_config(RLConfig, None, [*RL_ARGS, "agent.name=try_each"]))


def test_registered_strategy_and_agent_train_end_to_end(registered, tmp_path, monkeypatch):
    import train_student_rl
    monkeypatch.setenv("KD_TRACE_DIR", str(tmp_path / "trace"))
    train_student_rl.main([*RL_ARGS, "curriculum.strategy=median_band", "agent.name=try_each_target",
                           f"run.out_dir={tmp_path}", "run.name=r"])
    run = tmp_path / "r"
    lines = [json.loads(x) for x in (run / "curriculum.jsonl").read_text().splitlines()]
    assert [ln["action"] for ln in lines] == [[0, 1], [1, 1], [2, 1]]  # the agent's actions were applied
    assert [ln["target"] for ln in lines] == [0.0, 0.25, 0.5]
    assert [ln["num_samples"] for ln in lines] == [48, 24, 24]  # the whole set before the first refresh, then ceil(fN)
    assert [m["train/samples"] for m in read_metrics(run)] == [48, 24, 24]
    decisions = {d["epoch"]: d for d in map(json.loads, (tmp_path / "trace" / "decisions.rank0.jsonl").open())}
    for epoch in (1, 2):  # what trained: the samples nearest the median of that epoch's scores
        difficulty = np.load(run / "difficulty" / f"epoch_{epoch:03d}.npy").astype(np.float64)
        distance = np.abs(difficulty - np.median(difficulty))
        chosen = decisions[epoch]["selection"]
        assert len(set(chosen)) == math.ceil(0.5 * 48)
        assert distance[chosen].max() <= np.sort(distance)[len(chosen) - 1]
    ckpt = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["extra"]["agent"]["agent"] == {"rewards": [ln["reward"] for ln in lines]} and ckpt["extra"]["curriculum"]["refreshed_for"] == 2
