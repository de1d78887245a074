"""Every numeric config key declares its valid range once, beside its definition in the schema (common.config.opt), and a
value outside it, NaN or infinity fails with a message naming the key before anything is built or written: in all
three entry points, for the keys of every component (KD method, agent), selected or not. Most cases need only the
config loader; the cases listed in issue 16 also run each script's main in this process, with an empty
run.out_dir that must stay empty."""
from __future__ import annotations

import math

import pytest
from conftest import TINY, assert_clean_error, run_main

import common.config
from common.config import load_config
from common.errors import UserError
from engine.schema import Config
from engine.rl_schema import RLConfig
from gan_vae.continual import ContinualConfig

SCHEMAS = {"train_student": Config, "train_student_rl": RLConfig, "gan_vae": ContinualConfig}
GAN_VAE_TINY = ["data.tasks=[mnist]", "teacher.steps=2", "student.steps=2"]
ENTRY = {  # (script as run_main takes it, arguments before the bad value)
    "train_student": (("train_student.py",), TINY),
    "train_student_rl": (("train_student_rl.py",), [*TINY, "kd.alpha=0.5"]),
    "gan_vae": (("-m", "gan_vae.continual"), GAN_VAE_TINY),
}


def run_entry(entry: str, tmp_path, *args: str):
    script, base = ENTRY[entry]
    return run_main(*script, *base, *args, f"run.out_dir={tmp_path}", "run.name=r")


def leaves(schema):
    """(key, type name, default) of every leaf of a schema; for train_student_rl's, only the keys it adds to
    train_student's (the others are tested there)."""
    inherited = {key for key, *_ in common.config.iter_schema(Config)} if schema is RLConfig else set()
    return [(key, type_name, default) for key, type_name, default, _ in common.config.iter_schema(schema)
            if key not in inherited]


# ---------------------------------------------------------------------------------------------------------------
# The values issue 16 lists: each crashed late (often after the data, models and teacher cache were built), or
# trained something silently wrong. Now a clean error naming the key, and nothing written.
# ---------------------------------------------------------------------------------------------------------------
ISSUE_CASES = [
    ("train_student", "train.weight_decay=-1", "train.weight_decay=-1.0 must be >= 0"),
    ("train_student", "train.momentum=-0.5", "train.momentum=-0.5 must lie in [0, 1)"),
    ("train_student", "log.every_steps=0", "log.every_steps=0 must be >= 1"),
    ("train_student", "train.grad_clip=-1", "train.grad_clip=-1.0 must be >= 0"),
    ("train_student", "kd.dkd.warmup_epochs=nan", "kd.dkd.warmup_epochs=nan must be a finite number >= 0"),
    ("train_student", "kd.dist.temperature=inf", "kd.dist.temperature=inf must be a finite number > 0"),
    ("train_student", "kd.temperature=inf", "kd.temperature=inf must be a finite number > 0"),
    ("train_student_rl", "agent.ppo.n_steps=1", "agent.ppo.n_steps=1 must be >= 2"),
    ("train_student_rl", "agent.ppo.batch_size=1", "agent.ppo.batch_size=1 must be >= 2"),
    ("train_student_rl", "agent.bandit.prior_std=0", "agent.bandit.prior_std=0.0 must be > 0"),
    ("train_student_rl", "agent.bandit.reward_std=-1", "agent.bandit.reward_std=-1.0 must be > 0"),
    ("train_student_rl", "train.weight_decay=-1", "train.weight_decay=-1.0 must be >= 0"),
    ("gan_vae", "run.checkpoint_every=0", "run.checkpoint_every=0 must be >= 1"),
    ("gan_vae", "log.every_steps=0", "log.every_steps=0 must be >= 1"),
    ("gan_vae", "student.lr=-1", "student.lr=-1.0 must be > 0"),
    ("gan_vae", "teacher.batch_size=0", "teacher.batch_size=0 must be >= 1"),
]


@pytest.mark.parametrize("entry,override,message", ISSUE_CASES, ids=[f"{e}:{o}" for e, o, _ in ISSUE_CASES])
def test_issue_values_are_refused_before_anything_is_written(entry, override, message, tmp_path):
    assert_clean_error(run_entry(entry, tmp_path, override), message)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args,key", [
    (["agent.name=fixed", "agent.ppo.n_steps=1"], "agent.ppo.n_steps"),  # PPO's keys, another agent selected
    (["agent.name=ppo", "agent.bandit.prior_std=nan"], "agent.bandit.prior_std"),
    (["kd.method=kd", "kd.dkd.temperature=0"], "kd.dkd.temperature"),  # DKD's keys, another method selected
    (["kd.method=dkd", "kd.dist.beta=-1"], "kd.dist.beta"),
])
def test_keys_of_components_not_selected_are_checked_too(args, key):
    with pytest.raises(UserError, match=f"^{key}="):
        load_config(RLConfig, None, args)


