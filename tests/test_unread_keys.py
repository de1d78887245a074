"""Keys a component does not read are refused, not ignored (common.config.check_unread_keys): each registry entry
(KD method, agent, curriculum strategy) declares the shared keys it reads (`reads`); the others, and other entries'
sections, set away from their defaults are refused before any work. A loss whose weights are all 0 is refused. A
resume compares only what the run reads, and names a value that was a default before it changed. Each method labels
its own loss."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import yaml
from omegaconf import OmegaConf
from conftest import TINY, TINY_LABEL_ONLY, TINY_LOCAL_TEACHER, TINY_ONLINE, assert_clean_error, read_metrics, run_main
from test_bad_input import _copy_run

import kd_methods
from agents import AGENT_REGISTRY
from common.checkpoint import load_checkpoint, save_checkpoint
from common.config import check_resume_config, check_unread_keys, iter_schema, load_config
from common.errors import UserError
from curriculum_dataloader import STRATEGY_REGISTRY
from engine.schema import Config, validate
from engine.rl_schema import RLConfig, validate_rl

REGISTRIES = [(kd_methods.KD_METHODS, Config), (AGENT_REGISTRY, RLConfig), (STRATEGY_REGISTRY, RLConfig)]


def _defaults(schema) -> dict:
    return {key: default for key, _, default, _ in iter_schema(schema)}


def _other(value):
    """A valid value other than a key's default."""
    if isinstance(value, bool):
        return not value
    if value is None:
        return 0.5
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value > 0 else 0.5
    if isinstance(value, list):
        return [[1, 1]]
    raise AssertionError(value)


def _cases():
    for registry, schema in REGISTRIES:
        for name in list(registry):
            yield pytest.param(registry, schema, name, id=f"{registry.key}={name}")


@pytest.mark.parametrize("registry,schema,name", list(_cases()))
def test_every_entry_refuses_the_keys_it_does_not_read(registry, schema, name):
    """Over every registered entry: a shared key it does not declare, or a key of another entry's section, set away
    from its default, is refused naming the key, the entry and the entry's own keys; the shared keys it reads, and
    its own section, are accepted."""
    cfg = load_config(schema, None, [f"{registry.key}={name}"])
    defaults = _defaults(OmegaConf.get_type(cfg))
    reads = registry.reads(cfg, name)
    prefix = f"{registry.sections}."
    for key, default in defaults.items():
        owner = key.removeprefix(prefix).split(".")[0]
        in_section = key.startswith(prefix) and "." in key.removeprefix(prefix) and owner in registry
        if key not in registry.shared and not in_section:
            continue
        changed = copy.deepcopy(cfg)  # the check load_config makes, on the loaded config with one key changed
        OmegaConf.update(changed, key, _other(default))
        if key in reads or (in_section and owner == name):
            check_unread_keys(changed)  # read: accepted
            continue
        with pytest.raises(UserError) as err:
            check_unread_keys(changed)
        message = str(err.value)
        assert f"{key}=" in message and f"is not read by {registry.key}={name}" in message, message
        if registry.entry(name).config is not None:
            assert f"its own {registry.sections}.{name}.* (" in message, message
        if in_section:
            assert f"it is a key of {registry.key}={owner}" in message, message


