"""Write clips to disk: animated GIF, MP4 (needs imageio's ffmpeg plugin), frame-grid PNGs.

Clips are [3, T, H, W] float tensors in [-1, 1]; they are mapped to uint8 by
round((x + 1) * 127.5) after clamping, and upscaled by nearest neighbour so pixels stay crisp.
"""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8_frames(video: torch.Tensor, scale: int = 1) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> uint8 frames [T, H*scale, W*scale, 3]."""
    if not isinstance(video, torch.Tensor) or video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"video: expected a tensor [3, T, H, W], got {getattr(video, 'shape', type(video))}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    x = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    frames = x.permute(1, 2, 3, 0)  # [T, H, W, 3]
    if scale > 1:
        frames = frames.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return frames.numpy()


def save_gif(video: torch.Tensor, path: str | Path, fps: int = 8, scale: int = 4) -> Path:
    """Write ``video`` [3, T, H, W] in [-1, 1] as a looping GIF; returns the path.

    Pillow merges identical consecutive frames (their durations add up), so a clip with frozen
    frames plays correctly but may store fewer than T frames.
    """
    return _save_animation([Image.fromarray(f) for f in to_uint8_frames(video, scale)], path, fps)


def labelled_frames(videos: torch.Tensor, titles: list[str], columns: int = 4, scale: int = 4,
                    gap: int = 4) -> list[Image.Image]:
    """Frames of ``videos`` [B, 3, T, H, W] tiled `columns` per row, each clip under a white strip with its whole
    title (wrapped to the clip's width), tiles separated by `gap` grey pixels: one image per time step."""
    from PIL import ImageDraw, ImageFont

    if len(titles) != videos.shape[0]:
        raise ValueError(f"titles: expected {videos.shape[0]} titles, got {len(titles)}")
    b, _, t, h, w = videos.shape
    columns = min(columns, b)
    font = ImageFont.load_default()
    titles = [textwrap.fill(title, max(8, w * scale // 5)) for title in titles]  # the default font: ~5 px a letter
    line = font.getbbox("Ag")[3] + 2
    strip = max(title.count("\n") + 1 for title in titles) * line + 6
    tile_w, tile_h = w * scale, h * scale + strip
    rows = -(-b // columns)
    base = Image.new("RGB", (columns * (tile_w + gap) + gap, rows * (tile_h + gap) + gap), (96, 96, 96))
    draw = ImageDraw.Draw(base)
    corners = [(gap + (i % columns) * (tile_w + gap), gap + (i // columns) * (tile_h + gap)) for i in range(b)]
    for (x, y), title in zip(corners, titles):
        draw.rectangle((x, y, x + tile_w - 1, y + strip - 1), fill=(255, 255, 255))
        draw.multiline_text((x + 3, y + 3), title, fill=(0, 0, 0), font=font, spacing=2)
    clips = [to_uint8_frames(v, scale) for v in videos]
    frames = []
    for j in range(t):
        frame = base.copy()
        for (x, y), clip in zip(corners, clips):
            frame.paste(Image.fromarray(clip[j]), (x, y + strip))
        frames.append(frame)
    return frames


def save_comparison_gif(columns: dict[str, torch.Tensor], prompts: list[str], path: str | Path, fps: int = 8) -> Path:
    """:func:`save_comparison` as one looping GIF: a row per prompt, a column per entry of `columns`, each clip
    titled with its column and prompt; returns the path."""
    _check_columns(columns, prompts)
    videos = torch.stack([clips[i] for i in range(len(prompts)) for clips in columns.values()])
    titles = [f"{title}: {prompt}" for prompt in prompts for title in columns]
    return _save_animation(labelled_frames(videos, titles, len(columns)), path, fps)


def _save_animation(frames: list[Image.Image], path: str | Path, fps: int) -> Path:
    """Write `frames` as a looping GIF at `fps` frames per second."""
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    return path


def mp4_available() -> bool:
    """True when imageio's ffmpeg plugin (package ``imageio-ffmpeg``) is installed."""
    return importlib.util.find_spec("imageio_ffmpeg") is not None


def save_mp4(video: torch.Tensor, path: str | Path, fps: int = 8, scale: int = 4) -> Path:
    """Write ``video`` [3, T, H, W] as H.264 MP4 via imageio-ffmpeg; returns the path."""
    if not mp4_available():
        raise RuntimeError("save_mp4 needs imageio's ffmpeg plugin: `pip install imageio[ffmpeg]`, "
                           "or write a GIF with save_gif")
    import imageio.v2 as iio

    frames = to_uint8_frames(video, max(scale, 1))
    # H.264 wants even sizes; macro_block_size=2 pads to them instead of rescaling.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.mimwrite(path, list(frames), fps=fps, macro_block_size=2)
    return path


def grid_image(videos: torch.Tensor, nrow: int | None = None, scale: int = 4, pad: int = 1) -> np.ndarray:
    """Frame grid uint8 [rows, cols, 3]: each clip is one row of its T frames.

    videos [B, 3, T, H, W]; ``nrow`` clips per column block (default B: one block); blocks are
    placed side by side; ``pad`` grey pixels separate frames.
    """
    if videos.dim() != 5 or videos.shape[1] != 3:
        raise ValueError(f"videos: expected [B, 3, T, H, W], got {list(videos.shape)}")
    b, _, t, h, w = videos.shape
    nrow = b if nrow is None else nrow
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    blocks = -(-b // nrow)
    fh, fw = h * scale + pad, w * scale + pad
    canvas = np.full((min(b, nrow) * fh + pad, blocks * t * fw + pad, 3), 128, dtype=np.uint8)
    for i in range(b):
        frames = to_uint8_frames(videos[i], scale)
        row, block = i % nrow, i // nrow
        for j in range(t):
            y, x = pad + row * fh, pad + (block * t + j) * fw
            canvas[y:y + h * scale, x:x + w * scale] = frames[j]
    return canvas


def save_grid_png(videos: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 4) -> Path:
    """Write :func:`grid_image` of ``videos`` [B, 3, T, H, W] as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid_image(videos, nrow, scale)).save(path)
    return path


def save_annotated_grid(videos: torch.Tensor, titles: list[str], path: str | Path, scale: int = 2) -> Path:
    """Frame grid of ``videos`` [B, 3, T, H, W], one row per clip titled by ``titles[b]`` (matplotlib)."""
    if len(titles) != videos.shape[0]:
        raise ValueError(f"titles: expected {videos.shape[0]} titles, got {len(titles)}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = videos.shape[0]
    rows = [grid_image(videos[i:i + 1], scale=scale) for i in range(b)]
    height, width = rows[0].shape[:2]
    fig, axes = plt.subplots(b, 1, figsize=(width / 60, b * (height / 60 + 0.3)), squeeze=False)
    for ax, img, title in zip(axes[:, 0], rows, titles, strict=True):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=8, loc="left")
        ax.axis("off")
    return save_figure(fig, path)


def save_comparison(columns: dict[str, torch.Tensor], prompts: list[str], path: str | Path, frames: int = 4,
                    scale: int = 2) -> Path:
    """One figure comparing models from the same noise: a row per prompt, a column per entry of `columns`
    ({title: clips [B, 3, T, H, W]}, e.g. "teacher, 2 steps"), each cell `frames` frames spread over the clip."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = _check_columns(columns, prompts)
    picked = torch.linspace(0, first.shape[2] - 1, min(frames, first.shape[2])).round().long()
    cells = {title: clips[:, :, picked] for title, clips in columns.items()}
    height, width = grid_image(first[:1, :, picked], scale=scale).shape[:2]
    fig, axes = plt.subplots(len(prompts), len(cells), squeeze=False,
                             figsize=(len(cells) * (width / 80 + 0.1), len(prompts) * (height / 80 + 0.25) + 0.4))
    for j, (title, clips) in enumerate(cells.items()):
        axes[0, j].set_title(title, fontsize=9)
        for i, prompt in enumerate(prompts):
            axes[i, j].imshow(grid_image(clips[i:i + 1], scale=scale), interpolation="nearest")
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if j == 0:
                axes[i, j].set_ylabel(prompt.removeprefix("a ").replace(" moving", "\nmoving"), fontsize=7,
                                      rotation=0, ha="right", va="center")
    return save_figure(fig, path)


def _check_columns(columns: dict[str, torch.Tensor], prompts: list[str]) -> torch.Tensor:
    """The first column's clips; ValueError unless every column holds clips of one shape, one per prompt."""
    first = next(iter(columns.values()), None)
    if first is None or any(c.shape != first.shape for c in columns.values()) or len(prompts) != first.shape[0]:
        raise ValueError(f"columns: expected clips of one shape, one per prompt ({len(prompts)}), got "
                         f"{[list(c.shape) for c in columns.values()]}")
    return first


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write (PNG at 100 dpi, parent folders created) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
