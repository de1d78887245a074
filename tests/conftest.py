"""Shared helpers: run the scripts the way a user does (a subprocess in the repository root), tiny configs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

# A run small enough for a few seconds on a 2-core CPU: 4 synthetic classes, 32 px, small timm models.
TINY = ["data.name=synthetic", "data.synthetic.num_classes=4", "data.synthetic.images_per_class=12",
        "data.synthetic.image_size=32", "data.image_size=32", "data.crop_scale_min=0.35", "data.workers=0",
        "teacher.name=resnet10t", "teacher.pretrained=false", "teacher.cache_views=2", "student.name=mobilenetv2_035",
        "train.batch_size=8", "train.eval_batch_size=16", "train.epochs=2", "eval.latency=false"]


def run_script(script: str, *args: str, timeout: float = 300, env: dict | None = None,
               launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + [str(ROOT / script), *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user error: non-zero exit, a one-paragraph message naming the problem, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "error:" in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA
