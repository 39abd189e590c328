"""Time one rCM training iteration by phase: Triton kernels vs the reference path, same run.

Phases of an iteration with DMD on (`methods/recipes/rcm.py`, in the trainer's order, bf16 autocast):
  noise        t from the proposal, x_t = cos t·x0 + sin t·ε
  teacher      dx_t/dt = F_teacher(x_t, t) with CFG (2B rows)
  jvp          the rearranged JVP pass of the student (forward AD, no_grad)
  student_fwd  one no-grad simulation step + the student's forward on [x_t; x_gen] (2B rows)
  tangent      ĝ = g/(‖g‖+c) and the sCM loss
  dmd          re-noise x̂, teacher (CFG) and critic data predictions, DMD surrogate
  student_bwd  backward of sCM + λ·DMD
  optimizer    grad clipping + fused AdamW
  ema          power EMA of the student, two profiles
  critic       one flow-matching update of the critic (forward, backward, AdamW)
Providers: "triton" (Triton flash attention with the fused forward+tangent kernel, fused
TrigFlow noising and tangent, fused multi-tensor EMA) and "reference" (math attention
`attention_ref` and forward AD through it, eager noising with torch.randn, `scm_tangent_ref`,
foreach-lerp EMA), switched with `kernels.dispatch.reference_kernels()`; "triton-recompute" is "triton" with
activation checkpointing in the student and the critic (`--activation-checkpointing`: each DiT block
recomputed in the backward), for the memory it saves and the time it costs; "triton-compiled" is "triton"
with every DiT's blocks through torch.compile (`train.compile`; the JVP pass stays eager), compiled during
the warm-up iterations.

Shapes: the `small` preset (3×8×32×32 clips, 512 tokens, batch 32) and a Wan2.1-1.3B-width DiT
with 2 layers at 32,760 tokens (latent 16×21×60×104, patch (1,2,2), batch 1, 512 text tokens).
Per phase: CUDA events around each phase, synchronised once per iteration; median (p20, p80)
over the timed iterations; step = sum of phases; peak memory = max_memory_allocated over the
provider's iterations; tokens/s = B·N / step; model TFLOP per step from one iteration under
`FlopCounterMode` (attention by the custom ops' registered formulas) and MFU against the GPU's dense bf16
peak (`--peak-tflops`). Host side: the host clock per phase (`host_ms`: the time
to issue it, which equals the device time when the host is the bottleneck) and, over one more untimed
iteration under `OpCounter`, ATen operators, kernel launches and host synchronisations per phase (with
the code line of each synchronisation; not for "triton-compiled", whose programs a dispatch mode turns back
into eager code) and, on CUDA, the kernels the profiler sees the GPU run in one more.
Before timing, the triton provider's JVP pass is checked against the reference provider's on the same
inputs (relative L2 error of dF/dt, bf16); where the reference does not fit (math attention at 32k: the
N×N scores alone are ~51 GB in fp32 per head group), the triton pass is checked for finiteness and the
failure is recorded.

    python -m vdistill.bench.bench_rcm_step [--quick] [--out bench/results] [--iters 3] [--autotune] [--model DIR]

Budget on an H200: ~60-90 s (autotuning off by default: each kernel's first config).
CPU smoke run of the logic: `TRITON_INTERPRET=1 python -m vdistill.bench.bench_rcm_step --device cpu --tiny`.
Metadata and JSON output come from `bench/harness.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from vdistill.bench.harness import device_label, result_name, run_meta, write_json
from vdistill.methods.train.op_counter import OpCounter
from vdistill.methods.train.profiling import nvtx_range

SHAPES = {  # name: (DiT size, overrides, clip (C, T, H, W), batch, text tokens)
    "small": ("small", {}, (3, 8, 32, 32), 32, 8),
    "wan1.3b-2L-32k": ("wan-1.3b", {"layers": 2}, (16, 21, 60, 104), 1, 512),
}
TINY = {"tiny": ("tiny", {"dim": 32, "heads": 2}, (3, 2, 8, 8), 2, 5)}
QUICK = ("wan1.3b-2L-32k",)
PHASES = ("noise", "teacher", "jvp", "student_fwd", "tangent", "dmd", "student_bwd", "optimizer", "ema", "critic")
CFG_SCALE = 5.0
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100-80GB-HBM3": 989.4}  # dense bf16 tensor-core peaks (SXM), for MFU
SIM_STEPS = 2  # student backward simulation: one no-grad step, then the step with grad


def noise_eager(x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Eager TrigFlow noising: ε = torch.randn, x_t = cos t·x0 + sin t·ε (fp32 math)."""
    eps = torch.randn(x0.shape, device=x0.device, dtype=torch.float32)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    return (torch.cos(t).view(shape) * x0.float() + torch.sin(t).view(shape) * eps).to(x0.dtype)