def test_dkd_with_kd_alpha_1_is_refused_before_any_work(tmp_path):
    """kd.alpha=1 means labels only for kd; dkd does not read it, and would build and distil a teacher."""
    proc = run_main("train_student.py", *TINY, "kd.method=dkd", "kd.alpha=1", f"run.out_dir={tmp_path}")
    assert_clean_error(proc, "kd.alpha=1.0 is not read by kd.method=dkd",
                       "kd.method=dkd reads kd.logit_standardize and its own kd.dkd.* (alpha, beta, temperature, "
                       "warmup_epochs, ce_weight)", "kd, pooled_hint read it")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args,fragment", [
    (["kd.method=dkd", "kd.ce_weight=0.1", "kd.kd_weight=9"], "kd.ce_weight=0.1 is not read by kd.method=dkd"),
    (["kd.method=dist", "kd.temperature=2"], "kd.temperature=2.0 is not read by kd.method=dist"),
    (["kd.method=fitnet", "teacher.mode=online", "kd.alpha=0.5"], "kd.alpha=0.5 is not read by kd.method=fitnet"),
    (["kd.method=dkd", "kd.dist.beta=1"], "kd.dist.beta=1.0 is not read by kd.method=dkd"),
    (["kd.dkd.alpha=9"], "it is a key of kd.method=dkd"),
    (["kd.alpha=1", "kd.temperature=2"], "kd.temperature=2.0 is not read by kd.method=kd"),  # labels only: no KL
    (["kd.alpha=1", "kd.logit_standardize=true"], "kd.logit_standardize=true is not read by kd.method=kd"),
])
def test_unread_kd_keys_are_refused(args, fragment):
    with pytest.raises(UserError, match="so it would change nothing") as err:
        load_config(Config, None, [*TINY, *args])
    assert fragment in str(err.value)


@pytest.mark.parametrize("args,fragment", [
    (["agent.name=bandit", "agent.fixed_actions=[[1,1]]"], "agent.fixed_actions=[[1, 1]] is not read by agent.name=bandit"),
    (["agent.name=bandit", "agent.ppo.lr=0.1"], "it is a key of agent.name=ppo"),
    (["curriculum.strategy=easy_to_hard", "curriculum.fraction=0.5"],
     "curriculum.fraction=0.5 is not read by curriculum.strategy=easy_to_hard"),
    (["curriculum.strategy=adaptive", "curriculum.pacing_epochs=3"],
     "curriculum.pacing_epochs=3 is not read by curriculum.strategy=adaptive"),
    (["curriculum.strategy=all", "curriculum.fraction=0.5"], "curriculum.fraction=0.5 is not read by "
                                                               "curriculum.strategy=all"),
])
def test_unread_agent_and_strategy_keys_are_refused(args, fragment):
    with pytest.raises(UserError) as err:
        load_config(RLConfig, None, [*TINY, "kd.alpha=0.5", *args])
    assert fragment in str(err.value)


# ---- all loss weights 0 ---------------------------------------------------------------------------------------
ZERO = {
    "kd": ["kd.ce_weight=0", "kd.kd_weight=0"],
    "pooled_hint": ["kd.ce_weight=0", "kd.kd_weight=0", "kd.pooled_hint.weight=0"],
    "dkd": ["kd.dkd.ce_weight=0", "kd.dkd.alpha=0", "kd.dkd.beta=0"],
    "dist": ["kd.dist.ce_weight=0", "kd.dist.beta=0", "kd.dist.gamma=0"],
    "fitnet": ["teacher.mode=online", "kd.fitnet.ce_weight=0", "kd.fitnet.hint_weight=0"],
}


@pytest.mark.parametrize("method", list(kd_methods.KD_METHODS))
def test_every_method_declares_its_loss_weights_and_refuses_them_all_at_zero(method):
    cfg = load_config(Config, None, [f"kd.method={method}", *(["teacher.mode=online"] if method == "fitnet" else [])])
    weights = kd_methods.KD_METHODS[method].loss_weights(cfg)
    assert weights and any(w > 0 for w in weights.values())
    if method not in ZERO:
        return
    with pytest.raises(UserError, match=f"every loss weight of kd.method={method} is 0"):
        validate(load_config(Config, None, [f"kd.method={method}", *ZERO[method]]))
    # one weight above 0 is a run
    validate(load_config(Config, None, [f"kd.method={method}", *ZERO[method][:-1],
                                        ZERO[method][-1].replace("=0", "=1")]))


def test_all_weights_zero_is_refused_on_the_command_line(tmp_path):
    proc = run_main("train_student.py", *TINY, "kd.ce_weight=0", "kd.kd_weight=0", f"run.out_dir={tmp_path}")
    assert_clean_error(proc, "every loss weight of kd.method=kd is 0 (0 CE, labels only)", "would train nothing")
    assert not any(tmp_path.iterdir())


