"""The shared trainer: exact resume, atomic checkpoints, exports, errors."""

import json
from dataclasses import replace

import pytest
import torch
from distributed_workers import final_state, trainer

from vdistill.methods.data.batch import Batch
from vdistill.methods.data.batches import Prefetched, ShapesBatches
from vdistill.methods.data.text import WordTextEncoder
from vdistill.methods.data.toy import ToyBatches, ToyVelocityNet
from vdistill.methods.recipes.pretrain import FlowMatching
from vdistill.methods.train import checkpoint as ckpt
from vdistill.methods.train import trainer as trainer_module
from vdistill.methods.train.presets import tiny
from vdistill.methods.train.trainer import TrainConfig, Trainer
from vdistill.models.dit import VideoDiT


def _trainer(run_dir, steps, prefetch=True, **train):
    run = tiny()
    run = replace(run, train=replace(run.train, steps=steps, ckpt_every=3, log_every=1, **train))
    torch.manual_seed(run.train.seed)
    text = WordTextEncoder(dim=run.model.text_dim, max_len=run.text_max_len)
    data = ShapesBatches(run.data, text, run.train.batch_size, seed=run.train.seed)
    data = Prefetched(data) if prefetch else data
    return Trainer(FlowMatching(VideoDiT(run.model), run.method), data, run.train, run_dir, run_config=run.to_dict())


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path):
    full = _trainer(tmp_path / "full", steps=6).fit()
    _trainer(tmp_path / "cut", steps=3).fit()  # "interrupted" after the checkpoint at step 3
    resumed_trainer = _trainer(tmp_path / "cut", steps=6)
    resumed = resumed_trainer.fit(resume=True)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[3:]]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in full[3:]]
    log_steps = [json.loads(ln)["step"] for ln in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert log_steps == [1, 2, 3, 4, 5, 6]  # the resumed log continues, no duplicates
    resumed_trainer.data.close()


def test_bf16_precision_autocasts_on_cpu(tmp_path):
    """precision="bf16" trains under CPU autocast (other rounding, losses within 5% of fp32);
    the default "auto" keeps CPU in fp32."""
    def losses(name, precision):
        trainer = _trainer(tmp_path / name, steps=3, prefetch=False, precision=precision)
        return [r["loss"] for r in trainer.fit()]

    fp32, auto, bf16 = losses("fp32", "fp32"), losses("auto", "auto"), losses("bf16", "bf16")
    assert auto == fp32
    assert bf16 != fp32 and all(abs(a - b) < 0.05 * a for a, b in zip(fp32, bf16))


@pytest.mark.parametrize("native", [True, False])
def test_emulated_cpu_bf16_is_warned_about(tmp_path, monkeypatch, caplog, native):
    """bf16 on a CPU without oneDNN's bf16 path warns once, naming the fix; fp32 and native bf16 stay quiet."""
    monkeypatch.setattr(trainer_module, "cpu_bf16_is_native", lambda: native)
    with caplog.at_level("WARNING", logger="vdistill"):
        for precision in ("fp32", "auto", "bf16"):
            _trainer(tmp_path / precision, steps=1, prefetch=False, precision=precision)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == (0 if native else 1)
    assert all("emulated" in w and "--set train.precision=fp32" in w for w in warnings)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "run" / "checkpoints" / "step_00000001.pt"

    def broken_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, {"step": 1})
    assert not path.exists()
    assert list(path.parent.iterdir()) == []  # no temp file left behind


def test_corrupt_and_missing_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt"):
        ckpt.load_checkpoint(bad)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a vdistill training checkpoint"):
        ckpt.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not safetensors|corrupt"):
        ckpt.load_dit(bad)


def test_export_round_trips_ema_weights(tmp_path):
    trainer = _trainer(tmp_path, steps=3, prefetch=False)
    trainer.fit()
    paths = trainer.export()
    model, meta = ckpt.load_dit(paths["ema"])
    assert meta["recipe"] == "pretrain" and meta["step"] == 3
    ema = dict(zip([n for n, _ in trainer.recipe.student.named_parameters()], trainer.ema.tensors(0)))
    for name, p in model.named_parameters():
        assert torch.equal(p, ema[name]), name
    raw, _ = ckpt.load_dit(paths["raw"])
    assert any(not torch.equal(a, b) for a, b in zip(raw.parameters(), model.parameters()))


def test_checkpoints_are_pruned(tmp_path):
    _trainer(tmp_path, steps=9, prefetch=False).fit()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000006.pt", "step_00000009.pt"]


def test_micro_batches_split_the_batch_and_draw_their_own_noise():
    batch = Batch(torch.randn(6, 2), torch.randn(6, 3, 4), torch.zeros(1, 3, 4), torch.arange(18).view(6, 3))
    parts = batch.split(3, first_part=3, count=6)  # rank 1 of 2, 3 micro-batches each
    assert [p.part for p in parts] == [(3, 6), (4, 6), (5, 6)]
    assert torch.equal(torch.cat([p.x0 for p in parts]), batch.x0)
    assert torch.equal(torch.cat([p.labels for p in parts]), batch.labels) and parts[0].text.shape == (2, 3, 4)
    offsets = [p.noise_offset(i) for i in range(4) for p in parts]  # every (step, part): its own stream
    assert len(set(offsets)) == len(offsets)
    assert batch.noise_offset(7) == 7 and parts[2].noise_offset(7) == 7 * 6 + 5
    assert parts[0].to(torch.device("cpu")).part == (3, 6)
    with pytest.raises(ValueError, match="grad_accum 4 must divide the batch of 6 clips"):
        batch.split(4, first_part=0, count=4)


def test_grad_accumulation_trains_as_the_whole_batch(tmp_path):
    """Flow matching draws noise from the global RNG, so compare a deterministic recipe (x0 back at s = 0.5)."""
    whole = trainer("denoise", tmp_path / "whole", steps=2, batch_size=4)
    rows = [whole.fit()]
    accumulated = trainer("denoise", tmp_path / "accumulated", steps=2, batch_size=4, grad_accum=2)
    rows.append(accumulated.fit())
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in rows[1]] == pytest.approx([r[key] for r in rows[0]], rel=1e-5), key
    for key, value in final_state(whole).items():
        torch.testing.assert_close(final_state(accumulated)[key], value, rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_needs_a_trained_dit(tmp_path):
    cfg = TrainConfig(steps=1, batch_size=4, device="cpu", activation_checkpointing=True)
    with pytest.raises(ValueError, match="activation_checkpointing: recipe 'pretrain' trains no DiT"):
        Trainer(FlowMatching(ToyVelocityNet(hidden=8, depth=1)), ToyBatches(4), cfg, tmp_path)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"steps": 0}, "steps"), ({"lr": 0.0}, "lr"), ({"precision": "fp8"}, "precision"), ({"device": "tpu"}, "device"),
     ({"grad_accum": 0}, "grad_accum must be >= 1"), ({"batch_size": 6, "grad_accum": 4}, "grad_accum 4 must divide")],
)
def test_bad_train_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_time_limit_stops_with_a_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, steps=50, prefetch=False)
    trainer.cfg.time_limit_s = 0.0
    rows = trainer.fit()
    assert [r["step"] for r in rows] == [1]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001.pt"]
