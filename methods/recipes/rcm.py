"""rCM: continuous-time consistency distillation (sCM, one JVP pass) + DMD score regularisation.

Convention: TrigFlow, t in [0, π/2] (0 = data), σ_d = 1; every network is an RF DiT read through
`methods/recipes/trigflow_student.py`. Zheng et al. 2025 (rCM) on top of Lu & Song 2024 (sCM), per step:

1. t with tan t = exp(N(P_mean, P_std²)); x_t = cos t·x0 + sin t·ε by the fused kernel.
2. dx_t/dt = F_teacher(x_t, t) with CFG baked in (teacher's scale).
3. JVP pass of the target θ⁻ (stop-grad student, or an EMA copy) under no_grad. "JVP
   rearrangement" (sCM Sec. 4.3): the tangents are (cos t·sin t·dx_t/dt, cos t·sin t), so the pass
   yields D = cos t·sin t·dF⁻/dt directly, never the large raw dF⁻/dt in bf16. The fused kernel
   `scm_tangent` takes dF⁻/dt, so D/(cos t·sin t) is passed in float32 (exact rescaling; t is
   clamped away from 0 and π/2). `jvp_mode="finite_difference"` replaces the pass by a central
   difference of two forwards along the same tangent: for networks without forward AD only,
   slower (3 forwards in EMA mode) and less accurate (O(h²) truncation, bf16 cancellation).
4. g = −cos²t·(F⁻ − dx_t/dt) − r·cos t·sin t·(x_t + dF⁻/dt), ĝ = g/(‖g‖ + c), r: 0 → 1 linearly
   over `tangent_warmup` steps; L_sCM = ‖F_θ − F⁻ − ĝ‖²/D per sample (D = elements), optionally
   weighted exp(−w_φ(t))·L + w_φ(t). Samples with a non-finite ĝ, F⁻ or F_θ are masked out and
   counted (`nan_samples`, `nan_total`). With the stop-grad target F⁻ = F_θ in value, so the logged
   `scm_loss` is ‖ĝ‖²/D < 1/D whatever the student does (1/D ≈ 4.1e-5 on the shapes clips): its
   gradient trains, its value is no progress measure (evaluate the student instead).
5. From `dmd_start` (default: the end of the tangent warm-up): L += λ·L_DMD (`methods/recipes/rcm_dmd.py`)
   on a 1..`max_sim_steps`-step student sample; the last step shares the student's forward with
   F_θ (one batch of 2B). The critic is trained in `auxiliary_step` on the same (detached) samples.
   The DMD times (re-noising, simulation, critic) come from the DMD proposal: log-normal (`dmd_p_mean`,
   `dmd_p_std`), or with `dmd_shift` > 0 the shifted uniform RF schedule (NVlabs/rcm's code with a timestep shift).

rCM's sCM loss is 100·Σ and its DMD loss 1·Σ over elements; here both are /D and λ = 0.01 keeps
that ratio. The trainer keeps the power EMA of the student (`kernels.ema`).
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from vdistill.kernels.ema import EMA
from vdistill.kernels.ema_schedule import EMAProfile
from vdistill.kernels.scm_tangent import scm_tangent
from vdistill.kernels.trigflow import trigflow_noise
from vdistill.methods.data.batch import Batch
from vdistill.methods.recipes.base import DistillRecipe, Logs
from vdistill.methods.recipes.rcm_dmd import critic_loss, dmd_loss, simulate_to_last_step
from vdistill.methods.recipes.shared import frozen, student_from
from vdistill.methods.recipes.trigflow_student import (
    AdaptiveWeight,
    check_mid_times,
    guided_trig_velocity,
    rf_sampling_times,
    sample_shifted_trig_time,
    sample_trig_time,
    trig_model,
    trig_velocity,
)
from vdistill.methods.train import distributed
from vdistill.methods.train.profiling import nvtx_range
from vdistill.models.config_fields import check_fields
from vdistill.models.jvp import jvp
from vdistill.models.parameterization import per_sample, trig_x0

TARGETS = ("stopgrad", "ema")
JVP_MODES = ("forward_ad", "func", "finite_difference")
SIM_TIMES = ("proposal", "sampler")


@dataclass
class RCMConfig:
    p_mean: float = -0.8  # sCM time proposal: tan t = exp(N(p_mean, p_std²))
    p_std: float = 1.6  # spread of the sCM time proposal (>= 0)
    tangent_warmup: int = 300  # steps over which r ramps 0 -> 1 (DMD starts after it by default)
    tangent_c: float = 0.1  # ĝ = g / (‖g‖ + c)
    target: str = "stopgrad"  # θ⁻: "stopgrad" (the student itself) or "ema" (constant-β EMA copy)
    target_ema_beta: float = 0.99  # decay of the EMA target (target="ema")
    jvp_mode: str = "forward_ad"  # "forward_ad", "func" (torch.func.jvp), or "finite_difference"
    fd_step: float = 1e-3  # finite-difference step along the rearranged tangent
    adaptive_weight: bool = False  # learned w_φ(t) (sCM eq. 9)
    weight_lr: float = 1e-3  # learning rate of w_φ(t)
    dmd_weight: float = 0.01  # λ; 0 = sCM only (no critic)
    dmd_start: int = -1  # first step with DMD; -1 = tangent_warmup
    dmd_p_mean: float = 0.0  # DMD proposal (re-noising, critic and, with sim_times="proposal", simulation times)
    dmd_p_std: float = 1.6  # spread of the DMD proposal (>= 0)
    dmd_shift: float = 0.0  # > 0: DMD times from the shifted uniform RF schedule instead (rCM's code: 5)
    max_sim_steps: int = 4  # student backward simulation uses 1..max_sim_steps steps
    sim_times: str = "proposal"  # its times: "proposal" (rCM: min(DMD draw, t)) or "sampler" (mid_times_N_max)
    critic_every: int = 1  # critic update frequency (steps)
    critic_updates: int = 1  # critic updates per critic step
    critic_lr: float = 1e-4  # the critic's AdamW learning rate
    critic_betas: tuple[float, float] = (0.0, 0.999)  # the critic's AdamW (β1, β2)
    critic_grad_clip: float = 1.0  # max grad norm of the critic's update (0 = off)
    noise_seed: int = 0  # seed of the fused TrigFlow noise (offset from the step and the batch part)
    mid_times_2: tuple[float, ...] = (1.1,)  # TrigFlow time after π/2 of 2-step sampling
    mid_times_3: tuple[float, ...] = (1.3, 0.8)  # TrigFlow times after π/2 of 3-step sampling
    mid_times_4: tuple[float, ...] = (1.3, 1.0, 0.6)  # TrigFlow times after π/2 of 4-step sampling

    def __post_init__(self) -> None:
        check_fields(self)
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.jvp_mode not in JVP_MODES:
            raise ValueError(f"jvp_mode must be one of {JVP_MODES}, got {self.jvp_mode!r}")
        if self.sim_times not in SIM_TIMES:
            raise ValueError(f"sim_times must be one of {SIM_TIMES}, got {self.sim_times!r}")
        for name in ("tangent_warmup", "max_sim_steps", "critic_every", "critic_updates"):
            low = 0 if name == "tangent_warmup" else 1
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        for name in ("tangent_c", "dmd_weight", "p_std", "dmd_p_std", "dmd_shift"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.target_ema_beta < 1:
            raise ValueError(f"target_ema_beta must be in [0, 1), got {self.target_ema_beta}")
        if self.fd_step <= 0:
            raise ValueError(f"fd_step must be > 0, got {self.fd_step}")
        for n in (2, 3, 4):
            times = getattr(self, f"mid_times_{n}")
            check_mid_times(times, f"mid_times_{n}")
            if len(times) != n - 1:
                raise ValueError(f"mid_times_{n} must hold {n - 1} times, got {tuple(times)}")
        if self.sim_times == "sampler" and self.max_sim_steps > 4:
            raise ValueError(f"sim_times='sampler' needs max_sim_steps <= 4 (mid_times_2..4), got {self.max_sim_steps}")

    def mid_times(self, steps: int) -> tuple[float, ...]:
        """The sampler's intermediate TrigFlow times for 1-4 steps."""
        return () if steps == 1 else tuple(getattr(self, f"mid_times_{steps}"))

    def dmd_time(self, b: int, device: torch.device | str) -> torch.Tensor:
        """[b] draws from the DMD proposal: log-normal (dmd_p_mean, dmd_p_std), or shifted uniform (dmd_shift)."""
        if self.dmd_shift > 0:
            return sample_shifted_trig_time(b, self.dmd_shift, device)
        return sample_trig_time(b, self.dmd_p_mean, self.dmd_p_std, device)

    @property
    def sim_mid_times(self) -> tuple[float, ...] | None:
        """Intermediate times of the backward simulation; None: drawn from the DMD proposal."""
        return None if self.sim_times == "proposal" else self.mid_times(self.max_sim_steps)

    @property
    def first_dmd_step(self) -> int:
        return self.tangent_warmup if self.dmd_start < 0 else self.dmd_start


