"""A Wan2.1 checkpoint (original Wan-AI layout) loaded into a VideoDiT runs through the Triton kernels, interpreted:
its forward and one-pass forward+JVP equal diffusers' own forward and forward-mode JVP (math SDPA backend) in
float32, on a grid with an odd frame count and a short prompt."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/wan_helpers.py
pytest.importorskip("diffusers", reason="the hf extra is not installed")
from diffusers.models import attention_dispatch  # noqa: E402
from wan_helpers import CHANNELS, TEXT_DIM, diffusers_forward, float64_time_sinusoid, save_original, tiny_wan  # noqa: E402

from vdistill.kernels import dispatch  # noqa: E402
from vdistill.models.loading import load_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def test_loaded_wan_through_the_kernels_equals_diffusers(tmp_path):
    assert dispatch.INTERPRET and dispatch.HAS_TRITON
    wan = float64_time_sinusoid(tiny_wan())
    model = load_model(save_original(wan, tmp_path / "wan", text_len=16))  # 16 padded tokens, not 512: faster here
    g = torch.Generator().manual_seed(1)
    x, s, text = torch.randn(2, CHANNELS, 3, 6, 8, generator=g), torch.rand(2, generator=g), torch.randn(2, 5, TEXT_DIM)
    dx, ds = torch.randn(x.shape, generator=g), torch.tensor([1.0, -0.5])
    out, jvp = torch.func.jvp(lambda a, b: model(a, b, text), (x, s), (dx, ds))
    with attention_dispatch.attention_backend("_native_math"):
        want, want_jvp = torch.func.jvp(lambda a, b: diffusers_forward(wan, a, b, text, text_len=16), (x, s), (dx, ds))
    for got, ref in ((out, want), (jvp, want_jvp)):
        err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
        assert err <= 1e-5 + 1e-5 * scale, (err, scale)
