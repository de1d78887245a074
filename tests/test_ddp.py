"""DDP under torchrun (2 CPU processes, gloo): every rank acts on rank 0's curriculum decision and evaluates with
rank 0's BatchNorm statistics, also across a SIGKILL and `run.resume=auto`.

The scripts record what each rank applied when KD_TRACE_DIR is set (utils.trace): per epoch the agent's action,
target, temperature, selection and this rank's shard; per evaluation or difficulty pass a digest of the weights;
per checkpoint and resume a digest of the RNG state."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY, TINY_LABEL_ONLY, read_metrics, run_script

LAUNCHER = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
EPOCHS = 6
# 80 validation images, so that BatchNorm statistics that differ between ranks show in val/acc1 itself
RL_DDP = [*TINY, "data.synthetic.eval_images_per_class=20", "student.name=test_resnet", "kd.alpha=0.5",
          "difficulty.warmup_epochs=1", "difficulty.refresh_every=1", f"train.epochs={EPOCHS}", "agent.name=ppo",
          "agent.ppo.n_steps=2", "agent.ppo.batch_size=2"]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in their own sessions, so a process-group kill
    would miss them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def torchrun_and_sigkill(*args: str, env: dict, watch: Path, after_lines: int, log: Path) -> None:
    """Launch train_student_rl.py under torchrun; once `watch` has `after_lines` lines, SIGKILL the launcher and
    both workers."""
    with open(log, "w") as out:
        proc = subprocess.Popen([*LAUNCHER, str(ROOT / "train_student_rl.py"), *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **env})
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if watch.exists() and len(watch.read_text().splitlines()) >= after_lines:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed:\n" + log.read_text()[-3000:]
        for pid in [*_descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


def read_trace(folder: Path, kind: str) -> list[list[dict]]:
    """[rank 0's records, rank 1's records] of one kind."""
    return [[json.loads(ln) for ln in (folder / f"{kind}.rank{r}.jsonl").read_text().splitlines()] if
            (folder / f"{kind}.rank{r}.jsonl").exists() else [] for r in (0, 1)]


def single_process_evaluator(cfg):
    """A function (weights file, split) -> `engine.evaluation.evaluate` of those weights in this single process."""
    import torch

    from engine.evaluation import evaluate
    from engine.optim import autocast_for
    from imagedata.augment import AugSpec
    from imagedata.image_sources import load_splits
    from imagedata.samplers import ShardSampler
    from imagedata.views import EvalViews, make_loader
    from models import create_student
    splits, cpu = load_splits(cfg.data), torch.device("cpu")
    num_classes = len(splits["train"].class_names)
    loaders = {s: make_loader(EvalViews(splits[s], AugSpec.from_cfg(cfg.data)), ShardSampler(len(splits[s])),
                              cfg.train.eval_batch_size, 0, cpu) for s in ("validation", "test")}

    def run(weights: Path, split: str) -> dict:
        student = create_student(cfg, num_classes)
        student.load_state_dict(torch.load(weights, map_location="cpu"))
        if cfg.train.channels_last:
            student = student.to(memory_format=torch.channels_last)
        return evaluate(student, loaders[split], cpu, cfg.train.channels_last, autocast_for("off", cpu), num_classes)

    return run


def test_ddp_ranks_share_decisions_rng_and_batchnorm_across_sigkill_and_resume(tmp_path):
    """Issue 9, items 1 and 2: a 2-process PPO curriculum run, SIGKILLed once it has logged two epochs, then
    resumed with run.resume=auto. Both ranks apply identical actions, targets, temperatures and selections every epoch (their shards partition
    the selection); each rank gets its own RNG state back on resume; every evaluation and difficulty pass uses
    identical weights and BatchNorm buffers on both ranks; and every epoch's val/acc1 (and the final
    test/acc1_last) equals a single-process evaluation of that epoch's weights."""
    from common.config import load_config
    from engine.rl_schema import RLConfig
    args = [*RL_DDP, f"run.out_dir={tmp_path}", "run.name=ddp"]
    run_dir, before, after = tmp_path / "ddp", tmp_path / "trace_before", tmp_path / "trace_after"
    # a busy machine may let the run go past epoch 2 before the kill lands: any resume epoch from 1 on will do
    torchrun_and_sigkill(*args, env={"OMP_NUM_THREADS": "1", "KD_TRACE_DIR": str(before)},
                         watch=run_dir / "metrics.jsonl", after_lines=2, log=tmp_path / "killed.log")
    import torch
    resume_epoch = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["epoch"]
    assert 1 <= resume_epoch < EPOCHS
    resumed = run_script("train_student_rl.py", *args, "run.resume=auto", launcher=LAUNCHER,
                         env={"OMP_NUM_THREADS": "1", "KD_TRACE_DIR": str(after)})
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'last.pt'} at epoch {resume_epoch}" in resumed.stdout

    problems = []
    # ---- item 1: one decision per epoch, the same on both ranks ----------------------------------------------
    applied = {}  # epoch -> rank 0's decision of the run that produced the final logs
    for phase, folder, epochs in (("before the kill", before, range(resume_epoch)),
                                  ("after the resume", after, range(resume_epoch, EPOCHS))):
        rank0, rank1 = ({d["epoch"]: d for d in records} for records in read_trace(folder, "decisions"))
        for epoch in epochs:
            a, b = rank0.get(epoch), rank1.get(epoch)
            if a is None or b is None:
                problems.append(f"{phase}: epoch {epoch} missing from a rank's trace")
                continue
            applied[epoch] = a
            for key in ("action", "target", "temperature", "selection", "difficulty"):
                if a[key] != b[key]:
                    problems.append(f"{phase}, epoch {epoch}: {key} differs across ranks: {a[key]} vs {b[key]}")
            if set(a["shard"]) | set(b["shard"]) != set(a["selection"]):
                problems.append(f"{phase}, epoch {epoch}: the two shards do not partition rank 0's selection")
    logged = [json.loads(ln) for ln in (run_dir / "curriculum.jsonl").read_text().splitlines()]
    assert [ln["epoch"] for ln in logged] == list(range(EPOCHS))
    for ln in logged:  # curriculum.jsonl records what was applied
        d = applied.get(ln["epoch"])
        if d is not None and (ln["action"], ln["target"], ln["temperature"]) != (d["action"], d["target"],
                                                                                d["temperature"]):
            problems.append(f"curriculum.jsonl epoch {ln['epoch']} logs {ln['action']}, {ln['target']}, "
                            f"{ln['temperature']} but the ranks applied {d['action']}, {d['target']}, "
                            f"{d['temperature']}")

    # ---- item 1: every rank's RNG state is saved and restored --------------------------------------------------
    saved, restored = read_trace(before, "rng_saved"), read_trace(after, "rng_restored")
    for rank in (0, 1):
        at_resume = [r["digest"] for r in saved[rank] if r["epoch"] == resume_epoch]
        got = [r["digest"] for r in restored[rank] if r["epoch"] == resume_epoch]
        if not at_resume or got != at_resume[-1:]:
            problems.append(f"rank {rank} resumed at epoch {resume_epoch} with RNG state {got}, saved {at_resume}")

    # ---- item 2: rank 0's weights and BatchNorm buffers in every evaluation and difficulty pass ------------------
    for phase, folder in (("before the kill", before), ("after the resume", after)):
        rank0, rank1 = read_trace(folder, "weights")
        for a, b in zip(rank0, rank1):
            if a != b:
                problems.append(f"{phase}: {a['pass']} pass after epoch {a['epoch']} used different weights on "
                                f"the two ranks ({a['digest']} vs {b['digest']})")
        passes = {r["pass"] for r in rank0}
        assert passes >= {"validation", "difficulty"} or phase == "after the resume" and resume_epoch == EPOCHS - 1
        assert "test" in passes or phase == "before the kill"

    single_process = single_process_evaluator(load_config(RLConfig, str(run_dir / "config.yaml")))
    for record in read_metrics(run_dir):
        epoch = record["epoch"]
        weights = (before if epoch < resume_epoch else after) / f"weights_validation_e{epoch:03d}.pt"
        single = single_process(weights, "validation")
        if (single["acc1"], single["acc5"]) != (record["val/acc1"], record["val/acc5"]) or \
                single["loss"] != pytest.approx(record["val/loss"], rel=1e-5):
            problems.append(f"epoch {epoch}: val/acc1, acc5, loss under DDP {record['val/acc1']}, "
                            f"{record['val/acc5']}, {record['val/loss']}; one process on rank 0's weights "
                            f"{single['acc1']}, {single['acc5']}, {single['loss']}")
    results = json.loads((run_dir / "results.json").read_text())
    last = single_process(after / f"weights_validation_e{EPOCHS - 1:03d}.pt", "test")
    if last["acc1"] != results["test/acc1_last"]:
        problems.append(f"test/acc1_last under DDP {results['test/acc1_last']}, one process {last['acc1']}")
    assert not problems, f"resumed at epoch {resume_epoch}:\n" + "\n".join(problems)


