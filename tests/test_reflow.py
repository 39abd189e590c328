"""ReFlow: the 1-step student beats the 1-step teacher on the 2-D toy; the recipe's contract."""

import pytest
import torch
from distill_helpers import N_EVAL, NOISE_SEED, distances, fit_toy, one_thread, tiny_dit_trainer  # noqa: F401

from vdistill.methods.data.batch import Batch
from vdistill.methods.data.shards import write_shard
from vdistill.methods.data.toy import TOY_TEXT, ToyVelocityNet, toy_data, toy_sample_ode, toy_teacher, toy_text
from vdistill.methods.recipes import reflow

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_one_step_student_is_twice_as_close_as_the_teacher(tmp_path):
    torch.manual_seed(0)
    recipe = reflow.ReFlow(toy_teacher(), reflow.ReFlowConfig(pair_steps=8, pair_solver="heun"))
    fit_toy(recipe, tmp_path, steps=200)
    teacher = distances(toy_sample_ode(toy_teacher(), N_EVAL, 1, seed=NOISE_SEED))
    student = distances(toy_sample_ode(recipe.student, N_EVAL, 1, seed=NOISE_SEED))
    print(f"1 step: teacher {teacher}, reflow student {student}")
    assert student["sw"] < teacher["sw"] / 2 and student["energy"] < teacher["energy"] / 2


def test_online_pairs_are_the_teacher_ode_and_target_is_the_straight_line():
    teacher = ToyVelocityNet().eval()
    recipe = reflow.ReFlow(teacher, reflow.ReFlowConfig(pair_steps=4, pair_solver="euler"))
    batch = Batch(toy_data(16), toy_text(16), TOY_TEXT)
    torch.manual_seed(3)
    noise, data, _ = recipe.online_pairs(batch)
    x = noise  # four Euler steps of the teacher by hand
    for s, s_next in zip(torch.linspace(1, 0, 5)[:-1], torch.linspace(1, 0, 5)[1:]):
        x = x + (s_next - s) * teacher(x, s.expand(16), toy_text(16))
    torch.testing.assert_close(data, x)
    # The student starts as a copy of the teacher and is the only trainable module.
    assert all(torch.equal(a, b) for a, b in zip(recipe.student.parameters(), teacher.parameters()))
    assert not any(p.requires_grad for p in recipe.teacher.parameters())
    loss, _ = recipe.loss(batch, 0)
    loss.backward()
    assert all(p.grad is not None for p in recipe.student.parameters())


def test_resume_with_offline_pairs_is_exact(tmp_path):
    g = torch.Generator().manual_seed(0)
    for k in range(2):  # pair shards in the tiny preset's geometry: [noise, data] = 2·3 channels, 4×16×16
        write_shard(tmp_path / "pairs" / f"p{k}.safetensors", torch.randn(5, 6, 4, 16, 16, generator=g),
                    torch.randn(5, 8, 16, generator=g))
    cfg = reflow.ReFlowConfig(pairs=str(tmp_path / "pairs"))
    full = tiny_dit_trainer(reflow.ReFlow, cfg, tmp_path / "full", steps=6).fit()
    tiny_dit_trainer(reflow.ReFlow, cfg, tmp_path / "cut", steps=3).fit()
    resumed = tiny_dit_trainer(reflow.ReFlow, cfg, tmp_path / "cut", steps=6).fit(resume=True)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[3:]]
    assert len({r["loss"] for r in full}) == 6


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"pair_steps": 0}, "pair_steps"),
        ({"pair_solver": "rk4"}, "pair_solver"),
        ({"shift": 0.0}, "shift"),
        ({"time_sampling": "beta"}, "time_sampling"),
        ({"loss": "l1"}, "loss"),
        ({"huber_c": -1.0}, "huber_c"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        reflow.ReFlowConfig(**kwargs)