# ---------------------------------------------------------------------------------------------------------------
# Generated from the schemas: every float key refuses NaN and +-infinity; every numeric key declares a range, and
# a value just outside it is refused with a message naming the key.
# ---------------------------------------------------------------------------------------------------------------
def _with(default, bad):
    """`bad` in place of the value of a key, or of the first number of a list key (as a command-line value)."""
    if isinstance(default, list):
        flat = default[0] if default and isinstance(default[0], list) else default
        rest = [str(x) for x in flat[1:]]
        inner = "[" + ",".join([bad, *rest]) + "]"
        return f"[{inner}]" if default and isinstance(default[0], list) else inner
    return bad


FLOAT_KEYS = [(name, key, default) for name, schema in SCHEMAS.items() for key, type_name, default in leaves(schema)
              if type_name in ("float", "list[float]")]


@pytest.mark.parametrize("name,key,default", FLOAT_KEYS, ids=[f"{n}:{k}" for n, k, _ in FLOAT_KEYS])
def test_every_float_key_refuses_nan_and_infinity(name, key, default):
    for bad in ("nan", "inf", "-inf"):
        with pytest.raises(UserError, match=f"^{key}=.*must .*finite number"):
            load_config(SCHEMAS[name], None, [f"{key}={_with(default, bad)}"])


NUMERIC = {"int", "float", "list[float]", "list[int]", "list[list[int]]"}


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_numeric_key_declares_a_range_and_its_default_lies_in_it(name):
    schema = SCHEMAS[name]
    ranges = common.config.schema_ranges(schema)
    numeric = [key for key, type_name, _, _ in common.config.iter_schema(schema) if type_name in NUMERIC]
    assert numeric and not [key for key in numeric if key not in ranges], "declare a range with opt(..., ge=...)"
    common.config.check_ranges(load_config(schema), schema)  # the defaults pass


def _outside(valid: common.config.Range, is_int: bool) -> list[str]:
    """Values just outside a Range, as command-line text."""
    step = 1 if is_int else 1e-3
    out = []
    if valid.ge is not None:
        out.append(valid.ge - step)
    if valid.gt is not None:
        out.append(valid.gt)
    if valid.le is not None:
        out.append(valid.le + step)
    if valid.lt is not None:
        out.append(valid.lt)
    return [str(int(v)) if is_int else repr(float(v)) for v in out]


BOUNDED = [(name, key, type_name, default) for name, schema in SCHEMAS.items()
           for key, type_name, default in leaves(schema)
           if key in common.config.schema_ranges(schema) and common.config.schema_ranges(schema)[key].choices is None]


@pytest.mark.parametrize("name,key,type_name,default", BOUNDED, ids=[f"{n}:{k}" for n, k, _, _ in BOUNDED])
def test_a_value_just_outside_a_declared_range_is_refused(name, key, type_name, default):
    valid = common.config.schema_ranges(SCHEMAS[name])[key]
    values = _outside(valid, "int" in type_name)
    assert values
    for bad in values:
        with pytest.raises(UserError) as err:
            load_config(SCHEMAS[name], None, [f"{key}={_with(default, bad)}"])
        assert str(err.value).startswith(f"{key}=") and valid.describe() in str(err.value)


def test_choices_and_registries():
    with pytest.raises(UserError, match="unknown train.optimizer 'rmsprop'; choose one of adam, adamw, sgd"):
        load_config(Config, None, ["train.optimizer=rmsprop"])
    with pytest.raises(UserError, match="data.channels=2 must be one of 1, 3"):
        load_config(ContinualConfig, None, ["data.channels=2"])
    assert load_config(Config, None, ["train.amp=off"]).train.amp == "off"  # YAML 1.1 reads a bare off as false


def test_a_kd_method_registered_later_is_a_valid_choice():
    import kd_methods
    with pytest.raises(UserError, match="unknown kd.method 'mine'; choose one of kd, dkd, dist, pooled_hint, fitnet .*run.plugins"):
        load_config(Config, None, ["kd.method=mine"])

    class Mine(kd_methods.KD):
        """Hinton's KD under another name"""

    kd_methods.KD_METHODS.register("mine")(Mine)
    try:
        assert load_config(Config, None, ["kd.method=mine"]).kd.method == "mine"
        assert "mine: Hinton's KD under another name" in common.config.config_help(Config, "p", "")
    finally:
        kd_methods.KD_METHODS.unregister("mine")
    with pytest.raises(UserError, match="unknown kd.method 'mine'"):
        load_config(Config, None, ["kd.method=mine"])


def test_a_config_changed_in_code_is_checked_by_validate():
    from engine import schema as engine_config
    cfg = load_config(Config)
    cfg.train.weight_decay = float("nan")
    with pytest.raises(UserError, match="train.weight_decay=nan"):
        engine_config.validate(cfg)


