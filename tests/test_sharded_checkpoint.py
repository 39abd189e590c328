"""Distributed checkpoints of sharded (FSDP2) runs: every rank writes its shards into a checksummed directory; a
resume on as many ranks is exact, onto another number reshards the student, optimiser and EMAs exactly (and
re-seeds the RNG streams); a torn or damaged directory is refused, and resume falls back past it."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from distributed_workers import trainer
from sharded_workers import fit_in_turn_on

from vdistill.methods.train import checkpoint as ckpt
from vdistill.methods.train import run_folder
from vdistill.methods.train.sharded_checkpoint import _split, read_whole, save_sharded

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")

FILES = {".metadata", "__0_0.distcp", "state.pt", "manifest.sha256"}  # of one rank


def _rewrite_manifest(path) -> None:
    """A manifest that matches the directory as it is now (a forger's, or a careless copy's)."""
    names = sorted(p.name for p in path.iterdir() if p.name != ckpt.MANIFEST)
    ckpt.checksum_path(path).write_text("".join(f"{ckpt._sha256(path / n)}  {n}\n" for n in names))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_torn_damaged_or_unsafe_directory_is_refused_by_name(tmp_path):
    """One process (no process group: DCP writes alone). Round trip; then a missing shard file, a missing manifest,
    a flipped byte and DCP metadata that would run code are each refused before anything is unpickled; a NaN is
    not written; pruning removes whole directories, a restart the temporary one of a killed write."""
    path = ckpt.checkpoint_path(tmp_path, 2, sharded=True)
    with pytest.raises(ValueError, match="tensor 'w' of rank 0 has non-finite"):
        save_sharded(path, {"step": 2, "sharded": {"w": torch.tensor([1.0, float("nan")])}})
    assert not (tmp_path / "checkpoints").exists()
    save_sharded(path, {"step": 2, "sharded": {"w": torch.arange(6.0).view(2, 3), "n": [3, (4, 5)]}})
    assert {p.name for p in path.iterdir()} == FILES and ckpt.list_checkpoints(tmp_path) == [path]
    lines = ckpt.checksum_path(path).read_text().splitlines()  # `sha256sum -c` format
    assert sorted(line.split()[1] for line in lines) == sorted(FILES - {"manifest.sha256"})
    state = ckpt.load_checkpoint(path)
    whole = read_whole(state["sharded"], ("w",))
    assert torch.equal(whole["w"], torch.arange(6.0).view(2, 3)) and whole["n"] == [3, (4, 5)]

    def damaged(name, damage):
        copy = tmp_path / name / path.name
        shutil.copytree(path, copy)
        damage(copy)
        return copy

    cases = {
        "lacks __0_0.distcp: torn": lambda p: (p / "__0_0.distcp").unlink(),
        "has no readable manifest.sha256": lambda p: ckpt.checksum_path(p).unlink(),
        "fail their checksums": lambda p: (p / "state.pt").write_bytes(b"\0" + (p / "state.pt").read_bytes()[1:]),
        "DCP metadata .* holds other objects": lambda p: ((p / ".metadata").write_bytes(pickle.dumps(print)),
                                                          _rewrite_manifest(p)),
    }
    for i, (message, damage) in enumerate(cases.items()):
        with pytest.raises(ValueError, match=message):
            ckpt.load_checkpoint(damaged(f"case{i}", damage))
    newer = ckpt.checkpoint_path(tmp_path, 4, sharded=True)
    shutil.copytree(path, newer)
    ckpt.prune_checkpoints(tmp_path, keep=1)
    assert ckpt.list_checkpoints(tmp_path) == [newer]
    killed = newer.with_name(".step_00000006.tmp")
    shutil.copytree(newer, killed)
    run_folder.remove_stale_temporaries(tmp_path)
    assert not killed.exists() and ckpt.list_checkpoints(tmp_path) == [newer]


def test_only_a_sharded_run_takes_a_distributed_checkpoint_and_another_number_of_ranks(tmp_path):
    """Without train.fsdp: a distributed checkpoint is refused, and so is a file of another number of ranks."""
    t = trainer("denoise", tmp_path, steps=1)
    state = t.state_dict()
    with pytest.raises(ValueError, match="written with train.fsdp; resume the same way"):
        t.load_state_dict({**state, "sharded": {}})
    with pytest.raises(ValueError, match="written by 2 ranks and this run has 1"):
        t.load_state_dict({**state, "world_size": 2})


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """rCM (critic, EMA target) sharded over 2 ranks for 4 steps: distributed checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("sharded") / "run"
    [run] = fit_in_turn_on(2, [("rcm-shardable", run_dir, 4, False)])
    return run_dir, run


