"""Plugins (run.plugins): a KD method or an agent defined in a file outside the repository works from the command line
with its own keys (range-checked, in --help), trains, checkpoints and resumes; bad plugins are named without a
traceback. The example plugins (examples/plugins/) work from a copy of their file, and NKD's loss matches hand
computation."""
import json
import math
import re
import shutil
import textwrap

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, TINY_ONLINE, assert_clean_error, read_metrics, run_and_sigkill, run_main, run_script

import agents
import kd_methods
import models
from common import plugins
from common.config import load_config
from common.errors import UserError
from engine.schema import Config

# A KD method with a key of its own and a trainable part, as a user would write it in a file of their own.
SCALED_KD = textwrap.dedent('''
    """KD's loss on student logits scaled by a learned factor, plus CE weighted by kd.scaled_kd.weight."""
    from dataclasses import dataclass

    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from common.config import opt
    from kd_methods import KD_METHODS, KDMethod
    from models import kd_loss_terms


    @dataclass
    class ScaledKDConfig:
        weight: float = opt(0.5, "weight of the label cross-entropy", ge=0, le=1)


    @KD_METHODS.register("scaled_kd", config=ScaledKDConfig, help="KD through a learned logit scale (a test plugin)")
    class ScaledKD(KDMethod):
        def __init__(self, cfg, student, teacher_feature_dim):
            super().__init__(cfg, student, teacher_feature_dim)
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, student, x):
            return {"logits": student(x) * self.scale}

        def loss_terms(self, outputs, teacher, labels, epoch, temperature):
            w = self.cfg.kd.scaled_kd.weight
            t = kd_loss_terms(outputs["logits"], teacher["logits"], labels, 0.0, temperature)
            return {"ce": (w, F.cross_entropy(outputs["logits"].float(), labels)), "kd": (1.0 - w, t["kd"])}
''')


@pytest.fixture
def isolated():
    """Whatever a test's plugins register, and the record of imported plugins, is taken out again afterwards."""
    from curriculum_dataloader import STRATEGY_REGISTRY
    from gan_vae.losses import STUDENT_LOSSES
    from gan_vae.experts import EXPANSION_RULES
    registries = (kd_methods.KD_METHODS, agents.AGENT_REGISTRY, STRATEGY_REGISTRY, STUDENT_LOSSES,
                  models.DIFFICULTY_SCORES, EXPANSION_RULES)
    before = {registry: dict(registry._entries) for registry in registries}
    loaded, records = dict(plugins._loaded), dict(plugins._records)
    yield
    for registry, entries in before.items():
        registry._entries.clear()
        registry._entries.update(entries)
    plugins._loaded.clear()
    plugins._loaded.update(loaded)
    plugins._records.clear()
    plugins._records.update(records)


def _plugin(tmp_path, text: str, name: str = "my_plugin.py"):
    folder = tmp_path / "elsewhere"  # outside the repository, as a user's own file
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


def _example(tmp_path, name: str):
    folder = tmp_path / "copy"
    folder.mkdir(exist_ok=True)
    return shutil.copy(ROOT / "examples" / "plugins" / name, folder / name)


def _without_time(records):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


