"""Registries of curriculum strategies and agents: a new entry registered from this file alone runs end to end
through train_student_rl.py; the built-in entries select exactly what they selected before the registries; the
environment needs only its small interface (rl_curriculum_env.CurriculumTraining); and the contract test over every
entry of the six registries, built-in or an example plugin (at the end)."""
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, assert_clean_error, read_metrics, run_main
from omegaconf import OmegaConf
from test_gan_vae import _args as gan_vae_args
from test_gan_vae import domains  # noqa: F401 - a fixture

from common.errors import UserError
from curriculum_dataloader import STRATEGY_REGISTRY, CurriculumSampler, Strategy
from gan_vae.continual import ContinualConfig


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
    from engine.rl_schema import RLConfig, validate_rl
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


# ---------------------------------------------------------------------------------------------------------------
# The contract of every registry entry (issue 24, item 7), parametrised from the registries themselves: the built-in
# entries and those of the example plugins (examples/plugins/*.py, collected by importing each file once, then taken
# out again). A new entry, in the repository or in examples/plugins/, gets every check below by being registered.
#   every entry:  each ranged key of its section refused out of its range (load_config, as the scripts load it);
#                 `--help` lists its keys and its name with its help; a KD method's undeclared teacher mode
#                 (teacher.mode=cached where can_cache is false) refused with exit 2 before any run directory.
#   runs:         a 2-epoch run, and the same run killed after its first epoch's checkpoint and resumed, with the
#                 same metrics lines and weights (`_run_and_resume`). KD methods: one run set per method in its first
#                 declared teacher mode (cached when it can be), plus a 1-epoch run in the other declared mode.
#                 Agents, strategies and difficulty scores: train_student_rl.py run sets that combine one entry of
#                 each kind (cycled, so every entry is in one). gan_vae losses (all active in every run) and
#                 expansion rules: one run set per rule other than the default (whose run and SIGKILL resume
#                 test_gan_vae.py has), with every loss, killed at its first mid-phase checkpoint.
# ---------------------------------------------------------------------------------------------------------------


def _kinds() -> dict:
    """kind -> (registry, program run_main takes, its config schema)."""
    import agents
    import kd_methods
    import models
    from engine.schema import Config
    from engine.rl_schema import RLConfig
    from gan_vae.continual import ContinualConfig
    from gan_vae.experts import EXPANSION_RULES
    from gan_vae.losses import STUDENT_LOSSES
    return {"kd_method": (kd_methods.KD_METHODS, ("train_student.py",), Config),
            "agent": (agents.AGENT_REGISTRY, ("train_student_rl.py",), RLConfig),
            "strategy": (STRATEGY_REGISTRY, ("train_student_rl.py",), RLConfig),
            "difficulty_score": (models.DIFFICULTY_SCORES, ("train_student_rl.py",), RLConfig),
            "gan_vae_loss": (STUDENT_LOSSES, ("-m", "gan_vae.continual"), ContinualConfig),
            "expansion_rule": (EXPANSION_RULES, ("-m", "gan_vae.continual"), ContinualConfig)}


def _collect_entries() -> list[tuple[str, str, str | None]]:
    """(kind, name, the example plugin's path or None) of every entry: built-ins, then each example plugin's,
    found by importing the file and seeing what it registers (taken out again, with the record of loaded plugins)."""
    from common import plugins
    kinds = _kinds()
    found = [(kind, name, None) for kind, (registry, *_) in kinds.items() for name in registry]
    loaded = dict(plugins._loaded)
    for path in sorted((ROOT / "examples" / "plugins").glob("*.py")):
        before = {kind: set(registry) for kind, (registry, *_) in kinds.items()}
        plugins.load([str(path)])
        for kind, (registry, *_) in kinds.items():
            for name in [n for n in registry if n not in before[kind]]:
                found.append((kind, name, str(path)))
                registry.unregister(name)
    plugins._loaded.clear()
    plugins._loaded.update(loaded)
    return found


