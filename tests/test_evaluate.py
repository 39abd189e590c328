"""Evaluator: ground-truth accuracy, corruptions score worse, Fréchet distance maths."""

import math

import pytest
import torch
import torch.nn.functional as F

from vdistill.methods.data.shapes import SHAPES, MovingShapes, ShapesConfig
from vdistill.methods.eval.analyzer import FEATURE_NAMES, analyze
from vdistill.methods.eval.evaluate import (
    diversity,
    evaluate_clips,
    frechet_distance,
    mean_over_seeds,
    reference_features,
)


@pytest.fixture(scope="module")
def real():
    videos, _, labels = MovingShapes(seed=1).batch(range(512))
    return videos, labels


@pytest.fixture(scope="module")
def reference():
    return reference_features(1024)


@pytest.fixture(scope="module")
def clean(real, reference):
    return evaluate_clips(*real, reference=reference)


def _blur(videos, sigma=1.5):
    k = torch.arange(-3, 4.0).div(sigma).square().mul(-0.5).exp()
    k = k / k.sum()
    b, c, t, h, w = videos.shape
    x = videos.permute(0, 2, 1, 3, 4).reshape(b * t * c, 1, h, w)
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), k.view(1, 1, 1, 7))
    x = F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), k.view(1, 1, 7, 1))
    return x.view(b, t, c, h, w).permute(0, 2, 1, 3, 4)


def _freeze(videos):
    x = videos.clone()
    x[:, :, 4:] = x[:, :, 3:4]
    return x


def _shuffle(videos):
    g = torch.Generator().manual_seed(0)
    return torch.stack([v[:, torch.randperm(v.shape[1], generator=g)] for v in videos])


def test_ground_truth_accuracy(clean):
    print(clean)
    assert clean["acc_all"] >= 0.98
    assert clean["detected"] == 1.0
    assert clean["smoothness"] < 0.3  # anti-aliased centroids sit on a line up to sub-pixel error
    assert clean["diversity"] > 1.0


def test_analyzer_reads_each_attribute(real):
    videos, labels = real
    result = analyze(videos[:64])
    assert result.features.shape == (64, len(FEATURE_NAMES))
    assert torch.equal(result.labels, labels[:64])
    assert torch.isfinite(result.features).all()


def test_noise_lowers_accuracy_and_raises_fd(real, reference, clean):
    videos, labels = real
    noise = torch.randn(videos.shape, generator=torch.Generator().manual_seed(0))
    noisy = (videos + 0.3 * noise).clamp(-1, 1)
    m = evaluate_clips(noisy, labels, reference=reference)
    print(m)
    assert m["acc_all"] < clean["acc_all"] and m["fd"] > clean["fd"]


def test_blur_lowers_shape_accuracy_and_raises_fd(real, reference, clean):
    m = evaluate_clips(_blur(real[0]), real[1], reference=reference)
    print(m)
    assert m["acc_shape"] < clean["acc_shape"] and m["fd"] > clean["fd"]


def test_per_shape_accuracy_and_square_fill(real, reference, clean):
    videos, labels = real
    assert clean["acc_circle"] == clean["acc_square"] == clean["acc_triangle"] == 1.0
    assert clean["square_fill"] >= 0.97
    # blurring rounds the corners: squares fall under the fill threshold and read as circles
    m = evaluate_clips(_blur(videos), labels, reference=reference)
    assert m["square_fill"] < clean["square_fill"] - 0.05
    assert m["acc_square"] < m["acc_circle"]
    # the per-shape rates are rates within each prompted shape: they average back to acc_shape
    counts = torch.bincount(labels[:, 0], minlength=3).double() / len(labels)
    per_shape = torch.tensor([m["acc_circle"], m["acc_square"], m["acc_triangle"]], dtype=torch.float64)
    assert math.isclose(float(counts @ per_shape), m["acc_shape"], rel_tol=1e-12)
    no_squares = labels[:, 0] != SHAPES.index("square")
    none = evaluate_clips(videos[no_squares], labels[no_squares], reference=reference)
    assert math.isnan(none["acc_square"]) and math.isnan(none["square_fill"])


def test_frozen_frames_hurt_smoothness_and_fd(real, reference, clean):
    m = evaluate_clips(_freeze(real[0]), real[1], reference=reference)
    print(m)
    assert m["smoothness"] > 2 * clean["smoothness"] and m["fd"] > clean["fd"]


def test_fully_frozen_clip_has_no_direction(real, reference, clean):
    still = real[0][:, :, :1].expand_as(real[0])
    m = evaluate_clips(still, real[1], reference=reference)
    assert m["acc_direction"] == 0.0 and m["fd"] > clean["fd"]