# ---------------------------------------------------------------------------------------------------------------
# The test: a KD method from a plugin file trains, resumes after a kill, and refuses a bad value of its key
# ---------------------------------------------------------------------------------------------------------------
def test_a_plugin_kd_method_trains_resumes_after_a_kill_and_checks_its_key(tmp_path):
    plugin = _plugin(tmp_path, SCALED_KD)
    args = [*TINY, "data.synthetic.images_per_class=24", "train.epochs=4", f"run.plugins=[{plugin}]",
            "kd.method=scaled_kd", "kd.scaled_kd.weight=0.25", f"run.out_dir={tmp_path / 'runs'}"]

    bad = run_script("train_student.py", *args[:-2], "kd.scaled_kd.weight=1.5", f"run.out_dir={tmp_path / 'runs'}")
    assert_clean_error(bad, "kd.scaled_kd.weight=1.5 must lie in [0, 1]")
    assert not (tmp_path / "runs").exists()  # refused before any run directory

    full = run_script("train_student.py", *args, "run.name=full")
    assert full.returncode == 0, full.stderr[-3000:]
    # killed as soon as the second epoch's metrics line is out: the first epoch's checkpoint is written by then (the
    # line of an epoch comes just before its checkpoint, so killing at the first line may leave none to resume)
    run_and_sigkill("train_student.py", *args, "run.name=killed", watch=tmp_path / "runs" / "killed" / "metrics.jsonl",
                    after_lines=2, settle=0.0)
    assert len(read_metrics(tmp_path / "runs" / "killed")) < 4
    # resumed without run.plugins: the run's own plugin is imported again (issue 23 1.6, issue 24 item 3)
    without = [a for a in args if not a.startswith("run.plugins=")]
    resumed = run_script("train_student.py", *without, "run.name=killed", "run.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout

    a, b = read_metrics(tmp_path / "runs" / "full"), read_metrics(tmp_path / "runs" / "killed")
    assert [m["epoch"] for m in b] == [0, 1, 2, 3] and _without_time(a) == _without_time(b)
    for m in a:  # the loop summed the plugin's weighted terms, with its key's value
        assert m["train/loss"] == pytest.approx(0.25 * m["train/loss_ce"] + 0.75 * m["train/loss_kd"], rel=1e-6)
    ckpt = torch.load(tmp_path / "runs" / "killed" / "checkpoints" / "last.pt", map_location="cpu",
                      weights_only=False)
    assert ckpt["method"]["scale"].item() != 1.0  # the plugin's parameter trained and was checkpointed
    assert ckpt["config"]["kd"]["scaled_kd"] == {"weight": 0.25} and ckpt["config"]["run"]["plugins"] == [str(plugin)]
    assert ckpt["plugins"] == [{"item": str(plugin), "path": str(plugin), "sha256": plugins.file_sha256(plugin)}]
    assert json.loads((tmp_path / "runs" / "killed" / "run.json").read_text())["plugins"] == ckpt["plugins"]


def test_a_resume_or_evaluation_refuses_a_plugin_that_changed_or_is_gone(tmp_path, isolated):
    """The run's plugins are recorded with their digests; resuming it (run.resume=auto or from its checkpoint) or
    evaluating its checkpoint without run.plugins imports them, and refuses, naming the file, one that was edited
    or deleted since. A resume that names other plugins is refused too. Refused before any work."""
    plugin = _plugin(tmp_path, SCALED_KD)
    out = tmp_path / "runs"
    args = [*TINY, "train.epochs=1", "kd.method=scaled_kd", f"run.out_dir={out}"]
    done = run_main("train_student.py", *args, f"run.plugins=[{plugin}]", "run.name=r")
    assert done.returncode == 0, done.stderr[-3000:]
    best = out / "r" / "checkpoints" / "best.pt"
    evaluated = run_main("train_student.py", *args, f"eval.checkpoint={best}")  # the run's plugin, imported
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["test/n"] > 0

    named_none = run_main("train_student.py", *args, "run.plugins=[]", "run.name=r", "run.resume=auto")
    assert_clean_error(named_none, f"run.plugins=[] is not what the run was made with ({plugin}")
    copy = shutil.copy(plugin, tmp_path / "moved.py")  # the same content elsewhere is the same plugin
    assert plugins.check_same_as_recorded(plugins.of_run_dir(out / "r"), [str(copy)]) is None

    plugin.write_text(SCALED_KD + "\n# edited after the run\n")
    for command in (["run.name=r", "run.resume=auto"], ["run.name=r2", f"run.resume={out / 'r' / 'checkpoints' / 'last.pt'}"],
                    [f"eval.checkpoint={best}"]):
        proc = run_main("train_student.py", *args, *command)
        assert_clean_error(proc, f"the run's plugin {plugin}", "has changed since the run started")
    named = run_main("train_student.py", *args, f"run.plugins=[{plugin}]", "run.name=r", "run.resume=auto")
    assert_clean_error(named, f"the run's plugin {plugin}", "has changed since the run started")

    plugin.unlink()
    for command in (["run.name=r", "run.resume=auto"], [f"eval.checkpoint={best}"],
                    [f"eval.checkpoint={out / 'r' / 'student.safetensors'}"]):  # the run directory it lies in
        proc = run_main("train_student.py", *args, *command)
        assert_clean_error(proc, f"the run's plugin {plugin}", "no longer exists")
    assert not (out / "r2").exists()


def test_a_resume_refuses_keys_and_names_the_current_schema_lacks(tmp_path, isolated):
    """The safety net under the re-import: a saved config whose plugin keys or registry names the current config
    lacks is refused, naming them and the run's plugins, never continued with a built-in component."""
    from common.config import check_resume_config, to_plain
    plugin = _example(tmp_path, "normalized_kd.py")
    saved = to_plain(load_config(Config, None, [f"run.plugins=[{plugin}]", "kd.method=nkd"]))
    with pytest.raises(UserError) as refused:
        check_resume_config(saved, load_config(Config), "the checkpoint")
    message = str(refused.value)
    assert "kd.nkd.temperature" in message and "kd.method=nkd" in message and str(plugin) in message
    # gan_vae's resume check too: a loss term's keys the current config lacks
    from gan_vae.continual import ContinualConfig, check_config_matches_checkpoint
    tv = _example(tmp_path, "tv_loss.py")
    saved_gan = to_plain(load_config(ContinualConfig, None, [f"run.plugins=[{tv}]"]))
    run_dir = tmp_path / "gan_run"
    with pytest.raises(UserError, match=r"holds student\.tv\.weight, .*run\.plugins=\[\"" + re.escape(str(tv))):
        check_config_matches_checkpoint({"config": saved_gan}, run_dir / "checkpoints" / "last.pt",
                                        load_config(ContinualConfig), run_dir)


# ---------------------------------------------------------------------------------------------------------------
# --help, choices, bad plugins
# ---------------------------------------------------------------------------------------------------------------
def test_help_with_a_plugin_lists_its_keys_and_entry(tmp_path, isolated):
    plugin = _plugin(tmp_path, SCALED_KD)
    without = run_main("train_student.py", "--help")
    assert without.returncode == 0 and "kd.scaled_kd" not in without.stdout
    proc = run_main("train_student.py", f"run.plugins=[{plugin}]", "--help")
    assert proc.returncode == 0
    assert "  kd.scaled_kd.weight (float, in [0, 1]) = 0.5\n      weight of the label cross-entropy" in proc.stdout
    assert "  kd.method (str, one of kd, dkd, dist, pooled_hint, fitnet, scaled_kd) = " in proc.stdout
    assert "scaled_kd: KD through a learned logit scale (a test plugin)" in proc.stdout
    assert "dkd: Decoupled KD (Zhao et al. CVPR 2022)" in proc.stdout  # every entry with its help


def test_a_plugin_named_in_a_config_file_is_imported(tmp_path, isolated):
    plugin = _plugin(tmp_path, SCALED_KD)
    (tmp_path / "c.yaml").write_text(f"run:\n  plugins: [{plugin}]\nkd:\n  method: scaled_kd\n  scaled_kd:\n"
                                     "    weight: 0.75\n")
    cfg = load_config(Config, str(tmp_path / "c.yaml"))
    assert cfg.kd.method == "scaled_kd" and cfg.kd.scaled_kd.weight == 0.75


def test_one_plugin_may_be_given_without_brackets(tmp_path, isolated):
    plugin = _plugin(tmp_path, SCALED_KD)
    cfg = load_config(Config, None, [f"run.plugins={plugin}", "kd.method=scaled_kd"])
    assert cfg.run.plugins == [str(plugin)] and cfg.kd.scaled_kd.weight == 0.5
    (tmp_path / "c.yaml").write_text(f"run:\n  plugins: {plugin}\n")
    assert load_config(Config, str(tmp_path / "c.yaml")).run.plugins == [str(plugin)]
    assert load_config(Config, None, ["run.plugins="]).run.plugins == []


def test_an_unknown_method_lists_the_choices(tmp_path, isolated):
    plugin = _plugin(tmp_path, SCALED_KD)
    proc = run_main("train_student.py", *TINY, f"run.plugins=[{plugin}]", "kd.method=scaled", f"run.out_dir={tmp_path}")
    assert_clean_error(proc, "unknown kd.method 'scaled'; choose one of kd, dkd, dist, pooled_hint, fitnet, scaled_kd",
                       "run.plugins")


@pytest.mark.parametrize("text,fragments", [
    (None, ["run.plugins: plugin file", "does not exist"]),
    ("raise RuntimeError('no GPU here')\n", ["importing plugin file", "RuntimeError: no GPU here"]),
    ("import a_module_nobody_has\n", ["importing plugin file", "a_module_nobody_has"]),
    ("from kd_methods import KD, KD_METHODS\nKD_METHODS.register('dkd')(type('Mine', (KD,), {}))\n",
     ["KD method 'dkd' is registered twice", "kd_methods.DKD", "rename one of them"]),
])
def test_a_bad_plugin_is_a_clean_error(tmp_path, isolated, text, fragments):
    plugin = tmp_path / "missing.py" if text is None else _plugin(tmp_path, text)
    out = tmp_path / "runs"
    proc = run_main("train_student.py", *TINY, f"run.plugins=[{plugin}]", f"run.out_dir={out}")
    assert_clean_error(proc, *fragments)
    assert not out.exists()


def test_a_missing_plugin_module_is_a_clean_error(tmp_path, isolated):
    proc = run_main("train_student.py", *TINY, "run.plugins=[no_such_package.methods]", f"run.out_dir={tmp_path}")
    assert_clean_error(proc, "run.plugins: no module named 'no_such_package.methods'")


def test_registering_a_taken_name_or_a_section_key_is_refused(isolated):
    with pytest.raises(UserError, match="KD method 'kd' is registered twice"):
        kd_methods.KD_METHODS.register("kd")(type("Other", (kd_methods.KD,), {}))
    kd_methods.KD_METHODS.register("kd")(kd_methods.KD)  # the same class again (a module imported twice) is fine

    from dataclasses import dataclass

    from common.config import opt

    @dataclass
    class AlphaConfig:
        x: float = opt(1.0, "x", ge=0)

    kd_methods.KD_METHODS.register("alpha", config=AlphaConfig)(type("Alpha", (kd_methods.KD,), {}))
    with pytest.raises(UserError, match="cannot have a config section kd.alpha: that is already a key of kd"):
        load_config(Config)


# ---------------------------------------------------------------------------------------------------------------
# The example plugins, each from a copy of its file
# ---------------------------------------------------------------------------------------------------------------
def _softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_nkd_loss_hand_computed_value(tmp_path, isolated):
    (module,) = plugins.load([str(_example(tmp_path, "normalized_kd.py"))])
    # One sample, three classes, label 0, lambda = 2.
    zs, zt, lam = [1.0, 0.0, -1.0], [3.0, 1.0, 0.0], 2.0
    target = -_softmax(zt)[0] * math.log(_softmax(zs)[0])
    q_t, q_s = _softmax([1.0 / lam, 0.0 / lam]), _softmax([0.0 / lam, -1.0 / lam])  # the non-target logits / lambda
    non_target = -lam**2 * sum(p * math.log(q) for p, q in zip(q_t, q_s))
    terms = module.nkd_loss_terms(torch.tensor([zs]), torch.tensor([zt]), torch.tensor([0]), lam)
    assert terms["target"].item() == pytest.approx(target, rel=1e-6)
    assert terms["non_target"].item() == pytest.approx(non_target, rel=1e-6)
    # a batch is the mean of its samples; the teacher's target probability carries no gradient
    zs2, zt2, y2 = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True), torch.tensor([4, 0, 2])
    both = module.nkd_loss_terms(zs2, zt2, y2, 1.5)
    single = [module.nkd_loss_terms(zs2[i:i + 1], zt2[i:i + 1], y2[i:i + 1], 1.5) for i in range(3)]
    for name in ("target", "non_target"):
        assert both[name].item() == pytest.approx(sum(s[name].item() for s in single) / 3, rel=1e-5)
    (both["target"] + both["non_target"]).backward()
    assert zt2.grad is None and zs2.grad is not None