# ---------------------------------------------------------------------------------------------------------------
# Checks that involve several keys stay in validate (and the components' validate hooks)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry,args,message", [
    ("train_student", ["train.optimizer=sgd", "train.momentum=0"], "needs train.momentum > 0"),
    ("train_student", ["train.lr=0.001", "train.min_lr=0.01"], "train.min_lr=0.01 is above train.lr=0.001"),
    ("train_student_rl", ["agent.ppo.n_steps=4", "agent.ppo.batch_size=8"], "agent.ppo.batch_size=8 is larger"),
    ("gan_vae", ["data.tasks=[mnist,fashion_mnist,mnist:invert]", "student.batch_size=2"],
     "student.batch_size=2 is split in equal shares over the tasks, 3"),
    ("gan_vae", ["kd.weight_floor=0.9", "kd.weight_ceiling=0.5"], "kd.weight_floor=0.9 is above"),
])
def test_cross_key_checks(entry, args, message, tmp_path):
    assert_clean_error(run_entry(entry, tmp_path, *args), message)
    assert not any(tmp_path.iterdir())


def test_dist_refuses_logit_standardize(tmp_path):
    proc = run_entry("train_student", tmp_path, "kd.method=dist", "kd.logit_standardize=true")
    assert_clean_error(proc, "kd.logit_standardize=true is not read by kd.method=dist",
                       "kd.method=dist reads its own kd.dist.* (beta, gamma, temperature, ce_weight)",
                       "kd, dkd, pooled_hint read it")
    assert not any(tmp_path.iterdir())
    from engine import schema as engine_config
    for method in ("kd", "dkd", "pooled_hint"):  # applied there
        engine_config.validate(load_config(Config, None, [f"kd.method={method}", "kd.logit_standardize=true"]))


# ---------------------------------------------------------------------------------------------------------------
# A value given to a whole section
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,fragments", [
    ("kd=3", ["'kd' is a section of the config, not a key", "kd.method=kd", "`kd: {method: kd}`"]),
    ("train=x", ["'train' is a section", "train.epochs=2"]),  # TINY sets train.epochs=2
    ("kd.dkd=[1]", ["'kd.dkd' is a section", "kd.dkd.alpha=1.0", "`kd: {dkd: {alpha: 1.0}}`"]),
    ("kd.temperature={a: 1}", ["'kd.temperature' is a key, not a section", "kd.temperature=4.0"]),
])
def test_a_value_given_to_a_section(override, fragments, tmp_path):
    proc = run_entry("train_student", tmp_path, override)
    assert_clean_error(proc, f"(override '{override}')", *fragments)
    assert "'?'" not in proc.stderr


def test_a_value_given_to_a_section_in_a_yaml_file(tmp_path):
    (tmp_path / "c.yaml").write_text("kd: 3\n")
    with pytest.raises(UserError, match="'kd' is a section of the config, not a key.*kd.method=kd") as err:
        load_config(Config, str(tmp_path / "c.yaml"))
    assert str(tmp_path / "c.yaml") in str(err.value)
    (tmp_path / "g.yaml").write_text("student: 64\n")
    with pytest.raises(UserError, match="'student' is a section .* student.z_dim=16"):
        load_config(ContinualConfig, str(tmp_path / "g.yaml"))


# ---------------------------------------------------------------------------------------------------------------
# The ranges are documented where the keys are
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry,lines", [
    ("train_student", ["kd.temperature (float, > 0) = 4.0", "kd.alpha (float, in [0, 1]) = 0.0",
                       "train.grad_clip (float, >= 0) = 0.0", "kd.method (str, one of kd, dkd, dist, pooled_hint, fitnet)"]),
    ("train_student_rl", ["agent.ppo.n_steps (int, >= 2) = 5", "agent.bandit.prior_std (float, > 0) = 10.0"]),
    ("gan_vae", ["run.checkpoint_every (int, >= 1) = 500", "teacher.batch_size (int, >= 1) = 64",
                 "student.lr (float, > 0) = 0.001"]),
])
def test_help_shows_every_range(entry, lines):
    script, _ = ENTRY[entry]
    proc = run_main(*script, "--help")
    assert proc.returncode == 0
    for line in lines:
        assert f"  {line}" in proc.stdout, line
    assert "never NaN or infinite" in proc.stdout
    ranges = common.config.schema_ranges(SCHEMAS[entry])
    for key, valid in ranges.items():
        assert f"  {key} (" in proc.stdout and valid.describe() in proc.stdout


def test_range_describe():
    assert common.config.Range(gt=0).describe() == "> 0"
    assert common.config.Range(ge=0, lt=1).describe() == "in [0, 1)"
    assert common.config.Range(gt=0, le=1).describe() == "in (0, 1]"
    assert common.config.Range(choices={"a": 1, "b": 2}).describe() == "one of a, b"
    assert not common.config.Range(ge=0).contains(math.nan) and not common.config.Range().contains(math.inf)
    assert common.config.Range(ge=0, allow_inf=True).contains(math.inf)
