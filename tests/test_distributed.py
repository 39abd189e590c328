"""Data-parallel training (DDP over gloo, two CPU ranks): the same update as one process with the whole
batch (also with gradient accumulation), ranks that stay identical, an exact resume, and the CLI
(training, reflow-pairs) under torchrun."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from distributed_workers import assert_same, final_state, fit_on_two_ranks, tiny_dit, torchrun, trainer

from vdistill.methods.cli.main import main
from vdistill.methods.data.shapes import MovingShapes, ShapesStream
from vdistill.methods.data.shards import ShardDataset, ShardLoader, read_shard, write_shard
from vdistill.methods.train.checkpoint import list_checkpoints
from vdistill.methods.train.presets import tiny

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
ROOT = Path(__file__).resolve().parents[1]


def test_rank_parts_make_up_the_single_process_batch():
    dataset = MovingShapes(tiny().data, seed=3)
    whole = ShapesStream(dataset, 6, seed=3)
    parts = [ShapesStream(dataset, 6, seed=3, part=slice(3 * r, 3 * r + 3)) for r in (0, 1)]
    for _ in range(2):
        videos, prompts, labels = next(whole)
        split = [next(p) for p in parts]
        torch.testing.assert_close(torch.cat([s[0] for s in split]), videos, rtol=0, atol=0)
        assert [p for s in split for p in s[1]] == prompts
        assert torch.equal(torch.cat([s[2] for s in split]), labels)


@pytest.mark.slow
def test_two_ranks_train_as_one_process_with_the_whole_batch(tmp_path):
    """Deterministic loss: 2 ranks x 2 clips (the halves of the single process's batch) == 1 process x 4
    clips (gradient mean, clipping, AdamW, EMA, an in-training evaluation); the loss rank 0 logs (the mean
    over ranks) is the single process's."""
    single = trainer("denoise", tmp_path / "single", steps=3)
    single_rows = single.fit()
    ranks = fit_on_two_ranks("denoise", tmp_path / "ddp", steps=3)
    torch.testing.assert_close(torch.cat([r["first_x0"] for r in ranks]), single.recipe.first_x0, rtol=0, atol=0)
    assert_same(ranks[0]["state"], ranks[1]["state"], rtol=0, atol=0)
    assert_same(ranks[0]["state"], final_state(single), rtol=1e-5, atol=1e-6)
    assert not torch.equal(single.recipe.student.head.weight, tiny_dit().head.weight)  # it did train
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in ranks[0]["rows"]] == pytest.approx([r[key] for r in single_rows], rel=1e-5), key
    evals = [json.loads(ln) for ln in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines() if "eval" in ln]
    assert [e["step"] for e in evals] == [2]  # written once, by rank 0


@pytest.mark.slow
def test_a_nan_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """The gradients are averaged before the norm is taken, so every rank sees the NaN and skips step 1:
    the ranks stay identical and train on."""
    ranks = fit_on_two_ranks("denoise-nan-rank1", tmp_path, steps=3)
    for rank in ranks:
        assert [r["skipped_steps"] for r in rank["rows"]] == [0.0, 1.0, 1.0]
    assert_same(ranks[0]["state"], ranks[1]["state"], rtol=0, atol=0)
    assert all(torch.isfinite(v).all() for v in ranks[0]["state"].values())


@pytest.mark.slow
def test_rcm_on_two_ranks_keeps_ranks_identical_and_resumes_exactly(tmp_path):
    """rCM with critic, w_φ and EMA target: the ranks hold the same weights (student, EMA, critic, w_φ); a
    run cut at step 2 and resumed on two ranks ends bit-identical to the uninterrupted one."""
    full = fit_on_two_ranks("rcm", tmp_path / "full", steps=4)
    assert_same(full[0]["state"], full[1]["state"], rtol=0, atol=0)
    assert "critic_loss" in full[0]["rows"][-1]
    fit_on_two_ranks("rcm", tmp_path / "cut", steps=2)
    resumed = fit_on_two_ranks("rcm", tmp_path / "cut", steps=4, resume=True)
    assert_same(resumed[0]["state"], full[0]["state"], rtol=0, atol=0)
    assert [r["loss"] for r in resumed[0]["rows"]] == [r["loss"] for r in full[0]["rows"][2:]]
    assert not (tmp_path / "full" / "rank1").exists() and len(list_checkpoints(tmp_path / "full")) == 2

    with pytest.raises(ValueError, match="written by 2 ranks and this run has 1"):
        trainer("rcm", tmp_path / "cut", steps=6).fit(resume=True)


