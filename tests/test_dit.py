"""The video DiT: shapes, input errors, meta construction, RoPE, and that it can fit data."""

import pytest
import torch

from vdistill.models.dit import DIT_CONFIGS, build_dit, count_params, dit_config
from vdistill.models.parameterization import rf_interpolate
from vdistill.models.rope import apply_rope, grid_position_code, rope_split, rope_tables


def _inputs(model, b, t, h, w, length=5, dtype=torch.float32):
    cfg = model.cfg
    x = torch.randn(b, cfg.in_channels, t, h, w, dtype=dtype)
    return x, torch.rand(b, dtype=dtype), torch.randn(b, length, cfg.text_dim, dtype=dtype)


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2), (1, 4, 4), (1, 1, 1)])
@pytest.mark.parametrize("thw", [(4, 8, 8), (2, 4, 12), (6, 8, 4)])
def test_output_shape_matches_input(patch, thw):
    torch.manual_seed(0)
    model = build_dit("tiny", patch=patch)
    if any(d % p for d, p in zip(thw, patch)):
        pytest.skip("shape does not tile with this patch")
    for p in model.parameters():  # a non-zero head so the output is not trivially zero
        p.data.normal_(0, 0.1)
    x, time, text = _inputs(model, 3, *thw)
    out = model(x, time, text)
    assert out.shape == x.shape
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_zero_initialised_head():
    model = build_dit("tiny")
    x, time, text = _inputs(model, 2, 2, 4, 4)
    assert torch.count_nonzero(model(x, time, text)) == 0


@pytest.mark.parametrize(
    "shape,match",
    [
        ((2, 3, 3, 8, 8), "divisible by the patch"),
        ((2, 3, 2, 8, 7), "divisible by the patch"),
        ((2, 4, 2, 8, 8), "channels"),
        ((2, 3, 8, 8), r"\[B, C, T, H, W\]"),
    ],
)
def test_bad_x_shape_raises(shape, match):
    model = build_dit("tiny", patch=(2, 2, 2))
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape), torch.rand(2), torch.randn(2, 3, 16))


def test_bad_time_and_text_raise():
    model = build_dit("tiny")
    x, time, text = _inputs(model, 2, 2, 4, 4)
    with pytest.raises(ValueError, match="time must have shape"):
        model(x, torch.rand(3), text)
    with pytest.raises(ValueError, match="text must be"):
        model(x, time, torch.randn(2, 3, 7))


def test_bad_config_raises():
    with pytest.raises(ValueError, match="unknown DiT size"):
        dit_config("huge")
    with pytest.raises(ValueError, match="divisible by heads"):
        dit_config("tiny", heads=5)
    with pytest.raises(ValueError, match="patch"):
        dit_config("tiny", patch=(1, 2))


