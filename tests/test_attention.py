"""Attention without the interpreter: the reference path, validation, the closed-form ops behind the
autograd/forward-AD wiring (gradcheck in float64), and torch.compile on CPU.

The Triton kernels themselves are tested in tests/interp/test_attention_interp.py (interpreter)
and tests/test_attention_gpu.py (CUDA).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from vdistill.kernels.attention import attention, attention_jvp, attention_ref, bwd_select, tuning
from vdistill.kernels.attention.op import _check_kernel_inputs
from vdistill.kernels.attention.ops import (
    AttentionForwardADFunction,
    AttentionFunction,
    attention_bwd_op,
    attention_fwd_jvp_op,
    attention_fwd_op,
)
from vdistill.kernels.dispatch import INTERPRET

pytestmark = pytest.mark.skipif(INTERPRET, reason="reference-path tests: run without TRITON_INTERPRET")

SHAPES = [  # (B, H, Nq, Nk, D)
    (1, 1, 1, 1, 16),
    (2, 3, 17, 17, 32),
    (1, 2, 33, 97, 64),  # cross-attention
    (1, 1, 97, 5, 24),
]


def _inputs(B, H, Nq, Nk, D, dtype=torch.float64, seed=0):
    """q, k, v as transposed views of [B, N, H, D] tensors (non-contiguous, as the DiT passes them)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Nq, H, D, generator=g, dtype=dtype).transpose(1, 2)
    k = torch.randn(B, Nk, H, D, generator=g, dtype=dtype).transpose(1, 2)
    v = torch.randn(B, Nk, H, D, generator=g, dtype=dtype).transpose(1, 2)
    return q, k, v


def _naive(q, k, v, c):
    """Attention written out element by element in float64: an independent reference."""
    s = torch.einsum("bhnd,bhmd->bhnm", q.double(), k.double()) * c
    p = torch.exp(s - s.amax(-1, keepdim=True))
    return torch.einsum("bhnm,bhmd->bhnd", p / p.sum(-1, keepdim=True), v.double()), torch.logsumexp(s, -1)


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_naive(shape):
    q, k, v = _inputs(*shape)
    c = 0.3
    out = attention(q, k, v, scale=c)  # CPU without the interpreter: the reference
    want, _ = _naive(q, k, v, c)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    default = attention(q, k, v)
    torch.testing.assert_close(default, _naive(q, k, v, 1 / math.sqrt(shape[-1]))[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_half_inputs_computed_in_fp32(dtype):
    q, k, v = _inputs(1, 2, 17, 33, 32, dtype=dtype)
    out = attention_ref(q, k, v)
    assert out.dtype == dtype
    want, _ = _naive(q, k, v, 32**-0.5)
    eps = torch.finfo(dtype).eps
    assert (out.double() - want).abs().max() <= 2 * eps * want.abs().max()


@pytest.mark.parametrize("shape", SHAPES)
def test_math_ops_forward_and_backward(shape):
    q, k, v = _inputs(*shape)
    c = 0.2
    o, lse = attention_fwd_op(q, k, v, c)
    want, want_lse = _naive(q, k, v, c)
    torch.testing.assert_close(o, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-6)  # LSE is stored in fp32
    assert o.stride() == q.stride()  # O takes q's layout (what the fake impl promises)

    qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))
    do = torch.randn_like(want)
    attention_ref(qr, kr, vr, scale=c).backward(do)
    # LSE in fp32 limits the recomputed probabilities to ~1e-7 relative
    dq, dk, dv = attention_bwd_op(do, q, k, v, o, lse, c)
    for got, ref in ((dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_math_jvp_op_matches_func_jvp(shape):
    q, k, v = _inputs(*shape)
    tq, tk, tv = _inputs(*shape, seed=1)
    c = 0.25
    want_o, want_t = torch.func.jvp(lambda a, b, d: attention_ref(a, b, d, scale=c), (q, k, v), (tq, tk, tv))
    o, t_o, lse = attention_fwd_jvp_op(q, k, v, tq, tk, tv, c)
    torch.testing.assert_close(o, want_o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t_o, want_t, rtol=1e-10, atol=1e-10)
    assert lse.dtype == torch.float32


def test_function_gradcheck_reverse_and_forward_mode():
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 3, 5, 16))
    fn = lambda a, b, d: AttentionForwardADFunction.apply(a, b, d, 0.3)[0]
    assert torch.autograd.gradcheck(fn, (q, k, v), check_forward_ad=True, check_backward_ad=True, fast_mode=True)


