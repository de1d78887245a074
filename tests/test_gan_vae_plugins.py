"""A gan_vae student loss term from a plugin file alone (examples/plugins/tv_loss.py): its formula, its own
range-checked key, a continual run that logs it, re-evaluation that imports it again, and a resume that would drop
it. The plugin is imported in subprocesses only (and, for its formula, with the registry restored afterwards), so
no other test's run sums it."""
import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, run_script
from test_gan_vae import ONE_THREAD, _args, domains  # noqa: F401 - a fixture

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


def test_a_plugin_term_trains_is_logged_range_checked_and_imported_again(domains, tmp_path):  # noqa: F811
    plugin = Path(shutil.copy(PLUGIN, tmp_path / "my_tv.py"))  # a file outside the repository
    args = [*_args(domains, tmp_path, ["discs", "inverted"]), "teacher.steps=4", "student.steps=4",
            "log.every_steps=1", "log.sample_every=4", "run.name=tv", f"run.plugins=[{plugin}]"]

    bad = run_script("-m", "gan_vae.continual", *args, "student.tv.weight=-1", env=ONE_THREAD)
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

    # continuing the run without its plugin would drop the term: refused, naming it and the run's run.plugins
    dropped = run_script("-m", "gan_vae.continual", *args[:-1], "run.resume=auto")
    assert_clean_error(dropped, "loss terms ['tv']", f"run.plugins=[\"{plugin}\"]")


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
