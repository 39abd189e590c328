"""rCM's JVP pass with the Triton attention kernel (interpreted) equals the reference pass.

Run with `TRITON_INTERPRET=1 python -m pytest tests/interp`. A tiny DiT with head dim 16; the
rearranged JVP pass (tangents cos t·sin t·(dx_t/dt, 1)) and the fused sCM tangent, both through
the kernels, against the same pass with `attention_ref` and `scm_tangent_ref`.
"""

from __future__ import annotations

import torch

from vdistill.kernels.attention import attention_ref
from vdistill.kernels.scm_tangent import scm_tangent, scm_tangent_ref
from vdistill.methods.recipes.rcm import RCM, RCMConfig
from vdistill.models import layers
from vdistill.models.dit import build_dit


def test_rcm_jvp_pass_with_kernel_equals_reference(monkeypatch):
    torch.manual_seed(0)
    model = build_dit("tiny", dim=32, heads=2).eval()
    for p in model.parameters():  # the output head is zero-initialised: give it weights
        p.data.normal_(0, 0.2)
    recipe = RCM(model, RCMConfig(dmd_weight=0.0))
    x_t, dxdt = torch.randn(2, 3, 2, 4, 4), torch.randn(2, 3, 2, 4, 4)
    t, text = torch.tensor([0.4, 1.3]), torch.randn(2, 5, 16)
    f, df = recipe.tangent_pass(x_t, t, text, dxdt)
    g_hat, norm = scm_tangent(f, dxdt, x_t, df, t, 0.5, 0.1)

    monkeypatch.setattr(layers, "attention", attention_ref)
    f_ref, df_ref = recipe.tangent_pass(x_t, t, text, dxdt)
    g_ref, norm_ref = scm_tangent_ref(f_ref, dxdt, x_t, df_ref, t, 0.5, 0.1)
    assert df_ref.abs().max() > 1e-2
    torch.testing.assert_close(f, f_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(df, df_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(norm, norm_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_hat, g_ref, rtol=1e-4, atol=1e-5)
