"""bench.py and summarize.py run end to end on tiny inputs (their numbers are not checked, only their form)."""
import json

from conftest import run_script


def test_bench_runs_and_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench"
    proc = run_script("bench.py", "--teacher", "resnet10t", "--student", "test_resnet", "--image-size", "32",
                      "--classes", "3", "--images-per-class", "8", "--batch-size", "8", "--repeats", "1",
                      "--refresh-every", "2", "--cache-views", "2", "--jpeg-height", "48", "--preprocess-size", "40",
                      "--gan-images", "120", "--gan-steps", "1", "--fid-samples", "60", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert {"cpu", "cores", "torch", "device"} <= set(result["machine"])
    rows = {r["item"]: r for r in result["rows"]}
    assert rows["KD epoch, label-only"]["ratio"] == 1.0
    for item in ("KD epoch, cached", "KD epoch, online", "teacher-cache build", "difficulty refresh",
                 "curriculum epoch, plain KD", "curriculum epoch, RL ppo", "curriculum epoch, RL bandit",
                 "input pipeline, JPEG decode + augment in loader", "input pipeline, pre-decoded, augment in loader",
                 "input pipeline, pre-decoded, augment on device", "gan_vae teacher (WGAN-GP) steps",
                 "gan_vae student (beta-VAE + distillation) steps", "gan_vae FID evaluation"):
        assert rows[item]["median"] > 0 and rows[item]["min"] <= rows[item]["median"] <= rows[item]["max"], item
    assert rows["curriculum epoch, RL ppo"]["n"] == 2 and rows["difficulty refresh"]["n"] == 1
    markdown = out.with_suffix(".md").read_text()
    assert markdown.startswith("Machine: ") and "| input pipeline, pre-decoded, augment on device |" in markdown


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
