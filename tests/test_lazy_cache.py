"""teacher.cache_fill=lazy: the teacher cache filled by training itself gives the eager cache's slots and the
eager run's numbers, every digit; a kill keeps what was written and the resumed run ends equal; a second run of the
same cache never writes while another fills it, and reads no unfilled slot."""
from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, Killed, call_main, read_metrics

RUN = [*TINY, "train.epochs=3"]  # K = 2 views: a lazy run fills every slot in epochs 1-2, epoch 3 only reads
METHODS = {"kd": ["kd.alpha=0.5"], "dkd": ["kd.method=dkd"], "dist": ["kd.method=dist"],
           "pooled_hint": ["kd.method=pooled_hint", "kd.alpha=0.5"]}


def _train(out: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    import train_student
    proc = call_main(train_student.main, [*RUN, f"run.out_dir={out}", f"run.name={name}", *extra])
    assert proc.returncode in (0, None), proc.stderr[-3000:]
    return proc


def _numbers(run_dir: Path) -> tuple[list[dict], dict]:
    """(metrics.jsonl without the timings, the student's tensors)."""
    metrics = [{k: v for k, v in rec.items() if not k.startswith("time/")} for rec in read_metrics(run_dir)]
    return metrics, load_file(run_dir / "student.safetensors")


def _assert_same_numbers(a: Path, b: Path) -> None:
    (metrics_a, weights_a), (metrics_b, weights_b) = _numbers(a), _numbers(b)
    assert metrics_a == metrics_b
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def _cache_dir_of(cache_dir: Path) -> Path:
    """The one published cache in `cache_dir`."""
    [root] = [p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return root


def _arrays(root: Path) -> dict[str, bytes]:
    """Every stored byte a run reads: the training slots and flags, and each split's evaluation-view logits once
    they are marked scored (a lazy KD run reads the validation and test ones for the teacher's accuracy, and never
    the training split's, which only the curriculum reads)."""
    train = np.load(root / "train.npy")
    out = {"flags": np.load(root / "train.filled.npy").tobytes(),
           **{field: train[field].tobytes() for field in train.dtype.names if field != "eval_logits"}}
    for split in ("train", "validation", "test"):
        if (root / f"{split}.eval.done").exists():
            out[f"{split} eval"] = np.load(root / f"{split}.npy")["eval_logits"].tobytes()
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_a_lazy_run_equals_the_eager_run_every_digit(tmp_path, method):
    """The same config with teacher.cache_fill=eager and =lazy, each with its own cache: the lazily filled cache
    holds the eager cache's bytes (logits, records, pooled features for pooled_hint, flags), and the two runs give
    the same metrics and weights. Epoch 1 fills half of the slots, epoch 2 the rest, epoch 3 only reads."""
    for fill in ("eager", "lazy"):
        _train(tmp_path / fill, "run", *METHODS[method], f"teacher.cache_fill={fill}")
    eager, lazy = (_cache_dir_of(tmp_path / fill / "teacher_cache") for fill in ("eager", "lazy"))
    assert eager.name == lazy.name  # one fingerprint: the fill mode does not change a slot
    stored_eager, stored_lazy = _arrays(eager), _arrays(lazy)
    assert "train eval" not in stored_lazy  # never read, so never scored
    del stored_eager["train eval"]
    assert stored_eager == stored_lazy and {"validation eval", "test eval", "view_logits"} <= stored_lazy.keys()
    assert np.load(lazy / "train.filled.npy").all()
    if method == "pooled_hint":
        assert np.abs(np.load(lazy / "train.npy")["view_features"].astype(np.float32)).sum() > 0
    _assert_same_numbers(tmp_path / "eager" / "run", tmp_path / "lazy" / "run")


def _hold_lock(path: Path):
    """Another process holding `path` (a filelock), as a second run filling the same cache would."""
    code = ("import sys, time; from filelock import FileLock; l = FileLock(sys.argv[1]); l.acquire(); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_killed_lazy_run_keeps_its_slots_resumes_equal_and_a_second_run_never_writes(tmp_path, monkeypatch):
    """1. A lazy run killed in epoch 2 (after its first checkpoint), at its third batch's write, between storing
       the logits and marking them filled: the slots of every earlier batch stay filled, the interrupted write's
       stay unfilled (never flagged over logits that might not be there).
    2. While another process holds the fill lock, a second run of the same cache prints that it does not write,
       scores the missing slots itself, leaves the flags as they were, and ends with the eager run's numbers.
    3. The killed run, resumed, fills the rest and ends with the eager run's numbers, every digit.
    4. teacher.cache_fill=eager on a cache a killed lazy run left fills the rest before training, to the same bytes."""
    from engine.teacher_cache import TeacherCache, fill_lock_path
    _train(tmp_path, "eager", *METHODS["kd"], "teacher.cache_fill=eager", "teacher.cache_dir=" + str(tmp_path / "eager_cache"))
    lazy = [*METHODS["kd"], f"teacher.cache_dir={tmp_path / 'cache'}", "teacher.cache_fill=lazy"]

    writes = {"n": 0}
    mark = TeacherCache._mark_filled

    def die_at_the_eighth_write(self, index, view):
        writes["n"] += 1
        if writes["n"] == 8:  # epoch 1 writes 6 batches (48 images, batch 8), so this is epoch 2's second one
            raise Killed
        mark(self, index, view)

    with monkeypatch.context() as mp:
        mp.setattr(TeacherCache, "_mark_filled", die_at_the_eighth_write)
        with pytest.raises(Killed):
            _train(tmp_path, "lazy", *lazy)
    root = _cache_dir_of(tmp_path / "cache")
    flags = np.load(root / "train.filled.npy")
    n_train = flags.shape[0]
    assert flags.sum() == n_train + 8  # epoch 1's every slot, then epoch 2's first batch; not the killed write's
    eager = np.load(_cache_dir_of(tmp_path / "eager_cache") / "train.npy")
    stored = np.load(root / "train.npy")
    filled = flags.astype(bool)
    assert np.array_equal(stored["view_logits"][filled], eager["view_logits"][filled])
    assert np.array_equal(stored["view_records"][filled], eager["view_records"][filled])

    partial = tmp_path / "partial_cache"  # the cache as the kill left it, for the eager run of step 4
    shutil.copytree(tmp_path / "cache", partial)

    holder = _hold_lock(fill_lock_path(root))
    try:
        proc = _train(tmp_path, "reader", *lazy)
    finally:
        holder.kill()
        holder.wait()
    assert "not written" in proc.stdout
    assert np.array_equal(np.load(root / "train.filled.npy"), flags)  # it wrote nothing
    _assert_same_numbers(tmp_path / "eager", tmp_path / "reader")

    _train(tmp_path, "lazy", *lazy, "run.resume=auto")
    assert np.load(root / "train.filled.npy").all()
    stored_eager = _arrays(_cache_dir_of(tmp_path / "eager_cache"))
    del stored_eager["train eval"]
    assert _arrays(root) == stored_eager
    _assert_same_numbers(tmp_path / "eager", tmp_path / "lazy")

    # 4. an eager run on the cache as the kill left it scores every remaining slot before its first step
    from engine.teacher_cache import SlotFiller
    monkeypatch.setattr(SlotFiller, "complete", lambda *a: pytest.fail("an eager run scored a slot in training"))
    proc = _train(tmp_path, "finisher", *METHODS["kd"], f"teacher.cache_dir={partial}", "teacher.cache_fill=eager")
    assert "teacher cache reused" in proc.stdout and np.load(_cache_dir_of(partial) / "train.filled.npy").all()
    stored = _arrays(_cache_dir_of(partial))
    assert all(stored[k] == stored_eager[k] for k in ("flags", "view_logits", "view_records"))
    _assert_same_numbers(tmp_path / "eager", tmp_path / "finisher")


def test_forward_chunks_gives_a_view_the_same_logits_in_any_company():
    """What the lazy fill rests on: through `forward_chunks` (one forward shape, the last forward padded), a view's
    float32 logits (before the fp16 rounding, which would hide most differences) do not depend on which views share
    its forward, how many, or where it sits. (Without the padding they do on this CPU: oneDNN runs a forward of
    fewer than 16 images with other kernels.)"""
    import timm

    from engine.teacher_cache import forward_chunks
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=6).eval()
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    cpu = torch.device("cpu")
    with torch.no_grad():
        reference, _ = forward_chunks(model, images, 16, cpu, contextlib.nullcontext)
        for seed in range(4):
            g = torch.Generator().manual_seed(seed)
            rows = torch.randperm(40, generator=g)[:int(torch.randint(1, 40, (1,), generator=g))]
            logits, _ = forward_chunks(model, images[rows], 16, cpu, contextlib.nullcontext)
            assert torch.equal(logits, reference[rows]), seed


def test_lazy_filling_across_machines_is_refused(monkeypatch, tmp_path):
    """Ranks on several machines would write one cache file through a shared filesystem: refused, naming the
    eager build that works there. A full cache is only read, which works anywhere."""
    from common.distributed import DistInfo
    from common.errors import UserError
    from engine.teacher_cache import TeacherCache, open_filler
    cache = TeacherCache(tmp_path, {"num_views": 2, "num_classes": 4})
    cache.complete = False
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    with pytest.raises(UserError, match="teacher.cache_fill=eager"):
        open_filler(cache, None, 8, DistInfo(rank=0, world_size=2), contextlib.nullcontext)
    cache.complete = True
    for split in ("train", "validation", "test"):
        (tmp_path / f"{split}.eval.done").touch()
    assert open_filler(cache, None, 8, DistInfo(rank=0, world_size=2), contextlib.nullcontext) == (None, "reads")


def test_two_ranks_fill_the_cache_lazily_to_the_eager_runs_numbers(tmp_path):
    """DDP (torchrun, 2 CPU processes, gloo, one machine): each rank scores and writes the unfilled rows of its own
    batches, and the validation and test evaluation views at the end (each rank its shard); the cache and the run
    equal a 2-rank eager run's."""
    from conftest import run_script
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for fill in ("eager", "lazy"):
        proc = run_script("train_student.py", *RUN, *METHODS["kd"], "train.epochs=2", f"teacher.cache_fill={fill}",
                          f"run.out_dir={tmp_path / fill}", "run.name=run", launcher=launcher,
                          env={"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
    eager, lazy = (_cache_dir_of(tmp_path / fill / "teacher_cache") for fill in ("eager", "lazy"))
    stored_eager, stored_lazy = _arrays(eager), _arrays(lazy)
    del stored_eager["train eval"]
    assert stored_eager == stored_lazy and np.load(lazy / "train.filled.npy").all()
    _assert_same_numbers(tmp_path / "eager" / "run", tmp_path / "lazy" / "run")