def test_shuffled_frames_hurt_direction_smoothness_and_fd(real, reference, clean):
    m = evaluate_clips(_shuffle(real[0]), real[1], reference=reference)
    print(m)
    assert m["acc_direction"] < clean["acc_direction"]
    assert m["smoothness"] > 2 * clean["smoothness"] and m["fd"] > clean["fd"]


def test_blank_clips_are_undetected_and_wrong(real, reference):
    blank = torch.full_like(real[0][:8], -1.0)
    m = evaluate_clips(blank, real[1][:8], reference=reference)
    assert m["detected"] == 0.0 and m["acc_all"] == 0.0 and m["fd"] > 0


def test_frechet_distance_exact_for_affine_copy():
    # b = 2a + 1 -> mu_b = 2 mu_a + 1, S_b = 4 S_a: FD = |mu_a + 1|^2 + tr(S_a) (1 + 4 - 2*2).
    a = torch.randn(300, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) @ torch.randn(
        5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = (a.mean(0) + 1).square().sum() + torch.cov(a.T).trace()
    assert frechet_distance(a, 2 * a + 1) == pytest.approx(float(expected), rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_scipy_and_is_symmetric():
    linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(3)
    a = torch.randn(200, 6, generator=g, dtype=torch.float64)
    b = torch.randn(150, 6, generator=g, dtype=torch.float64) * 1.5 + 0.3
    ca, cb = torch.cov(a.T).numpy(), torch.cov(b.T).numpy()
    ref = float(((a.mean(0) - b.mean(0)) ** 2).sum()) + ca.trace() + cb.trace() \
        - 2 * linalg.sqrtm(ca @ cb).real.trace()
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(b, a) == pytest.approx(ref, rel=1e-8)


def test_rank_deficient_features_stay_finite():
    a = torch.randn(50, 4, dtype=torch.float64)
    a[:, 3] = 0.0  # a constant feature: singular covariance
    fd = frechet_distance(a, a + 0.5)
    assert fd == pytest.approx(4 * 0.25, rel=1e-6)


def test_diversity_zero_for_identical_clips():
    feats = torch.randn(1, 3).repeat(4, 1)
    labels = torch.zeros(4, 3, dtype=torch.long)
    assert diversity(feats, labels) == pytest.approx(0.0, abs=1e-12)
    pair = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert diversity(pair, torch.zeros(2, 3, dtype=torch.long)) == pytest.approx(5.0)
    assert torch.isnan(torch.tensor(diversity(pair, torch.tensor([[0, 0, 0], [1, 0, 0]]))))


def test_input_errors(real):
    with pytest.raises(ValueError, match="videos"):
        analyze(torch.zeros(2, 1, 8, 32, 32))
    with pytest.raises(ValueError, match="labels"):
        evaluate_clips(real[0][:4], real[1][:3])
    with pytest.raises(ValueError, match="videos"):
        evaluate_clips(torch.zeros(2, 3, 4, 16, 16), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="feats_a"):
        frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))


@pytest.mark.parametrize("cfg", [
    ShapesConfig(antialias=1),
    ShapesConfig(background=-0.6),
    ShapesConfig(height=48, width=48, size_min=14, size_max=20),
    ShapesConfig(frames=16, height=24, width=24, size_min=8, size_max=10, speed_min=0.5, speed_max=0.8),
], ids=["hard-edges", "grey-background", "48px", "16x24x24"])
def test_analyzer_other_geometries(cfg):
    videos, _, labels = MovingShapes(cfg, seed=3).batch(range(128))
    assert (analyze(videos).labels == labels).all(dim=1).double().mean() >= 0.98


def test_one_pixel_specks_keep_features_bounded():
    """A generated clip whose foreground is a single pixel must not blow up the FD (compactness ~ area/var)."""
    clips = MovingShapes(seed=3).batch(range(16))[0].clone()
    clips[:4] = -1.0
    for y, x in ((5, 7), (4, 6), (4, 8), (6, 7)):  # only the centre has >= 3 foreground neighbours:
        clips[:4, 0, :, y, x] = 1.0  # the mask keeps a single pixel per frame
    feats = analyze(clips).features
    compact = feats[:, FEATURE_NAMES.index("compactness")]
    assert torch.isfinite(feats).all() and compact.max() < 1.2
    fd = frechet_distance(feats, reference_features(n=256))
    assert math.isfinite(fd) and fd < 1e3


