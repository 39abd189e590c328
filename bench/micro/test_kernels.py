"""Micro benchmarks (pytest-benchmark): each kernel against its baselines, plus the DiT's forward-mode JVP.

    pytest bench/micro --benchmark-autosave                 # time and save .benchmarks/<machine>/NNNN_*.json
    pytest bench/micro --benchmark-compare --benchmark-group-by=group   # compare with the last saved run
    pytest bench/micro --benchmark-disable                  # run each case once (a check, no timing)

Providers: "vdistill" is the public op as a model calls it (Triton on CUDA), "reference" the same op
under `reference_kernels()` (its PyTorch reference), and "sdpa" / "eager" what a user would
write without vdistill. Every provider is checked against a float32 reference before it is timed.
The scripted benchmarks (`vdistill bench ...`) time the same kernels at more shapes with TFLOP/s,
bandwidth and memory columns; this suite is for regressions between commits.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from vdistill.bench.bench_trigflow import noise_eager, tangent_eager
from vdistill.bench.micro.checks import check_close
from vdistill.kernels.attention import attention, attention_jvp, attention_ref
from vdistill.kernels.dispatch import reference_kernels
from vdistill.kernels.ema import EMA, ema_update_ref
from vdistill.kernels.ema_schedule import EMAProfile
from vdistill.kernels.scm_tangent import scm_tangent, scm_tangent_ref
from vdistill.kernels.trigflow import trigflow_noise
from vdistill.models.dit import build_dit
from vdistill.models.jvp import jvp

GPU = torch.cuda.is_available()
DTYPE = torch.bfloat16 if GPU else torch.float32
# (B, H, Nq, Nk, D): Wan-width self-attention, a 64-wide head, cross-attention to 512 text tokens
ATTENTION_SHAPES = (
    [(1, 12, 4096, 4096, 128), (2, 16, 2048, 2048, 64), (1, 12, 4096, 512, 128)]
    if GPU
    else [(1, 2, 96, 96, 64), (1, 2, 96, 40, 64)]
)
CLIP = (8, 16, 21, 60, 104) if GPU else (2, 3, 5, 7, 11)  # [B, C, T, H, W]: Wan 480p latents on the GPU


def _shape_id(shape) -> str:
    return "x".join(map(str, shape))


def _qkv(shape, device, seed: int = 0) -> list[torch.Tensor]:
    b, h, nq, nk, d = shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dims = ((b, h, nq, d), (b, h, nk, d), (b, h, nk, d))
    return [torch.randn(s, generator=gen).to(device, DTYPE) for s in dims]


def _attention_provider(name: str):
    if name == "sdpa":
        return F.scaled_dot_product_attention
    if name == "reference":

        def reference(q, k, v):
            with reference_kernels():
                return attention(q, k, v)

        return reference
    return attention


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("provider", ["vdistill", "reference", "sdpa"])
def test_attention_forward(timed, device, shape, provider):
    q, k, v = _qkv(shape, device)
    fn = _attention_provider(provider)
    with torch.no_grad():
        check_close("O", fn(q, k, v), attention_ref(q.float(), k.float(), v.float()), DTYPE)
        timed(f"attention forward {_shape_id(shape)}", lambda: fn(q, k, v))


def _jvp_provider(name: str):
    if name == "forward_ad":

        def dual(q, k, v, tq, tk, tv):
            with fwAD.dual_level():
                out = attention(*(fwAD.make_dual(p, t) for p, t in ((q, tq), (k, tk), (v, tv))))
                primal, tangent = fwAD.unpack_dual(out)
                return primal, tangent

        return dual
    if name == "func.jvp(reference)":

        def reference(*args):
            with reference_kernels():
                return attention_jvp(*args)

        return reference
    return attention_jvp


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("provider", ["vdistill", "forward_ad", "func.jvp(reference)"])
def test_attention_forward_jvp(timed, device, shape, provider):
    primals = _qkv(shape, device)
    tangents = _qkv(shape, device, seed=1)
    fn = _jvp_provider(provider)
    with torch.no_grad():
        want_o, want_t = torch.func.jvp(attention_ref, tuple(p.float() for p in primals),
                                        tuple(t.float() for t in tangents))
        o, t_o = fn(*primals, *tangents)
        check_close("O", o, want_o, DTYPE)
        check_close("tangent of O", t_o, want_t, DTYPE)
        timed(f"attention forward+JVP {_shape_id(shape)}", lambda: fn(*primals, *tangents))


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("provider", ["vdistill", "reference", "sdpa"])
def test_attention_forward_backward(timed, device, shape, provider):
    q, k, v = (t.requires_grad_() for t in _qkv(shape, device))
    do = _qkv(shape, device, seed=2)[0]
    fn = _attention_provider(provider)

    def step() -> None:
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(do)

    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    attention_ref(q32, k32, v32).backward(do.float())
    step()
    for name, got, want in (("dQ", q.grad, q32.grad), ("dK", k.grad, k32.grad), ("dV", v.grad, v32.grad)):
        check_close(name, got, want, DTYPE)
    timed(f"attention forward+backward {_shape_id(shape)}", step)


def _ema_params(device) -> list[torch.Tensor]:
    """A Wan-1.3B block's parameter shapes times 4 on the GPU (~170 M elements), a few small ones on CPU."""
    dim, ffn = (1536, 8960) if GPU else (48, 96)
    block = [(dim, dim)] * 8 + [(ffn, dim), (dim, ffn), (6 * dim,), (dim,), (ffn,)]
    gen = torch.Generator(device="cpu").manual_seed(0)
    return [torch.randn(s, generator=gen).to(device, DTYPE) for s in block * (4 if GPU else 1)]