# ---- other keys a program does not read ------------------------------------------------------------------------
@pytest.mark.parametrize("schema,check,args,fragment", [
    (Config, validate, ["kd.alpha=1", "kd.baseline=true"], "kd.baseline=true trains a label-only student beside"),
    (RLConfig, validate_rl, ["kd.alpha=0.5", "kd.baseline=true", "agent.name=bandit"],
     "train_student_rl.py trains no label-only baseline"),
    (Config, validate, ["train.warmup_epochs=2"], "train.warmup_epochs=2.0 is not below train.epochs=2"),
    (RLConfig, validate_rl, ["kd.alpha=0.5", "agent.name=ppo", "agent.ppo.n_steps=3", "agent.ppo.batch_size=2"],
     "agent.ppo.n_steps=3 is more than train.epochs=2: PPO updates its policy once per rollout"),
    (Config, validate, ["data.name=timm/mini-imagenet"], "data.synthetic.num_classes, data.synthetic.images_per_class set, "
                                                         "but data.name=timm/mini-imagenet is not the generated"),
    (Config, validate, ["data.path=/data/x"], "data.path=/data/x is not read with data.name=synthetic"),
    (Config, validate, ["data.preprocess_size=64"], "data.preprocess_size=64 sizes the pre-decoded copy"),
    (Config, validate, ["train.momentum=0.5"], "train.momentum=0.5 is read by train.optimizer=sgd only"),
    (RLConfig, validate_rl, ["kd.alpha=1", "curriculum.strategy=all", "agent.name=bandit", "difficulty.refresh_every=2"],
     "difficulty.refresh_every=2: the difficulty scores come from the cached teacher's logits"),
])
def test_settings_that_would_do_nothing_are_refused(schema, check, args, fragment):
    base = TINY_LABEL_ONLY if "kd.alpha=1" in args else TINY  # labels only: without TINY's teacher.* keys
    with pytest.raises(UserError) as err:
        check(load_config(schema, None, [*base, *args]))
    assert fragment in str(err.value)


def test_ppo_rollout_as_long_as_the_run_is_accepted():
    validate_rl(load_config(RLConfig, None, [*TINY, "kd.alpha=0.5", "agent.ppo.n_steps=2", "agent.ppo.batch_size=2"]))
    validate(load_config(Config, None, [*TINY, "train.warmup_epochs=1.5"]))


def test_baseline_config_is_a_config_of_its_own(tmp_path):
    """kd.baseline's label-only run (train_student.baseline_config) keeps no key of the method it is compared
    with, nor of the teacher it does not build (TINY sets teacher.name, pretrained, cache_views): its config
    validates, so its config.yaml can be fed back in."""
    import train_student
    cfg = load_config(Config, None, [*TINY, "kd.method=dkd", "kd.dkd.alpha=9", "kd.logit_standardize=true",
                                     "kd.baseline=true", f"run.out_dir={tmp_path}", "run.name=x"])
    base = train_student.baseline_config(cfg)
    validate(base)
    assert base.kd.method == "kd" and base.kd.alpha == 1.0 and not kd_methods.uses_teacher(base)
    assert base.kd.dkd.alpha == 1.0 and not base.kd.logit_standardize
    assert OmegaConf.to_container(base.teacher) == OmegaConf.to_container(OmegaConf.structured(Config).teacher)
    OmegaConf.save(base, tmp_path / "config.yaml")
    validate(load_config(Config, str(tmp_path / "config.yaml"), None))