def test_function_forward_ad_apis_agree_with_reference():
    q, k, v = _inputs(2, 2, 9, 11, 16)
    tq, tk, tv = _inputs(2, 2, 9, 11, 16, seed=3)
    fn = lambda a, b, d: AttentionForwardADFunction.apply(a, b, d, 0.25)[0]
    want = torch.func.jvp(lambda a, b, d: attention_ref(a, b, d, scale=0.25), (q, k, v), (tq, tk, tv))[1]
    got_func = torch.func.jvp(fn, (q, k, v), (tq, tk, tv))[1]
    with fwAD.dual_level():
        got_fwad = fwAD.unpack_dual(fn(fwAD.make_dual(q, tq), k, fwAD.make_dual(v, tv))).tangent
    want_partial = torch.func.jvp(lambda a, d: attention_ref(a, k, d, scale=0.25), (q, v), (tq, tv))[1]
    torch.testing.assert_close(got_func, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_fwad, want_partial, rtol=1e-10, atol=1e-10)


def test_higher_order_is_refused_not_silently_zero():
    q, k, v = _inputs(1, 1, 4, 6, 16)
    t = torch.randn_like(q)
    inner = lambda a: torch.func.jvp(lambda x: AttentionForwardADFunction.apply(x, k, v, 0.25)[0], (a,), (t,))[1]
    with pytest.raises(NotImplementedError, match="higher-order"):
        torch.func.jvp(inner, (q,), (t,))
    qr = q.detach().requires_grad_()
    (g,) = torch.autograd.grad(AttentionFunction.apply(qr, k, v, 0.25)[0].sum(), qr, create_graph=False)
    assert torch.isfinite(g).all()
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(AttentionFunction.apply(qr, k, v, 0.25)[0].sum(), qr, create_graph=True)


def test_reference_jvp_against_finite_differences():
    q, k, v = _inputs(1, 2, 17, 33, 16)
    tq, tk, tv = _inputs(1, 2, 17, 33, 16, seed=5)
    o, t_o = attention_jvp(q, k, v, tq, tk, tv)
    h = 1e-6
    plus = attention(q + h * tq, k + h * tk, v + h * tv)
    minus = attention(q - h * tq, k - h * tk, v - h * tv)
    torch.testing.assert_close(t_o, (plus - minus) / (2 * h), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(o, attention(q, k, v), rtol=0, atol=0)


@pytest.mark.slow
def test_ops_pass_opcheck():
    q, k, v = _inputs(1, 2, 5, 7, 16, dtype=torch.float32)
    torch.library.opcheck(attention_fwd_op, (q, k, v, 0.25))
    o, lse = attention_fwd_op(q, k, v, 0.25)
    torch.library.opcheck(attention_bwd_op, (torch.randn_like(o), q, k, v, o, lse, 0.25))
    torch.library.opcheck(attention_fwd_jvp_op, (q, k, v, *_inputs(1, 2, 5, 7, 16, dtype=torch.float32, seed=2), 0.25))


@pytest.mark.slow
def test_torch_compile_forward_and_backward():
    """The op wiring (custom ops + AttentionFunction) and the public reference path under torch.compile."""
    torch._dynamo.reset()
    q, k, v = (t.float().requires_grad_() for t in _inputs(1, 2, 17, 33, 16))
    op_path = torch.compile(lambda a, b, d: AttentionFunction.apply(a, b, d, 0.25)[0], fullgraph=True)
    public = torch.compile(lambda a, b, d: attention(a, b, d, scale=0.25), fullgraph=True)
    want = attention_ref(q, k, v, scale=0.25)
    grads_want = torch.autograd.grad(want.sum(), (q, k, v))
    for fn in (op_path, public):
        out = fn(q, k, v)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
        for got, ref in zip(torch.autograd.grad(out.sum(), (q, k, v)), grads_want):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_validation_errors_name_the_argument():
    q, k, v = _inputs(1, 2, 5, 7, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="q must be"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="k and v"):
        attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match="disagree"):
        attention(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="disagree"):
        attention(q, k[..., :8], v[..., :8])
    with pytest.raises(TypeError, match="dtypes"):
        attention(q, k.double(), v)
    with pytest.raises(ValueError, match="devices"):
        attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="at least one token"):
        attention(q, k[:, :, :0], v[:, :, :0])
    with pytest.raises(ValueError, match="scale"):
        attention(q, k, v, scale=float("nan"))
    with pytest.raises(TypeError, match="v must be"):
        attention(q, k, v.numpy())
    with pytest.raises(ValueError, match="tk has shape"):
        attention_jvp(q, k, v, q, k[:, :, :2], v)
    with pytest.raises(TypeError, match="tv has dtype"):
        attention_jvp(q, k, v, q, k, v.half())