def test_normalized_kd_plugin_trains_from_a_copy_of_its_file(tmp_path):
    plugin = _example(tmp_path, "normalized_kd.py")
    args = [*TINY, "train.epochs=1", f"run.plugins=[{plugin}]", "kd.method=nkd", f"run.out_dir={tmp_path / 'runs'}"]
    bad = run_script("train_student.py", *args, "kd.nkd.gamma=-1")
    assert_clean_error(bad, "kd.nkd.gamma=-1.0 must be >= 0")
    bad = run_script("train_student.py", *args, "kd.logit_standardize=true")
    assert_clean_error(bad, "kd.logit_standardize=true is not read by kd.method=nkd",
                       "kd.method=nkd reads its own kd.nkd.* (temperature, gamma, ce_weight)")
    assert not (tmp_path / "runs").exists()
    proc = run_script("train_student.py", *args, "kd.nkd.gamma=1.0", "kd.nkd.ce_weight=0.5", "run.name=r")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (m,) = read_metrics(tmp_path / "runs" / "r")
    assert m["kd/temperature"] == 1.0 and m["train/loss_nkd_non_target"] > 0
    assert m["train/loss"] == pytest.approx(0.5 * m["train/loss_ce"] + m["train/loss_nkd_target"]
                                            + m["train/loss_nkd_non_target"], rel=1e-6)


