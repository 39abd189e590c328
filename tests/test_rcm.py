"""rCM: sCM tangent vs a float64 torch.func reference, DMD gradient vs direct autograd, 2-D toy
quality, exact resume with the critic through the real Trainer, and the CLI end to end."""

import json
import math
from dataclasses import replace

import pytest
import torch
from distributed_workers import tiny_dit

from vdistill.kernels.scm_tangent import scm_tangent
from vdistill.kernels.trigflow import trigflow_eps
from vdistill.methods.cli.main import main
from vdistill.methods.data.batch import Batch
from vdistill.methods.data.batches import ShapesBatches
from vdistill.methods.data.text import WordTextEncoder
from vdistill.methods.data.toy import (
    TOY_TEXT,
    ToyVelocityNet,
    sliced_wasserstein,
    toy_data,
    toy_sample_ode,
    toy_teacher,
    toy_text,
)
from vdistill.methods.recipes.rcm import RCM, RCMConfig
from vdistill.methods.recipes.rcm_dmd import dmd_loss, simulate_to_last_step
from vdistill.methods.recipes.trigflow_student import rf_sampling_times, trig_velocity
from vdistill.methods.sampling.samplers import sample_consistency
from vdistill.methods.train.checkpoint import load_dit
from vdistill.methods.train.presets import tiny
from vdistill.methods.train.trainer import Trainer
from vdistill.models.parameterization import rf_time_from_trig, rf_x0, trig_velocity_from_rf, trig_x0


@pytest.mark.parametrize("mode,tol", [("forward_ad", 2e-4), ("func", 2e-4), ("finite_difference", 2e-2)])
def test_scm_tangent_matches_float64_func_jvp(mode, tol):
    """ĝ from the rearranged JVP pass + fused tangent vs g built in float64 from torch.func.jvp with (dx/dt, 1)."""
    model = tiny_dit().eval()
    recipe = RCM(model, RCMConfig(jvp_mode=mode, dmd_weight=0.0))
    g = torch.Generator().manual_seed(1)
    x_t, dxdt = torch.randn(2, 3, 4, 8, 8, generator=g), torch.randn(2, 3, 4, 8, 8, generator=g)
    t, text, r = torch.tensor([0.3, 1.2]), torch.randn(2, 5, 16, generator=g), 0.7
    f_minus, df_dt = recipe.tangent_pass(x_t, t, text, dxdt)
    got, norm = scm_tangent(f_minus, dxdt, x_t, df_dt, t, r, 0.1)

    ref_model = tiny_dit().eval().double()
    x64, t64, dx64, text64 = x_t.double(), t.double(), dxdt.double(), text.double()

    def F(x, tt):
        return trig_velocity_from_rf(lambda a, s: ref_model(a, s, text64), x, tt)

    f, dfdt = torch.func.jvp(F, (x64, t64), (dx64, torch.ones_like(t64)))
    c, s = torch.cos(t64).view(-1, 1, 1, 1, 1), torch.sin(t64).view(-1, 1, 1, 1, 1)
    g_ref = -(c * c) * (f - dx64) - r * c * s * (x64 + dfdt)
    norm_ref = g_ref.flatten(1).norm(dim=1)
    want = g_ref / (norm_ref.view(-1, 1, 1, 1, 1) + 0.1)
    assert (r * c * s * dfdt).abs().max() > 1e-2  # the JVP term matters
    torch.testing.assert_close(f_minus.double(), f, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norm.double(), norm_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_dmd_gradient_matches_direct_autograd():
    """The surrogate's parameter gradient equals a direct VJP of x̂ with DMD's formula, built in float64
    through the RF parameterisation (x0 = x_s − s·v) rather than TrigFlow."""
    torch.manual_seed(0)
    student, teacher, critic = (ToyVelocityNet(hidden=32, depth=2).double() for _ in range(3))
    b = 16
    x, t = torch.randn(b, 2, dtype=torch.float64), torch.full((b,), math.pi / 2 - 0.2, dtype=torch.float64)
    t_d = torch.rand(b, dtype=torch.float64) * 1.4 + 0.05
    text = toy_text(b).double()

    def x_hat():
        return torch.cos(t)[:, None] * x - torch.sin(t)[:, None] * trig_velocity(student, text)(x, t)

    per, _ = dmd_loss(x_hat(), t_d, teacher, critic, text, text[:1], 1.0, seed=3, offset=5)
    got = torch.autograd.grad(per.mean(), list(student.parameters()))

    xh = x_hat()
    eps = trigflow_eps(xh, seed=3, offset=5)
    c, s = torch.cos(t_d)[:, None], torch.sin(t_d)[:, None]
    s_rf = rf_time_from_trig(t_d)
    x_s = (c * xh.detach() + s * eps) / (s + c)
    x0_real = rf_x0(x_s, s_rf, teacher(x_s, s_rf, text))
    x0_fake = rf_x0(x_s, s_rf, critic(x_s, s_rf, text))
    direction = (x0_fake - x0_real) / (xh.detach() - x0_real).abs().mean(1, keepdim=True)
    want = torch.autograd.grad(xh, list(student.parameters()), grad_outputs=2 * direction / (b * 2))
    assert max(w.abs().max() for w in want) > 1e-3
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-7)


