"""The pytest-benchmark suite (bench/micro) runs: every provider passes its output check once (no timing)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vdistill.bench.micro.checks import check_close

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_micro_benchmarks_pass_their_checks_once():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/micro", "-q", "--benchmark-disable", "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-1000:]


def test_output_check_names_the_output_that_drifts():
    want = torch.randn(64, dtype=torch.float64)
    check_close("O", want + 1e-6 * want, want, torch.float32)
    with pytest.raises(AssertionError, match="dQ: relative error"):
        check_close("dQ", want + 1e-3 * want, want, torch.float32)
    check_close("dQ", (want + 1e-2 * want).bfloat16(), want, torch.bfloat16)
    with pytest.raises(AssertionError, match="all zeros"):
        check_close("F", torch.zeros(4), torch.zeros(4), torch.float32)
