"""FSDP2 (`TrainConfig.fsdp`, gloo, two CPU ranks): a sharded student trains as one process with the whole
batch, rCM trains as under DDP and resumes exactly, and what cannot be sharded yet is refused."""

from __future__ import annotations

import json

import pytest
import torch
from distributed_workers import assert_same, final_state, fit_on_two_ranks, torchrun, trainer
from safetensors.torch import load_file

from vdistill.methods.cli.main import main
from vdistill.methods.train.checkpoint import list_checkpoints

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


@pytest.mark.slow
def test_sharded_student_trains_as_one_process_with_the_whole_batch(tmp_path):
    """Deterministic loss, 2 ranks with FSDP2 == 1 process (reduce-scattered gradients, clipping by the global
    norm, AdamW and the EMA on shards, a collective in-training evaluation, a checkpoint at step 2)."""
    single = trainer("denoise", tmp_path / "single", steps=3)
    single_rows = single.fit()
    ranks = fit_on_two_ranks("denoise", tmp_path / "fsdp", steps=3, fsdp=True)
    assert_same(ranks[0]["state"], ranks[1]["state"], rtol=0, atol=0)
    assert_same(ranks[0]["state"], final_state(single), rtol=1e-5, atol=1e-6)
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in ranks[0]["rows"]] == pytest.approx([r[key] for r in single_rows], rel=1e-5), key
    evals = [json.loads(ln) for ln in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines() if "eval" in ln]
    assert [e["step"] for e in evals] == [2]


@pytest.mark.slow
def test_sharded_student_accumulating_micro_batches_trains_as_one_process(tmp_path):
    """8 clips per step as 2 ranks x 2 micro-batches x 2 clips (gradients reduce-scattered after the last) == 1 x 8."""
    single = trainer("denoise", tmp_path / "single", steps=2, batch_size=8)
    single.fit()
    ranks = fit_on_two_ranks("denoise", tmp_path / "fsdp", steps=2, batch_size=8, grad_accum=2, fsdp=True)
    assert_same(ranks[0]["state"], final_state(single), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sharded_rcm_trains_as_under_ddp_and_resumes_exactly(tmp_path):
    """rCM with DMD, critic (replicated), EMA target (on shards, swapped in for the JVP pass) and activation
    checkpointing: FSDP2 gives DDP's weights; stopped at step 2 and resumed, it ends where the uninterrupted
    run ends, bit for bit."""
    ddp = fit_on_two_ranks("rcm-shardable", tmp_path / "ddp", steps=3)
    full = fit_on_two_ranks("rcm-shardable", tmp_path / "full", steps=3, fsdp=True)
    assert_same(full[0]["state"], full[1]["state"], rtol=0, atol=0)
    assert_same(full[0]["state"], ddp[0]["state"], rtol=1e-5, atol=1e-6)
    fit_on_two_ranks("rcm-shardable", tmp_path / "cut", steps=2, fsdp=True)
    resumed = fit_on_two_ranks("rcm-shardable", tmp_path / "cut", steps=3, resume=True, fsdp=True)
    assert_same(resumed[0]["state"], full[0]["state"], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["reflow", "rcm-stopgrad"])
def test_sharded_recipe_trains_as_under_ddp(tmp_path, kind):
    """ReFlow; rCM with its default stop-grad target, whose no-grad JVP and simulation forwards leave the root's
    gathered weights in place for the student's forward with grad."""
    ddp = fit_on_two_ranks(kind, tmp_path / "ddp", steps=2)
    sharded = fit_on_two_ranks(kind, tmp_path / "fsdp", steps=2, fsdp=True)
    assert_same(sharded[0]["state"], ddp[0]["state"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("progressive", "progressive cannot shard its student yet"),
        ("consistency", "consistency with target_decay > 0 cannot shard"),
        ("rcm", "adaptive weight"),
        ("denoise", "needs a process group; launch with torchrun"),
    ],
)
def test_what_cannot_be_sharded_is_refused(tmp_path, kind, message):
    with pytest.raises(ValueError, match=message):
        trainer(kind, tmp_path, steps=1, fsdp=True)


@pytest.mark.slow
def test_pretrain_cli_with_fsdp_exports_what_ddp_exports(tmp_path):
    """`torchrun ... pretrain --set train.fsdp=true`: both exports equal the DDP run's; `vdistill export` of its
    distributed checkpoint gives them too; it is not resumed without train.fsdp (onto other rank counts:
    tests/test_sharded_checkpoint.py)."""
    args = ("pretrain", "--preset", "tiny", "--set", "train.steps=2", "--set", "train.batch_size=4")
    for name, extra in (("ddp", ()), ("fsdp", ("--set", "train.fsdp=true"))):
        done = torchrun(*args, "--out", str(tmp_path / name), *extra)
        assert done.returncode == 0, done.stderr[-3000:]
    for file in ("model.safetensors", "model_ema.safetensors"):
        assert_same(load_file(tmp_path / "fsdp" / file), load_file(tmp_path / "ddp" / file), rtol=1e-5, atol=1e-6)
    newest = list_checkpoints(tmp_path / "fsdp")[-1]
    assert newest.is_dir()
    for file, extra in (("model.safetensors", ["--raw"]), ("model_ema.safetensors", [])):
        assert main(["export", "--checkpoint", str(newest), "--out", str(tmp_path / file), *extra]) == 0
        assert_same(load_file(tmp_path / file), load_file(tmp_path / "fsdp" / file), rtol=0, atol=0)
    mixed = torchrun(*args, "--set", "train.steps=3", "--out", str(tmp_path / "fsdp"), "--resume")
    assert mixed.returncode != 0 and "train.fsdp: True -> False" in mixed.stderr
    mixed = torchrun(*args, "--set", "train.steps=3", "--out", str(tmp_path / "fsdp"), "--resume", "--allow-changes")
    assert mixed.returncode != 0
    assert "the checkpoint was written with train.fsdp; resume the same way" in mixed.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sharded_rcm_runs_and_resumes_on_the_gpu(tmp_path):
    """One GPU, one rank (NCCL, CUDA DTensors, foreach AdamW on shards, the Triton kernels inside FSDP2):
    a sharded `pretrain` makes a teacher, a sharded `distill rcm` distils it, stops and resumes."""
    teacher = tmp_path / "teacher"
    done = torchrun("pretrain", "--preset", "tiny", "--set", "train.steps=3", "--set", "train.device=auto",
                    "--out", str(teacher), "--set", "train.fsdp=true", ranks=1)
    assert done.returncode == 0, done.stderr[-3000:]
    args = ("distill", "rcm", "--teacher", str(teacher / "model_ema.safetensors"), "--out", str(tmp_path / "rcm"),
            "--set", "train.batch_size=4", "--set", "train.fsdp=true", "--set", "tangent_warmup=1",
            "--set", "target=ema")
    for steps, extra in (("2", ()), ("3", ("--resume",))):
        done = torchrun(*args, "--set", f"train.steps={steps}", *extra, ranks=1)
        assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "rcm" / "student_ema.safetensors").is_file()
