"""The configuration of train_student_rl.py: train_student.py's schema (engine.schema.Config) plus the curriculum,
difficulty and agent sections, and `validate_rl`, the checks that involve several keys. An agent's, a strategy's or
a difficulty score's own keys live beside its code (agents.AGENT_REGISTRY, curriculum_dataloader.STRATEGY_REGISTRY,
models.DIFFICULTY_SCORES)."""
from __future__ import annotations

from dataclasses import dataclass

import kd_methods
from agents import AGENT_REGISTRY, AgentConfig
from common.config import opt, section
from common.errors import check
from common.registry import holds_sections_of
from curriculum_dataloader import STRATEGIES, STRATEGY_REGISTRY
from engine.schema import Config, validate
from models import DIFFICULTY_SCORES
from rl_curriculum_env import ACTION_NVEC


@holds_sections_of(STRATEGY_REGISTRY)
@dataclass
class CurriculumConfig:
    strategy: str = opt("adaptive", f"which samples an epoch uses: {', '.join(STRATEGIES)}",
                        choices=STRATEGY_REGISTRY)
    fraction: float = opt(0.7, "f: share of the training set per epoch (random_subset, adaptive, mixed)", gt=0, le=1)
    target: float = opt(0.5, "target difficulty before the agent's first action", ge=0, le=1)
    start_fraction: float = opt(0.4, "easy_to_hard / hard_to_easy: share of the set at epoch 0", gt=0, le=1)
    pacing_epochs: int = opt(10, "easy_to_hard / hard_to_easy: epochs until the whole set is used (0: from the start)",
                             ge=0)


@holds_sections_of(DIFFICULTY_SCORES)  # a score's own keys: difficulty.<score>.* (models.DIFFICULTY_SCORES)
@dataclass
class DifficultyConfig:
    score: str = opt("confidence_entropy_kl", "how each training image's difficulty is scored from the teacher's "
                                              "and the student's logits (models.DIFFICULTY_SCORES, or one a "
                                              "run.plugins file registers)", choices=DIFFICULTY_SCORES)
    refresh_every: int = opt(5, "recompute the difficulty scores every this many epochs", ge=1)
    warmup_epochs: int = opt(5, "first refresh before this epoch; until then the curriculum uses the whole set", ge=0)


@dataclass
class RLConfig(Config):
    curriculum: CurriculumConfig = section(CurriculumConfig)
    difficulty: DifficultyConfig = section(DifficultyConfig)
    agent: AgentConfig = section(AgentConfig)


def validate_rl(cfg) -> None:
    """Whether the strategy has the cached teacher it needs, engine.schema.validate, then the curriculum's checks
    that involve several keys and those of the selected agent, strategy and difficulty score (their `validate(cfg)`
    hooks, when they have one). Each key's own range is declared with it."""
    c = cfg.curriculum
    # the strategy's need of a cached teacher first: without one, the teacher.* keys are unread, and validate would
    # name those rather than the strategy that needs them read
    if STRATEGY_REGISTRY[c.strategy].needs_difficulty:
        check(kd_methods.uses_teacher(cfg), f"curriculum.strategy={c.strategy} ranks samples by difficulty, "
              "which needs a teacher: set kd.alpha < 1 (or a KD method other than label-only kd), or use strategy "
              "all or random_subset")
        check(cfg.teacher.mode == "cached",
              f"curriculum.strategy={c.strategy} scores difficulty from the teacher's cached evaluation-view logits "
              "of the training set, which teacher.mode=online does not build. Use teacher.mode=cached (the "
              "default: it also makes every epoch as cheap as label-only training)")
    validate(cfg)
    check(not cfg.kd.baseline, "kd.baseline=true: train_student_rl.py trains no label-only baseline beside its run "
                               "(train_student.py does); set kd.baseline=false and run the baseline as its own "
                               "run (kd.alpha=1, or an agent.name=fixed control)")
    for component in (AGENT_REGISTRY[cfg.agent.name], STRATEGY_REGISTRY[c.strategy]):
        if hasattr(component, "validate"):
            component.validate(cfg)
    DIFFICULTY_SCORES.validate(cfg, cfg.difficulty.score)
    for a in cfg.agent.fixed_actions:
        check(len(a) == len(ACTION_NVEC) and all(0 <= x < n for x, n in zip(a, ACTION_NVEC)),
              f"agent.fixed_actions entry {list(a)}: need [target index 0-{ACTION_NVEC[0] - 1}, temperature step "
              f"0-{ACTION_NVEC[1] - 1}]")
    check(len(cfg.agent.fixed_actions) >= 1, "agent.fixed_actions needs at least one action")
    if not (kd_methods.uses_teacher(cfg) and cfg.teacher.mode == "cached"):
        changed = [f"difficulty.{k}={getattr(cfg.difficulty, k)}" for k in DifficultyConfig.__dataclass_fields__
                   if getattr(cfg.difficulty, k) != getattr(DifficultyConfig(), k)]
        check(not changed, f"{', '.join(changed)}: the difficulty scores come from the cached teacher's logits, "
                           "which this run does not build (no teacher, or teacher.mode=online), so they would "
                           "change nothing; leave difficulty.* at its defaults")
    check_actions_are_read(cfg)


def check_actions_are_read(cfg) -> None:
    """The agent's action is a target difficulty, which only a strategy that selects by it reads
    (Strategy.reads_target: adaptive, mixed), and a temperature step, which only a method whose loss has a
    temperature reads (KDMethod.uses_temperature: not labels only, not fitnet). Refused, as a key that would change
    nothing is: agent.fixed_actions (and curriculum.target) away from their defaults in a part nothing reads, and an
    agent that chooses actions of which no part is read. An agent that chooses both where only the target is read
    trains at the method's own temperature (engine.curriculum_run keeps it)."""
    strategy, agent = cfg.curriculum.strategy, cfg.agent.name
    reads_target = STRATEGY_REGISTRY[strategy].reads_target
    reads_temperature = kd_methods.uses_temperature(cfg)
    no_target = f"curriculum.strategy={strategy} does not select by a target difficulty"
    no_temperature = (f"kd.method={cfg.kd.method} ({kd_methods.loss_label(cfg)}) has no temperature"
                      if kd_methods.uses_teacher(cfg) else "this run trains on labels only, with no temperature")
    check(reads_target or cfg.curriculum.target == CurriculumConfig.target,
          f"curriculum.target={cfg.curriculum.target} is not read: {no_target} (adaptive and mixed do), so it would "
          f"change nothing; leave it at its default {CurriculumConfig.target}")
    if agent == "fixed":
        default_target, kept = AgentConfig().fixed_actions[0]
        for a in cfg.agent.fixed_actions:
            check(reads_target or a[0] == default_target,
                  f"agent.fixed_actions entry {list(a)} sets target index {a[0]}, but {no_target}, so it would "
                  f"change nothing; use target index {default_target} (the default), or strategy adaptive or mixed")
            check(reads_temperature or a[1] == kept,
                  f"agent.fixed_actions entry {list(a)} sets temperature step {a[1]}, but {no_temperature}, so it "
                  f"would change nothing; use temperature step {kept} (T kept)")
        return
    check(reads_target or reads_temperature,
          f"agent.name={agent} chooses a target difficulty and a temperature every epoch, but {no_target} and "
          f"{no_temperature}, so its actions would change nothing. Use agent.name=fixed (a control), strategy "
          "adaptive or mixed, or a KD method with a temperature")