class PhaseTimer:
    """Marks phase boundaries with CUDA events and the host clock, inside an `nvtx_range` per phase (so
    Nsight and `OpCounter` see the phases); `collect()` after a sync."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, tuple, tuple]] = []

    def _mark(self) -> tuple:
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        return time.perf_counter(), event

    @contextlib.contextmanager
    def __call__(self, name: str):
        with nvtx_range(name):
            start = self._mark()
            yield
            self.marks.append((name, start, self._mark()))

    def collect(self) -> tuple[dict[str, float], dict[str, float]]:
        """({phase: device ms}, {phase: host ms}); without CUDA both are the host clock."""
        if self.cuda:
            torch.cuda.synchronize()
        host = {n: (b[0] - a[0]) * 1e3 for n, a, b in self.marks}
        device = {n: a[1].elapsed_time(b[1]) for n, a, b in self.marks} if self.cuda else host
        self.marks = []
        return device, host


def _meta(device: torch.device, argv: list[str]) -> dict:
    return {"bench": "rcm_step", **run_meta(device, argv),
            "autotune": os.environ.get("VDISTILL_ATTN_AUTOTUNE", "1") != "0"}


class Setup:
    """Networks, optimisers and inputs of one shape (shared by both providers)."""

    def __init__(self, spec: tuple, device: torch.device):
        from vdistill.kernels.ema import EMA, EMAProfile
        from vdistill.methods.recipes.rcm import RCM, RCMConfig
        from vdistill.models.dit import build_dit
        from vdistill.models.loading import load_model

        size, overrides, clip, batch, text_len = spec
        torch.manual_seed(0)
        if isinstance(size, Path):  # --model: a model file or Wan2.1 directory, trained in float32 as the presets
            teacher = load_model(size, dtype=torch.float32, device=device)
        else:
            teacher = build_dit(size, device=device, **overrides)
            torch.nn.init.normal_(teacher.head.weight, std=0.02)  # zero-initialised head: make F non-trivial
        cfg = RCMConfig(tangent_warmup=0, dmd_start=0, max_sim_steps=SIM_STEPS)
        self.recipe = RCM(teacher, cfg, cfg_scale=CFG_SCALE).to(device)
        self.params = [p for p in self.recipe.student.parameters() if p.requires_grad]
        fused = device.type == "cuda"
        self.opt = torch.optim.AdamW(self.params, lr=1e-5, fused=fused, foreach=not fused)
        self.ema = EMA(self.recipe.student, [EMAProfile(sigma_rel=0.05), EMAProfile(sigma_rel=0.1)])
        text_dim = teacher.cfg.text_dim
        self.x0 = torch.randn(batch, *clip, device=device)
        self.text = torch.randn(batch, text_len, text_dim, device=device)
        self.null = torch.zeros(1, text_len, text_dim, device=device)
        self.tokens = batch * math.prod(d // p for d, p in zip(clip[1:], teacher.cfg.patch))
        self.device = device
        self.n_params = sum(p.numel() for p in self.params)

    def recompute(self, on: bool) -> None:
        """Activation checkpointing of the trained DiTs (student, critic) on or off."""
        self.recipe.student.checkpoint_blocks = self.recipe.critic.checkpoint_blocks = on

    def compile(self, on: bool) -> None:
        """torch.compile of every DiT's blocks (student, teacher, critic; `train.compile`) on or off."""
        for dit in (self.recipe.student, self.recipe.teacher, self.recipe.critic):
            dit.compile_blocks = on

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def jvp_pass(self) -> torch.Tensor:
        """dF/dt of the student at a fixed (x_t, t) (for the provider check)."""
        from vdistill.methods.recipes.trigflow_student import guided_trig_velocity

        r, b = self.recipe, self.x0.shape[0]
        t = torch.linspace(0.3, 1.3, b, device=self.device)
        g = torch.Generator(device=self.device).manual_seed(1)
        x_t = torch.randn(self.x0.shape, device=self.device, generator=g)
        with self.autocast(), torch.no_grad():
            dxdt = guided_trig_velocity(r.teacher, self.text, self.null, CFG_SCALE)(x_t, t).float()
            return r.tangent_pass(x_t, t, self.text, dxdt)[1]

    def iteration(self, timer: PhaseTimer, fused: bool, step: int) -> None:
        """One rCM iteration (DMD on), phases timed."""
        from vdistill.kernels.ema import ema_update_ref
        from vdistill.kernels.scm_tangent import scm_tangent, scm_tangent_ref
        from vdistill.kernels.trigflow import trigflow_noise
        from vdistill.methods.recipes.rcm_dmd import dmd_loss, simulate_to_last_step
        from vdistill.methods.recipes.trigflow_student import guided_trig_velocity, sample_trig_time, trig_velocity
        from vdistill.models.parameterization import trig_x0

        r, cfg, x0, text = self.recipe, self.recipe.cfg, self.x0, self.text
        b = x0.shape[0]
        with timer("noise"):
            t = sample_trig_time(b, cfg.p_mean, cfg.p_std, self.device)
            x_t = trigflow_noise(x0, t, seed=0, offset=2 * step)[0] if fused else noise_eager(x0, t)
        with self.autocast():
            with timer("teacher"), torch.no_grad():
                dxdt = guided_trig_velocity(r.teacher, text, self.null, r.cfg_scale)(x_t, t).float()
            with timer("jvp"):
                _, df_dt = r.tangent_pass(x_t, t, text, dxdt)
            with timer("student_fwd"):
                g_x, g_t = simulate_to_last_step(
                    trig_velocity(r.student, text), torch.randn_like(x0), SIM_STEPS, cfg.dmd_time
                )
                both = trig_velocity(r.student, torch.cat([text, text]))(torch.cat([x_t, g_x]), torch.cat([t, g_t]))
                f_theta, f_gen = both.chunk(2)
                x_hat = trig_x0(g_x, g_t, f_gen.to(g_x.dtype))
            with timer("tangent"):
                tangent = scm_tangent if fused else scm_tangent_ref
                f_minus = f_theta.detach().float()
                g_hat, _ = tangent(f_minus, dxdt, x_t, df_dt, t, 1.0, cfg.tangent_c)
                loss = (f_theta.float() - f_minus - g_hat.float()).square().flatten(1).mean(1).mean()
            with timer("dmd"):
                t_d = cfg.dmd_time(b, self.device)
                per_dmd, _ = dmd_loss(x_hat, t_d, r.teacher, r.critic, text, self.null, r.cfg_scale,
                                      seed=0, offset=2 * step + 1)
                loss = loss + cfg.dmd_weight * per_dmd.mean()
        with timer("student_bwd"):
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        with timer("optimizer"):
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
        with timer("ema"):
            if fused:
                self.ema.update()
            else:
                for k, beta in enumerate(self.ema.betas()):
                    ema_update_ref(self.ema.tensors(k), self.params, beta)
        with timer("critic"), self.autocast():
            r.critic_step(x_hat.detach(), text)


