"""Context parallelism (Ulysses, `models/context_parallel.py`) on 2 and 4 CPU ranks joined by gloo: a DiT whose
45 tokens are split over the ranks returns the single-process output, forward-mode JVP (forward AD and torch.func)
and parameter gradients (also with activation checkpointing) on every rank, to float32 precision (max error ≤ 1e-5
of the max); heads that do not divide over the ranks are refused by name."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from context_parallel_workers import model_and_inputs, results, run
from distributed_workers import free_port

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


@pytest.mark.parametrize("world", [2, 4])
def test_split_tokens_give_the_single_process_forward_jvp_and_gradients(tmp_path, world):
    want = results(*model_and_inputs())
    mp.spawn(run, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        found = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert "heads divisible by" in found.pop("heads_error")
        assert found.keys() == want.keys()
        for key in want:  # float32 sums in another order: the largest error relative to the largest value
            error = (found[key] - want[key]).abs().max() / want[key].abs().max()
            assert error <= 1e-5, f"rank {rank} {key}: relative error {error:.2e}"