@pytest.fixture
def one_thread():
    """The toy loops are many tiny ops: one thread is faster and makes the runs reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _toy_student(teacher, cfg, steps=300, batch=128, lr=1e-4):
    torch.manual_seed(0)
    recipe = RCM(teacher, cfg)
    opt = torch.optim.Adam(recipe.student.parameters(), lr=lr)
    for step in range(steps):
        data = Batch(toy_data(batch, seed=10_000 + step), toy_text(batch), TOY_TEXT)
        loss, logs = recipe.loss(data, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        logs.update(recipe.auxiliary_step(data, step))
    assert logs["nan_samples"] == 0 and ("critic_loss" in logs) == (cfg.dmd_weight > 0)
    return recipe


def _toy_sw(recipe, cfg, steps, data):
    noise = torch.randn(len(data), 2, generator=torch.Generator().manual_seed(1))
    times = RCM.sampler_meta(cfg)["times"][str(steps)]
    with torch.no_grad():
        x = sample_consistency(lambda x, s: recipe.student(x, s, toy_text(len(x))), noise, times,
                               torch.Generator().manual_seed(2))
    return sliced_wasserstein(x, data)


@pytest.mark.slow
def test_toy_scm_and_rcm_students_beat_the_teacher_at_one_step(one_thread):
    """1-step students at least 2x closer to the data than the 1-step teacher; rCM at 2 steps no worse
    than sCM at 2 steps up to the metric's resolution (SW between two independent data sets)."""
    n = 8192
    teacher, data = toy_teacher(), toy_data(n, seed=123)
    teacher_1 = sliced_wasserstein(toy_sample_ode(teacher, n, 1), data)
    floor = sliced_wasserstein(toy_data(n, seed=7), data)
    base = RCMConfig(tangent_warmup=100, mid_times_2=(0.8,), critic_lr=1e-3, critic_updates=2)
    scm_cfg, rcm_cfg = replace(base, dmd_weight=0.0), replace(base, dmd_weight=0.01)
    scm, rcm = _toy_student(teacher, scm_cfg), _toy_student(teacher, rcm_cfg)
    runs = (("scm", scm, scm_cfg), ("rcm", rcm, rcm_cfg))
    sw = {(name, k): _toy_sw(r, c, k, data) for name, r, c in runs for k in (1, 2)}
    msg = f"teacher 1-step {teacher_1:.3f}, data-vs-data {floor:.3f}, students {sw}"
    assert sw["scm", 1] < teacher_1 / 2, msg
    assert sw["rcm", 1] < teacher_1 / 2, msg
    assert sw["rcm", 2] <= sw["scm", 2] + floor, msg