def test_epsilon_greedy_plugin_runs_through_train_student_rl(tmp_path, isolated, monkeypatch):
    plugin = _example(tmp_path, "epsilon_greedy.py")
    args = [*TINY, "train.epochs=3", "kd.alpha=0.5", "curriculum.strategy=random_subset", f"run.plugins=[{plugin}]",
            "agent.name=epsilon_greedy", f"run.out_dir={tmp_path / 'runs'}"]
    bad = run_script("train_student_rl.py", *args, "agent.epsilon_greedy.epsilon=1.5")
    assert_clean_error(bad, "agent.epsilon_greedy.epsilon=1.5 must lie in [0, 1]")
    assert not (tmp_path / "runs").exists()
    proc = run_script("train_student_rl.py", *args, "agent.epsilon_greedy.epsilon=0", "run.name=r")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "runs" / "r" / "curriculum.jsonl").read_text().splitlines()]
    assert [ln["action"] for ln in lines] == [[0, 0], [0, 1], [0, 2]]  # epsilon 0: untried arms in index order
    state = torch.load(tmp_path / "runs" / "r" / "checkpoints" / "last.pt", map_location="cpu",
                       weights_only=False)["extra"]["agent"]["agent"]
    assert list(state["counts"][:3]) == [1, 1, 1] and state["counts"].sum() == 3
    assert np.allclose(state["means"][:3], [ln["reward"] for ln in lines])

    # stopped after its first epoch, resumed without run.plugins: the run's agent is imported again, and the run
    # goes on as the uninterrupted one (issue 23 1.6, issue 24 item 3)
    import train_student_rl
    from engine.trainer import Trainer
    finish_epoch = Trainer.finish_epoch

    def finish_then_stop(self, epoch, *a, **k):
        finish_epoch(self, epoch, *a, **k)
        raise Killed

    monkeypatch.setattr(Trainer, "finish_epoch", finish_then_stop)
    with pytest.raises(Killed):
        train_student_rl.main([*args, "agent.epsilon_greedy.epsilon=0", "run.name=stopped"])
    monkeypatch.undo()
    without = [a for a in args if not a.startswith("run.plugins=")]
    resumed = run_script("train_student_rl.py", *without, "agent.epsilon_greedy.epsilon=0", "run.name=stopped",
                         "run.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    stopped = tmp_path / "runs" / "stopped"
    assert _without_time([json.loads(x) for x in (stopped / "curriculum.jsonl").read_text().splitlines()]) == \
        _without_time(lines)
    assert _without_time(read_metrics(stopped)) == _without_time(read_metrics(tmp_path / "runs" / "r"))


class Killed(Exception):
    pass


def test_epsilon_greedy_explores_with_probability_epsilon(tmp_path, isolated):
    (module,) = plugins.load([str(_example(tmp_path, "epsilon_greedy.py"))])
    obs = np.zeros(12, dtype=np.float32)
    agent = module.EpsilonGreedyAgent(0.0, 0, (2, 3))
    for arm in range(6):  # every arm once, arm 4 the best
        a = agent.act(obs)
        assert int(np.ravel_multi_index(tuple(a), (2, 3))) == arm
        agent.observe(obs, a, 10.0 if arm == 4 else 0.0, obs, False)
    assert [tuple(agent.act(obs)) for _ in range(5)] == [(1, 1)] * 5  # greedy
    explorer = module.EpsilonGreedyAgent(1.0, 0, (2, 3))
    explorer.counts[:] = 1
    explorer.means[4] = 10.0
    picks = {tuple(int(x) for x in explorer.act(obs)) for _ in range(200)}
    assert len(picks) == 6  # epsilon 1: uniform over every joint action


def test_margin_difficulty_by_hand(tmp_path, isolated):
    (module,) = plugins.load([str(_example(tmp_path, "margin_difficulty.py"))])
    student = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]]))  # margins 0.5 and 0 (a tie)
    teacher = torch.log(torch.tensor([[0.1, 0.1, 0.8], [0.3, 0.6, 0.1]]))  # margins 0.7 and 0.3
    assert module.margin_difficulty(teacher, student).tolist() == pytest.approx([0.5, 1.0], abs=1e-6)
    assert module.margin_difficulty(teacher, student, model="teacher").tolist() == pytest.approx([0.3, 0.7], abs=1e-6)