@pytest.mark.parametrize("provider", ["vdistill", "reference"])
def test_power_ema(timed, device, provider):
    params = _ema_params(device)
    profiles = [EMAProfile(sigma_rel=0.05), EMAProfile(sigma_rel=0.10)]
    ema = EMA(params, profiles)
    want = [[p.float().clone() for p in params] for _ in profiles]

    def update() -> None:
        if provider == "reference":
            with reference_kernels():
                ema.update()
        else:
            ema.update()

    for _ in range(2):
        betas = ema.betas()
        update()
        for w, beta in zip(want, betas):
            ema_update_ref(w, params, beta)
    for k in range(len(profiles)):
        check_close(f"EMA profile {k}", torch.cat([t.flatten() for t in ema.tensors(k)]),
                    torch.cat([t.flatten() for t in want[k]]), torch.float32)
    timed("power EMA, 2 profiles", update)


def _clip(device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(CLIP, generator=gen).to(device, DTYPE)
    t = (torch.rand(CLIP[0], generator=gen) * 1.5).to(device)
    return x0, t


@pytest.mark.parametrize("provider", ["vdistill", "eager"])
def test_trigflow_noise(timed, device, provider):
    x0, t = _clip(device)
    fn = noise_eager if provider == "eager" else (lambda a, b: trigflow_noise(a, b, seed=0))
    xt, v = fn(x0, t)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    cos, sin = torch.cos(t).view(shape), torch.sin(t).view(shape)
    check_close("x0 recovered from (x_t, v)", cos * xt.float() - sin * v.float(), x0.float(), DTYPE)
    timed(f"TrigFlow noising {_shape_id(CLIP)}", lambda: fn(x0, t))


@pytest.mark.parametrize("provider", ["vdistill", "eager"])
def test_scm_tangent(timed, device, provider):
    gen = torch.Generator(device="cpu").manual_seed(0)
    inputs = [torch.randn(CLIP, generator=gen).to(device, DTYPE) for _ in range(4)]
    t = (torch.rand(CLIP[0], generator=gen) * 1.5).to(device)
    fn = tangent_eager if provider == "eager" else scm_tangent
    g, _ = fn(*inputs, t, 0.5, 0.1)
    check_close("normalised tangent", g, scm_tangent_ref(*(x.float() for x in inputs), t, 0.5, 0.1)[0], DTYPE)
    timed(f"sCM tangent {_shape_id(CLIP)}", lambda: fn(*inputs, t, 0.5, 0.1))


@pytest.mark.parametrize("provider", ["vdistill", "reference"])
def test_dit_jvp(timed, device, provider):
    """dF/dt of the whole DiT as sCM needs it (`small` preset, batch 8, bf16 autocast on the GPU; `tiny` on CPU)."""
    model = build_dit("small" if GPU else "tiny", device).eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)  # zero-initialised: F and dF/dt would be 0
    cfg = model.cfg
    gen = torch.Generator(device="cpu").manual_seed(0)
    x_shape = (8, 3, 8, 32, 32) if GPU else (2, 3, 2, 8, 8)
    x, dx = (torch.randn(x_shape, generator=gen).to(device) for _ in range(2))
    time, dtime = torch.rand(x_shape[0], generator=gen).to(device), torch.ones(x_shape[0], device=device)
    text = torch.randn(x_shape[0], 8, cfg.text_dim, generator=gen).to(device)
    with reference_kernels():
        want = jvp(model, (x, time, text), (dx, dtime))

    def run():
        with torch.autocast(device.type, torch.bfloat16, enabled=GPU):
            if provider == "reference":
                with reference_kernels():
                    return jvp(model, (x, time, text), (dx, dtime))
            return jvp(model, (x, time, text), (dx, dtime))

    out, tangent = run()
    check_close("F", out, want[0], DTYPE)
    check_close("dF/dt", tangent, want[1], DTYPE)
    timed(f"DiT forward-mode JVP ({'small' if GPU else 'tiny'})", run)