ENTRIES = _collect_entries()
ENTRY_IDS = [f"{kind}-{name}" for kind, name, _ in ENTRIES]


@pytest.fixture
def restored_registries():
    """Whatever a run's plugins register is taken out again afterwards (plugins outlive a run in one process)."""
    from common import plugins
    kinds = _kinds()
    before = {kind: dict(registry._entries) for kind, (registry, *_) in kinds.items()}
    loaded = dict(plugins._loaded)
    yield
    for kind, (registry, *_) in kinds.items():
        registry._entries.clear()
        registry._entries.update(before[kind])
    plugins._loaded.clear()
    plugins._loaded.update(loaded)


def _plugin_args(*paths) -> list[str]:
    paths = sorted({p for p in paths if p})
    return [f"run.plugins=[{','.join(paths)}]"] if paths else []


def _entry_keys(kind: str, name: str) -> list[tuple[str, object]]:
    """(key, Range or None) of the entry's own keys: its section, and a gan_vae loss's weight key."""
    from common.config import iter_schema, schema_ranges
    from common.registry import compose_schema
    from gan_vae.losses import weight_key
    registry, _, schema = _kinds()[kind]
    composed = compose_schema(schema)
    ranges = schema_ranges(composed)
    keys = [key for key, *_ in iter_schema(composed) if key.startswith(f"{registry.sections}.{name}.")]
    if kind == "gan_vae_loss" and weight_key(registry.entry(name)) and weight_key(registry.entry(name)) not in keys:
        keys.append(weight_key(registry.entry(name)))
    return [(key, ranges.get(key)) for key in keys]


def _out_of_range(valid, current):
    """A value outside the Range `valid`, as a command-line string (a list key gets a one-item list)."""
    if valid.choices is not None:
        return "no_such_choice"
    as_int = isinstance(current, int) or (isinstance(current, list) and current and isinstance(current[0], int))
    for bound, delta in ((valid.ge, -1), (valid.gt, 0), (valid.le, 1), (valid.lt, 0)):
        if bound is not None:
            bad = bound + delta
            bad = int(bad) if as_int else float(bad)
            return f"[{bad}]" if isinstance(current, list) else str(bad)
    return None


@pytest.mark.parametrize("kind,name,plugin", ENTRIES, ids=ENTRY_IDS)
def test_every_entry_checks_its_ranges_and_is_listed_by_help(kind, name, plugin, restored_registries):
    from common.config import iter_schema, load_config
    from common.registry import compose_schema
    registry, program, schema = _kinds()[kind]
    extra = _plugin_args(plugin)
    cfg = load_config(schema, None, extra)
    assert name in registry
    for key, valid in _entry_keys(kind, name):
        current = OmegaConf.select(cfg, key)
        current = OmegaConf.to_object(current) if OmegaConf.is_config(current) else current
        bad = _out_of_range(valid, current) if valid else None
        if bad is None:  # a key without a range (a flag, a free string): nothing to refuse
            continue
        with pytest.raises(UserError, match=key.replace(".", r"\.")):
            load_config(schema, None, [*extra, f"{key}={bad}"])
    listed = run_main(*program, *extra, "--help")
    assert listed.returncode == 0, listed.stderr[-2000:]
    for key, _ in _entry_keys(kind, name):
        assert f"\n  {key} (" in listed.stdout, key
    if registry.key in {key for key, *_ in iter_schema(compose_schema(schema))}:
        assert f"{name}: {registry.entry(name).help}" in listed.stdout  # among the selector's choices


def _teacher_modes(name: str, cfg) -> tuple[str, ...]:
    """The teacher modes a KD method declares: online always, cached when the cache can hold its teacher outputs."""
    import kd_methods
    return ("cached", "online") if kd_methods.KD_METHODS[name].can_cache(cfg) else ("online",)


