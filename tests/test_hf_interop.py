"""diffusers' Wan2.1 transformer and vdistill in one process (the `hf` extra).

vdistill's attention stands in for the attention of diffusers' `WanTransformer3DModel` (self- and
cross-attention): the outputs agree with diffusers' own, and forward-mode AD (the JVP that sCM/rCM need)
runs through the diffusers model. The CLI still works once diffusers and transformers are imported, from
the repository root too (bare top-level names in vdistill once made diffusers' Wan import fail there). Tiny
random models only: no downloads.

diffusers >= 0.35: Wan's attention processor calls `transformer_wan.dispatch_attention_fn` with
[B, N, H, D] tensors; we swap that one function, so everything else (projections, q/k RMS norm, RoPE) stays
diffusers' code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="the hf extra is not installed (pip install -e '.[hf]')")
from diffusers.models import attention_dispatch  # noqa: E402
from diffusers.models.transformers import transformer_wan  # noqa: E402
from wan_helpers import CHANNELS, TEXT_DIM, tiny_wan  # noqa: E402

from vdistill.kernels.attention import attention, attention_ref  # noqa: E402

# torch's forward-AD decompositions still call torch.jit.script on first use: not ours, not actionable here
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
ROOT = Path(__file__).resolve().parents[1]
LATENT = (1, CHANNELS, 3, 8, 8)  # [B, C, T, H, W] -> 3·4·4 = 48 tokens with patch (1, 2, 2)
TEXT_TOKENS = 7  # cross-attention with Nq = 48 != Nk = 7
ATOL = RTOL = 1e-5


def wan_inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(LATENT, generator=g)
    t = torch.tensor([637.0])  # diffusers' Wan timestep scale: 1000·s
    text = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g)
    return x, t, text


def forward(model, x, t, text) -> torch.Tensor:
    return model(x, t, text, return_dict=False)[0]


class VdistillDispatch:
    """Stands in for diffusers' dispatch_attention_fn ([B, N, H, D] in and out) with a vdistill op ([B, H, N, D],
    read as transposed views without a copy) and records the (Nq, Nk) of each call."""

    def __init__(self, op):
        self.op, self.calls = op, []

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        assert attn_mask is None and dropout_p == 0.0 and not is_causal, "Wan T2V attends without mask or dropout"
        self.calls.append((query.shape[1], key.shape[1]))
        out = self.op(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)


def parity_errors(op=attention) -> dict[str, float]:
    """Max |diffusers' Wan with `op` - diffusers' Wan as shipped| for the output, and for the JVP w.r.t. (x, t)
    against diffusers' math-SDPA backend (its default CPU SDPA kernel has no forward-AD formula)."""
    model, (x, t, text) = tiny_wan(), wan_inputs()
    tx, tt = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)), torch.ones_like(t)

    def f(xx, tt_):
        return forward(model, xx, tt_, text)

    with torch.no_grad():
        ref = forward(model, x, t, text)
    with attention_dispatch.attention_backend("_native_math"):
        _, jvp_ref = torch.func.jvp(f, (x, t), (tx, tt))
    dispatch = VdistillDispatch(op)
    original = transformer_wan.dispatch_attention_fn
    transformer_wan.dispatch_attention_fn = dispatch
    try:
        with torch.no_grad():
            out = forward(model, x, t, text)
        calls, dispatch.calls = dispatch.calls, []
        out_jvp, jvp = torch.func.jvp(f, (x, t), (tx, tt))
    finally:
        transformer_wan.dispatch_attention_fn = original
    n = LATENT[2] * (LATENT[3] // 2) * (LATENT[4] // 2)
    return {
        "out": (out - ref).abs().max().item(),
        "out_scale": ref.abs().max().item(),
        "jvp_primal": (out_jvp - ref).abs().max().item(),
        "jvp": (jvp - jvp_ref).abs().max().item(),
        "jvp_scale": jvp_ref.abs().max().item(),
        "calls": [list(c) for c in calls],
        "jvp_calls": [list(c) for c in dispatch.calls],
        "expected_calls": [[n, n], [n, TEXT_TOKENS]] * 2,  # per block: self-attention, then cross-attention
    }


def test_tiny_wan_is_not_degenerate():
    """The re-drawn model's output depends on the latent, the time and the text (so parity below means something)."""
    model, (x, t, text) = tiny_wan(), wan_inputs()
    with torch.no_grad():
        ref = forward(model, x, t, text)
        assert ref.shape == x.shape
        assert ref.std() > 0.1
        # (not text.flip(1): cross-attention without a mask is invariant to the order of the text tokens)
        for other in (forward(model, x + 0.1, t, text), forward(model, x, t + 100, text),
                      forward(model, x, t, wan_inputs(seed=3)[2])):
            assert (other - ref).abs().max() > 1e-2


@pytest.mark.parametrize("op", [attention, attention_ref], ids=["attention", "attention_ref"])
def test_wan_with_vdistill_attention_matches_diffusers(op):
    err = parity_errors(op)
    assert err["calls"] == err["jvp_calls"] == err["expected_calls"], "vdistill's op missed some Wan attention calls"
    assert err["out"] <= ATOL + RTOL * err["out_scale"], err
    assert err["jvp_primal"] <= ATOL + RTOL * err["out_scale"], err
    assert err["jvp"] <= ATOL + RTOL * err["jvp_scale"], err


@pytest.mark.slow
def test_wan_with_triton_attention_in_interpreter():
    """The same parity with vdistill's Triton kernels (forward and one-pass forward+JVP) run by Triton's CPU
    interpreter on the shapes diffusers hands over: [B, N, H, D] views, head dim 24 (padded), Nk = 7."""
    pytest.importorskip("triton")
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import test_hf_interop as t\n"
        "from vdistill.kernels import dispatch\n"
        "assert dispatch.INTERPRET and dispatch.HAS_TRITON\n"
        "print(json.dumps(t.parity_errors()))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    err = json.loads(proc.stdout.strip().splitlines()[-1])
    assert err["calls"] == err["jvp_calls"] == err["expected_calls"]
    # fp32 kernel vs torch's SDPA: sums of <= 48 terms per row, then 2 layers of projections
    assert err["out"] <= ATOL + RTOL * err["out_scale"], err
    assert err["jvp_primal"] <= ATOL + RTOL * err["out_scale"], err
    assert err["jvp"] <= ATOL + RTOL * err["jvp_scale"], err


@pytest.mark.slow
def test_cli_after_importing_diffusers_and_transformers_from_repo_root():
    """`vdistill --help` in an interpreter that imported diffusers' Wan and transformers' UMT5 first, started
    from the repository root (`python -c` puts it first on sys.path, where kernels/ and models/ live)."""
    pytest.importorskip("transformers")
    code = (
        "import sys\n"
        "from diffusers import AutoencoderKLWan, WanTransformer3DModel\n"
        "from transformers import UMT5EncoderModel\n"
        "from vdistill.methods.cli.main import main\n"
        "sys.exit(main(['--help']))\n"
    )
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONSAFEPATH", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("usage: vdistill"), proc.stdout[:500]
    for command in ("pretrain", "distill", "sample", "evaluate", "demo", "bench"):
        assert command in proc.stdout, f"`{command}` missing from vdistill --help:\n{proc.stdout}"
