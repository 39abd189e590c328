"""Consistency distillation: the 1-step student beats the 1-step teacher on the 2-D toy; boundary
condition; EMA target; exact resume with the target network in the extra state."""

import pytest
import torch
from distill_helpers import (  # noqa: F401
    N_EVAL,
    NOISE_SEED,
    ConstantVelocity,
    distances,
    fit_toy,
    one_thread,
    tiny_dit_trainer,
    toy_sample_consistency,
)

from vdistill.methods.data.batch import Batch
from vdistill.methods.data.toy import TOY_TEXT, ToyVelocityNet, toy_data, toy_sample_ode, toy_teacher, toy_text
from vdistill.methods.recipes import consistency
from vdistill.methods.sampling.samplers import rf_time_grid

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_one_step_student_is_twice_as_close_as_the_teacher(tmp_path):
    torch.manual_seed(0)
    cfg = consistency.ConsistencyConfig(intervals=32, solver="euler", target_decay=0.95)
    recipe = consistency.Consistency(toy_teacher(), cfg)
    fit_toy(recipe, tmp_path, steps=400)
    times = consistency.Consistency.sampler_meta(cfg)["times"]
    teacher = distances(toy_sample_ode(toy_teacher(), N_EVAL, 1, seed=NOISE_SEED))
    student = distances(toy_sample_consistency(recipe.student, times["1"]))
    print(f"1 step: teacher {teacher}, consistency student {student}")
    print(f"2 steps: consistency student {distances(toy_sample_consistency(recipe.student, times['2']))}")
    assert student["sw"] < teacher["sw"] / 2 and student["energy"] < teacher["energy"] / 2


@pytest.mark.slow
def test_two_segment_student_at_two_steps_is_twice_as_close_as_the_teacher(tmp_path):
    # Multistep consistency: 2 segments, sampled deterministically by Euler steps onto the segment ends.
    torch.manual_seed(0)
    cfg = consistency.ConsistencyConfig(intervals=32, solver="euler", target_decay=0.95, segments=2)
    recipe = consistency.Consistency(toy_teacher(), cfg)
    fit_toy(recipe, tmp_path, steps=400)
    assert consistency.Consistency.sampler_meta(cfg)["kind"] == "ode"
    teacher = distances(toy_sample_ode(toy_teacher(), N_EVAL, 2, seed=NOISE_SEED))
    student = distances(toy_sample_ode(recipe.student, N_EVAL, 2, seed=NOISE_SEED))
    print(f"2 steps: teacher {teacher}, 2-segment student {student}")
    assert student["sw"] < teacher["sw"] / 2 and student["energy"] < teacher["energy"] / 2


def test_boundary_condition_is_exact():
    model = ToyVelocityNet()
    x = toy_data(16)
    zero, half = torch.zeros(16), torch.full((16,), 0.5)
    assert torch.equal(consistency.consistency_output(model, x, zero, toy_text(16), zero), x)
    assert torch.equal(consistency.consistency_output(model, x, half, toy_text(16), half), x)
    assert not torch.allclose(consistency.consistency_output(model, x, half, toy_text(16), zero), x)


@pytest.mark.parametrize("segments", [1, 4])
@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_straight_teacher_is_already_consistent(solver, segments):
    # For a straight flow the teacher step is exact and f(x, s) = x + (e - s)·c is constant along it
    # within a segment: zero loss, which needs the target's time to stay in the segment of s.
    cfg = consistency.ConsistencyConfig(intervals=8, solver=solver, segments=segments)
    recipe = consistency.Consistency(ConstantVelocity(), cfg)
    batch = Batch(toy_data(64), toy_text(64), TOY_TEXT)
    assert recipe.loss(batch, 0)[0].item() < 1e-12
    torch.manual_seed(0)
    recipe = consistency.Consistency(ToyVelocityNet(), cfg)
    assert recipe.loss(batch, 0)[0].item() > 1e-8


def test_target_network_is_an_ema_of_the_student():
    torch.manual_seed(0)
    recipe = consistency.Consistency(ToyVelocityNet(), consistency.ConsistencyConfig(target_decay=0.9))
    batch = Batch(toy_data(8), toy_text(8), TOY_TEXT)
    before = [p.clone() for p in recipe.target.parameters()]
    with torch.no_grad():
        for p in recipe.student.parameters():
            p.add_(1.0)
    recipe.auxiliary_step(batch, 0)
    for t, b, s in zip(recipe.target.parameters(), before, recipe.student.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)
    loss, _ = recipe.loss(batch, 1)
    loss.backward()
    assert all(p.grad is None for p in recipe.target.parameters())
    assert all(p.grad is not None for p in recipe.student.parameters())


@pytest.mark.parametrize("target_decay", [0.0, 0.9])
def test_resume_is_exact(tmp_path, target_decay):
    cfg = consistency.ConsistencyConfig(intervals=8, target_decay=target_decay, loss="pseudo_huber")
    full = tiny_dit_trainer(consistency.Consistency, cfg, tmp_path / "full", steps=5).fit()
    tiny_dit_trainer(consistency.Consistency, cfg, tmp_path / "cut", steps=3).fit()
    resumed = tiny_dit_trainer(consistency.Consistency, cfg, tmp_path / "cut", steps=5).fit(resume=True)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[3:]]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in full[3:]]


def test_sampler_meta_times_come_from_the_schedule():
    meta = consistency.Consistency.sampler_meta(consistency.ConsistencyConfig(shift=3.0, sample_steps=(1, 2, 4)))
    assert meta["kind"] == "consistency" and sorted(meta["times"]) == ["1", "2", "4"]
    assert meta["times"]["1"] == [1.0] and len(meta["times"]["4"]) == 4
    assert all(a > b for a, b in zip(meta["times"]["4"], meta["times"]["4"][1:]))


def test_segment_ends_are_the_euler_sampling_grid():
    # K Euler steps on the exported grid land on the K segment ends the student was trained to jump to.
    cfg = consistency.ConsistencyConfig(intervals=12, shift=3.0, segments=3)
    meta = consistency.Consistency.sampler_meta(cfg)
    assert meta == {"kind": "ode", "shift": 3.0, "segments": 3}
    ends = rf_time_grid(cfg.intervals, cfg.shift)[:: cfg.intervals // cfg.segments]
    torch.testing.assert_close(ends, rf_time_grid(cfg.segments, meta["shift"]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"intervals": 0}, "intervals"),
        ({"solver": "rk4"}, "solver"),
        ({"target_decay": 1.0}, "target_decay"),
        ({"sample_steps": ()}, "sample_steps"),
        ({"segments": 0}, "segments"),
        ({"intervals": 8, "segments": 3}, "segments"),
        ({"loss": "l1"}, "loss"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        consistency.ConsistencyConfig(**kwargs)