def test_margin_difficulty_plugin_decides_what_the_curriculum_trains_on(tmp_path, isolated):
    """Issue 24: a difficulty score as one outside file, no monkeypatching. Its key is checked and listed, and the
    refresh's scores are the plugin's formula on the teacher cache's logits (difficulty.margin.model=teacher), so
    easy_to_hard trains on the images of smallest margin difficulty."""
    plugin = _example(tmp_path, "margin_difficulty.py")
    out = tmp_path / "runs"
    args = [*TINY, "kd.alpha=0.5", "difficulty.warmup_epochs=1", "difficulty.refresh_every=1", "agent.name=fixed",
            "curriculum.strategy=easy_to_hard", f"run.plugins=[{plugin}]", "difficulty.score=margin",
            f"run.out_dir={out}"]
    listed = run_main("train_student_rl.py", *args, "--help")
    assert "  difficulty.margin.model (str, one of student, teacher) = \"student\"" in listed.stdout
    assert "margin: 1 - (p_(1) - p_(2))" in listed.stdout
    bad = run_main("train_student_rl.py", *args, "difficulty.margin.model=both")
    assert_clean_error(bad, "unknown difficulty.margin.model 'both'; choose one of student, teacher")
    assert not out.exists()

    proc = run_script("train_student_rl.py", *args, "difficulty.margin.model=teacher", "run.name=r",
                      env={"KD_TRACE_DIR": str(tmp_path / "trace")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (cache,) = (out / "teacher_cache").glob("*/train.npy")
    teacher = torch.from_numpy(np.load(cache)["eval_logits"].astype(np.float32))
    p = torch.softmax(teacher, dim=1).topk(2, dim=1).values
    difficulty = np.load(out / "r" / "difficulty" / "epoch_001.npy")
    np.testing.assert_array_equal(difficulty, (1.0 - (p[:, 0] - p[:, 1])).clamp(0, 1).numpy())
    decisions = {d["epoch"]: d for d in map(json.loads, (tmp_path / "trace" / "decisions.rank0.jsonl").open())}
    chosen = np.asarray(decisions[1]["selection"])
    assert 0 < len(chosen) < len(difficulty)  # pacing: ceil(g(1) N) of them
    assert difficulty[chosen].max() <= np.delete(difficulty, chosen).min()  # the easiest by the plugin's score
    saved = (out / "r" / "config.yaml").read_text()
    assert "score: margin" in saved and "model: teacher" in saved


# ---------------------------------------------------------------------------------------------------------------
# Plugins are per config (issue 23 section 4, issue 24 item 4)
# ---------------------------------------------------------------------------------------------------------------
def test_a_plugin_belongs_to_the_config_that_names_it(tmp_path, isolated):
    from common.files import save_config
    from gan_vae.continual import ContinualConfig
    from gan_vae.losses import STUDENT_LOSSES
    plugin = _example(tmp_path, "normalized_kd.py")
    with_nkd = load_config(Config, None, [f"run.plugins=[{plugin}]", "kd.method=nkd", "kd.nkd.gamma=1"])
    # a later config that names no plugin: neither the entry nor its section
    with pytest.raises(UserError, match="unknown kd.method 'nkd'; choose one of kd, dkd, dist, pooled_hint, fitnet"):
        load_config(Config, None, ["kd.method=nkd"])
    with pytest.raises(UserError, match="unknown config key 'kd.nkd'"):
        load_config(Config, None, ["kd.nkd.gamma=1"])
    plain = load_config(Config)
    assert "nkd" not in plain.kd
    help_text = run_main("train_student.py", "--help").stdout
    assert "kd.nkd" not in help_text and "nkd:" not in help_text
    (tmp_path / "run").mkdir()
    save_config(plain, tmp_path / "run")  # what it saves loads in a process that never imported the plugin
    assert "nkd" not in (tmp_path / "run" / "config.yaml").read_text()
    # the config that names it keeps it
    assert with_nkd.kd.nkd.gamma == 1 and kd_methods.method_class(with_nkd).name == "nkd"
    from common.config import check_ranges
    check_ranges(with_nkd)
    again = load_config(Config, None, [f"run.plugins=[{plugin}]", "kd.method=nkd"])
    assert again.kd.method == "nkd"

    # a gan_vae loss term is summed only by the runs that name its plugin
    tv = _example(tmp_path, "tv_loss.py")
    with_tv = load_config(ContinualConfig, None, [f"run.plugins=[{tv}]"])
    plain_gan = load_config(ContinualConfig)
    assert "tv" in [e.name for e in STUDENT_LOSSES.entries_of(with_tv)]
    assert "tv" not in [e.name for e in STUDENT_LOSSES.entries_of(plain_gan)] and "tv" not in plain_gan.student


def test_composing_a_composed_schema_gives_it_back(isolated):
    # load_config, check_ranges and the schema walks compose whatever schema they get, the composed one included
    from common.registry import compose_schema
    from train_student_rl import RLConfig
    composed = compose_schema(Config)
    assert compose_schema(composed) is composed and compose_schema(Config) is composed
    assert compose_schema(compose_schema(RLConfig)) is compose_schema(RLConfig)
    assert load_config(composed, None, ["kd.method=dkd", "kd.dkd.beta=3"]).kd.dkd.beta == 3
    from dataclasses import dataclass

    from common.config import iter_schema, opt

    @dataclass
    class ExtraConfig:
        x: float = opt(1.0, "x", ge=0)

    kd_methods.KD_METHODS.register("extra", config=ExtraConfig)(type("Extra", (kd_methods.KD,), {}))
    assert "kd.extra.x" in {key for key, *_ in iter_schema(composed)}  # composed again, with the new entry
    kd_methods.KD_METHODS.unregister("extra")
    keys = {key for key, *_ in iter_schema(composed)}
    assert "kd.dkd.beta" in keys and "kd.extra.x" not in keys and compose_schema(Config) is composed


# ---------------------------------------------------------------------------------------------------------------
# Attention Transfer (examples/plugins/attention_transfer.py): a method on stage maps, checked by the engine
# ---------------------------------------------------------------------------------------------------------------
def test_attention_transfer_loss_by_hand(tmp_path, isolated):
    (module,) = plugins.load([str(_example(tmp_path, "attention_transfer.py"))])
    # one sample, a map with C=2 channels of 1 x 2: F(A) = mean_c A_c^2 = [(1 + 9) / 2, (4 + 0) / 2] = [5, 2]
    a = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]])
    q = module.attention_map(a)
    assert q[0].tolist() == pytest.approx([5 / math.sqrt(29), 2 / math.sqrt(29)], rel=1e-6)
    # two stages of 2 and 1 positions: at = mean_k (dq_1)^2 + mean_k (dq_2)^2
    qs, qt = torch.tensor([[0.6, 0.8, 1.0]]), torch.tensor([[1.0, 0.0, 1.0]])
    z = [0.5, -0.5]
    terms = module.at_loss_terms(torch.tensor([z]), qs, qt, torch.tensor([1]), [2, 1])
    assert terms["at"].item() == pytest.approx((0.4**2 + 0.8**2) / 2 + 0.0, rel=1e-6)
    assert terms["ce"].item() == pytest.approx(-math.log(math.exp(-0.5) / (math.exp(0.5) + math.exp(-0.5))), rel=1e-6)