@pytest.mark.parametrize("name,expected", [("wan-1.3b", 1.42e9), ("wan-14b", 14.3e9)])
def test_big_configs_on_meta(name, expected):
    model = build_dit(name, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert abs(count_params(model) - expected) / expected < 0.01
    assert model.cfg.head_dim == 128 and DIT_CONFIGS[name].text_dim == 4096


def test_rope_is_a_rotation_and_relative():
    cos, sin = rope_tables((3, 4, 5), 24)
    assert rope_split(24) == (8, 8, 8) and cos.shape == sin.shape == (60, 24)
    q = torch.randn(2, 60, 3, 24, dtype=torch.float64)
    assert torch.allclose(apply_rope(q, cos.double(), sin.double()).norm(dim=-1), q.norm(dim=-1))
    for dtype in (torch.float32, torch.bfloat16):  # the pairwise rotation, rounded the same way
        x = q.to(dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        c, s = cos[None, :, None, 0::2].to(dtype), sin[None, :, None, 1::2].to(dtype)
        pairwise = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)
        assert torch.equal(apply_rope(x, cos, sin), pairwise)
    # along one axis the score <R_i q, R_j k> depends only on i - j
    cos, sin = (c.double() for c in rope_tables((6, 1, 1), 24))
    qv, kv = torch.randn(24, dtype=torch.float64), torch.randn(24, dtype=torch.float64)

    def score(i, j):
        qs = torch.zeros(1, 6, 1, 24, dtype=torch.float64)
        ks = torch.zeros(1, 6, 1, 24, dtype=torch.float64)
        qs[0, i, 0], ks[0, j, 0] = qv, kv
        return (apply_rope(qs, cos, sin)[0, i, 0] * apply_rope(ks, cos, sin)[0, j, 0]).sum()

    assert torch.allclose(score(0, 2), score(3, 5)) and not torch.allclose(score(0, 2), score(0, 3))


def test_flow_matching_overfits_a_fixed_batch():
    """200 Adam steps of RF flow matching on one fixed batch lower the loss by at least 10x."""
    torch.manual_seed(0)
    model = build_dit("tiny")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 2, 8, 8, generator=g)
    eps = torch.randn(4, 3, 2, 8, 8, generator=g)
    s = torch.rand(4, generator=g)
    text = torch.randn(4, 3, 16, generator=g)
    x_s, v = rf_interpolate(x0, eps, s)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(200):
        loss = (model(x_s, s, text) - v).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_position_code_tells_every_token_apart():
    code = grid_position_code((3, 4, 5), 8)
    assert code.shape == (60, 24)
    assert torch.cdist(code, code).add(torch.eye(60)).min() > 0.1
    # the frame part depends on the frame index only
    frames = code[:, :8].view(3, 20, 8)
    assert torch.equal(frames, frames[:, :1].expand(3, 20, 8))


@pytest.mark.parametrize("path, module", [("absolute_positions", "position_embed"), ("pooled_text", "text_pool")])
def test_optional_paths_start_as_the_identity(path, module):
    """Zero-initialised: with the other weights copied, the model computes what the plain one does."""
    torch.manual_seed(0)
    plain = build_dit("tiny")
    for p in plain.parameters():
        p.data.normal_(0, 0.1)
    grown = build_dit("tiny", **{path: True})
    missing, unexpected = grown.load_state_dict(plain.state_dict(), strict=False)
    assert missing and all(k.startswith(module) for k in missing)
    assert not unexpected
    x, time, text = _inputs(plain, 2, 2, 4, 4)
    assert torch.equal(grown(x, time, text), plain(x, time, text))
    for p in grown.parameters():  # trained away from zero, the path changes the output
        p.data.normal_(0, 0.1)
    assert not torch.allclose(grown(x, time, text), plain(x, time, text))


def test_activation_checkpointing_keeps_gradients_and_jvp_and_saves_less():
    """checkpoint_blocks: the same gradients (recomputed, bit for bit on CPU), a fraction of the saved
    activations, and an unchanged forward-mode JVP under no_grad."""
    torch.manual_seed(0)
    model = build_dit("tiny")
    for p in model.parameters():  # the zero-initialised head would make every gradient but the head's 0
        p.data.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    x, s = torch.randn(2, 3, 4, 16, 16, generator=g), torch.rand(2, generator=g)
    text = torch.randn(2, 5, 16, generator=g)

    def grads_and_saved_bytes(recompute: bool) -> tuple[list[torch.Tensor], int]:
        model.checkpoint_blocks = recompute
        model.zero_grad(set_to_none=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            loss = model(x, s, text).square().mean()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()], sum(saved)

    (plain, plain_bytes), (recomputed, recomputed_bytes) = grads_and_saved_bytes(False), grads_and_saved_bytes(True)
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert recomputed_bytes < plain_bytes / 5, (recomputed_bytes, plain_bytes)

    tangent = torch.randn(x.shape, generator=g)
    jvps = []
    for recompute in (False, True):
        model.checkpoint_blocks = recompute
        with torch.no_grad():
            jvps.append(torch.func.jvp(lambda x_: model(x_, s, text), (x,), (tangent,))[1])
    torch.testing.assert_close(jvps[1], jvps[0], rtol=0, atol=0)
