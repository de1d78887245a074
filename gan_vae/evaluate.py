"""Re-evaluate a saved continual run from its per-task checkpoints.

    python -m gan_vae.evaluate runs/<run>
    python -m gan_vae.evaluate runs/<run> fid.samples=2000      # config overrides apply on top of its config.yaml

Rebuilds every row R[i][·] from checkpoints/task_i.pt with the run's own config (FID features, sample counts,
seeds), then rewrites results.json (keeping the run's time/wall_s), forgetting_report.md and the heatmaps, and
prints the report. With the run's own config the matrices are reproduced exactly: every evaluation draws its
samples from a generator seeded by (seed, task, evaluated task).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from gan_vae import forgetting
from gan_vae.continual import ContinualConfig, ContinualRun, validate
from utils import UserError, load_checkpoint, load_config, make_dirs, run_cli, setup_distributed, write_json


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    run_dir = Path(argv[0])
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a gan_vae run directory (no config.yaml)")
    cfg = load_config(ContinualConfig, str(run_dir / "config.yaml"), argv[1:])
    validate(cfg)
    make_dirs({"the run directory": run_dir}, probe=True)  # before the work: it rewrites results.json at the end
    cfg.run.out_dir = str(run_dir.parent)
    dist = setup_distributed(cfg.train.device)
    checkpoints = sorted(run_dir.glob("checkpoints/task_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    if not checkpoints:
        raise UserError(f"{run_dir}/checkpoints holds no task_<i>.pt: no finished task to evaluate")
    run = None
    matrices = {}
    for i, path in enumerate(checkpoints):
        run = ContinualRun(cfg, None, dist.device)
        if i == 0:
            run.build_fid()
            evaluator, fid_info = run.evaluator, run.fid_info
        run.evaluator, run.fid_info = evaluator, fid_info
        run.load(load_checkpoint(path), path)
        for key, row in run.evaluate(i).items():
            matrices.setdefault(key, []).append(row)
        print(f"re-evaluated {path.name}", file=sys.stderr)
    run.matrices = matrices
    results = run.results()
    previous = run_dir / "results.json"
    if previous.is_file():  # what re-evaluation does not measure (the run's wall time) is kept
        kept = json.loads(previous.read_text())
        results.update({k: v for k, v in kept.items() if k.startswith("time/")})
    write_json(run_dir / "results.json", results)
    print(forgetting.report(results, list(cfg.data.tasks), run_dir))


if __name__ == "__main__":
    run_cli(main)
