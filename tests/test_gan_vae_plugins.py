"""A gan_vae student loss term from a plugin file alone (examples/plugins/tv_loss.py): its formula, its own
range-checked key, a continual run that logs it, re-evaluation that imports it again, a resume without run.plugins
that imports it again, and one refused when the plugin is gone or changed. Where this process imports a plugin, the
registries are restored afterwards (and a plugin's entries are seen only by the configs that name it). Both commands,
`python -m gan_vae` and `python -m gan_vae.continual`, run the module a plugin imports as gan_vae.continual."""
import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, run_main, run_script
from test_gan_vae import ONE_THREAD, _args, domains  # noqa: F401 - a fixture
from test_plugins import isolated  # noqa: F401 - a fixture

PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "plugins" / "tv_loss.py"


@pytest.fixture
def tv_module(monkeypatch):
    """The plugin module, imported with the loss registry restored after the test."""
    from gan_vae.losses import STUDENT_LOSSES
    monkeypatch.setattr(STUDENT_LOSSES, "_entries", dict(STUDENT_LOSSES._entries))
    spec = importlib.util.spec_from_file_location("tv_loss_under_test", PLUGIN)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclass resolves its annotations there
    spec.loader.exec_module(module)
    assert "tv" in STUDENT_LOSSES
    return module


def test_total_variation_by_hand(tv_module):
    # image 0, one channel [[0, 1, 3], [2, 2, 0]]: along rows |1-0| + |3-1| + |2-2| + |0-2| = 5, down the columns
    # |2-0| + |2-1| + |0-3| = 6, so TV = 11; image 1 is constant: TV = 0; a second channel adds its own
    x = torch.zeros(2, 2, 2, 3)
    x[0, 0] = torch.tensor([[0.0, 1.0, 3.0], [2.0, 2.0, 0.0]])
    x[1] = 4.0
    assert tv_module.total_variation(x).tolist() == [11.0, 0.0]
    x[0, 1] = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -1.0]])  # |0-(-1)| along the row, |-1-0| down: +2
    assert tv_module.total_variation(x).tolist() == [13.0, 0.0]


class Stopped(Exception):
    pass