def test_attention_transfer_trains_online_and_its_loss_is_the_formula(tmp_path, isolated):
    """A tiny online run end to end; on one batch, the method's terms equal the formula computed here from timm's own
    stage maps of the run's student and teacher."""
    from common.distributed import DistInfo
    from engine.schema import validate
    from engine.trainer import Trainer
    plugin = _example(tmp_path, "attention_transfer.py")
    args = [*TINY_ONLINE, "train.epochs=1", f"run.plugins=[{plugin}]", "kd.method=at", "teacher.mode=online",
            "kd.at.stages=[2,1]", "kd.at.weight=50"]
    proc = run_main("train_student.py", *args, f"run.out_dir={tmp_path / 'runs'}", "run.name=r")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (m,) = read_metrics(tmp_path / "runs" / "r")
    assert m["train/loss_at"] > 0 and m["train/loss"] == pytest.approx(m["train/loss_ce"] + 50 * m["train/loss_at"],
                                                                       rel=1e-6)
    cfg = load_config(Config, None, [*args, "train.channels_last=false"])
    validate(cfg)
    trainer = Trainer(cfg, DistInfo(), None)
    trainer.distiller.eval()
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 1])
    with torch.no_grad():
        terms = trainer.method.loss_terms(trainer.distiller(x), trainer.method.teacher_online(trainer.teacher, x), y,
                                          0, 1.0)
        student, teacher = trainer.student, trainer.teacher.model
        at = 0.0
        for stage in (2, 1):
            s = student.forward_intermediates(x, indices=[stage], intermediates_only=True)[0]
            t = teacher.forward_intermediates(x, indices=[stage], intermediates_only=True)[0]
            assert s.shape[2:] == t.shape[2:]  # the tiny pair's maps agree in size: no pooling
            qs, qt = (v.pow(2).mean(1).flatten(1) for v in (s, t))
            at += ((qs / qs.norm(dim=1, keepdim=True) - qt / qt.norm(dim=1, keepdim=True)) ** 2).mean()
        ce = torch.nn.functional.cross_entropy(student(x), y)
    assert terms["at"][0] == 50.0 and terms["at"][1].item() == pytest.approx(at.item(), rel=1e-5)
    assert terms["ce"][0] == 1.0 and terms["ce"][1].item() == pytest.approx(ce.item(), rel=1e-5)