def test_trigflow_sampling_equals_rf_consistency_sampler():
    """Sampling in TrigFlow (x0 = cos t·x − sin t·F, re-noise at the next t) is the RF sampler at s(t)."""
    model = ToyVelocityNet(hidden=32, depth=2).double()
    mids = (1.2, 0.5)
    noise = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    times = rf_sampling_times(mids)
    rf = sample_consistency(lambda x, s: model(x, s, None), noise, times, torch.Generator().manual_seed(4))
    gen, x = torch.Generator().manual_seed(4), noise
    for t, t_next in zip((math.pi / 2, *mids), (*mids, None)):
        x0 = math.cos(t) * x - math.sin(t) * trig_velocity(model, None)(x, torch.full((64,), t, dtype=torch.float64))
        if t_next is not None:
            x = math.cos(t_next) * x0 + math.sin(t_next) * torch.randn(noise.shape, generator=gen).double()
    torch.testing.assert_close(rf, x0, rtol=1e-5, atol=1e-5)


def test_backward_simulation_on_the_sampler_schedule_is_the_sampler():
    """sim_times="sampler": the DMD sample's path is the student's own 3-step sampler, noise for noise."""
    model = ToyVelocityNet(hidden=32, depth=2)
    cfg = RCMConfig(sim_times="sampler", max_sim_steps=3, mid_times_3=(1.2, 0.5))
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    sampled = sample_consistency(
        lambda x, s: model(x, s, None), noise, rf_sampling_times(cfg.mid_times_3), torch.Generator().manual_seed(4)
    )
    torch.manual_seed(4)
    x, t = simulate_to_last_step(trig_velocity(model, None), noise, 3, cfg.dmd_time, cfg.sim_mid_times)
    assert torch.all(t == 0.5)
    torch.testing.assert_close(trig_x0(x, t, trig_velocity(model, None)(x, t)), sampled, rtol=1e-4, atol=1e-4)
    assert RCMConfig().sim_mid_times is None and RCMConfig(sim_times="sampler", max_sim_steps=1).sim_mid_times == ()
    with pytest.raises(ValueError, match="mid_times"):
        simulate_to_last_step(trig_velocity(model, None), noise, 3, cfg.dmd_time, mid_times=(1.0,))


@pytest.mark.parametrize("shift", [1.0, 5.0])
def test_shifted_dmd_proposal_follows_the_shifted_uniform_schedule(shift):
    """dmd_shift > 0: RF times of the DMD draws have the CDF of s = shift·u/(1 + (shift − 1)·u)."""
    torch.manual_seed(0)
    s = rf_time_from_trig(RCMConfig(dmd_shift=shift).dmd_time(100_000, "cpu").double())
    for q in (0.1, 0.5, 0.9):  # the schedule is monotone in u, so its q-quantile is the map of q
        assert torch.quantile(s, q).item() == pytest.approx(shift * q / (1 + (shift - 1) * q), abs=5e-3)
    torch.manual_seed(0)
    lognormal = rf_time_from_trig(RCMConfig().dmd_time(100_000, "cpu").double())
    assert torch.quantile(lognormal, 0.5).item() == pytest.approx(0.5, abs=5e-3)  # tan t = e^0 at the median


def _trainer(run_dir, steps, cfg, **train_options):
    run = tiny()
    train = replace(run.train, steps=steps, ckpt_every=2, log_every=1, batch_size=2, **train_options)
    text = WordTextEncoder(dim=run.model.text_dim, max_len=run.text_max_len)
    data = ShapesBatches(run.data, text, train.batch_size, seed=train.seed)
    recipe = RCM(tiny_dit().eval(), cfg, cfg_scale=2.0)
    return Trainer(recipe, data, train, run_dir, run_config={"method": "rcm"})