def test_a_plugin_term_trains_is_logged_range_checked_and_imported_again(domains, tmp_path, isolated,  # noqa: F811
                                                                         monkeypatch):
    plugin = Path(shutil.copy(PLUGIN, tmp_path / "my_tv.py"))  # a file outside the repository
    args = [*_args(domains, tmp_path, ["discs", "inverted"]), "teacher.steps=4", "student.steps=4",
            "log.every_steps=1", "log.sample_every=4", "run.name=tv", f"run.plugins=[{plugin}]"]

    # refused when the config is loaded, before any work: in this process (run_main; `isolated` takes the plugin's
    # registration out again afterwards)
    bad = run_main("-m", "gan_vae.continual", *args, "student.tv.weight=-1")
    assert_clean_error(bad, "student.tv.weight=-1.0 must be >= 0")
    assert not (tmp_path / "tv").exists()

    proc = run_script("-m", "gan_vae.continual", *args, "student.tv.weight=0.5", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "tv"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    student = [r for r in lines if r["phase"] == "student"]
    assert len(student) == 8 and all(r["student/tv"] > 0 and math.isfinite(r["student/tv"]) for r in student)
    assert all("student/relational_kd" in r and "student/recon" in r for r in student)  # built-in terms still there
    written = json.loads((run / "results.json").read_text())

    # gan_vae.evaluate reads config.yaml, which names the plugin (student.tv.weight would be an unknown key else)
    again = run_script("-m", "gan_vae.evaluate", str(run), env=ONE_THREAD)
    assert again.returncode == 0, again.stderr[-3000:]
    for key in ("teacher_fid", "student_fid", "recon_mse", "recon_fid"):
        assert json.loads((run / "results.json").read_text())[key] == written[key], key

    # stopped after task 0 (in this process, on one thread as the run above), resumed without run.plugins: the
    # run's own plugin is imported again, and the run ends with the uninterrupted run's numbers
    import torch

    from gan_vae import continual
    save = continual.ContinualRun.save

    def save_then_stop(self, name):
        save(self, name)
        if name == "last.pt" and self.progress["task"] == 1:
            raise Stopped

    monkeypatch.setattr(continual.ContinualRun, "save", save_then_stop)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(Stopped):
            continual.main([*args[:-2], "run.name=stopped", f"run.plugins=[{plugin}]", "student.tv.weight=0.5"])
    finally:
        torch.set_num_threads(threads)
    monkeypatch.undo()
    resumed = run_script("-m", "gan_vae", *args[:-2], "run.name=stopped", "student.tv.weight=0.5", "run.resume=auto",
                         env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    stopped = json.loads((tmp_path / "stopped" / "results.json").read_text())
    for key in ("teacher_fid", "student_fid", "recon_mse", "recon_fid"):
        assert stopped[key] == written[key], key

    # a resume that names other plugins (none) would drop the term: refused, naming the run's plugin
    dropped = run_main("-m", "gan_vae.continual", *args[:-1], "run.plugins=[]", "student.tv.weight=0.5",
                       "run.resume=auto")
    assert_clean_error(dropped, "run.plugins=[] is not what the run was made with", str(plugin))

    # the plugin edited, then deleted: resume and re-evaluation refuse, naming the file
    plugin.write_text(plugin.read_text() + "\n# edited after the run\n")
    for command in (["-m", "gan_vae.continual", *args[:-1], "student.tv.weight=0.5", "run.resume=auto"],
                    ["-m", "gan_vae.evaluate", str(run)]):
        assert_clean_error(run_main(*command), f"the run's plugin {plugin}", "has changed since the run started")
    plugin.unlink()
    for command in (["-m", "gan_vae.continual", *args[:-1], "student.tv.weight=0.5", "run.resume=auto"],
                    ["-m", "gan_vae.evaluate", str(run)]):
        assert_clean_error(run_main(*command), f"the run's plugin {plugin}", "no longer exists")


# ---------------------------------------------------------------------------------------------------------------
# An expert-expansion rule from a plugin file (examples/plugins/relative_fid.py)
# ---------------------------------------------------------------------------------------------------------------
RELATIVE = PLUGIN.parent / "relative_fid.py"


def test_relative_fid_decision_by_hand(monkeypatch):
    from gan_vae.experts import EXPANSION_RULES
    monkeypatch.setattr(EXPANSION_RULES, "_entries", dict(EXPANSION_RULES._entries))  # restored after the test
    spec = importlib.util.spec_from_file_location("relative_fid_under_test", RELATIVE)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclass resolves its annotations there
    spec.loader.exec_module(module)
    decide = module.relative_fid_decision
    assert decide([], [], 2.0, 3) == ("new", 0)
    assert decide([30.0, 25.0], [10.0, 20.0], 2.0, 3) == ("reuse", 1)  # nearest: 25 <= 2 x 20
    assert decide([30.0, 41.0], [10.0, 20.0], 2.0, 3) == ("new", 2)    # nearest: 30 > 2 x 10
    assert decide([30.0, 41.0, 50.0], [10.0, 20.0, 1.0], 2.0, 3) == ("reuse", 0)  # at the cap


def test_an_expansion_rule_plugin_decides_and_experts_json_records_its_values(domains, tmp_path):  # noqa: F811
    """Issue 24: an expansion rule as one outside file, no monkeypatching. Its key is range-checked before any
    work; with an absolute threshold no FID reaches (the built-in rule would reuse expert 0 for the second task),
    the plugin's ratio test adds expert 1, and experts.json records the rule's name and the values it used, not
    the threshold it never read."""
    plugin = Path(shutil.copy(RELATIVE, tmp_path / "my_rule.py"))
    args = [*_args(domains, tmp_path, ["discs", "discs"]), "teacher.steps=4", "student.steps=4",
            "log.sample_every=4", "teacher.fid_threshold=1e9", "run.name=rule", f"run.plugins=[{plugin}]",
            "teacher.expansion=relative_fid"]
    bad = run_script("-m", "gan_vae.continual", *args, "teacher.relative_fid.ratio=0", env=ONE_THREAD)
    assert_clean_error(bad, "teacher.relative_fid.ratio=0.0 must be > 0")
    assert not (tmp_path / "rule").exists()

    proc = run_script("-m", "gan_vae.continual", *args, "teacher.relative_fid.ratio=0.001", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "rule"
    decisions = json.loads((run / "experts.json").read_text())["decisions"]
    own_fid = torch.load(run / "checkpoints" / "task_0.pt", map_location="cpu",
                         weights_only=False)["experts"][0]["latest_fid"]
    assert [d["action"] for d in decisions] == ["new", "new"]
    assert json.loads((run / "results.json").read_text())["task_to_expert"] == [0, 1]
    assert all(d["rule"] == "relative_fid" and "threshold" not in d for d in decisions)
    assert decisions[0]["rule_values"] == {"teacher.relative_fid.ratio": 0.001, "teacher.max_experts": 4}
    assert decisions[1]["rule_values"] == {"teacher.relative_fid.ratio": 0.001, "teacher.max_experts": 4,
                                           "nearest_expert_own_fid": own_fid}
    assert decisions[1]["fid_per_expert"][0] < 1e9 and decisions[1]["fid_per_expert"][0] > 0.001 * own_fid


# A plugin that imports gan_vae.continual: the module it gets must be the one the run uses, whichever command
# started it (issue 24 item 5). Its term's validate, run before any work, checks that the run's config is an
# instance of that module's schema; a second copy of the module (the program run as __main__) fails it.
SAME_MODULE = """
from dataclasses import dataclass

from omegaconf import OmegaConf

import gan_vae.continual as continual
from common.config import opt
from common.errors import UserError
from gan_vae.losses import STUDENT_LOSSES, TermValue


@dataclass
class ProbeConfig:
    weight: float = opt(0.0, "weight of a term that adds nothing", ge=0)


@STUDENT_LOSSES.register("probe", config=ProbeConfig, help="checks the module it imported is the run's")
def probe(step):
    return TermValue(step.vae["x_hat"].sum() * 0)


def validate(cfg):
    if not issubclass(OmegaConf.get_type(cfg), continual.ContinualConfig):
        raise UserError("probe: the run's config is not gan_vae.continual's: the program runs a second copy")
    print("probe: same module")


probe.validate = validate
"""


@pytest.mark.parametrize("module", ["gan_vae", "gan_vae.continual"])
def test_a_plugin_that_imports_gan_vae_continual_gets_the_module_the_run_uses(tmp_path, module):
    plugin = tmp_path / "probe.py"
    plugin.write_text(SAME_MODULE)
    # its key known (student.probe.weight), validated (the probe passes), then stopped by the first task's missing
    # file, before any work
    proc = run_script("-m", module, f"run.plugins=[{plugin}]", "student.probe.weight=1",
                      f"data.tasks=[{tmp_path / 'absent.npz'}]", f"run.out_dir={tmp_path / 'runs'}")
    assert "probe: same module" in proc.stdout, proc.stderr[-3000:]
    assert_clean_error(proc, "absent.npz")
