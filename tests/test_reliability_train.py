"""Training reliability: NaN samples and NaN steps, torn metrics logs, checkpoints loaded without running code."""

import json
import logging
import math
import pathlib
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from distributed_workers import tiny_dit

from vdistill.methods.data.batches import ShapesBatches
from vdistill.methods.data.text import WordTextEncoder
from vdistill.methods.recipes.pretrain import FlowMatching
from vdistill.methods.recipes.rcm import RCM, RCMConfig
from vdistill.methods.train import checkpoint as ckpt
from vdistill.methods.train import trainer as trainer_module
from vdistill.methods.train.export import export_checkpoint
from vdistill.methods.train.logs import read_metrics
from vdistill.methods.train.presets import tiny
from vdistill.methods.train.trainer import TrainConfig, Trainer
from vdistill.models.dit import VideoDiT


def _trainer(run_dir, steps, nan_steps=(), **train):
    """A tiny FlowMatching trainer whose loss is NaN at the steps in `nan_steps`."""
    run = tiny()
    run = replace(run, train=replace(run.train, steps=steps, ckpt_every=3, log_every=1, **train))
    torch.manual_seed(run.train.seed)
    text = WordTextEncoder(dim=run.model.text_dim, max_len=run.text_max_len)
    data = ShapesBatches(run.data, text, run.train.batch_size, seed=run.train.seed)
    recipe = FlowMatching(VideoDiT(run.model), run.method)
    loss_of = recipe.loss

    def loss(batch, step):
        value, logs = loss_of(batch, step)
        return (value * math.nan if step in nan_steps else value), logs

    recipe.loss = loss
    return Trainer(recipe, data, run.train, run_dir, run_config=run.to_dict())


def _snapshot(t: Trainer) -> dict[str, torch.Tensor]:
    state = {f"student.{k}": v.clone() for k, v in t.recipe.student.state_dict().items()}
    with t.ema.swapped(t.recipe.student, profile=0):
        state.update({f"ema.{k}": v.clone() for k, v in t.recipe.student.state_dict().items()})
    return state


# ---- 1a: a NaN sample contributes exactly zero gradient (rCM) -------------------------------------------
def test_rcm_nan_sample_gives_zero_gradient():
    """x0 of sample 1 NaN: finite student gradients, equal to the clean batch's with sample 1's output cut
    off the graph (its contribution removed), and unequal to the clean batch's full gradient."""
    run = tiny()
    text = WordTextEncoder(dim=run.model.text_dim, max_len=run.text_max_len)
    batch = next(ShapesBatches(run.data, text, 4, seed=0))
    recipe = RCM(tiny_dit().eval(), RCMConfig(dmd_weight=0.0, tangent_warmup=0, jvp_mode="finite_difference"))
    student = recipe.student

    def grads(b, drop_sample_1=False):
        handle = None
        if drop_sample_1:  # only the student's graph-building forward (the tangent pass runs without grad)
            handle = student.register_forward_hook(
                lambda m, i, out: torch.cat([out[:1], out[1:2].detach(), out[2:]]) if torch.is_grad_enabled() else out
            )
        student.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        loss, logs = recipe.loss(b, step=0)
        loss.backward()
        if handle is not None:
            handle.remove()
        return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}, logs

    nan_x0 = batch.x0.clone()
    nan_x0[1] = math.nan
    got, logs = grads(replace(batch, x0=nan_x0))
    want, _ = grads(batch, drop_sample_1=True)
    full, _ = grads(batch)
    assert logs["nan_samples"] == 1.0
    assert got.keys() == want.keys()
    assert all(torch.isfinite(g).all() for g in got.values()), "a NaN sample poisoned the gradients"
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-8, msg=name)
    assert any(not torch.allclose(full[n], want[n]) for n in full)  # sample 1 does count in the clean batch


# ---- 1b: non-finite steps are skipped, then the run stops -----------------------------------------------
def test_non_finite_step_is_skipped_and_counted(tmp_path):
    """A NaN gradient at step 1: no student, EMA or optimiser update that step; counted in skipped_steps;
    later steps train again and the run ends with finite weights."""
    t = _trainer(tmp_path, steps=4, nan_steps={1})
    t.train_step(0)
    before, opt_step = _snapshot(t), t.optimizer.state_dict()["state"][0]["step"].clone()
    skipped = t.train_step(1)
    assert math.isnan(skipped["grad_norm"]) and skipped["skipped_steps"] == 1.0
    after = _snapshot(t)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(t.optimizer.state_dict()["state"][0]["step"], opt_step)
    row = t.train_step(2)
    assert math.isfinite(row["grad_norm"]) and row["skipped_steps"] == 1.0
    assert any(not torch.equal(before[k], v) for k, v in _snapshot(t).items())


def test_run_logs_skipped_steps_and_stops_after_max_bad_steps(tmp_path):
    rows = _trainer(tmp_path / "one", steps=4, nan_steps={1}).fit()
    assert [r["skipped_steps"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    assert [r["skipped_steps"] for r in read_metrics(tmp_path / "one")] == [0.0, 1.0, 1.0, 1.0]

    t = _trainer(tmp_path / "bad", steps=8, nan_steps=set(range(2, 8)), max_bad_steps=3)
    with pytest.raises(trainer_module.TrainingDiverged, match=r"train\.max_bad_steps=3"):
        t.fit()
    assert t.step == 4  # steps 2, 3 and 4 (0-based) skipped: stopped at the third in a row
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "bad")] == ["step_00000003.pt"]
    state = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path / "bad")[-1])
    assert all(torch.isfinite(v).all() for v in state["student"].values())


