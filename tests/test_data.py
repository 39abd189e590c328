"""Moving-shapes data set: determinism, geometry, prompts, resumable stream."""

import pytest
import torch

from vdistill.methods.data.shapes import (
    COLOURS,
    DIRECTIONS,
    PALETTE,
    SHAPES,
    MovingShapes,
    ShapesConfig,
    ShapesStream,
    all_prompts,
    parse_prompt,
    prompt_for,
)


def test_batch_shapes_range_and_prompts_match_labels():
    ds = MovingShapes(seed=3)
    videos, prompts, labels = ds.batch(range(16))
    assert videos.shape == (16, 3, 8, 32, 32) and videos.dtype == torch.float32
    assert labels.shape == (16, 3) and labels.dtype == torch.long
    assert videos.min() >= -1 and videos.max() <= 1
    assert [parse_prompt(p) for p in prompts] == [tuple(lab) for lab in labels.tolist()]


def test_same_seed_index_same_clip_in_any_order():
    a = MovingShapes(seed=7).batch([5, 11, 2])[0]
    b = MovingShapes(seed=7).batch([2, 5, 11])[0]
    torch.testing.assert_close(a[0], b[1], rtol=0, atol=0)
    torch.testing.assert_close(MovingShapes(seed=7).sample(11).video, a[1], rtol=0, atol=0)
    assert not torch.equal(MovingShapes(seed=8).sample(5).video, a[0])


def test_shape_stays_inside_and_colour_is_pure():
    cfg = ShapesConfig()
    videos, _, labels = MovingShapes(cfg, seed=1).batch(range(64))
    fg = (videos - cfg.background).abs().amax(dim=1) > 1e-6  # [B, T, H, W]
    border = fg[..., 0, :].any() | fg[..., -1, :].any() | fg[..., :, 0].any() | fg[..., :, -1].any()
    assert not border, "a shape touched the frame border"
    assert fg.flatten(2).any(dim=2).all(), "a frame has no shape"
    # fully covered pixels carry exactly the palette colour of the label
    full = (videos - PALETTE[labels[:, 1]].view(-1, 3, 1, 1, 1)).abs().amax(dim=1) < 1e-6
    assert (full.flatten(2).sum(dim=2) > 20).all()


def test_motion_follows_direction():
    videos, _, labels = MovingShapes(seed=2).batch(range(32))
    w = (videos + 1).sum(dim=1)  # [B, T, H, W] foreground weight
    ys = torch.arange(32.0).view(1, 1, 32, 1)
    xs = torch.arange(32.0).view(1, 1, 1, 32)
    mass = w.sum(dim=(2, 3))
    cx, cy = (w * xs).sum(dim=(2, 3)) / mass, (w * ys).sum(dim=(2, 3)) / mass
    dx, dy = cx[:, -1] - cx[:, 0], cy[:, -1] - cy[:, 0]
    expect = torch.stack([-dx, dx, -dy, dy], dim=1)  # displacement along each direction
    assert torch.equal(expect.argmax(dim=1), labels[:, 2])
    assert (expect.amax(dim=1) >= 0.9 * 7).all()  # speed_min * (T - 1)


def test_prompt_round_trip_all_combinations():
    prompts = all_prompts()
    assert len(set(prompts)) == len(SHAPES) * len(COLOURS) * len(DIRECTIONS) == 72
    for p in prompts:
        assert prompt_for(parse_prompt(p)) == p
    assert prompt_for((0, 0, 0)) == "a red circle moving left"


@pytest.mark.parametrize("bad", ["a purple circle moving left", "a red hexagon moving left",
                                 "a red circle moving sideways", "red circle moving left", ""])
def test_parse_prompt_rejects_unknown(bad):
    with pytest.raises(ValueError, match="text"):
        parse_prompt(bad)


def test_prompt_for_rejects_out_of_range():
    with pytest.raises(ValueError, match="colour"):
        prompt_for((0, 6, 0))


def test_config_validation():
    with pytest.raises(ValueError, match="leave the frame"):
        ShapesConfig(size_max=20, speed_max=2.0)
    with pytest.raises(ValueError, match="channels"):
        ShapesConfig(channels=1)
    with pytest.raises(ValueError, match="index"):
        MovingShapes(length=10).sample(10)


def test_configurable_geometry():
    cfg = ShapesConfig(frames=4, height=24, width=40, size_min=6, size_max=8, background=-0.5, antialias=1)
    video = MovingShapes(cfg, seed=0).sample(0).video
    assert video.shape == (3, 4, 24, 40)
    assert video[:, :, 0, 0].eq(-0.5).all()


def test_stream_resume_is_exact():
    ds = MovingShapes(seed=0)
    stream = ShapesStream(ds, batch_size=4, seed=9)
    next(stream)
    next(stream)
    state = stream.state_dict()
    expected = [next(stream) for _ in range(2)]
    resumed = ShapesStream(ds, batch_size=4, seed=9)
    resumed.load_state_dict(state)
    got = [next(resumed) for _ in range(2)]
    for (va, pa, la), (vb, pb, lb) in zip(expected, got, strict=True):
        assert torch.equal(va, vb) and pa == pb and torch.equal(la, lb)
    assert stream.indices(0) != ShapesStream(ds, batch_size=4, seed=10).indices(0)


def test_stream_rejects_mismatched_state():
    stream = ShapesStream(MovingShapes(), batch_size=4, seed=1)
    with pytest.raises(ValueError, match="batch_size"):
        stream.load_state_dict({**stream.state_dict(), "batch_size": 8})