def _summary(samples: list[float]) -> tuple[float, float, float]:
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), q[1], q[7]


def _untimed(setup: Setup, fused: bool, step: int) -> None:
    """One more iteration, its phase marks dropped and its gradients cleared (run under a counting context)."""
    timer = PhaseTimer(setup.device)
    setup.iteration(timer, fused, step)
    if timer.cuda:
        torch.cuda.synchronize()
    timer.collect()
    setup.opt.zero_grad(set_to_none=True)


def _step_flops(setup: Setup) -> float | None:
    """Model FLOPs of one iteration (Triton provider: every matmul, attention by its registered formula, counted
    by `FlopCounterMode`; recomputation not counted); None if the iteration fails (e.g. out of memory)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            _untimed(setup, True, 0)
    except Exception as exc:  # noqa: BLE001 - the timings still run; the row says why there is no MFU
        print(f"warning: FLOP count failed ({type(exc).__name__}: {str(exc)[:120]})", flush=True)
        return None
    return float(counter.get_total_flops())


def _dispatch_counts(setup: Setup, fused: bool, step: int) -> dict:
    """One untimed iteration under `OpCounter`: operators, kernel launches and host syncs per phase."""
    with OpCounter() as counter:
        _untimed(setup, fused, step)
    ops, launches, syncs = counter.total()
    sites = Counter(f"{s.site} {s.op}" + (f" via {s.via}" if s.via else "") for s in counter.sync_sites)
    return dict(ops_per_step=ops, launches_per_step=launches, host_syncs_per_step=syncs, ops=dict(counter.ops),
                launches=dict(counter.launches), host_syncs=dict(counter.syncs), host_sync_sites=dict(sites))


def _cuda_kernels(setup: Setup, fused: bool, step: int) -> int:
    """GPU kernels one untimed iteration runs, from the profiler's device activity (compiled programs too)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _untimed(setup, fused, step)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _run_provider(setup: Setup, provider: str, iters: int, warmup: int) -> dict:
    from vdistill.kernels.dispatch import reference_kernels

    fused = provider != "reference"
    setup.recompute(provider == "triton-recompute")
    setup.compile(provider == "triton-compiled")
    timer = PhaseTimer(setup.device)
    cuda = setup.device.type == "cuda"
    per_iter: list[tuple[dict[str, float], dict[str, float]]] = []
    try:
        with reference_kernels(enabled=not fused):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            for i in range(warmup + iters):
                setup.iteration(timer, fused, i)
                times = timer.collect()
                if i >= warmup:
                    per_iter.append(times)
            counts = {}
            if provider != "triton-compiled":  # under a dispatch mode compiled programs fall back to eager
                counts.update(_dispatch_counts(setup, fused, warmup + iters))
            if cuda:
                counts["cuda_kernels_per_step"] = _cuda_kernels(setup, fused, warmup + iters + 1)
    except torch.cuda.OutOfMemoryError as exc:
        done = [n for n, _, _ in timer.marks]
        phase = PHASES[len(done)] if len(done) < len(PHASES) else "?"
        return {"error": f"OOM in phase {phase}: {str(exc).splitlines()[0][:160]}"}
    except Exception as exc:  # noqa: BLE001 - recorded per provider, never fatal
        return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    finally:
        timer.marks = []
        setup.opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
    row: dict = {"phases_ms": {}, "host_ms": {}}
    for name in PHASES:
        med, p20, p80 = _summary([device[name] for device, _ in per_iter])
        row["phases_ms"][name] = {"median": med, "p20": p20, "p80": p80}
        row["host_ms"][name] = _summary([host[name] for _, host in per_iter])[0]
    step_med, step_p20, step_p80 = _summary([sum(device.values()) for device, _ in per_iter])
    row.update(step_ms=step_med, step_p20_ms=step_p20, step_p80_ms=step_p80,
               host_step_ms=_summary([sum(host.values()) for _, host in per_iter])[0],
               tokens_per_s=setup.tokens / (step_med / 1e3), iters=len(per_iter), **counts)
    if cuda:
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def _check(setup: Setup) -> dict:
    """Relative L2 error of the triton provider's dF/dt vs the reference provider's."""
    from vdistill.kernels.dispatch import reference_kernels

    ours = setup.jvp_pass()
    if not torch.isfinite(ours).all():
        return {"check": "non-finite dF/dt from the triton path"}
    try:
        with reference_kernels():
            ref = setup.jvp_pass()
    except torch.cuda.OutOfMemoryError:
        return {"check": "reference OOM: triton dF/dt finite, not compared"}
    err = float((ours - ref).norm() / ref.norm().clamp_min(1e-12))
    return {"check_rel_err": err, "check": "ok" if err < 5e-2 else "MISMATCH"}


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the Wan 32k shape only")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="these shapes only")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per provider")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per provider (compilation)")
    p.add_argument("--autotune", action="store_true", help="autotune the attention kernels (slower start)")
    providers = ["triton", "triton-recompute", "triton-compiled", "reference"]
    p.add_argument("--providers", nargs="+", default=providers, choices=providers)
    p.add_argument("--device", default="cuda", help="cuda or cpu (cpu: smoke test with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny shape (CPU smoke test)")
    p.add_argument("--model", type=Path, help="time this Wan-latent model (file or Wan2.1 directory) instead, at "
                   "480p x 81 frames (16x21x60x104 latents, 512 text tokens) or, with --tiny, 16x3x8x8")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak for MFU (default: known GPUs)")
    p.add_argument("--out", type=Path, help="directory for the JSON result")
    args = p.parse_args(argv)
    if args.peak_tflops is not None and not 0 < args.peak_tflops < math.inf:
        p.error(f"--peak-tflops must be a finite number > 0, got {args.peak_tflops}")
    if not args.autotune:
        os.environ.setdefault("VDISTILL_ATTN_AUTOTUNE", "0")  # read when kernels is first imported

    device = torch.device(args.device)
    shapes = TINY if args.tiny else {n: SHAPES[n] for n in (args.shapes or (QUICK if args.quick else SHAPES))}
    if args.model is not None:  # a Wan-latent model at 480p x 81 frames, or with --tiny on a tiny grid
        clip, batch, text_len = ((16, 3, 8, 8), 1, 5) if args.tiny else SHAPES["wan1.3b-2L-32k"][2:]
        shapes = {args.model.name: (args.model, {}, clip, batch, text_len)}
    peak = args.peak_tflops if args.peak_tflops is not None else PEAK_BF16_TFLOPS.get(device_label(device))
    result = {**_meta(device, argv), "peak_tflops": peak, "rows": []}
    for name, spec in shapes.items():
        try:
            setup = Setup(spec, device)
        except Exception as exc:  # noqa: BLE001
            result["rows"].append({"shape": name, "error": f"setup: {type(exc).__name__}: {str(exc)[:200]}"})
            continue
        check = _check(setup)
        flops = _step_flops(setup)
        for provider in args.providers:
            row = {"shape": name, "provider": provider, "tokens": setup.tokens, "params": setup.n_params,
                   "tflop_per_step": None if flops is None else flops / 1e12}
            row.update(_run_provider(setup, provider, args.iters, args.warmup))
            if provider == "triton":
                row.update(check)
            if peak and flops and "step_ms" in row:
                row["mfu"] = flops / (row["step_ms"] / 1e3) / (peak * 1e12)
            result["rows"].append(row)
        del setup
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _print_table(result["rows"])
    if args.out:
        write_json(args.out, result_name("rcm-step", device_label(device)), result)
    return result


def _print_table(rows: list[dict]) -> None:
    head = f"{'shape':<16}{'provider':<18}{'step ms':>10}{'host ms':>9}{'launch':>7}{'syncs':>6}{'tok/s':>11}" \
        f"{'peak GiB':>9}  " + " ".join(f"{ph[:8]:>8}" for ph in PHASES)
    print(head)
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<16}{r.get('provider', ''):<18}  {r['error']}")
            continue
        phases = " ".join(f"{r['phases_ms'][ph]['median']:>8.2f}" for ph in PHASES)
        launches = r.get("cuda_kernels_per_step", r.get("launches_per_step", "-"))
        print(f"{r['shape']:<16}{r['provider']:<18}{r['step_ms']:>10.2f}{r['host_step_ms']:>9.2f}"
              f"{launches:>7}{r.get('host_syncs_per_step', '-'):>6}{r['tokens_per_s']:>11.0f}"
              f"{r.get('peak_mem_gib', float('nan')):>9.2f}  {phases}  {r.get('check', '')}"
              + (f"  MFU {r['mfu']:.1%}" if "mfu" in r else ""))


if __name__ == "__main__":
    main()