def test_max_bad_steps_is_validated():
    with pytest.raises(ValueError, match="max_bad_steps"):
        TrainConfig(max_bad_steps=0)


def test_resume_across_a_skipped_step_is_exact(tmp_path):
    full = _trainer(tmp_path / "full", steps=6, nan_steps={2}).fit()
    _trainer(tmp_path / "cut", steps=3, nan_steps={2}).fit()
    resumed = _trainer(tmp_path / "cut", steps=6, nan_steps={2}).fit(resume=True)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[3:]]
    assert [r["skipped_steps"] for r in resumed] == [1.0, 1.0, 1.0]


# ---- 1c: no checkpoint or export with non-finite weights ------------------------------------------------
def test_checkpoint_and_export_refuse_non_finite_weights(tmp_path):
    t = _trainer(tmp_path, steps=3)
    t.fit()
    t.export()
    files = [*ckpt.list_checkpoints(tmp_path), tmp_path / "model.safetensors", tmp_path / "model_ema.safetensors"]
    before = {p: p.read_bytes() for p in files}
    name, param = next(iter(t.recipe.student.named_parameters()))
    with torch.no_grad():
        param[0] = math.nan
    t.step = 4
    with pytest.raises(ValueError, match=f"student/{name}"):
        t.save()
    with pytest.raises(ValueError, match=name):
        t.export()
    assert ckpt.list_checkpoints(tmp_path) == files[:1]  # no step 4, no temporary left behind
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))
    assert {p: p.read_bytes() for p in files} == before
    with pytest.raises(ValueError, match="non-finite"):
        ckpt.save_weights(tmp_path / "other.safetensors", t.recipe.student)
    assert not (tmp_path / "other.safetensors").exists()


# ---- 2: a torn metrics.jsonl line -----------------------------------------------------------------------
def test_resume_drops_a_torn_last_metrics_line(tmp_path, caplog):
    _trainer(tmp_path, steps=3).fit()
    metrics = tmp_path / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 4, "loss": 0.1')  # killed mid-write
    with caplog.at_level(logging.WARNING, logger="vdistill"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
        _trainer(tmp_path, steps=5).fit(resume=True)
    assert str(metrics) in caplog.text and "torn" in caplog.text
    assert [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_corrupt_metrics_line_names_file_and_line(tmp_path):
    _trainer(tmp_path, steps=3).fit()
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "{garbage", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=rf"{metrics}, line 2"):
        _trainer(tmp_path, steps=5).fit(resume=True)
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(tmp_path)


# ---- 3: checkpoints are loaded without running code -----------------------------------------------------
class _Payload:
    """Unpickling this creates a marker file (stands for any code a crafted checkpoint could run)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_checkpoint_with_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    evil = ckpt.checkpoint_path(tmp_path / "run", 9)
    evil.parent.mkdir(parents=True)
    torch.save({"step": 9, "student": {}, "payload": _Payload(marker)}, evil)
    with pytest.raises(ValueError, match=str(evil)):
        ckpt.load_checkpoint(evil)
    with pytest.raises(ValueError, match=str(evil)):
        _trainer(tmp_path / "run", steps=10).fit(resume=True)
    with pytest.raises(ValueError, match=str(evil)):
        export_checkpoint(evil, tmp_path / "out.safetensors")
    assert not marker.exists(), "loading the checkpoint ran code stored in it"


def test_old_checkpoint_with_pickled_rng_state_is_refused_clearly(tmp_path):
    old = tmp_path / "step_00000001.pt"
    torch.save({"step": 1, "rng": {"numpy": np.random.get_state()}}, old)
    with pytest.raises(ValueError, match="written before"):
        ckpt.load_checkpoint(old)


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    np.random.seed(3)
    random.seed(4)
    np.random.randn()  # a cached Gaussian in the numpy state
    path = tmp_path / "step_00000001.pt"
    ckpt.save_checkpoint(path, {"step": 1, "rng": trainer_module._rng_state()})
    want = (np.random.randn(5), random.random(), torch.rand(3))
    trainer_module._set_rng_state(ckpt.load_checkpoint(path)["rng"])
    got = (np.random.randn(5), random.random(), torch.rand(3))
    assert np.array_equal(want[0], got[0]) and want[1] == got[1] and torch.equal(want[2], got[2])


def test_diverging_rcm_run_stops_with_a_clear_error_and_exports_nothing(tmp_path, capsys):
    """The issue's reproduction through the CLI (lr 1e6, no tangent warm-up, no DMD): rc 2 naming
    train.max_bad_steps instead of rc 0 with an all-NaN student; every checkpoint left on disk is finite."""
    from vdistill.methods.cli.main import main

    teacher = tmp_path / "teacher"
    assert main(["pretrain", "--preset", "tiny", "--set", "train.steps=2", "--out", str(teacher)]) == 0
    out = tmp_path / "rcm"
    argv = ["distill", "rcm", "--teacher", str(teacher / "model_ema.safetensors"), "--out", str(out),
            "--preset", "tiny", "--set", "train.steps=8", "--set", "train.lr=1e6", "--set", "train.max_bad_steps=2",
            "--set", "method.tangent_warmup=0", "--set", "method.dmd_weight=0"]
    assert main(argv) == 2
    assert "train.max_bad_steps=2" in capsys.readouterr().err
    assert not list(out.glob("student*.safetensors"))
    for path in ckpt.list_checkpoints(out):
        state = ckpt.load_checkpoint(path)
        assert all(torch.isfinite(v).all() for v in state["student"].values())