def test_direction_probe_reads_the_speed_of_real_tracks():
    """scripts/probe_direction.py's drift: +speed along the named direction, ~0 across it."""
    from probe_direction import track_drift

    from vdistill.methods.data.shapes import DIRECTION_STEPS, render

    for d in range(4):
        start = torch.tensor([[16.0, 16.0]]) - 5.25 * DIRECTION_STEPS[d]  # centred track
        clip = render(ShapesConfig(), torch.tensor([[0, 0, d]]), start, torch.tensor([1.5]), torch.tensor([11.0]))
        assert abs(track_drift(clip, d) - 1.5) < 0.05
        assert abs(track_drift(clip, (d + 2) % 4)) < 0.05  # the perpendicular axis


def test_word_attention_reports_each_prompt_word_share():
    """Keys made equal -> every text slot gets 1/L of the attention; and the diagnostic's
    probabilities are the ones the model's cross-attention really applies."""
    from probe_direction import word_attention

    from vdistill.methods.data.text import WordTextEncoder
    from vdistill.methods.sampling.generate import ModelBundle
    from vdistill.methods.train.presets import tiny
    from vdistill.models.dit import VideoDiT

    run = tiny()
    torch.manual_seed(0)
    model = VideoDiT(run.model).eval()
    attn = model.blocks[0].cross_attn
    x, context = torch.randn(2, 5, run.model.dim), torch.randn(2, 8, run.model.dim)
    v = attn.v(context).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    by_weights = attn.o((attn.cross_weights(x, context) @ v).transpose(1, 2).flatten(2))
    assert torch.allclose(by_weights, attn(x, context=context), atol=1e-5)

    for block in model.blocks:
        torch.nn.init.zeros_(block.cross_attn.k.weight)
        torch.nn.init.zeros_(block.cross_attn.k.bias)
    text = WordTextEncoder(dim=run.model.text_dim, max_len=run.text_max_len)
    shares = word_attention(ModelBundle(model, text, run.data, 1.0, {}), num=4)
    length = run.text_max_len
    assert all(abs(shares[w]["mean"] - 1 / length) < 1e-4 for w in ("a", "colour", "shape", "moving", "direction"))
    assert abs(shares["padding"]["mean"] - (length - 5) / length) < 1e-4


def test_word_sensitivity_is_zero_exactly_when_the_text_cannot_reach_the_output():
    from probe_direction import word_sensitivity

    from vdistill.methods.data.text import WordTextEncoder
    from vdistill.methods.sampling.generate import ModelBundle
    from vdistill.methods.train.presets import tiny
    from vdistill.models.dit import VideoDiT

    run = tiny()
    torch.manual_seed(0)
    model = VideoDiT(run.model).eval()
    torch.nn.init.normal_(model.head.weight, std=0.1)  # zero-initialised head: make v non-zero
    bundle = ModelBundle(model, WordTextEncoder(dim=run.model.text_dim, max_len=run.text_max_len), run.data, 1.0, {})
    uses_text = word_sensitivity(bundle, times=(0.5,), num=4)["0.5"]
    assert all(v > 1e-6 for v in uses_text.values())
    for block in model.blocks:  # cut the only text path: cross-attention's output projection
        torch.nn.init.zeros_(block.cross_attn.o.weight)
        torch.nn.init.zeros_(block.cross_attn.o.bias)
    assert all(v == 0 for v in word_sensitivity(bundle, times=(0.5,), num=4)["0.5"].values())


def test_mean_over_seeds_gives_means_and_standard_errors():
    def row(acc, fd):
        return {"steps": 2, "num": 100, "solver": "euler", "acc_all": acc, "fd": fd, "wall_s": 1.5}

    (mean,) = mean_over_seeds([[row(0.5, 3.0)], [row(0.7, 5.0)]])
    assert mean["acc_all"] == pytest.approx(0.6) and mean["fd"] == pytest.approx(4.0)
    # sample std of two values a, b is |a - b| / sqrt(2); over sqrt(2) seeds: |a - b| / 2
    assert mean["acc_all_se"] == pytest.approx(0.1) and mean["fd_se"] == pytest.approx(1.0)
    assert mean["acc_all_binomial_se"] == pytest.approx((0.6 * 0.4 / 200) ** 0.5)
    assert mean["steps"] == 2 and mean["solver"] == "euler" and mean["seeds"] == 2 and mean["wall_s"] == 3.0
    with pytest.raises(ValueError, match="at least 2 seeds"):
        mean_over_seeds([[row(0.5, 3.0)]])
    with pytest.raises(ValueError, match="differ in steps"):
        mean_over_seeds([[row(0.5, 3.0)], [{**row(0.7, 5.0), "steps": 4}]])
