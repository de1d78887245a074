"""Multi-node on one machine: two torchrun launchers (--nnodes=2, --node_rank=0 and 1, one process each,
--master_addr=127.0.0.1 and a free port), the launch docs/distributed.md documents. Gloo on CPU."""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY, read_metrics, run_script
from test_ddp import _descendants, read_trace

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
RUN = [*TINY, "student.name=test_resnet", "kd.alpha=0.5", "teacher.mode=cached", "train.epochs=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(node_rank: int, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}",
            "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}"]


def two_nodes(script: str, args0: list[str], args1: list[str] | None = None, env: dict | None = None,
              kill_when: tuple[Path, int] | None = None, timeout: float = 400) -> list[subprocess.CompletedProcess]:
    """Start node 0 and node 1 (each a torchrun launcher with its own arguments), wait for both; or, with
    kill_when=(file, lines), SIGKILL both launchers and their workers once `file` has that many lines (0: once it
    exists)."""
    import signal
    import time
    port = free_port()
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD, **(env or {})}
    procs = [subprocess.Popen([*launcher(node, port), str(ROOT / script), *args], cwd=ROOT, env=full_env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node, args in ((0, args0), (1, args1 if args1 is not None else args0))]
    if kill_when is not None:
        watch, lines = kill_when
        deadline = time.time() + timeout
        while time.time() < deadline and all(p.poll() is None for p in procs):
            if watch.exists() and (lines == 0 or len(watch.read_text().splitlines()) >= lines):
                break
            time.sleep(0.05)
        assert all(p.poll() is None for p in procs), "a node ended before it could be killed"
        for p in procs:
            for pid in [*_descendants(p.pid), p.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def single_process_test_acc1(run_dir: Path, schema) -> float:
    """test/acc1 of the run's best.pt, evaluated here in one process (no DDP) with the run's config."""
    import torch
    from test_ddp import single_process_evaluator

    from common.config import load_config
    state = torch.load(run_dir / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)["model"]
    weights = run_dir.parent / f"{run_dir.name}_best_weights.pt"
    torch.save(state, weights)
    return single_process_evaluator(load_config(schema, str(run_dir / "config.yaml")))(weights, "test")["acc1"]


def check_single_writer(run_dir: Path, epochs: int) -> None:
    """Global rank 0 alone wrote the run: one metrics line per epoch, one results file, nothing per rank."""
    assert [r["epoch"] for r in read_metrics(run_dir)] == list(range(epochs))
    names = {p.name for p in run_dir.rglob("*")}
    assert not any("rank" in n for n in names), names
    assert {"config.yaml", "metrics.jsonl", "results.json", "best.pt", "last.pt", "student.safetensors"} <= names


def test_two_nodes_train_with_a_cache_built_across_both(tmp_path):
    trace = tmp_path / "trace"
    args = [*RUN, f"run.out_dir={tmp_path}", "run.name=mn"]
    nodes = two_nodes("train_student.py", args, env={"KD_TRACE_DIR": str(trace)})
    for node, proc in enumerate(nodes):
        assert proc.returncode == 0, f"node {node}:\n{proc.stderr[-3000:]}"
    assert "teacher cache built" in nodes[0].stdout and "teacher cache" not in nodes[1].stdout
    run_dir = tmp_path / "mn"
    # the cache was built sharded: each node scored about half of every split, together all of it
    shards = read_trace(trace, "cache_shard")
    from common.config import load_config
    from engine.schema import Config
    from imagedata.image_sources import load_splits
    sizes = {s: len(v) for s, v in load_splits(load_config(Config, str(run_dir / "config.yaml")).data).items()}
    for split, n in sizes.items():
        mine, theirs = ({i for r in shards[rank] if r["split"] == split for i in r["indices"]} for rank in (0, 1))
        assert mine | theirs == set(range(n)) and abs(len(mine) - len(theirs)) <= 1 and len(mine) < n, split
    # each rank wrote a shard file of its own, rank 0 merged them: none left over, no row unwritten (zeros)
    import numpy as np
    (cache_dir,) = [p for p in (tmp_path / "teacher_cache").iterdir() if p.is_dir()]
    assert sorted(p.name for p in cache_dir.glob("*.npy")) == ["test.npy", "train.filled.npy", "train.npy",
                                                                "validation.npy"]
    assert np.load(cache_dir / "train.filled.npy").all()  # teacher.cache_fill=auto: eager across machines
    for split, n in sizes.items():
        rows = np.load(cache_dir / f"{split}.npy")
        assert len(rows) == n and (np.abs(rows["eval_logits"].astype(np.float32)).sum(1) > 0).all(), split
        if split == "train":
            assert (np.abs(rows["view_logits"].astype(np.float32)).sum((1, 2)) > 0).all()
    check_single_writer(run_dir, 2)
    results = json.loads((run_dir / "results.json").read_text())
    single = single_process_test_acc1(run_dir, Config)
    print(f"two nodes: test/acc1 {results['test/acc1']} over {results['test/n']} images, one process {single}; "
          f"cache shards (node 0 / node 1): " + ", ".join(
              f"{s} {len({i for r in shards[0] if r['split'] == s for i in r['indices']})}/"
              f"{len({i for r in shards[1] if r['split'] == s for i in r['indices']})}" for s in sizes))
    assert single == results["test/acc1"]


def test_two_nodes_rl_run_killed_and_resumed(tmp_path):
    args = [*RUN, "train.epochs=5", "difficulty.warmup_epochs=1", "difficulty.refresh_every=1", "agent.name=ppo",
            "agent.ppo.n_steps=2", "agent.ppo.batch_size=2", f"run.out_dir={tmp_path}", "run.name=rl"]
    run_dir = tmp_path / "rl"
    two_nodes("train_student_rl.py", args, kill_when=(run_dir / "checkpoints" / "last.pt", 0))
    nodes = two_nodes("train_student_rl.py", [*args, "run.resume=auto"])
    for node, proc in enumerate(nodes):
        assert proc.returncode == 0, f"node {node}:\n{proc.stderr[-3000:]}"
    assert "resumed from" in nodes[0].stdout
    check_single_writer(run_dir, 5)
    assert [json.loads(x)["epoch"] for x in (run_dir / "curriculum.jsonl").read_text().splitlines()] == [0, 1, 2, 3, 4]
    results = json.loads((run_dir / "results.json").read_text())
    from engine.rl_schema import RLConfig
    single = single_process_test_acc1(run_dir, RLConfig)
    resumed_at = nodes[0].stdout.split("at epoch ")[1].split()[0]
    print(f"two nodes, RL: killed, resumed at epoch {resumed_at}; test/acc1 {results['test/acc1']}, one process "
          f"{single}")
    assert single == results["test/acc1"]


def test_nodes_given_different_configs_refuse_to_start_naming_the_key(tmp_path):
    args = [*RUN, f"run.out_dir={tmp_path}", "run.name=mismatch"]
    nodes = two_nodes("train_student.py", [*args, "kd.temperature=4"], [*args, "kd.temperature=2"])
    for node, proc in enumerate(nodes):
        assert proc.returncode != 0, f"node {node} did not fail"
        worker_error = [ln for ln in proc.stderr.splitlines() if "error: the processes of this launch" in ln]
        assert worker_error and "kd.temperature = 4.0 on rank 0 but 2.0 on rank 1" in worker_error[0], proc.stderr
        # the worker exits 2 with that one line and no traceback of its own; torchrun then reports the failed
        # child in its own words (ChildFailedError, a launcher traceback of torch's frames only)
        frames = re.findall(r'File "([^"]+)"', proc.stderr)
        ours = [f for f in frames if Path(f).is_relative_to(ROOT) and "site-packages" not in f]
        assert not ours, proc.stderr[-3000:]
    assert not (tmp_path / "mismatch").exists()