def test_attention_transfer_cached_and_a_bad_stage_are_refused_by_the_engine(tmp_path, isolated):
    """Issue 24: the plugin has no refusal of its own; the engine reads its declaration (teacher outputs beyond
    what the cache holds; stage maps at kd.at.stages) and refuses before any work, naming the method and the range."""
    plugin = _example(tmp_path, "attention_transfer.py")
    assert "teacher.mode" not in plugin.read_text().split('"""')[2]  # no check of its own below the docstring
    out = tmp_path / "runs"
    args = [*TINY, f"run.plugins=[{plugin}]", "kd.method=at", f"run.out_dir={out}"]
    cached = run_main("train_student.py", *args, "teacher.mode=cached")
    assert_clean_error(cached, "kd.method=at cannot use teacher.mode=cached: it reads the teacher's attention, and "
                               "the teacher cache holds only logits, features. Use teacher.mode=online")
    assert not out.exists()  # before the run directory or a cache
    online = [a for a in args if not a.startswith("teacher.cache_views=")]  # a cache key: refused online
    bad = run_main("train_student.py", *online, "teacher.mode=online", "kd.at.stages=[1,9]")
    assert_clean_error(bad, "kd.method=at (its stages: [1, 9]) reads stage 9 of the student mobilenetv2_035",
                       "which has stages 0 to 4")
    assert not (out / "teacher_cache").exists()