class RCM(DistillRecipe):
    """sCM generator loss + DMD regulariser; the student and the critic start from `teacher` (an RF net)."""

    name = "rcm"
    Config = RCMConfig

    @classmethod
    def sampler_meta(cls, cfg: RCMConfig) -> dict:
        """Consistency sampling at RF times converted from the TrigFlow times π/2, mid_times_n..."""
        return {"kind": "consistency", "times": {str(n): rf_sampling_times(cfg.mid_times(n)) for n in (1, 2, 3, 4)}}

    def __init__(self, teacher: torch.nn.Module, cfg: RCMConfig | None = None, cfg_scale: float = 1.0):
        super().__init__()
        self.cfg = cfg or RCMConfig()
        self.cfg_scale = float(cfg_scale)
        self.student = student_from(teacher)
        self.critic = student_from(teacher) if self.cfg.dmd_weight > 0 else None
        self.teacher = frozen(teacher)
        self.weight = AdaptiveWeight() if self.cfg.adaptive_weight else None
        self.nan_total = 0
        self._critic_opt: torch.optim.Optimizer | None = None
        self._weight_opt: torch.optim.Optimizer | None = None
        self._target_ema: EMA | None = None
        self._samples: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (step, x̂, text) for the critic
        self._replicas: dict[str, torch.nn.Module] = {}  # the critic as its loss sees it (DDP under torchrun)

    # ---- helpers ---------------------------------------------------------------------------------
    def tangent_ratio(self, step: int) -> float:
        """Tangent warm-up factor r in [0, 1]."""
        warm = self.cfg.tangent_warmup
        return 1.0 if warm == 0 else min(1.0, step / warm)

    def dmd_active(self, step: int) -> bool:
        return self.critic is not None and step >= self.cfg.first_dmd_step

    def _critic_optimizer(self) -> torch.optim.Optimizer:
        if self._critic_opt is None:
            first = next(self.critic.parameters())
            fused = first.is_cuda and not isinstance(first, DTensor)  # sharded (FSDP2): foreach AdamW
            self._critic_opt = torch.optim.AdamW(
                self.critic.parameters(), lr=self.cfg.critic_lr, betas=self.cfg.critic_betas,
                weight_decay=0.0, fused=fused, foreach=not fused,
            )
        return self._critic_opt

    def _weight_optimizer(self) -> torch.optim.Optimizer:
        if self._weight_opt is None:
            self._weight_opt = torch.optim.Adam(self.weight.parameters(), lr=self.cfg.weight_lr)
        return self._weight_opt

    def _target(self) -> EMA:
        if self._target_ema is None:
            self._target_ema = EMA(self.student, [EMAProfile(beta=self.cfg.target_ema_beta)])
        return self._target_ema

    def tangent_pass(
        self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor, dxt_dt: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(F⁻, dF⁻/dt) in float32 [B, ...] at (x_t, t) from the target network (no autograd graph)."""
        cs = torch.cos(t) * torch.sin(t)  # [B], > 0 on the clamped proposal
        cs_x = per_sample(cs, x_t)
        tangent_x = (cs_x * dxt_dt).to(x_t.dtype)
        model = trig_model(self.student)
        ema_target = self.cfg.target == "ema"
        with distributed.ema_weights(self._target(), self.student) if ema_target else contextlib.nullcontext():
            if self.cfg.jvp_mode == "finite_difference":
                h = self.cfg.fd_step
                with torch.no_grad():
                    f = model(x_t, t, text)
                    plus = model(x_t + h * tangent_x, t + h * cs, text)
                    minus = model(x_t - h * tangent_x, t - h * cs, text)
                scaled = (plus.float() - minus.float()) / (2 * h)
            else:
                f, scaled = jvp(model, (x_t, t, text), (tangent_x, cs), backend=self.cfg.jvp_mode)
        return f.float(), scaled.float() / cs_x

    # ---- the recipe ------------------------------------------------------------------------------
    def loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, Logs]:
        cfg, x0, text = self.cfg, batch.x0, batch.text
        b, dev = x0.shape[0], x0.device
        t = sample_trig_time(b, cfg.p_mean, cfg.p_std, dev)
        x_t, _ = trigflow_noise(x0, t, seed=cfg.noise_seed, offset=batch.noise_offset(2 * step))
        with nvtx_range("teacher"), torch.no_grad():
            dxt_dt = guided_trig_velocity(self.teacher, text, batch.null_text, self.cfg_scale)(x_t, t).float()
        with nvtx_range("jvp"):
            f_target, df_dt = self.tangent_pass(x_t, t, text, dxt_dt)
        # samples whose inputs or targets are not finite enter the student as zeros: their loss is masked
        # below, and finite activations make their gradient exactly zero (0 · NaN would poison every weight)
        ok_in = torch.stack([torch.isfinite(a).flatten(1).all(1) for a in (x_t, dxt_dt, f_target, df_dt)]).all(0)
        x_in = torch.where(per_sample(ok_in, x_t), x_t, 0.0)

        dmd = self.dmd_active(step)
        logs: Logs = {"tangent_r": self.tangent_ratio(step)}
        if dmd:  # the last simulation step shares the student's forward with F_θ
            # the same on every rank (a sharded student's forwards are collectives): drawn from the step
            sim_steps = random.Random(cfg.noise_seed * 1_000_003 + step).randint(1, cfg.max_sim_steps)
            with nvtx_range("simulate"):
                g_x, g_t = simulate_to_last_step(
                    trig_velocity(self.student, text), torch.randn_like(x0), sim_steps, cfg.dmd_time, cfg.sim_mid_times
                )
            with nvtx_range("student"):
                both = trig_velocity(self.student, torch.cat([text, text]))(torch.cat([x_in, g_x]), torch.cat([t, g_t]))
            f_theta, f_gen = both.chunk(2)
            x_hat = trig_x0(g_x, g_t, f_gen.to(g_x.dtype))
            logs["sim_steps"] = float(sim_steps)
        else:
            with nvtx_range("student"):
                f_theta = trig_velocity(self.student, text)(x_in, t)
        f_minus = f_theta.detach().float() if cfg.target == "stopgrad" else f_target

        g_hat, g_norm = scm_tangent(f_minus, dxt_dt, x_t, df_dt, t, self.tangent_ratio(step), cfg.tangent_c)
        outputs = (g_hat, f_minus, f_theta)
        ok = ok_in & torch.stack([torch.isfinite(a.detach()).flatten(1).all(1) for a in outputs]).all(0)
        ok_x = per_sample(ok, x_t)
        residual = torch.where(ok_x, f_theta.float() - f_minus - g_hat.float(), 0.0)
        sample_loss = residual.square().flatten(1).mean(1)
        logs["scm_loss"] = sample_loss.detach().mean()
        if self.weight is not None:
            w = self.weight(t)
            sample_loss = torch.where(ok, torch.exp(-w) * sample_loss + w, 0.0)
        loss = sample_loss.mean()
        nan_samples = (~ok).sum()
        self.nan_total = self.nan_total + nan_samples  # a device tensor: read only when saved
        logs.update(nan_samples=nan_samples.float(), g_norm=g_norm.float().mean())

        if dmd:
            t_d = cfg.dmd_time(b, dev)
            with nvtx_range("dmd"):
                per_dmd, _ = dmd_loss(
                    x_hat, t_d, self.teacher, self.critic, text, batch.null_text, self.cfg_scale,
                    seed=cfg.noise_seed, offset=batch.noise_offset(2 * step + 1),
                )
            per_dmd = torch.where(torch.isfinite(per_dmd.detach()), per_dmd, 0.0)
            loss = loss + cfg.dmd_weight * per_dmd.mean()
            logs["dmd_loss"] = per_dmd.detach().mean()
            self._samples = (step, x_hat.detach(), text)
        return loss, logs

    def trained_by_loss(self) -> list[torch.nn.Module]:
        return [self.student] + ([self.weight] if self.weight is not None else [])

    def check_shardable(self) -> None:
        if self.weight is not None:
            raise ValueError("fsdp: rCM's adaptive weight w_φ cannot be trained with a sharded student yet; "
                             "set adaptive_weight=false or use data parallelism (torchrun without train.fsdp)")

    def shard_auxiliary(self, shard) -> None:
        super().shard_auxiliary(shard)
        if self.critic is not None:  # with its optimiser: created after this, on the shards
            shard(self.critic)

    def replicate_auxiliary(self, wrap) -> None:
        if self.critic is not None:
            self._replicas["critic"] = wrap(self.critic)

    def auxiliary_step(self, batch: Batch, step: int) -> Logs:
        """Step w_φ's optimiser, the target EMA and (on DMD steps) the critic."""
        logs: Logs = {}
        if self.weight is not None:
            opt = self._weight_optimizer()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if self.cfg.target == "ema":
            self._target().update()
        samples, self._samples = self._samples, None
        if samples is None or samples[0] != step or step % self.cfg.critic_every:
            return logs
        _, x_hat, text = samples
        with nvtx_range("critic"):
            logs["critic_loss"] = self.critic_step(x_hat, text)
        return logs

    def critic_step(self, x_hat: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """`critic_updates` flow-matching updates of the critic on student samples x̂ [B, ...]; last loss (0-d,
        on the device)."""
        # sharded: the DMD term's no-grad forward left the root unit's weights gathered, and an optimiser made now
        # would hold those instead of the shards
        distributed.reshard(self.critic)
        opt = self._critic_optimizer()
        self.critic.train()
        for _ in range(self.cfg.critic_updates):
            t = self.cfg.dmd_time(x_hat.shape[0], x_hat.device)
            loss = critic_loss(self._replicas.get("critic", self.critic), x_hat, text, t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.critic_grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.critic.parameters(), self.cfg.critic_grad_clip)
            opt.step()
        return loss.detach()

    # ---- state -----------------------------------------------------------------------------------
    def extra_state(self) -> dict:
        state: dict = {"nan_total": int(self.nan_total)}
        if self.critic is not None:
            state["critic"] = self.critic.state_dict()
            state["critic_opt"] = self._critic_optimizer().state_dict()
        if self.weight is not None:
            state["weight"] = self.weight.state_dict()
            state["weight_opt"] = self._weight_optimizer().state_dict()
        if self.cfg.target == "ema":
            state["target_ema"] = self._target().state_dict()
        return state

    def load_extra_state(self, state: dict) -> None:
        expected = set(self.extra_state())
        if set(state) != expected:
            raise ValueError(f"rcm extra state has keys {sorted(state)}, this recipe expects {sorted(expected)}")
        self.nan_total = int(state["nan_total"])
        if self.critic is not None:
            self.critic.load_state_dict(state["critic"])
            self._critic_optimizer().load_state_dict(state["critic_opt"])
        if self.weight is not None:
            self.weight.load_state_dict(state["weight"])
            self._weight_optimizer().load_state_dict(state["weight_opt"])
        if self.cfg.target == "ema":
            self._target().load_state_dict(state["target_ema"])
