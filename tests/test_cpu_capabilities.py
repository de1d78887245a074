"""The numerics-sensitive tests once more, under a second ATen CPU capability (issue 23).

ATen picks its vectorised kernels once, at start-up, by what the CPU offers: AVX-512, AVX2 or scalar (`default`);
the variable ATEN_CPU_CAPABILITY forces a lower one. The kernels of different vector widths add floats in different
orders, so two computations that round alike on one CPU can differ in the last bit on another: the gan_vae case of
test_refactor_identity.py passed on AVX-512 and failed on an AVX2-only CPU. The tests marked `numerics` (pytest.ini)
compare floats bit for bit and are cheap enough to run twice. This test runs them again in one pytest subprocess,
under the capability this CPU does not use by default: avx2 on an AVX-512 CPU, the scalar `default` on any other.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import ROOT

TESTS = ROOT / "tests"


def other_capability() -> str:
    """The ATEN_CPU_CAPABILITY value whose kernels this process does not use: avx2 under AVX-512, else default."""
    return "avx2" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "default"


def numerics_files() -> list[str]:
    """The test files that hold a test marked numerics (read, not imported: only these are collected again)."""
    return sorted(str(p) for p in TESTS.glob("test_*.py")
                  if p.name != Path(__file__).name and "@pytest.mark.numerics" in p.read_text())


def test_numerics_tests_pass_under_another_cpu_capability():
    capability = other_capability()
    files = numerics_files()
    assert files
    # ATen reads the variable when torch is imported: the child prints the capability it got, then runs pytest
    # without xdist (one process, the scripts it starts on one thread, as under the suite's workers)
    child = ("import sys, pytest, torch; print('ATen CPU capability:', torch.backends.cpu.get_cpu_capability()); "
             "sys.exit(pytest.main(sys.argv[1:]))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run([sys.executable, "-c", child, "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
                           "-o", "addopts=", "-m", "numerics", *files], cwd=ROOT, capture_output=True, text=True,
                          timeout=540, env=env)
    assert f"ATen CPU capability: {capability.upper()}" in proc.stdout, proc.stdout[-3000:]
    assert proc.returncode == 0, (capability, proc.stdout[-6000:], proc.stderr[-3000:])
    assert " passed" in proc.stdout.splitlines()[-1], proc.stdout[-3000:]
