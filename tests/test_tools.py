"""bench.py and summarize.py run end to end on tiny inputs (their numbers are not checked, only their form)."""
import json
import os

import pytest

from conftest import run_script


def test_bench_runs_and_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench"
    proc = run_script("bench.py", "--teacher", "resnet10t", "--student", "test_resnet", "--image-size", "32",
                      "--classes", "3", "--images-per-class", "8", "--batch-size", "8", "--repeats", "1",
                      "--refresh-every", "2", "--cache-views", "2", "--jpeg-height", "48", "--preprocess-size", "40",
                      "--gan-images", "120", "--gan-steps", "1", "--fid-samples", "60", "--e2e-epochs", "1", "3",
                      "--e2e-repeats", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert {"cpu", "cores", "torch", "device"} <= set(result["machine"])
    rows = {r["item"]: r for r in result["rows"]}
    assert rows["KD epoch, label-only"]["ratio"] == 1.0
    for item in ("KD epoch, cached", "KD epoch, online", "KD epoch, cached pooled_hint (+ kd)",
                 "KD epoch, online fitnet", "teacher-cache build", "teacher-cache build, with pooled features",
                 "difficulty refresh",
                 "curriculum epoch, plain KD", "curriculum epoch, RL ppo", "curriculum epoch, RL bandit",
                 "input pipeline, JPEG decode + augment in loader", "input pipeline, pre-decoded, augment in loader",
                 "input pipeline, pre-decoded, augment on device", "gan_vae teacher (WGAN-GP) steps",
                 "gan_vae student (beta-VAE + distillation) steps", "gan_vae FID evaluation"):
        assert rows[item]["median"] > 0 and rows[item]["min"] <= rows[item]["median"] <= rows[item]["max"], item
    assert rows["curriculum epoch, RL ppo"]["n"] == 2 and rows["difficulty refresh"]["n"] == 1
    for e in (1, 3):  # end to end: one row per mode and E, as a ratio to the online run of the same E
        assert rows[f"end to end, E = {e}, online"]["ratio"] == 1.0
        assert rows[f"end to end, E = {e}, lazy cache"]["median"] > 0 and rows[f"end to end, E = {e}, eager cache"]
    assert rows["end to end, E = 3, lazy cache"]["median"] > rows["end to end, E = 1, lazy cache"]["median"]
    assert rows["launch to first step, online"]["ratio"] == 1.0 and rows["launch to first step, eager cache"]
    markdown = out.with_suffix(".md").read_text()
    assert markdown.startswith("Machine: ") and "| input pipeline, pre-decoded, augment on device |" in markdown


def test_bench_gpu_suite_runs_on_cpu_at_reduced_size(tmp_path):
    """`--suite gpu` without CUDA: every item measured in images (or steps) per second, at the reduced size (the
    CPU defaults, scaled down further here), compile off for the training items (compiled runs are tested in test_cuda_path.py); JSON and markdown written,
    the markdown saying these are not GPU numbers."""
    out = tmp_path / "gpu"
    proc = run_script("bench.py", "--suite", "gpu", "--teacher", "resnet10t", "--student", "test_resnet",
                      "--image-size", "32", "--classes", "3", "--images-per-class", "6", "--batch-size", "8",
                      "--repeats", "1", "--jpeg-height", "48", "--gan-images", "120", "--gan-steps", "1",
                      "--fid-samples", "60", "--compile", "off", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["suite"] == "gpu" and result["machine"]["device"] == "cpu"
    rows = {r["item"]: r for r in result["rows"]}
    for item in ("teacher-cache build", "training, label-only, compile off", "training, cached KD, compile off",
                 "training, online KD, compile off", "input pipeline, pre-decoded, augment on device",
                 "input pipeline, JPEG decode + augment, 0 workers", "gan_vae teacher (WGAN-GP) steps",
                 "gan_vae student (beta-VAE + distillation) steps"):
        assert rows[item]["median"] > 0 and rows[item]["unit"] in ("img/s", "steps/s"), item
        assert "peak_gb" in rows[item] and rows[item]["peak_gb"] is None, item  # no GPU memory on a CPU
    assert rows["training, label-only, compile off"]["ratio"] == 1.0
    assert rows["training, cached KD, compile off"]["floor"] == "label-only, compile off"
    assert rows["input pipeline, pre-decoded, augment on device"]["floor"] == "fastest cached-KD training"
    markdown = out.with_suffix(".md").read_text()
    assert "not GPU numbers" in markdown and "| peak GPU memory |" in markdown and "Targets: cached KD" in markdown


def test_summarize_groups_seeds_and_baselines(tmp_path):
    for seed, (kd, lab) in enumerate([(80.0, 70.0), (82.0, 74.0)]):
        run = tmp_path / f"qs_s{seed}"
        (run / "label_only").mkdir(parents=True)
        (run / "results.json").write_text(json.dumps({"test/acc1": kd}))
        (run / "label_only" / "results.json").write_text(json.dumps({"test/acc1": lab}))
    proc = run_script("summarize.py", str(tmp_path / "qs_s0"), str(tmp_path / "qs_s1"), "--keys", "test/acc1")
    assert proc.returncode == 0, proc.stderr
    assert "| qs | 2 | 81.00 ± 1.41 |" in proc.stdout
    assert "| qs/label_only | 2 | 72.00 ± 2.83 |" in proc.stdout


def test_two_writers_of_one_file_do_not_share_a_temp_file(tmp_path):
    """atomic_write wrote every file through `<path>.tmp`: a second writer of the same file (two processes) opened
    the same temp file, so the first one's rename published the second one's half-written bytes and the second's
    rename failed. Each writer now has a temp file of its own; the last rename wins, whole."""
    from common.files import atomic_write
    path = tmp_path / "results.json"
    with atomic_write(path) as first:
        first.write("first writer\n")
        with atomic_write(path) as second:
            second.write("second writer\n")
        assert path.read_text() == "second writer\n"
    assert path.read_text() == "first writer\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # the mode open() would give it


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_bench_times_only_configs_the_scripts_accept(tmp_path):
    """bench.py built its trainers from load_config alone: its shared overrides set teacher.* keys for the
    label-only mode too (which the scripts refuse as unread), and nothing it timed was validated. checked_config
    drops the teacher keys a mode does not read, then validates as the scripts do."""
    import argparse
    import bench
    from common.errors import UserError
    from engine.schema import Config, TeacherConfig
    args = argparse.Namespace(classes=3, images_per_class=8, image_size=32, workers=0, batch_size=8,
                              teacher="resnet10t", student="test_resnet", cache_views=2)
    base = bench.common_overrides(args, str(tmp_path))
    labels = bench.checked_config(Config, [*base, "kd.alpha=1"])
    assert labels.teacher == TeacherConfig()  # every teacher.* key at its default: none is read
    online = bench.checked_config(Config, [*base, "kd.alpha=0", "teacher.mode=online"])
    assert (online.teacher.name, online.teacher.cache_views) == ("resnet10t", TeacherConfig.cache_views)
    with pytest.raises(UserError, match="train.warmup_epochs=3.0 is not below train.epochs=2"):
        bench.checked_config(Config, [*base, "kd.alpha=0", "train.epochs=2", "train.warmup_epochs=3"])


def test_forgetting_against_the_experts_fid_draws_only_rows_with_experts_of_their_own(tmp_path):
    """scripts/forgetting_vs_expert_fid.py on a hand-made study: the reference row and the row whose expert FID
    differs are drawn, the branch rows (the reference's experts, or the other row's) are not; Pearson's r by hand."""
    import importlib.util
    import math

    from studies.summary import values_csv
    spec = importlib.util.spec_from_file_location("fve", os.path.join(os.path.dirname(__file__), "..", "scripts",
                                                                      "forgetting_vs_expert_fid.py"))
    fve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fve)
    table = {("default", 0): (10.0, 20.0), ("default", 1): (12.0, 18.0), ("branch", 0): (10.0, 5.0),
             ("branch", 1): (12.0, 4.0), ("longer", 0): (6.0, 9.0), ("longer", 1): (8.0, None),
             ("longer_branch", 0): (6.0, 1.0), ("longer_branch", 1): (8.0, 2.0)}
    values = [{"row": row, "seed": seed, "metric": m, "value": v, "reference": row == "default"}
              for (row, seed), pair in table.items() for m, v in zip(("expert_fid", "forgetting"), pair)]
    assert fve.own_expert_rows(values, "expert_fid") == ["default", "longer"]
    drawn = fve.points(values, ["default", "longer"], "expert_fid", "forgetting")
    assert drawn == {"default": [(0, 10.0, 20.0), (1, 12.0, 18.0)], "longer": [(0, 6.0, 9.0)]}  # seed 1: no y
    # x = 10, 12, 6 (mean 28/3), y = 20, 18, 9 (mean 47/3): sxy = 94/3, sxx = 56/3, syy = 206/3
    assert fve.pearson([(10, 20), (12, 18), (6, 9)]) == pytest.approx(94 / math.sqrt(56 * 206))
    assert fve.pearson([(1, 2), (3, 4)]) is None and fve.pearson([(1, 2), (1, 3), (1, 4)]) is None
    path = tmp_path / "study.csv"
    path.write_text(values_csv(values))
    out = tmp_path / "figures" / "f.png"
    proc = run_script("scripts/forgetting_vs_expert_fid.py", "--csv", str(path), "--out", str(out),
                      "--x", "expert_fid")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.stat().st_size > 0
    assert "| longer | 0 | 6.00 | +9.00 |" in proc.stdout and "branch" not in proc.stdout
    assert f"Pearson r over 3 runs: {94 / math.sqrt(56 * 206):.3f}" in proc.stdout
    missing = run_script("scripts/forgetting_vs_expert_fid.py", "--csv", str(tmp_path / "none.csv"))
    assert missing.returncode != 0 and "does not exist" in missing.stderr