# ---- resume: what the run reads, and changed defaults -----------------------------------------------------------
def test_a_kd_run_saved_with_the_old_dist_defaults_resumes(stopped_runs, tmp_path):
    """A plain kd run saved when kd.dist.beta and gamma defaulted to 1 continues: DIST's section does not affect
    it (it was refused with "kd.dist.beta = 1.0 in the run, 2.0 now")."""
    run = _copy_run(stopped_runs, "ts", tmp_path)
    last = run / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last)
    ckpt["config"]["kd"]["dist"].update(beta=1.0, gamma=1.0)
    save_checkpoint(ckpt, last)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["kd"]["dist"].update(beta=1.0, gamma=1.0)
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    proc = run_main("train_student.py", *TINY_LABEL_ONLY, f"run.out_dir={tmp_path}", "run.name=ts",
                    "run.resume=auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["epoch"] for m in read_metrics(run)] == [0, 1]


def test_a_dist_run_with_the_old_default_is_refused_naming_it():
    """A dist run saved with beta = 1 (the default before it changed) is refused, and the message says so and how
    to continue it; a run saved before a key existed counts with the value the key's `before` records."""
    current = load_config(Config, None, ["kd.method=dist"])
    saved = load_config(Config, None, ["kd.method=dist", "kd.dist.beta=1"])
    from common.config import to_plain
    with pytest.raises(UserError) as err:
        check_resume_config(to_plain(saved), current, "last.pt")
    assert ("kd.dist.beta = 1.0 in the run (its default before it changed: resume with kd.dist.beta=1.0), "
            "2.0 now") in str(err.value)
    old = to_plain(saved)
    del old["kd"]["dist"]["gamma"]  # a run saved before the key existed ran with its `before` value, 1
    with pytest.raises(UserError) as err:
        check_resume_config(old, load_config(Config, None, ["kd.method=dist", "kd.dist.beta=1"]), "last.pt")
    assert "kd.dist.gamma = 1.0 in the run (saved before this key existed" in str(err.value)
    check_resume_config(old, load_config(Config, None, ["kd.method=dist", "kd.dist.beta=1", "kd.dist.gamma=1"]),
                        "last.pt")


def test_gan_vae_records_its_gained_key_with_the_same_mechanism():
    from gan_vae import continual
    fields = {f.name: f for f in dataclasses.fields(continual.StudentConfig)}
    assert fields["self_replay"].metadata["before"] == 0.0
    assert not hasattr(continual, "GAINED_KEYS")


# ---- each method labels its loss --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(kd_methods.KD_METHODS))
def test_every_method_labels_its_loss_with_its_weights(method):
    cfg = load_config(Config, None, [f"kd.method={method}", *(["teacher.mode=online"] if method == "fitnet" else [])])
    label = kd_methods.loss_label(cfg)
    assert "CE" in label
    if method == "fitnet":  # no temperature: nothing is T²-scaled
        assert label == "1 CE + 100 feature-map MSE"


def test_the_results_line_names_explicit_weights_not_kd_alpha(capsys):
    from engine.report import print_results
    cfg = load_config(Config, None, ["kd.ce_weight=0.1", "kd.kd_weight=9"])
    print_results("t", {"KD student": {"kd/method": "kd", "kd/loss": kd_methods.loss_label(cfg)}})
    out = capsys.readouterr().out
    assert "KD student: the student distilled from the teacher (kd.method=kd: 0.1 CE + 9 T² KL)" in out
    assert "kd.alpha" not in out


# ---- teacher.* keys that no code reads: without a teacher, and the cache's with an online teacher --------------
# One value away from its default for every teacher.* key (TINY sets teacher.name, pretrained and cache_views too).
TEACHER_KEYS = {"teacher.name": "resnet18", "teacher.pretrained": "false", "teacher.checkpoint": "t.safetensors",
                "teacher.mode": "online", "teacher.cache_views": "3", "teacher.cache_features": "false",
                "teacher.prepare": "configs/quickstart_teacher.yaml", "teacher.cache_dir": "shared_cache",
                "teacher.batch_size": "32"}
CACHE_KEYS = ("teacher.cache_views", "teacher.cache_features", "teacher.cache_dir", "teacher.batch_size")
NO_TEACHER = {"kd_alpha_1": ["kd.alpha=1"], "kd_weight_0": ["kd.ce_weight=1", "kd.kd_weight=0"]}


@pytest.mark.parametrize("script", ["train_student.py", "train_student_rl.py"])
@pytest.mark.parametrize("labels_only", sorted(NO_TEACHER))
@pytest.mark.parametrize("key", sorted(TEACHER_KEYS))
def test_a_teacher_key_without_a_teacher_is_refused(tmp_path, key, labels_only, script):
    """Labels only (kd.alpha=1, or a KD weight of 0): no teacher is built, so every teacher.* key is unread. It was
    accepted, recorded in config.yaml and ignored; now it is refused before any work, named, with the way out."""
    base = [a for a in TINY_LABEL_ONLY if a != "kd.alpha=1"] + NO_TEACHER[labels_only]
    if script == "train_student_rl.py":
        base += ["curriculum.strategy=random_subset", "agent.name=bandit"]
    out = tmp_path / "runs"
    proc = run_main(script, *base, f"{key}={TEACHER_KEYS[key]}", f"run.out_dir={out}")
    assert_clean_error(proc, f"{key}={TEACHER_KEYS[key]} set, but this run builds no teacher",
                       "so they would change nothing", "configs/quickstart_label_only.yaml")
    assert not out.exists()


@pytest.mark.parametrize("script", ["train_student.py", "train_student_rl.py"])
@pytest.mark.parametrize("key", CACHE_KEYS)
def test_a_cache_key_with_an_online_teacher_is_refused(tmp_path, key, script):
    """teacher.mode=online builds no teacher cache: the cache's keys are unread there, so they are refused."""
    base = [a for a in TINY if not a.startswith("teacher.cache_views=")] + ["kd.alpha=0.5", "teacher.mode=online"]
    if script == "train_student_rl.py":
        base += ["curriculum.strategy=random_subset", "agent.name=bandit"]
    out = tmp_path / "runs"
    proc = run_main(script, *base, f"{key}={TEACHER_KEYS[key]}", f"run.out_dir={out}")
    assert_clean_error(proc, f"{key}={TEACHER_KEYS[key]} set, but teacher.mode=online builds no teacher cache",
                       "use teacher.mode=cached")
    assert not out.exists()


def test_cache_features_without_a_feature_method_is_refused():
    """A cached teacher keeps features only for a method that reads them (pooled_hint): with kd the cache holds
    none either way, so teacher.cache_features=false would change nothing."""
    with pytest.raises(UserError, match="teacher.cache_features=false set, but kd.method=kd reads no teacher "
                                        "features"):
        validate(load_config(Config, None, [*TINY, "kd.alpha=0.5", "teacher.cache_features=false"]))


@pytest.mark.parametrize("key", sorted(set(TEACHER_KEYS) - {"teacher.cache_features"}))
def test_a_teacher_key_is_accepted_where_it_is_read(key):
    """The same values where they are read: with a teacher (kd.alpha=0.5), the cache's keys with a cached one,
    teacher.mode=online (TINY's cache key left out)."""
    base = {"teacher.mode": [a for a in TINY if not a.startswith("teacher.cache_views=")],
            "teacher.checkpoint": TINY_LOCAL_TEACHER}.get(key, TINY)
    args = [*base, "kd.alpha=0.5", f"{key}={TEACHER_KEYS[key]}"]
    validate(load_config(Config, None, args))
    validate_rl(load_config(RLConfig, None, [*args, "curriculum.strategy=random_subset", "agent.name=bandit"]))


@pytest.mark.parametrize("mode", ["cached", "online"])
def test_teacher_pretrained_with_a_teacher_checkpoint_is_refused(mode):
    """teacher.checkpoint gives the teacher's weights, so the hub's are never loaded (models.create_teacher):
    teacher.pretrained=false beside it changed nothing and was accepted; now it is refused, named, and the same
    config without it is accepted."""
    base = TINY_LOCAL_TEACHER if mode == "cached" else [a for a in TINY_ONLINE if a != "teacher.pretrained=false"]
    args = [*base, "kd.alpha=0.5", "teacher.checkpoint=t.safetensors"]
    with pytest.raises(UserError, match="teacher.pretrained=false set, but teacher.checkpoint=t.safetensors gives "
                                        "the teacher's weights"):
        validate(load_config(Config, None, [*args, "teacher.pretrained=false"]))
    validate(load_config(Config, None, args))


def test_cache_features_is_read_by_a_cached_feature_method():
    """teacher.cache_features=false is read where the cached teacher's method needs features: pooled_hint refuses
    it for what it does (no features in the cache), not as a key that would change nothing."""
    with pytest.raises(UserError, match="kd.method=pooled_hint needs the teacher's pooled features"):
        validate(load_config(Config, None, [*TINY, "kd.method=pooled_hint", "teacher.cache_features=false"]))


def test_a_label_only_run_saved_with_teacher_keys_resumes(stopped_runs, tmp_path):
    """A label-only run saved when unread teacher.* keys were accepted (its config.yaml and checkpoint hold
    teacher.name=resnet10t, ...) continues without them: the resume compares only what the run reads."""
    run = _copy_run(stopped_runs, "ts", tmp_path)
    old = {"name": "resnet10t", "pretrained": False, "cache_views": 2}
    last = run / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last)
    ckpt["config"]["teacher"].update(old)
    save_checkpoint(ckpt, last)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["teacher"].update(old)
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    proc = run_main("train_student.py", *TINY_LABEL_ONLY, f"run.out_dir={tmp_path}", "run.name=ts",
                    "run.resume=auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["epoch"] for m in read_metrics(run)] == [0, 1]


# ---- the RL agent's action: a target difficulty and a temperature step, each read only where something uses it ----
FITNET_ONLINE = [*TINY_ONLINE, "kd.method=fitnet"]
UNREAD_ACTIONS = {
    "learning agent, labels only, random_subset": (
        [*TINY_LABEL_ONLY, "curriculum.strategy=random_subset", "agent.name=bandit"],
        "agent.name=bandit chooses a target difficulty and a temperature every epoch, but curriculum.strategy="
        "random_subset does not select by a target difficulty and this run trains on labels only"),
    "learning agent, fitnet, all": (
        [*FITNET_ONLINE, "curriculum.strategy=all", "agent.name=ppo", "agent.ppo.n_steps=2", "agent.ppo.batch_size=2"],
        "agent.name=ppo chooses a target difficulty and a temperature every epoch, but curriculum.strategy=all does "
        "not select by a target difficulty and kd.method=fitnet"),
    "fixed temperature step, fitnet": (
        [*FITNET_ONLINE, "curriculum.strategy=random_subset", "agent.name=fixed", "agent.fixed_actions=[[2,2]]"],
        "agent.fixed_actions entry [2, 2] sets temperature step 2, but kd.method=fitnet"),
    "fixed target index, random_subset": (
        [*TINY, "kd.alpha=0.5", "curriculum.strategy=random_subset", "agent.name=fixed",
         "agent.fixed_actions=[[4,1]]"],
        "agent.fixed_actions entry [4, 1] sets target index 4, but curriculum.strategy=random_subset does not "
        "select by a target difficulty"),
    "curriculum.target, easy_to_hard": (
        [*TINY, "kd.alpha=0.5", "curriculum.strategy=easy_to_hard", "agent.name=fixed", "curriculum.target=0.3"],
        "curriculum.target=0.3 is not read: curriculum.strategy=easy_to_hard does not select by a target"),
}


@pytest.mark.parametrize("case", sorted(UNREAD_ACTIONS))
def test_an_agent_action_that_nothing_reads_is_refused(case):
    """The agent's action sets the epoch's target difficulty (read by adaptive and mixed only) and its temperature
    (read by a loss that has one: not labels only, not fitnet). A learning agent on a run that reads neither, and a
    fixed action or curriculum.target set away from its default where it is not read, trained and logged actions
    that changed nothing; now refused before any work, naming what does not read them."""
    args, message = UNREAD_ACTIONS[case]
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_rl(load_config(RLConfig, None, args))


@pytest.mark.parametrize("args", [
    [*TINY, "kd.alpha=0.5", "curriculum.strategy=random_subset", "agent.name=bandit"],   # the temperature is read
    [*TINY, "kd.alpha=0.5", "curriculum.strategy=adaptive", "agent.name=fixed", "agent.fixed_actions=[[4,0]]"],
    [*TINY_LABEL_ONLY, "curriculum.strategy=random_subset", "agent.name=fixed"],          # the controls' default
    [*FITNET_ONLINE, "curriculum.strategy=random_subset", "agent.name=fixed"],
], ids=["bandit-kd", "fixed-adaptive", "fixed-labels", "fixed-fitnet"])
def test_an_agent_action_is_accepted_where_it_is_read(args):
    validate_rl(load_config(RLConfig, None, args))