def test_resume_with_critic_is_exact(tmp_path):
    cfg = RCMConfig(tangent_warmup=2, dmd_start=1, target="ema", adaptive_weight=True, max_sim_steps=2)
    full = _trainer(tmp_path / "full", 4, cfg).fit()
    _trainer(tmp_path / "cut", 2, cfg).fit()
    resumed = _trainer(tmp_path / "cut", 4, cfg).fit(resume=True)
    assert [r["step"] for r in resumed] == [3, 4]
    assert "critic_loss" in full[-1] and "dmd_loss" in full[-1]
    for key in ("loss", "grad_norm", "critic_loss", "dmd_loss", "scm_loss"):
        assert [r[key] for r in resumed] == [r[key] for r in full[2:]], key


def test_activation_checkpointing_trains_rcm_identically(tmp_path):
    """Student and critic recompute their blocks in the backward: the same losses, norms and weights."""
    cfg = RCMConfig(tangent_warmup=2, dmd_start=1, adaptive_weight=True, max_sim_steps=2)
    plain = _trainer(tmp_path / "plain", 3, cfg)
    rows = [plain.fit()]
    recomputed = _trainer(tmp_path / "recomputed", 3, cfg, activation_checkpointing=True)  # same seeds
    assert recomputed.recipe.student.checkpoint_blocks and recomputed.recipe.critic.checkpoint_blocks
    assert not recomputed.recipe.teacher.checkpoint_blocks  # frozen: it only runs without grad
    rows.append(recomputed.fit())
    assert "critic_loss" in rows[1][-1]
    for key in ("loss", "grad_norm", "critic_loss", "dmd_loss"):
        assert [r.get(key) for r in rows[1]] == [r.get(key) for r in rows[0]], key
    for a, b in zip(plain.recipe.critic.parameters(), recomputed.recipe.critic.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_distill_rcm_cli_end_to_end(tmp_path):
    teacher_dir, out = tmp_path / "teacher", tmp_path / "rcm"
    assert main(["pretrain", "--preset", "tiny", "--set", "train.steps=2", "--out", str(teacher_dir)]) == 0
    args = ["distill", "rcm", "--teacher", str(teacher_dir / "model_ema.safetensors"), "--out", str(out),
            "--preset", "tiny", "--set", "train.steps=4", "--set", "tangent_warmup=2", "--set", "max_sim_steps=2"]
    assert main(args) == 0
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert "critic_loss" in rows[-1] and all(math.isfinite(r["loss"]) for r in rows)
    _, meta = load_dit(out / "student_ema.safetensors")
    assert meta["sampler"] == RCM.sampler_meta(RCMConfig(tangent_warmup=2, max_sim_steps=2))
    assert main(["evaluate", "--model", str(out / "student_ema.safetensors"), "--steps", "1", "2", "--num", "4",
                 "--out", str(tmp_path / "eval")]) == 0


def test_sampler_meta_converts_trigflow_times():
    times = RCM.sampler_meta(RCMConfig())["times"]
    assert times["1"] == [1.0] and len(times["4"]) == 4
    assert all(a > b for a, b in zip(times["4"], times["4"][1:]))
    assert times["2"][1] == pytest.approx(math.sin(1.1) / (math.sin(1.1) + math.cos(1.1)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"target": "teacher"}, "target"),
        ({"jvp_mode": "magic"}, "jvp_mode"),
        ({"mid_times_2": (1.0, 0.5)}, "mid_times_2"),
        ({"mid_times_3": (0.5, 1.0)}, "mid_times_3"),
        ({"max_sim_steps": 0}, "max_sim_steps"),
        ({"sim_times": "fixed"}, "sim_times"),
        ({"sim_times": "sampler", "max_sim_steps": 5}, "max_sim_steps"),
        ({"dmd_weight": -1.0}, "dmd_weight"),
        ({"dmd_shift": -5.0}, "dmd_shift"),
        ({"target_ema_beta": 1.0}, "target_ema_beta"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RCMConfig(**kwargs)
