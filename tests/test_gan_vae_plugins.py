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
