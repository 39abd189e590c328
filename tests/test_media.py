"""Media writers: files are written and read back with the right frames and pixels."""

import numpy as np
import pytest
import torch
from PIL import Image

from vdistill.methods.data.shapes import MovingShapes
from vdistill.methods.sampling.media import (
    grid_image,
    mp4_available,
    save_annotated_grid,
    save_gif,
    save_grid_png,
    save_mp4,
    to_uint8_frames,
)


@pytest.fixture(scope="module")
def clips():
    return MovingShapes(seed=0).batch(range(3))


def test_gif_round_trip(clips, tmp_path):
    video = clips[0][0]
    path = save_gif(video, tmp_path / "sub" / "clip.gif", fps=8, scale=2)
    with Image.open(path) as im:
        assert im.n_frames == 8 and im.size == (64, 64)
        assert abs(im.info["duration"] - 125) <= 10  # GIF stores centiseconds
        im.seek(5)
        frame = np.asarray(im.convert("RGB"))
    expected = to_uint8_frames(video, scale=2)[5]
    assert np.abs(frame.astype(int) - expected.astype(int)).mean() < 4  # palette quantisation only


def test_uint8_mapping():
    video = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 4).expand(3, 1, 1, 4)
    frames = to_uint8_frames(video)
    assert frames.shape == (1, 1, 4, 3) and frames[0, 0, :, 0].tolist() == [0, 128, 255, 255]
    with pytest.raises(ValueError, match="video"):
        to_uint8_frames(torch.zeros(1, 8, 4, 4))


def test_grid_png_layout(clips, tmp_path):
    videos = clips[0]
    path = save_grid_png(videos, tmp_path / "grid.png", scale=2)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (3 * (64 + 1) + 1, 8 * (64 + 1) + 1, 3)
    # row 2, frame 6 sits at (pad + 2 * 65, pad + 6 * 65)
    cell = img[1 + 130:1 + 130 + 64, 1 + 390:1 + 390 + 64]
    np.testing.assert_array_equal(cell, to_uint8_frames(videos[2], 2)[6])
    wrapped = grid_image(videos, nrow=2, scale=1)
    assert wrapped.shape == (2 * 33 + 1, 2 * 8 * 33 + 1, 3)


def test_annotated_grid(clips, tmp_path):
    videos, prompts, _ = clips
    path = save_annotated_grid(videos, prompts, tmp_path / "annotated.png")
    with Image.open(path) as im:
        assert im.size[0] > 100 and im.size[1] > 100
    with pytest.raises(ValueError, match="titles"):
        save_annotated_grid(videos, prompts[:2], tmp_path / "bad.png")


def test_mp4_or_clear_error(clips, tmp_path):
    if mp4_available():
        import imageio.v3 as iio

        path = save_mp4(clips[0][0], tmp_path / "clip.mp4")
        assert iio.imread(path).shape[0] == 8
    else:
        with pytest.raises(RuntimeError, match="save_gif"):
            save_mp4(clips[0][0], tmp_path / "clip.mp4")
        assert not (tmp_path / "clip.mp4").exists()
