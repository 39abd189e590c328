"""Progressive distillation: the 1-step student beats the 1-step teacher on the 2-D toy; stages; exact resume."""

import pytest
import torch
from distill_helpers import N_EVAL, NOISE_SEED, ConstantVelocity, distances, fit_toy, one_thread, tiny_dit_trainer  # noqa: F401

from vdistill.methods.data.batch import Batch
from vdistill.methods.data.toy import TOY_TEXT, ToyVelocityNet, toy_data, toy_sample_ode, toy_teacher, toy_text
from vdistill.methods.recipes.progressive import Progressive, ProgressiveConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_one_step_student_is_twice_as_close_as_the_teacher(tmp_path):
    torch.manual_seed(0)
    cfg = ProgressiveConfig(teacher_steps=32, final_steps=1, stage_steps=(80,))
    recipe = Progressive(toy_teacher(), cfg)
    fit_toy(recipe, tmp_path, steps=80 * cfg.stages)
    assert recipe.stage == cfg.stages - 1
    teacher = distances(toy_sample_ode(toy_teacher(), N_EVAL, 1, seed=NOISE_SEED))
    student = distances(toy_sample_ode(recipe.student, N_EVAL, 1, seed=NOISE_SEED))
    print(f"1 step: teacher {teacher}, progressive student {student}")
    assert student["sw"] < teacher["sw"] / 2 and student["energy"] < teacher["energy"] / 2


def test_target_is_two_teacher_steps():
    # A straight teacher: two small Euler steps equal one big one, so the teacher's copy has zero loss...
    recipe = Progressive(ConstantVelocity(), ProgressiveConfig(teacher_steps=8, stage_steps=(1,)))
    batch = Batch(toy_data(64), toy_text(64), TOY_TEXT)
    assert recipe.loss(batch, 0)[0].item() < 1e-12
    # ...and a curved one leaves a gap that the student must learn.
    torch.manual_seed(0)
    recipe = Progressive(ToyVelocityNet().eval(), ProgressiveConfig(teacher_steps=8, stage_steps=(1,)))
    assert recipe.loss(batch, 0)[0].item() > 1e-9


def test_stages_swap_teachers():
    torch.manual_seed(0)
    cfg = ProgressiveConfig(teacher_steps=4, final_steps=1, stage_steps=(1, 2))
    recipe = Progressive(ToyVelocityNet().eval(), cfg)
    batch = Batch(toy_data(8), toy_text(8), TOY_TEXT)
    _, logs = recipe.loss(batch, 0)
    assert logs == {"stage": 0.0, "student_steps": 2.0}
    with torch.no_grad():
        for p in recipe.student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    _, logs = recipe.loss(batch, 1)  # stage 1: the teacher is now a frozen copy of the student
    assert logs["stage"] == 1.0 and logs["student_steps"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(recipe.teacher.parameters(), recipe.student.parameters()))
    assert not any(p.requires_grad for p in recipe.teacher.parameters())
    assert [cfg.stage_at(k) for k in range(5)] == [0, 1, 1, 1, 1]


def test_resume_across_a_stage_switch_is_exact(tmp_path):
    cfg = ProgressiveConfig(teacher_steps=8, final_steps=1, stage_steps=(2,))  # stages switch at steps 2 and 4
    full = tiny_dit_trainer(Progressive, cfg, tmp_path / "full", steps=6).fit()
    tiny_dit_trainer(Progressive, cfg, tmp_path / "cut", steps=3).fit()  # checkpoint at step 3, in stage 1
    resumed = tiny_dit_trainer(Progressive, cfg, tmp_path / "cut", steps=6).fit(resume=True)
    assert [r["stage"] for r in full] == [0, 0, 1, 1, 2, 2]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[3:]]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in full[3:]]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"teacher_steps": 1}, "teacher_steps"),
        ({"teacher_steps": 12, "final_steps": 1}, "power of two"),
        ({"stage_steps": (5, 5)}, "stage_steps"),
        ({"stage_steps": (0,)}, "stage_steps"),
        ({"loss": "l1"}, "loss"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProgressiveConfig(**kwargs)
