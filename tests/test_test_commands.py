"""The documented test commands (README, docs/design.md) work as written: the parallel default and the serial one
without pytest-xdist."""
import subprocess
import sys

from conftest import ROOT


def test_serial_command_without_xdist_collects():
    # docs/design.md, Tests: `python -m pytest -q -p no:xdist -o addopts=""`. It stopped at collection with exit 3 while
    # conftest.py defined an xdist hook that pytest did not know without the plugin.
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-o", "addopts=", "--collect-only",
                           "tests/test_kd_loss.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "INTERNALERROR" not in proc.stdout + proc.stderr