def test_resume_restores_each_ranks_rng_state_and_warns_on_another_world_size(tmp_path, capsys):
    """Each rank restores its own saved RNG state; checkpoints from before per-rank states ("rng": rank 0's) still
    load; with a different number of processes the run continues, ranks without a saved state are reseeded from
    (train.seed, epoch, rank) and rank 0 warns (docs/getting-started.md, "Resume a run")."""
    import torch

    from common.config import load_config
    from common.distributed import DistInfo
    from common.rng import rng_state, seed_everything
    from engine.schema import Config
    from engine.trainer import Trainer
    cfg = load_config(Config, None, [*TINY_LABEL_ONLY, "train.seed=5"])
    trainer = Trainer(cfg, DistInfo(), None)
    states = []
    for seed in (1, 2):
        seed_everything(seed)
        states.append(rng_state())
    path = tmp_path / "last.pt"

    def restored(ckpt_rng: dict, rank: int = 0, world: int = 1) -> torch.Tensor:
        trainer.dist = DistInfo(rank=rank, world_size=world)
        seed_everything(99)
        ckpt = {k: v for k, v in trainer.state_dict(3).items() if k != "rng_per_rank"}
        trainer.load_state({**ckpt, **ckpt_rng}, path)
        return torch.get_rng_state()

    assert torch.equal(restored({"rng_per_rank": [states[0]]}), states[0]["torch"])
    assert torch.equal(restored({"rng": states[1]}), states[1]["torch"])  # an older checkpoint
    assert "warning" not in capsys.readouterr().err
    assert torch.equal(restored({"rng_per_rank": states}, rank=1, world=2), states[1]["torch"])
    assert torch.equal(restored({"rng_per_rank": states}), states[0]["torch"])  # 2 processes -> 1
    err = capsys.readouterr().err
    assert "holds the random state of 2 process(es); this run has 1" in err and "continues from epoch 3" in err
    seed_everything(5 + 7919 * 3, 1)
    fresh = torch.get_rng_state()
    assert torch.equal(restored({"rng_per_rank": states[:1]}, rank=1, world=2), fresh)  # 1 process -> 2
    assert capsys.readouterr().err == ""  # only rank 0 warns


# ---------------------------------------------------------------------------------------------------------------
# In-process DDP: 2 gloo processes started by torch.multiprocessing (no torchrun, no script start-up).
# ---------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_ranks(worker, *args) -> None:
    """Run `worker(rank, *args)` in 2 processes joined in one gloo group (rank 0 and 1); an error in either fails
    the test (torch.multiprocessing ends the other)."""
    import torch.multiprocessing as mp
    mp.start_processes(worker, args=(_free_port(), *args), nprocs=2, join=True, start_method="spawn")


def _ranks_with_their_own_agents(rank: int, port: int, out_dir: str, trace_folder: str) -> None:
    """One rank of a 2-epoch curriculum run whose agents act differently on each rank (RandomAgent seeded by rank):
    only the broadcast of rank 0's decision keeps the ranks on one curriculum."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "KD_TRACE_DIR": trace_folder})
    import torch
    torch.set_num_threads(1)
    from agents import RandomAgent
    from common.config import load_config
    from common.distributed import cleanup_distributed, setup_distributed
    from common.metrics import MetricLogger
    from engine.curriculum_run import CurriculumRun
    from engine.rl_schema import RLConfig
    cfg = load_config(RLConfig, None, [*TINY, "kd.alpha=0.5", "train.epochs=2", "difficulty.warmup_epochs=0",
                                       "difficulty.refresh_every=1", "agent.name=random", f"run.out_dir={out_dir}",
                                       f"teacher.cache_dir={Path(out_dir) / 'cache'}"])
    dist = setup_distributed("cpu")
    run_dir = Path(out_dir) / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    run = CurriculumRun(cfg, dist, run_dir)
    run.agent = RandomAgent(seed=100 + rank)  # a different random stream on each rank
    run.fit(MetricLogger(run_dir / "metrics.jsonl", dist.is_main))
    cleanup_distributed()


def test_every_rank_applies_rank_0s_decision_when_the_ranks_agents_differ(tmp_path):
    """Issue 16: agents that would act differently on each rank (here seeded by rank; in general any agent that
    samples from the process's own random streams): every rank applies rank 0's action, target, temperature and
    selection each epoch, and the shards partition that selection (engine.curriculum_run.CurriculumRun.decide,
    apply_curriculum)."""
    trace_folder = tmp_path / "trace"
    _spawn_ranks(_ranks_with_their_own_agents, str(tmp_path), str(trace_folder))
    rank0, rank1 = read_trace(trace_folder, "decisions")
    assert [d["epoch"] for d in rank0] == [d["epoch"] for d in rank1] == [0, 1]
    for a, b in zip(rank0, rank1):
        for key in ("action", "target", "temperature", "selection", "difficulty"):
            assert a[key] == b[key], (a["epoch"], key, a[key], b[key])
        assert sorted(a["shard"] + b["shard"]) == sorted(a["selection"])
    logged = [json.loads(ln) for ln in (tmp_path / "run" / "curriculum.jsonl").read_text().splitlines()]
    assert [ln["action"] for ln in logged] == [d["action"] for d in rank0]


def _rank_1_fails_while_scoring_the_cache(rank: int, port: int, out_dir: str) -> None:
    """One rank of a 2-rank teacher cache build in which rank 1's image decoder crashes (a RuntimeError, not a
    UserError) on its first training image. Each rank writes how its build ended to rank<r>.txt. The failed rank
    stays alive for a while, as a process of a launch does while it prints its traceback and its launcher reacts:
    a rank left waiting at a collective shows as no file."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    import contextlib

    import torch
    torch.set_num_threads(1)
    from common.config import load_config
    from common.distributed import setup_distributed
    from engine.schema import Config
    from engine.teacher_cache import build_or_load_cache
    from imagedata.augment import AugSpec
    from imagedata.image_sources import load_splits
    from models import create_teacher
    cfg = load_config(Config, None, TINY)
    dist = setup_distributed("cpu")
    sources = load_splits(cfg.data)
    teacher = create_teacher(cfg, sources["train"].class_names)
    if rank == 1:
        def crash(index):
            raise RuntimeError("the image decoder crashed")
        sources["train"].load = crash
    try:
        build_or_load_cache(teacher, sources, AugSpec.from_cfg(cfg.data), 2, 0, Path(out_dir) / "cache", dist, 16, 0,
                            contextlib.nullcontext)
        outcome = "finished"
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    Path(out_dir, f"rank{rank}.txt").write_text(outcome)
    deadline = time.time() + 40
    while time.time() < deadline and not Path(out_dir, f"rank{1 - rank}.txt").exists():
        time.sleep(0.1)
    os._exit(0)  # no process-group teardown: a peer may be gone


def test_an_error_on_one_rank_while_scoring_the_cache_stops_every_rank(tmp_path):
    """Issue 23: an exception on one rank while the teacher cache was scored left the other ranks waiting at the
    next collective for good. The ranks now agree on failure before the barrier: the failed rank raises its own
    error, every other rank stops with a UserError naming it, and nothing partial is published."""
    import torch.multiprocessing as mp
    context = mp.start_processes(_rank_1_fails_while_scoring_the_cache, args=(_free_port(), str(tmp_path)),
                                 nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 180
    while not context.join(timeout=1) and time.time() < deadline:
        pass
    for process in context.processes:
        if process.is_alive():
            process.kill()
    outcomes = {r: (tmp_path / f"rank{r}.txt").read_text() if (tmp_path / f"rank{r}.txt").exists() else None
                for r in (0, 1)}
    assert outcomes[1] == "RuntimeError: the image decoder crashed", outcomes
    assert outcomes[0] is not None and outcomes[0].startswith("UserError: rank 1 stopped while building the "
                                                              "teacher cache (RuntimeError: the image decoder "
                                                              "crashed)"), outcomes
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
