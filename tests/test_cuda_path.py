"""The CUDA path's logic, exercised on CPU: torch.compile (inductor, with this machine's C++ compiler), bf16
autocast and channels_last, together and separately, in train_student.py and train_student_rl.py; fp16 with its
GradScaler; checkpoints across compiled and eager models; and the clear errors of the CUDA-only switches.

Tolerances (first-epoch train/loss, same seed and data, one thread): a compiled run against the eager run of the
same precision, relative 1e-4 in fp32 and 2e-2 in bf16 (inductor fuses and reorders bf16 arithmetic, so roundings
differ); channels_last against the default layout 1e-3 (other convolution kernels: measured 1.2e-4 on the
quickstart data); bf16 against fp32 5e-2."""
import json
import math

import pytest
import torch
from conftest import ROOT, TINY, TINY_LABEL_ONLY, assert_clean_error, call_main, read_metrics, run_script

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# The student: tests/compile_probe.py, a plugin (conv, batch norm, pooling, a linear head) that inductor compiles in
# about half the time of timm's test_resnet; kd.alpha=0.5 runs the cached teacher's KD term too
PROBE = ["student.name=compile_probe", f"run.plugins=[{ROOT / 'tests' / 'compile_probe.py'}]"]
BASE = [*TINY, *PROBE, "kd.alpha=0.5", "train.epochs=1"]
LABEL_ONLY = [*TINY_LABEL_ONLY, *PROBE, "train.epochs=1"]  # BASE on labels only, no teacher keys
EAGER_FP32 = ["train.compile=false", "train.amp=off", "train.channels_last=false"]


