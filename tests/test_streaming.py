"""Streaming shards: `LazyShards` reads the same rows as the in-memory `ShardDataset` (so `ShardLoader` shuffles,
splits and resumes over it identically), refuses shards that disagree, and streams a data set larger than a memory
budget within it; `LatentBatches` hands the trainer `Batch`es with the prepared negative-prompt embedding."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from vdistill.methods.data.shards import ShardDataset, ShardLoader, write_shard
from vdistill.methods.data.streaming import NULL_TEXT, LatentBatches, LazyShards


def write_shards(directory, sizes, latent=(4, 2, 4, 4), text=(6, 8), mask=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    for i, n in enumerate(sizes):
        write_shard(directory / f"shard-{i:06d}.safetensors", torch.randn(n, *latent, generator=g),
                    torch.randn(n, *text, generator=g), torch.rand(n, text[0], generator=g) > 0.3 if mask else None)
    return directory


def test_lazy_rows_equal_the_in_memory_rows_in_any_order(tmp_path):
    write_shards(tmp_path, [3, 5, 2])
    lazy, eager = LazyShards(tmp_path), ShardDataset(tmp_path)
    assert len(lazy) == len(eager) == 10 and lazy.latent_shape == eager.latent_shape
    for indices in ([0], [9, 0, 4, 3, 7], list(range(10))[::-1]):
        a, b = lazy.batch(indices), eager.batch(indices)
        assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("latents", "text", "text_mask"))


def test_loader_over_lazy_shards_shuffles_splits_and_resumes_as_in_memory(tmp_path):
    write_shards(tmp_path, [4, 4, 4])
    runs = {}
    for name, data in (("lazy", LazyShards(tmp_path)), ("eager", ShardDataset(tmp_path))):
        loader = ShardLoader(data, 4, seed=3, part=slice(2, 4))
        runs[name] = [next(loader).latents for _ in range(5)]  # crosses an epoch (12 clips, 3 batches each)
        resumed = ShardLoader(data, 4, seed=3, part=slice(2, 4))
        replay = ShardLoader(data, 4, seed=3, part=slice(2, 4))
        for _ in range(2):
            next(replay)
        resumed.load_state_dict(replay.state_dict())
        assert all(torch.equal(next(resumed).latents, runs[name][k]) for k in range(2, 5))
    assert all(torch.equal(a, b) for a, b in zip(runs["lazy"], runs["eager"]))


def test_shards_that_disagree_are_refused_by_name(tmp_path):
    write_shards(tmp_path, [2])
    write_shard(tmp_path / "shard-000001.safetensors", torch.zeros(2, 4, 2, 4, 8), torch.zeros(2, 6, 8),
                torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="shard-000001.safetensors: differs .*latents_shape"):
        LazyShards(tmp_path)


def test_latent_batches_carry_the_negative_prompt_embedding(tmp_path):
    write_shards(tmp_path, [4, 4])
    assert torch.equal(LatentBatches(tmp_path, 2).null, torch.zeros(1, 6, 8))  # none prepared: zeros, flagged
    null = torch.randn(1, 6, 8)
    save_file({"text": null, "text_mask": torch.ones(1, 6, dtype=torch.bool)}, str(tmp_path / NULL_TEXT))
    batches = LatentBatches(tmp_path, 2, seed=1)
    batch = next(batches)
    assert batch.x0.shape == (2, 4, 2, 4, 4) and batch.text.shape == (2, 6, 8) and torch.equal(batch.null_text, null)
    assert not batches.null_is_zeros and len(batches.dataset) == 8  # the null embedding is not a shard


@pytest.mark.slow
def test_a_data_set_larger_than_the_memory_budget_streams_within_it(tmp_path):
    """24 shards of 4.2 MiB (101 MiB): one epoch of batches of 4 clips grows the reader's peak memory by < 48 MiB
    (measured: ~0 MiB after the first batch; the in-memory ShardDataset grows by 115 MiB on opening them)."""
    write_shards(tmp_path, [16] * 24, latent=(16, 4, 32, 32), text=(64, 64), mask=False)
    code = ("import resource, sys\nfrom vdistill.methods.data.shards import ShardLoader\n"
            "from vdistill.methods.data.streaming import LazyShards\n"
            "data = LazyShards(sys.argv[1])\nloader = ShardLoader(data, 4)\nnext(loader)\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "for _ in range(len(data) // 4 - 1):\n    next(loader)\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-1]) < 48 * 2**20