def test_the_engine_checks_any_method_declaration(isolated):
    """Declarations of a method registered here: an unknown output kind, stage maps without stages, and an explicit
    can_cache=False (on cacheable outputs) are refused by engine.schema.validate, naming the method."""
    from engine.schema import validate

    class Odd(kd_methods.KD):
        student_reads = ("logits", "attention")

    class NoStages(kd_methods.KD):
        teacher_reads = ("stage_maps",)

    class Uncached(kd_methods.KD):
        @classmethod
        def can_cache(cls, cfg):
            return False

        @classmethod
        def cache_refusal(cls, cfg):
            return "its targets change every epoch"

    for name, cls in (("odd", Odd), ("no_stages", NoStages), ("uncached", Uncached)):
        kd_methods.KD_METHODS.register(name)(cls)
    with pytest.raises(UserError, match=r"kd.method=odd declares that it reads \['attention'\] from the student"):
        validate(load_config(Config, None, ["kd.method=odd"]))
    with pytest.raises(UserError, match="kd.method=no_stages reads stage maps but declares no stages"):
        validate(load_config(Config, None, ["kd.method=no_stages"]))
    with pytest.raises(UserError, match="kd.method=uncached cannot use teacher.mode=cached: .*its targets change every "
                                        "epoch. Use teacher.mode=online"):
        validate(load_config(Config, None, ["kd.method=uncached"]))
    validate(load_config(Config, None, ["kd.method=uncached", "teacher.mode=online"]))
