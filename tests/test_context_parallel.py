"""Context parallelism (Ulysses, `models/context_parallel.py`) on 2 and 4 CPU ranks joined by gloo: a DiT whose
45 tokens are split over the ranks returns the single-process output, forward-mode JVP (forward AD and torch.func)
and parameter gradients (also with activation checkpointing) on every rank, to float32 precision (max error ≤ 1e-5
of the max); heads that do not divide over the ranks are refused by name."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from context_parallel_workers import model_and_inputs, results, run
from distributed_workers import assert_same, final_state, fit_on_two_ranks, free_port, torchrun, trainer
from safetensors.torch import load_file

from vdistill.methods.cli.main import main
from vdistill.methods.train import distributed

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_split_tokens_give_the_single_process_forward_jvp_and_gradients(tmp_path, world):
    every_variant = world == 2  # torch.func and activation checkpointing on 2 ranks only (time)
    want = results(*model_and_inputs(), every_variant=every_variant)
    mp.spawn(run, args=(world, free_port(), str(tmp_path), every_variant), nprocs=world, join=True)
    for rank in range(world):
        found = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert "heads divisible by" in found.pop("heads_error")
        assert found.keys() == want.keys()
        for key in want:  # float32 sums in another order: the largest error relative to the largest value
            error = (found[key] - want[key]).abs().max() / want[key].abs().max()
            assert error <= 1e-5, f"rank {rank} {key}: relative error {error:.2e}"


@pytest.fixture(scope="module")
def one_process_rcm(tmp_path_factory) -> tuple[dict, list[dict]]:
    """(final state, logged rows) of 2 rCM steps (the second with DMD and the critic) in one process."""
    t = trainer("rcm-shardable", tmp_path_factory.mktemp("single"), steps=2)
    rows = t.fit()
    return final_state(t), rows


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True])
def test_rcm_with_split_tokens_trains_as_one_process(one_process_rcm, tmp_path, fsdp):
    """rCM (teacher, JVP pass, DMD simulation, critic, EMA target; activation checkpointing) with each clip's tokens
    over 2 ranks, the student replicated (DDP) or sharded with the teacher and critic (FSDP2), ends on every rank
    where one process does."""
    want_state, want_rows = one_process_rcm
    found = fit_on_two_ranks("rcm-shardable", tmp_path / "cp", steps=2, fsdp=fsdp, context_parallel=2)
    for rank in found:  # FSDP2: the frozen teacher and the critic sharded too
        assert rank["sharded"] == dict.fromkeys(("student", "teacher", "critic"), fsdp)
        assert_same(rank["state"], want_state, rtol=1e-4, atol=1e-5)
    for row, want in zip(found[0]["rows"], want_rows, strict=True):  # losses, gradient norms, critic losses, ...
        assert row.keys() == want.keys()
        assert {k: v for k, v in row.items() if k != "wall_s"} == pytest.approx(
            {k: v for k, v in want.items() if k != "wall_s"}, rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_data_parallel_times_context_parallel_ranks_share_clips_by_group(tmp_path):
    """4 ranks = 2 data-parallel × 2 context-parallel, the student sharded by FSDP2 over all 4 (deterministic loss,
    an evaluation on every rank, a distributed checkpoint): the two ranks of a group see the same clips, the groups
    disjoint halves of the batch, and training equals one process."""
    single = trainer("denoise", tmp_path / "single", steps=2)
    single.fit()
    found = fit_on_two_ranks("denoise", tmp_path / "cp", steps=2, fsdp=True, context_parallel=2, ranks=4)
    first = [rank["first_x0"] for rank in found]
    assert torch.equal(first[0], first[1]) and torch.equal(first[2], first[3])
    torch.testing.assert_close(torch.cat([first[0], first[2]]), single.recipe.first_x0, rtol=0, atol=0)
    for rank in found:
        assert_same(rank["state"], final_state(single), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_pretrain_cli_with_context_parallel_exports_what_one_process_exports(tmp_path):
    """`torchrun ... pretrain --context-parallel 2`: both ranks train on the whole batch with split tokens and export
    what one process exports."""
    args = ("pretrain", "--preset", "tiny", "--set", "train.steps=1", "--set", "train.batch_size=2")
    done = torchrun(*args, "--out", str(tmp_path / "cp"), "--context-parallel", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert main([*args, "--out", str(tmp_path / "one"), "--set", "train.device=cpu"]) == 0
    for file in ("model.safetensors", "model_ema.safetensors"):
        assert_same(load_file(tmp_path / "cp" / file), load_file(tmp_path / "one" / file), rtol=1e-5, atol=1e-6)


def test_context_parallel_groups_must_divide_the_ranks():
    with pytest.raises(ValueError, match="context_parallel 2 must be >= 1 and divide the 1 ranks"):
        distributed.set_context_parallel(2)
    assert distributed.context_size() == 1
