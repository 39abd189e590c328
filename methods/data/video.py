"""Read a clip from a video file for training: frames sampled at a target frame rate, resized to cover the target
size and centre-cropped, as [3, F, H, W] in [-1, 1].

mp4 / webm / mov / mkv are decoded with PyAV (`av`), GIFs with Pillow. Decoding stops as soon as the frames it needs
are read, so a long video costs only its first F / fps seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".gif")


class UnreadableVideo(ValueError):
    """A video that cannot be decoded, or is shorter than the clip asked for."""


def _frames_av(path: Path) -> Iterator[tuple[float, Image.Image]]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            if frame.time is not None:
                yield float(frame.time), frame.to_image()


def _frames_gif(path: Path) -> Iterator[tuple[float, Image.Image]]:
    with Image.open(path) as gif:
        time = 0.0
        for index in range(getattr(gif, "n_frames", 1)):
            gif.seek(index)
            yield time, gif.convert("RGB")
            time += (gif.info.get("duration") or 100) / 1000  # ms; GIFs without one play at 10 fps


def _resize_crop(image: Image.Image, height: int, width: int) -> np.ndarray:
    """Scale to cover height x width (aspect kept), then crop the centre: uint8 [height, width, 3]."""
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return np.asarray(image.crop((left, top, left + width, top + height)))


def read_clip(path: str | Path, frames: int, fps: float, height: int, width: int) -> torch.Tensor:
    """`frames` frames of `path` at `fps` from its start (each the last decoded frame at or before its time),
    resized and centre-cropped to height x width: float32 [3, frames, height, width] in [-1, 1].
    UnreadableVideo if the file cannot be decoded or holds fewer than frames / fps seconds."""
    path = Path(path)
    frames_of = _frames_gif if path.suffix.lower() == ".gif" else _frames_av
    picked: list[np.ndarray] = []  # frame k shows time k / fps: the last decoded frame at or before it
    last, last_time = None, 0.0
    try:
        for time, image in frames_of(path):
            while last is not None and len(picked) < frames and len(picked) / fps < time - 1e-6:
                picked.append(_resize_crop(last, height, width))
            if len(picked) == frames:
                break
            last, last_time = image, time
        while last is not None and len(picked) < frames and len(picked) / fps <= last_time + 1e-6:
            picked.append(_resize_crop(last, height, width))  # the stream ended: its last frame up to its time
    except Exception as e:  # noqa: BLE001 - decoders raise many types; the caller logs and skips the file
        raise UnreadableVideo(f"{path}: cannot decode ({type(e).__name__}: {e})") from e
    if len(picked) < frames:
        raise UnreadableVideo(f"{path}: too short: {len(picked)} of {frames} frames at {fps:g} fps")
    clip = torch.from_numpy(np.stack(picked)).permute(3, 0, 1, 2)  # [3, F, H, W] uint8
    return clip.float() / 127.5 - 1.0
