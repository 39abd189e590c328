"""Context parallelism through the Triton kernels, interpreted: with a DiT's 45 tokens split over 2 gloo ranks, the
attention kernels (forward, backward, one-pass forward+JVP) run on each rank's heads and the output, forward-AD JVP
and gradients equal one process's (also through the kernels), float32."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/context_parallel_workers.py
from context_parallel_workers import model_and_inputs, results, run  # noqa: E402
from distributed_workers import free_port  # noqa: E402

from vdistill.kernels import dispatch  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def test_split_tokens_through_the_kernels_equal_one_process(tmp_path):
    assert dispatch.INTERPRET and dispatch.HAS_TRITON
    want = results(*model_and_inputs(layers=1), every_variant=False)  # one block: the interpreter is slow
    mp.spawn(run, args=(2, free_port(), str(tmp_path), False, 1), nprocs=2, join=True)
    for rank in range(2):
        found = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        found.pop("heads_error")
        for key in want:
            error = (found[key] - want[key]).abs().max() / want[key].abs().max()
            assert error <= 1e-5, f"rank {rank} {key}: relative error {error:.2e}"
