"""scripts/gan_vae_ablation.py: its rows are valid branches of the shared-data config, and its table averages the
seeds right (hand-made results.json files)."""
import importlib.util
import json
from pathlib import Path

import pytest

from common.config import load_config
from gan_vae.continual import STUDENT_PHASE_SECTIONS, ContinualConfig, validate

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gan_vae_ablation", ROOT / "scripts" / "gan_vae_ablation.py")
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)


@pytest.mark.parametrize("row", list(ablation.ROWS))
def test_every_row_is_a_valid_config_that_changes_only_student_keys(row):
    label, overrides, branch = ablation.ROWS[row]
    # the arguments the script gives the row: BASE less the keys the row leaves unread, then the row's own
    validate(load_config(ContinualConfig, ROOT / ablation.CONFIG, ["train.seed=1", *ablation.row_arguments(row)]))
    assert branch in (None, "task_1_teacher", "task_0_teacher")
    assert all(o.split(".")[0] in STUDENT_PHASE_SECTIONS for o in overrides)  # what a branch there may change


def test_only_the_noreplay_row_drops_a_base_key():
    """student.replay=false reads no replay key, so the noreplay row leaves out BASE's student.self_replay=0 (it
    would be refused as doing nothing); every other row keeps BASE whole, so its numbers are those of before."""
    assert ablation.row_arguments("noreplay") == ["student.replay=false"]
    for row, (_, overrides, _) in ablation.ROWS.items():
        if row != "noreplay":
            assert ablation.row_arguments(row) == [*ablation.BASE, *overrides]


def _results(path: Path, mse0: float, mse1: float, fashion: float, fid: list[float]) -> None:
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({
        "tasks_done": 2, "recon_mse": [[mse0, None], [mse1, fashion]], "student_fid": [[30.0, None], fid],
        "student_fid_samples": [[[2000, 2000], None], [[2000, 2000], [889, 889]]]}))


def test_the_table_gives_mean_and_sd_over_the_seeds(tmp_path):
    _results(tmp_path / "gv_s0", 0.010, 0.012, 0.015, [40.0, 20.0])   # forgetting +20%
    _results(tmp_path / "gv_s1", 0.008, 0.008, 0.013, [50.0, 30.0])   # +0%
    _results(tmp_path / "gv_s0_prev0", 0.010, 0.011, 0.014, [40.0, 20.0])
    text = ablation.table(tmp_path, ["default", "prev0"], [0, 1])
    assert "after task 0, the start of every row: 0.00900 ± 0.00141 (seeds 0, 1)" in text
    default = next(line for line in text.splitlines() if line.startswith("| experts' replay only"))
    assert default == (f"| {ablation.ROWS['default'][0]} | 0, 1 | 0.01000 ± 0.00283 | +10.0 ± 14.1 | 0.01400 ± 0.00141 | "
                       "45.00 ± 7.07 | 25.00 ± 7.07 | [[2000, 2000], [889, 889]] |")
    prev0 = next(line for line in text.splitlines() if line.startswith("| `kd.previous_weight=0`"))
    assert prev0.startswith("| `kd.previous_weight=0` | 0 | 0.01100 ± 0.00000 | +10.0 ± 0.0 |")


def test_an_interrupted_run_continues_itself_and_one_without_a_checkpoint_starts_over(tmp_path, monkeypatch):
    """launch: a row stopped midway (its own checkpoints/last.pt) resumes with run.resume=auto, not from the branch
    checkpoint again (refused: the directory holds a run); one stopped before any checkpoint is removed and started
    afresh from the branch."""
    calls = []
    monkeypatch.setattr(ablation.subprocess, "run", lambda cmd, **kw: (calls.append(cmd), type("P", (), {
        "returncode": 0})())[1])
    branch = ["train.seed=0", "kd.previous_weight=0", "run.resume=/x/gv_s0/checkpoints/task_1_teacher.pt"]
    (tmp_path / "midway" / "checkpoints").mkdir(parents=True)
    (tmp_path / "midway" / "checkpoints" / "last.pt").write_bytes(b"")
    assert ablation.launch(tmp_path, "midway", branch) == 0
    assert calls[-1][-3:] == ["train.seed=0", "kd.previous_weight=0", "run.resume=auto"]
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "config.yaml").write_text("{}")
    assert ablation.launch(tmp_path, "early", branch) == 0
    assert calls[-1][-3:] == branch and not (tmp_path / "early").exists()