def _run(tmp_path, name: str, *overrides: str, script: str = "train_student.py", base=BASE, env=None) -> dict:
    proc = run_script(script, *base, *overrides, f"run.out_dir={tmp_path}", f"run.name={name}",
                      env={**ONE_THREAD, **(env or {})}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_metrics(tmp_path / name)[0]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    """The eager fp32 run and the eager bf16 run every other run is compared with (their folder, first epochs)."""
    root = tmp_path_factory.mktemp("eager")
    return root, {"fp32": _run(root, "fp32", *EAGER_FP32),
                  "bf16": _run(root, "bf16", "train.compile=false", "train.amp=bf16", "train.channels_last=false")}


def test_bf16_and_channels_last_each_alone_match_eager_fp32(eager, tmp_path):
    _, ref = eager
    cl = _run(tmp_path, "cl", "train.compile=false", "train.amp=off", "train.channels_last=true")
    bf16 = ref["bf16"]
    print(f"first-epoch loss: fp32 {ref['fp32']['train/loss']:.6f}, channels_last {cl['train/loss']:.6f}, "
          f"bf16 {bf16['train/loss']:.6f}")
    assert _rel(cl["train/loss"], ref["fp32"]["train/loss"]) < 1e-3
    assert math.isfinite(bf16["train/loss"]) and bf16["train/loss"] != ref["fp32"]["train/loss"]  # it is bf16
    assert _rel(bf16["train/loss"], ref["fp32"]["train/loss"]) < 5e-2


def test_compile_alone_matches_eager_fp32(eager, tmp_path):
    _, ref = eager
    compiled = _run(tmp_path, "compiled", "train.compile=true", "train.amp=off", "train.channels_last=false")
    diff = _rel(compiled["train/loss"], ref["fp32"]["train/loss"])
    print(f"compiled fp32 vs eager fp32: loss {compiled['train/loss']:.8f} vs {ref['fp32']['train/loss']:.8f} "
          f"(relative {diff:.2e}); epoch {compiled['time/epoch_s']:.1f} s vs {ref['fp32']['time/epoch_s']:.2f} s "
          "(the compiled epoch includes compilation)")
    assert diff < 1e-4


def test_compile_bf16_channels_last_together_in_both_scripts(eager, tmp_path, monkeypatch):
    """All three CUDA switches at once in train_student.py; the compiled run's best.pt evaluated by an eager
    student (eval.checkpoint) gives the run's own test/acc1. A compiled 2-epoch run stopped after its first epoch
    continues eagerly from its last.pt (train.compile may change on resume) and trains its second epoch. Then
    train_student_rl.py with the same switches. Every compiled run here has the training graph compiled first
    (same student, batch, precision and layout; strategy all), so inductor's cache serves it."""
    _, ref = eager
    on = ["train.compile=true", "train.amp=bf16", "train.channels_last=true"]
    together = _run(tmp_path, "all", *on)
    diff = _rel(together["train/loss"], ref["bf16"]["train/loss"])
    print(f"compile + bf16 + channels_last vs eager bf16: relative loss difference {diff:.2e}")
    assert diff < 2e-2
    results = json.loads((tmp_path / "all" / "results.json").read_text())
    best = tmp_path / "all" / "checkpoints" / "best.pt"
    proc = run_script("train_student.py", *BASE, "train.amp=bf16", f"eval.checkpoint={best}", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["test/acc1"] == results["test/acc1"]

    # in this process, so that the compiled run can be stopped right after its first checkpoint (Ctrl-C's path)
    import train_student
    from engine.trainer import Trainer
    partial = [*BASE, "train.epochs=2", *on[1:], f"run.out_dir={tmp_path}", "run.name=partial"]
    train_epoch = Trainer.train_epoch

    def interrupted_at_second_epoch(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return train_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", interrupted_at_second_epoch)
    stopped = call_main(train_student.main, [*partial, "train.compile=true"])
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    monkeypatch.undo()
    again = call_main(train_student.main, [*partial, "train.compile=false", "run.resume=auto"])
    assert again.returncode is None, again.stderr[-3000:]
    assert f"resumed from {tmp_path / 'partial' / 'checkpoints' / 'last.pt'} at epoch 1" in again.stdout
    lines = read_metrics(tmp_path / "partial")
    assert [r["epoch"] for r in lines] == [0, 1] and math.isfinite(lines[1]["train/loss"])  # one epoch trained

    rl = [*BASE, "train.epochs=2", "difficulty.warmup_epochs=1", "difficulty.refresh_every=1", "agent.name=bandit",
          "curriculum.strategy=all", "train.amp=bf16", "train.channels_last=true"]
    eager_rl = _run(tmp_path, "eager", "train.compile=false", script="train_student_rl.py", base=rl)
    compiled = _run(tmp_path, "compiled", "train.compile=true", script="train_student_rl.py", base=rl)
    assert _rel(compiled["train/loss"], eager_rl["train/loss"]) < 2e-2
    lines = read_metrics(tmp_path / "compiled")
    assert len(lines) == 2 and all(math.isfinite(r["train/loss"]) for r in lines)
    assert (tmp_path / "compiled" / "curriculum.jsonl").read_text().count("\n") == 2


def test_fp16_with_grad_scaler_on_cpu(tmp_path):
    """train.amp=fp16 runs on CPU (torch.amp.GradScaler("cpu")), and its scaler state is in the checkpoint."""
    first = _run(tmp_path, "fp16", "train.amp=fp16")
    assert math.isfinite(first["train/loss"])
    ckpt = torch.load(tmp_path / "fp16" / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["scaler"]["scale"] > 0 and "_growth_tracker" in ckpt["scaler"]


def test_state_dicts_of_compiled_and_ddp_models_load_into_plain_ones_and_back():
    from common.checkpoint import load_state_strict
    from common.config import load_config
    from common.errors import UserError
    from engine.schema import Config
    from models import create_student
    cfg = load_config(Config, None, ["student.name=test_resnet"])
    torch.manual_seed(0)
    plain = create_student(cfg, 4)
    compiled = torch.compile(create_student(cfg, 4))  # state_dict keys gain "_orig_mod."; nothing is compiled yet
    saved = compiled.state_dict()
    assert all(k.startswith("_orig_mod.") for k in saved)
    with torch.no_grad():
        for v in saved.values():
            v.add_(1.0) if v.is_floating_point() else None
    load_state_strict(plain, saved, "compiled weights")  # compiled -> eager
    assert all(torch.equal(plain.state_dict()[k[len("_orig_mod."):]], v) for k, v in saved.items())
    other = torch.compile(create_student(cfg, 4))
    load_state_strict(other, plain.state_dict(), "eager weights")  # eager -> compiled
    assert all(torch.equal(other.state_dict()[k], v) for k, v in saved.items())
    ddp_style = {f"module._orig_mod.{k}": v for k, v in plain.state_dict().items()}  # compiled inside DDP
    load_state_strict(create_student(cfg, 4), ddp_style, "DDP weights")
    with pytest.raises(UserError, match="does not match the model"):
        load_state_strict(plain, {f"_orig_mod.{k}": v for k, v in list(plain.state_dict().items())[1:]}, "partial")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(tmp_path):
    proc = run_script("train_student.py", *BASE, "train.device=cuda", f"run.out_dir={tmp_path}", "run.name=r")
    assert_clean_error(proc, "train.device=cuda but no CUDA device is visible")
    assert not (tmp_path / "r").exists()


def test_compile_failure_names_it_and_the_eager_way(tmp_path):
    """A C++ compiler that does not exist makes inductor fail at the first step: a clear error naming
    torch.compile and train.compile=false, exit 2, no traceback, and the run continues eagerly from where it was."""
    env = {**ONE_THREAD, "CXX": "/nonexistent/g++", "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    proc = run_script("train_student.py", *LABEL_ONLY, "train.compile=true", f"run.out_dir={tmp_path}",
                      "run.name=r", env=env)
    assert_clean_error(proc, "torch.compile failed (train.compile=true)", "InvalidCxxCompiler",
                       "train.compile=false")
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
    eager_run = run_script("train_student.py", *LABEL_ONLY, "train.compile=false", f"run.out_dir={tmp_path}",
                           "run.name=r", "run.resume=auto", env=ONE_THREAD)
    assert eager_run.returncode == 0, eager_run.stderr[-3000:]
    assert (tmp_path / "r" / "results.json").exists()


def test_amp_auto_resolves_by_device_and_gpu_generation(monkeypatch):
    """auto: off on CPU; bf16 on a GPU that computes it natively; fp16 (with the GradScaler) on an older one."""
    from engine.optim import resolve_amp
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_amp("auto", cpu) == "off" and resolve_amp("fp16", cpu) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation
                        and native["bf16"])
    native = {"bf16": True}
    assert resolve_amp("auto", cuda) == "bf16"
    native["bf16"] = False  # e.g. a V100 or T4
    assert resolve_amp("auto", cuda) == "fp16" and resolve_amp("bf16", cuda) == "bf16"


def test_rng_state_keeps_only_this_processes_cuda_device(monkeypatch):
    """A checkpoint holds the RNG state of the rank's own GPU, restored with set_rng_state: resuming where fewer
    GPUs are visible cannot index a device that is not there."""
    import common.rng
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: calls.append(state))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("all devices' states saved"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("all devices' states restored"))
    state = common.rng.rng_state()
    assert torch.equal(state["cuda_device"], torch.tensor([7], dtype=torch.uint8)) and "cuda" not in state
    common.rng.set_rng_state(state)
    assert len(calls) == 1 and torch.equal(calls[0], state["cuda_device"])


def test_normalisation_statistics_are_made_once_per_device():
    """The (mean, std) tensors are built once and reused (no host-to-device copy per batch); the values agree with
    the formula (x - 255 mean) / (255 std)."""
    from imagedata.normalization import IMAGENET_NORM, _pixel_scale, normalize_batch
    a, b = _pixel_scale(IMAGENET_NORM, torch.device("cpu")), _pixel_scale(IMAGENET_NORM, torch.device("cpu"))
    assert a[0] is b[0] and a[1] is b[1]
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean = torch.tensor(IMAGENET_NORM[0]).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_NORM[1]).view(1, 3, 1, 1) * 255
    assert torch.equal(normalize_batch(x, torch.device("cpu"), False), (x.float() - mean) / std)