KD_ENTRIES = [(name, plugin) for kind, name, plugin in ENTRIES if kind == "kd_method"]


@pytest.mark.parametrize("name,plugin", KD_ENTRIES, ids=[n for n, _ in KD_ENTRIES])
def test_every_kd_method_refuses_the_teacher_modes_it_does_not_declare(name, plugin, tmp_path, restored_registries):
    from common.config import load_config
    from engine.schema import Config
    extra = [*TINY, *_plugin_args(plugin), f"kd.method={name}"]
    declared = _teacher_modes(name, load_config(Config, None, extra))
    for mode in {"online", "cached"} - set(declared):
        proc = run_main("train_student.py", *extra, f"teacher.mode={mode}", f"run.out_dir={tmp_path / 'runs'}")
        assert_clean_error(proc, f"kd.method={name} cannot use teacher.mode={mode}")
        assert not (tmp_path / "runs").exists()


# The smallest run that still trains: 16 training images in 2 steps of 8, 1 validation and test image per class.
CONTRACT_RUN = [*TINY, "data.synthetic.images_per_class=4", "train.epochs=2"]


def _same_run(full: Path, resumed: Path) -> None:
    a, b = read_metrics(full), read_metrics(resumed)
    strip = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in (*a, *b)]
    assert len(a) == len(b) and strip[:len(a)] == strip[len(a):]
    wa, wb = (torch.load(d / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]
              for d in (full, resumed))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _run_and_resume(script: str, argv: list[str], out: Path) -> None:
    """The uninterrupted run (out/full), and the same run killed after its first epoch's checkpoint, then resumed
    (out/killed): the same metrics lines and weights. The killed run costs no run of its own: its directory is the
    full run's copied right after epoch 1's checkpoint, what a kill there leaves on disk (the run lock is an
    flock, which a copy does not hold)."""
    from engine.trainer import Trainer
    finish_epoch = Trainer.finish_epoch

    def finish_then_copy(self, epoch, *args, **kwargs):
        finish_epoch(self, epoch, *args, **kwargs)
        if epoch == 0:
            shutil.copytree(self.run_dir, out / "killed")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "finish_epoch", finish_then_copy)
        full = run_main(script, *argv, f"run.out_dir={out}", "run.name=full")
    assert full.returncode == 0, full.stderr[-3000:]
    assert len(read_metrics(out / "killed")) == 1 and not (out / "killed" / "results.json").exists()
    resumed = run_main(script, *argv, f"run.out_dir={out}", "run.name=killed", "run.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at epoch 1" in resumed.stdout
    _same_run(out / "full", out / "killed")


def _in_mode(argv: list[str], mode: str) -> list[str]:
    """`argv` with teacher.mode=`mode`; online without TINY's teacher.cache_views (unread there, so refused)."""
    return [*(a for a in argv if mode != "online" or not a.startswith("teacher.cache_views=")), f"teacher.mode={mode}"]


@pytest.mark.parametrize("name,plugin", KD_ENTRIES, ids=[n for n, _ in KD_ENTRIES])
def test_every_kd_method_runs_in_its_teacher_modes_and_resumes_exactly(name, plugin, tmp_path, restored_registries):
    from common.config import load_config
    from engine.schema import Config
    argv = [*CONTRACT_RUN, *_plugin_args(plugin), f"kd.method={name}"]
    first, *others = _teacher_modes(name, load_config(Config, None, argv))
    _run_and_resume("train_student.py", _in_mode(argv, first), tmp_path / first)
    for mode in others:  # one epoch in each other declared mode
        proc = run_main("train_student.py", *_in_mode(argv, mode), "train.epochs=1",
                        f"run.out_dir={tmp_path / mode}", "run.name=r")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert len(read_metrics(tmp_path / mode / "r")) == 1


def _rl_run_sets() -> list[tuple[tuple[str, str | None], ...]]:
    """Agents, strategies and difficulty scores cycled together: run set i takes entry i (mod its count) of each."""
    kinds = [[(n, p) for k, n, p in ENTRIES if k == kind] for kind in ("agent", "strategy", "difficulty_score")]
    count = max(len(entries) for entries in kinds)
    return [tuple(entries[i % len(entries)] for entries in kinds) for i in range(count)]


RL_SETS = _rl_run_sets()


@pytest.mark.parametrize("agent,strategy,score", RL_SETS, ids=["-".join(n for n, _ in s) for s in RL_SETS])
def test_every_agent_strategy_and_difficulty_score_runs_and_resumes_exactly(agent, strategy, score, tmp_path,
                                                                            restored_registries):
    argv = [*CONTRACT_RUN, "kd.alpha=0.5", "difficulty.warmup_epochs=1", "difficulty.refresh_every=1",
            *_plugin_args(agent[1], strategy[1], score[1]), f"agent.name={agent[0]}",
            f"curriculum.strategy={strategy[0]}", f"difficulty.score={score[0]}",
            *(["agent.ppo.n_steps=2", "agent.ppo.batch_size=2"] if agent[0] == "ppo" else [])]  # PPO updates once
    _run_and_resume("train_student_rl.py", argv, tmp_path / "runs")
    assert len(list((tmp_path / "runs" / "killed" / "difficulty").glob("epoch_*.npy"))) == 1  # epoch 2 refreshed


# the default rule (fid_threshold) runs, is SIGKILLed and resumes exactly in test_gan_vae.py
# (test_repeated_domain_reuses_expert_and_new_domain_adds_one); every other rule gets a run set here
GAN_VAE_RULES = [(name, plugin) for kind, name, plugin in ENTRIES if kind == "expansion_rule"
                 and name != ContinualConfig().teacher.expansion]
GAN_VAE_LOSS_PLUGINS = sorted({plugin for kind, _, plugin in ENTRIES if kind == "gan_vae_loss" and plugin})


@pytest.mark.parametrize("rule,plugin", GAN_VAE_RULES, ids=[n for n, _ in GAN_VAE_RULES])
def test_every_expansion_rule_and_gan_vae_loss_runs_and_resumes_exactly(rule, plugin, domains, tmp_path,  # noqa: F811
                                                                        restored_registries):
    from gan_vae.continual import ContinualRun
    out = tmp_path / "runs"
    argv = [*gan_vae_args(domains, out, ["discs", "crosses"]), "teacher.steps=4", "student.steps=4",
            "run.checkpoint_every=2", "log.every_steps=1", "log.sample_every=4", "fid.samples=24",
            "fid.classifier_epochs=1", *_plugin_args(plugin, *GAN_VAE_LOSS_PLUGINS), f"teacher.expansion={rule}"]
    save = ContinualRun.save

    def save_then_copy(self, name):  # the first mid-phase checkpoint: the run as a kill right after it leaves it
        save(self, name)
        if name == "last.pt" and not (out / "killed").exists():
            shutil.copytree(self.run_dir, out / "killed")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ContinualRun, "save", save_then_copy)
        full = run_main("-m", "gan_vae.continual", *argv, "run.name=full")
    assert full.returncode == 0, full.stderr[-3000:]
    resumed = run_main("-m", "gan_vae.continual", *argv, "run.name=killed", "run.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a, b = (json.loads((out / d / "results.json").read_text()) for d in ("full", "killed"))
    assert {k: v for k, v in a.items() if "time" not in k} == {k: v for k, v in b.items() if "time" not in k}
    strip = [[{k: v for k, v in r.items() if "time" not in k} for r in read_metrics(out / d)] for d in ("full", "killed")]
    assert strip[0] == strip[1]
    logged = {k for r in strip[0] for k in r}
    from gan_vae.losses import STUDENT_LOSSES
    assert {f"student/{n}" for n in STUDENT_LOSSES} & logged  # the terms were logged
