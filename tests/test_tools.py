"""bench.py and summarize.py run end to end on tiny inputs (their numbers are not checked, only their form)."""
import json

from conftest import run_script


def test_bench_runs_and_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench"
    proc = run_script("bench.py", "--teacher", "resnet10t", "--student", "test_resnet", "--image-size", "32",
                      "--classes", "3", "--images-per-class", "8", "--batch-size", "8", "--repeats", "1",
                      "--refresh-every", "2", "--cache-views", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert set(result["epoch_time"]) == {"label-only", "cached", "online"}
    assert result["epoch_time"]["label-only"]["ratio_to_label_only"] == 1.0
    assert result["teacher_cache_build_s"] > 0 and "cpu" in result["machine"]
    assert set(result["curriculum_epoch_time"]) == {"plain KD", "RL ppo", "RL bandit"}
    assert all(r["epochs"] == 2 for r in result["curriculum_epoch_time"].values())
    markdown = out.with_suffix(".md").read_text()
    assert "| KD epoch, cached |" in markdown and "| RL ppo epoch |" in markdown


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