@pytest.mark.slow
def test_two_ranks_accumulating_two_micro_batches_train_as_one_process(tmp_path):
    """8 clips per step as 2 ranks x 2 micro-batches x 2 clips (no all-reduce but for the last) == 1 x 8."""
    single = trainer("denoise", tmp_path / "single", steps=2, batch_size=8)
    single_rows = single.fit()
    ranks = fit_on_two_ranks("denoise", tmp_path / "ddp", steps=2, batch_size=8, grad_accum=2)
    assert_same(ranks[0]["state"], ranks[1]["state"], rtol=0, atol=0)
    assert_same(ranks[0]["state"], final_state(single), rtol=1e-5, atol=1e-6)
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in ranks[0]["rows"]] == pytest.approx([r[key] for r in single_rows], rel=1e-5), key


@pytest.mark.slow
@pytest.mark.parametrize("method", ["reflow", "progressive", "consistency"])
def test_every_recipe_keeps_the_ranks_identical(tmp_path, method):
    ranks = fit_on_two_ranks(method, tmp_path / method, steps=2)
    assert_same(ranks[0]["state"], ranks[1]["state"], rtol=0, atol=0)
    assert ranks[0]["state"]["student.head.weight"].ne(tiny_dit().head.weight).any()


def test_pair_shard_parts_make_up_the_single_process_batch(tmp_path):
    latents, text = torch.randn(10, 2, 1, 2, 2), torch.randn(10, 3, 4)
    write_shard(tmp_path / "pairs.safetensors", latents, text)
    dataset = ShardDataset(tmp_path)
    whole = ShardLoader(dataset, 4, seed=5)
    parts = [ShardLoader(dataset, 4, seed=5, part=slice(2 * r, 2 * r + 2)) for r in (0, 1)]
    for _ in range(3):  # into the second epoch
        expected = next(whole).latents
        torch.testing.assert_close(torch.cat([next(p).latents for p in parts]), expected, rtol=0, atol=0)


def _torchrun_pretrain(out: Path, batch_size: int) -> subprocess.CompletedProcess:
    return torchrun("pretrain", "--preset", "tiny", "--set", "train.steps=2", "--set", f"train.batch_size={batch_size}",
                    "--out", str(out))


@pytest.mark.slow
def test_pretrain_cli_undertorchrun(tmp_path):
    """`torchrun --nproc_per_node 2 -m vdistill.methods.cli pretrain`: one set of files, written by rank 0, with each
    rank's RNG state in the checkpoint; a global batch the ranks cannot split is refused by name."""
    out = tmp_path / "run"
    done = _torchrun_pretrain(out, batch_size=4)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "model_ema.safetensors").is_file()
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    state = torch.load(list_checkpoints(out)[-1], weights_only=False)
    assert state["world_size"] == 2 and len(state["rng_by_rank"]) == 2
    assert not torch.equal(state["rng_by_rank"][0]["torch"], state["rng_by_rank"][1]["torch"])

    odd = _torchrun_pretrain(tmp_path / "odd", batch_size=3)
    assert odd.returncode != 0
    assert "batch_size 3 is the global batch and must be divisible by the 2 data-parallel ranks" in odd.stderr


@pytest.mark.slow
def test_reflow_pairs_under_torchrun_write_the_single_process_shards(tmp_path):
    """Two ranks share the shards (rank r writes r, r + 2, ...) and write the files one process writes."""
    assert main(["pretrain", "--preset", "tiny", "--set", "train.steps=1", "--out", str(tmp_path / "teacher")]) == 0
    args = ["reflow-pairs", "--teacher", str(tmp_path / "teacher" / "model_ema.safetensors"), "--num-pairs", "5",
            "--shard-size", "2", "--steps", "2", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    done = torchrun(*args, "--out", str(tmp_path / "ranks"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("reflow-pairs: wrote") == 3  # each shard by one rank
    names = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert len(names) == 3 and sorted(p.name for p in (tmp_path / "ranks").iterdir()) == names
    for name in names:
        single, ranks = read_shard(tmp_path / "single" / name), read_shard(tmp_path / "ranks" / name)
        assert torch.equal(single[0], ranks[0]) and torch.equal(single[1], ranks[1])