def test_kernel_only_limits_are_refused():
    with pytest.raises(ValueError, match=r"head dim D = q.shape\[3\] = 160"):
        _check_kernel_inputs(torch.empty(1, 1, 4, 160))
    _check_kernel_inputs(torch.empty(1, 1, 4, 48))  # zero-padded to 64
    with pytest.raises(TypeError, match="float64"):
        _check_kernel_inputs(torch.empty(1, 1, 4, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="Nq = 0"):
        _check_kernel_inputs(torch.empty(1, 1, 0, 64))
    _check_kernel_inputs(torch.empty(1, 1, 4, 128, dtype=torch.bfloat16))


class _FakeQ:
    is_cuda = True
    device = torch.device("cuda", 0)

    @staticmethod
    def element_size() -> int:
        return 2


def test_fit_smem_lowers_stages_drops_misfits_and_honours_no_autotune(monkeypatch):
    monkeypatch.setattr(tuning, "_smem_limit", lambda index: 100_000)
    monkeypatch.setattr(tuning, "_pinned", set())
    cfgs = tuning.configs([(128, 64, 8, 4, True), (64, 32, 4, 3, False), (256, 256, 8, 2, True)])
    prune = tuning.fit_smem("k", lambda m, n, d: (m * d, 2 * n * d))
    # bytes = 2·(m·d + stages·2·n·d) at d = 128: 128×64 fits with 2 stages, 64×32 with 3, 256×256 never
    got = prune(cfgs, {"Q": _FakeQ()}, HEAD_DIM=128)
    summary = [(c.kwargs["BLOCK_M"], c.num_stages, c.kwargs["LAZY_RESCALE"]) for c in got]
    assert summary == [(128, 2, True), (64, 3, False)]
    monkeypatch.setattr(tuning, "AUTOTUNE", False)
    assert len(prune(cfgs, {"Q": _FakeQ()}, HEAD_DIM=128)) == 1


def test_launch_pins_first_config_after_a_compile_failure(monkeypatch, caplog):
    monkeypatch.setattr(tuning, "_pinned", set())

    class FakeKernel:
        """Fails while it may autotune over all configs, works once pinned to the first."""

        def __init__(self, name):
            self.fn, self.configs, self.cache, self.calls = SimpleNamespace(__name__=name), [0, 1], {1: 0}, 0

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                self.calls += 1
                if self.fn.__name__ not in tuning._pinned or self.fn.__name__ == "always_fails":
                    raise RuntimeError("PassManager::run failed")

            return run

    kernel = FakeKernel("flaky")
    with caplog.at_level("WARNING"):
        tuning.launch(kernel, (1,), 0, x=1)
    assert kernel.calls == 2 and kernel.cache == {} and "flaky" in tuning._pinned
    assert "autotuning failed" in caplog.text
    with pytest.raises(RuntimeError, match="PassManager"):
        tuning.launch(FakeKernel("always_fails"), (1,))


def test_backward_backend_selection(monkeypatch):
    """auto: flash backward validated once against Triton, then used; errors, disagreement, fp32 -> Triton."""
    assert bwd_select.BACKEND == "triton"  # the default (measured faster on the H200, see the module)
    monkeypatch.setattr(bwd_select, "BACKEND", "auto")
    calls = []
    grads = tuple(torch.ones(2) for _ in range(3))
    monkeypatch.setattr(bwd_select, "attention_bwd_triton", lambda *a: calls.append("triton") or grads)
    monkeypatch.setattr(bwd_select, "_flash_bwd", lambda *a: calls.append("flash") or grads)
    monkeypatch.setattr(bwd_select, "_flash_state", {})
    half = [torch.empty(1, 1, 4, 16, dtype=torch.bfloat16)] * 5
    args = (*half, torch.empty(1, 1, 4), 0.25)
    bwd_select.attention_bwd_cuda(*args)
    bwd_select.attention_bwd_cuda(*args)
    assert calls == ["flash", "triton", "flash"]

    calls.clear()
    monkeypatch.setattr(bwd_select, "_flash_state", {})
    monkeypatch.setattr(bwd_select, "_flash_bwd", lambda *a: calls.append("flash") or tuple(2 * g for g in grads))
    assert bwd_select.attention_bwd_cuda(*args) is grads  # disagreement: the Triton result
    bwd_select.attention_bwd_cuda(*args)
    assert calls == ["flash", "triton", "triton"]

    calls.clear()
    monkeypatch.setattr(bwd_select, "_flash_state", {})
    monkeypatch.setattr(bwd_select, "_flash_bwd", lambda *a: (_ for _ in ()).throw(RuntimeError("no flash")))
    bwd_select.attention_bwd_cuda(*args)
    fp32 = (*[torch.empty(1, 1, 4, 16)] * 5, torch.empty(1, 1, 4), 0.25)
    bwd_select.attention_bwd_cuda(*fp32)
    assert calls == ["triton", "triton"]

    monkeypatch.setattr(bwd_select, "BACKEND", "cudnn")
    with pytest.raises(ValueError, match="VDISTILL_ATTN_BWD"):
        bwd_select.attention_bwd_cuda(*args)