@pytest.mark.slow
def test_each_rank_writes_its_shards_and_a_torn_newest_is_skipped_for_an_exact_resume(sharded_run, tmp_path):
    """The step-4 directory holds both ranks' shard files and no whole copy of anything; without its manifest
    (torn) the resume on 2 ranks falls back to step 2, renames it `.bad` and ends bit-identical to the
    uninterrupted run (student, AdamW, EMAs, critic; the same losses)."""
    run_dir, run = sharded_run
    newest = ckpt.checkpoint_path(run_dir, 4, sharded=True)
    assert ckpt.list_checkpoints(run_dir) == [ckpt.checkpoint_path(run_dir, 2, sharded=True), newest]
    assert {p.name for p in newest.iterdir()} == FILES | {"__1_0.distcp"}
    assert not list((run_dir / "checkpoints").glob("*.pt"))
    small = torch.load(newest / "state.pt", weights_only=True)
    assert small["world_size"] == 2 and _split(small["sharded"]["trees"])[0] == {}  # its tensors are in the shards
    torn = tmp_path / "torn"
    shutil.copytree(run_dir, torn)
    ckpt.checksum_path(ckpt.checkpoint_path(torn, 4, sharded=True)).unlink()
    [resumed] = fit_in_turn_on(2, [("rcm-shardable", torn, 4, True)])
    assert any("skipped the damaged checkpoint" in w and "has no readable manifest" in w for w in resumed["warnings"])
    assert (torn / "checkpoints" / "step_00000004.bad").is_dir()
    assert json.loads((torn / "resumes.jsonl").read_text())["checkpoint"] == "step_00000002"
    assert resumed["state"].keys() == run["state"].keys()
    for key, value in run["state"].items():
        assert torch.equal(resumed["state"][key], value), key
    for key in ("loss", "grad_norm", "critic_loss"):
        assert [r[key] for r in resumed["rows"]] == [r[key] for r in run["rows"][2:]], key


@pytest.mark.slow
def test_a_checkpoint_reshards_onto_another_number_of_ranks(sharded_run, tmp_path):
    """Written by 2 ranks, loaded by 1; written by 1, loaded by 2: the whole student, AdamW state, EMA profiles, EMA
    target and critic equal the saved ones bit for bit, with a warning that the RNG streams were re-seeded."""
    run_dir, run = sharded_run
    shutil.copytree(run_dir, tmp_path / "one")
    one, solo = fit_in_turn_on(1, [("rcm-shardable", tmp_path / "one", 4, True),
                                   ("rcm-shardable", tmp_path / "solo", 2, False)])
    shutil.copytree(tmp_path / "solo", tmp_path / "two")
    [two] = fit_in_turn_on(2, [("rcm-shardable", tmp_path / "two", 2, True)])
    for loaded, saved, ranks in ((one, run, "2 ranks on 1"), (two, solo, "1 ranks on 2")):
        assert loaded["step"] == saved["step"] and loaded["state"].keys() == saved["state"].keys()
        for key, value in saved["state"].items():
            assert torch.equal(loaded["state"][key], value), (ranks, key)
        assert any(f"checkpoint of {ranks}" in w and "re-seeded" in w for w in loaded["warnings"])
