"""Moving-shapes text-to-video benchmark, generated deterministically on the fly.

Each clip shows one filled shape (circle, square, triangle) in one of six saturated colours,
moving in a straight line at constant speed in one of four directions on a plain dark
background; its prompt names the three attributes ("a red circle moving left").

Size choice: clips are pixel-space videos [C=3, T=8, H=32, W=32] in [-1, 1]. A DiT with
patch (1, 4, 4) sees 8 frames x 8x8 patches = 512 tokens, which a 2-core CPU can train on in
minutes-to-hours; 32x32 frames still leave a shape of 10-13 px (about 3x3 patches), so circle,
square and triangle remain distinguishable and an 8-frame track of 1-2 px/frame makes the
direction unambiguous.

Clip ``(seed, index)`` draws its parameters from ``numpy.random.default_rng([seed, index])``, so
any clip can be regenerated alone, in any order, on any machine. Edges are anti-aliased by
supersampling each pixel on an ``antialias x antialias`` grid.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vdistill.models.config_fields import check_fields

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "cyan", "magenta")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")

# RGB in [-1, 1]; the corners of the colour cube, pairwise at least 2 apart.
PALETTE = torch.tensor(
    [
        [1.0, -1.0, -1.0],  # red
        [-1.0, 1.0, -1.0],  # green
        [-1.0, -1.0, 1.0],  # blue
        [1.0, 1.0, -1.0],  # yellow
        [-1.0, 1.0, 1.0],  # cyan
        [1.0, -1.0, 1.0],  # magenta
    ]
)
# Unit step per direction in image coordinates (x right, y down).
DIRECTION_STEPS_XY = ((-1.0, 0.0), (1.0, 0.0), (0.0, -1.0), (0.0, 1.0))  # (x, y) unit step per direction
DIRECTION_STEPS = torch.tensor(DIRECTION_STEPS_XY)
MARGIN = 1.0  # pixels kept free between the shape and the frame border


@dataclass(frozen=True)
class ShapesConfig:
    """Geometry of the moving-shapes clips."""

    channels: int = 3  # RGB
    frames: int = 8  # T
    height: int = 32  # H, pixels
    width: int = 32  # W, pixels
    speed_min: float = 1.0  # slowest speed, pixels per frame
    speed_max: float = 2.0  # fastest speed, pixels per frame
    size_min: float = 10.0  # smallest side of the shape's bounding box, pixels
    size_max: float = 13.0  # largest side of the shape's bounding box, pixels
    background: float = -1.0  # grey level of the plain background in [-1, 1]
    antialias: int = 2  # supersamples per pixel and axis (1 = hard edges)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.channels != 3:
            raise ValueError(f"channels must be 3 (RGB), got {self.channels}")
        if self.frames < 2 or self.height < 8 or self.width < 8:
            raise ValueError(f"frames >= 2 and height, width >= 8 required, got {self}")
        if not 0 < self.speed_min <= self.speed_max:
            raise ValueError(f"need 0 < speed_min <= speed_max, got {self.speed_min}, {self.speed_max}")
        if not 2 <= self.size_min <= self.size_max:
            raise ValueError(f"need 2 <= size_min <= size_max, got {self.size_min}, {self.size_max}")
        travel = self.speed_max * (self.frames - 1)
        if self.size_max + travel + 2 * MARGIN > min(self.height, self.width):
            raise ValueError(
                f"size_max + speed_max*(frames-1) + 2 px margin = {self.size_max + travel + 2 * MARGIN} "
                f"does not fit in "
                f"{self.height}x{self.width}: the shape would leave the frame"
            )
        if not -1.0 <= self.background <= 1.0:
            raise ValueError(f"background must be in [-1, 1], got {self.background}")
        if self.antialias < 1:
            raise ValueError(f"antialias must be >= 1, got {self.antialias}")

    @property
    def clip_shape(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of one clip."""
        return (self.channels, self.frames, self.height, self.width)


@dataclass
class Clip:
    """One clip: video [3, T, H, W] float32 in [-1, 1], its prompt, labels [3] (shape, colour, direction)."""

    video: torch.Tensor
    prompt: str
    labels: torch.Tensor


def prompt_for(labels: Sequence[int] | torch.Tensor) -> str:
    """Prompt text for labels (shape, colour, direction), e.g. "a red circle moving left"."""
    shape, colour, direction = (int(v) for v in labels)
    for name, value, names in (("shape", shape, SHAPES), ("colour", colour, COLOURS),
                               ("direction", direction, DIRECTIONS)):
        if not 0 <= value < len(names):
            raise ValueError(f"labels: {name} index {value} out of range [0, {len(names)})")
    return f"a {COLOURS[colour]} {SHAPES[shape]} moving {DIRECTIONS[direction]}"


def parse_prompt(text: str) -> tuple[int, int, int]:
    """Inverse of :func:`prompt_for`: "a red circle moving left" -> (shape, colour, direction)."""
    words = text.lower().split()
    if len(words) != 5 or words[0] != "a" or words[3] != "moving":
        raise ValueError(f"text: expected 'a <colour> <shape> moving <direction>', got {text!r}")
    for word, names, what in ((words[1], COLOURS, "colour"), (words[2], SHAPES, "shape"),
                              (words[4], DIRECTIONS, "direction")):
        if word not in names:
            raise ValueError(f"text: unknown {what} {word!r} in {text!r}; known: {', '.join(names)}")
    return SHAPES.index(words[2]), COLOURS.index(words[1]), DIRECTIONS.index(words[4])


def all_prompts() -> list[str]:
    """Every prompt of the benchmark (3 x 6 x 4 = 72), in label order."""
    return [prompt_for((s, c, d)) for s in range(len(SHAPES)) for c in range(len(COLOURS))
            for d in range(len(DIRECTIONS))]


def _coverage(shape: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """Inside-test per sample point. shape [B], dx/dy [B, T, S, S'] offsets from centre, half [B]."""
    h = half.view(-1, 1, 1, 1)
    circle = dx.square() + dy.square() <= h.square()
    square = (dx.abs() <= h) & (dy.abs() <= h)
    # Isosceles triangle, apex up: width grows linearly from 0 at dy = -h to 2h at dy = +h.
    triangle = (dy <= h) & (dx.abs() <= (dy + h) / 2)
    s = shape.view(-1, 1, 1, 1)
    return torch.where(s == 0, circle, torch.where(s == 1, square, triangle)).float()


def render(cfg: ShapesConfig, labels: torch.Tensor, start: torch.Tensor, speed: torch.Tensor,
           size: torch.Tensor) -> torch.Tensor:
    """Render clips from explicit parameters.

    labels [B, 3] long (shape, colour, direction); start [B, 2] centre (x, y) at frame 0 in
    pixels (pixel i covers [i, i+1)); speed [B] pixels/frame; size [B] bounding-box side.
    Returns videos [B, 3, T, H, W] float32 in [-1, 1], on the device of the inputs.
    """
    b, t, h, w, a = labels.shape[0], cfg.frames, cfg.height, cfg.width, cfg.antialias
    dev = labels.device
    sub = (torch.arange(a, dtype=torch.float32, device=dev) + 0.5) / a
    ys = (torch.arange(h, dtype=torch.float32, device=dev)[:, None] + sub[None, :]).reshape(-1)  # [H*a]
    xs = (torch.arange(w, dtype=torch.float32, device=dev)[:, None] + sub[None, :]).reshape(-1)  # [W*a]
    frame = torch.arange(t, dtype=torch.float32, device=dev)
    step = DIRECTION_STEPS.to(dev)[labels[:, 2]][:, None, :]  # [B, 1, 2]
    centre = start[:, None, :] + (speed[:, None, None] * frame[None, :, None]) * step  # [B, T, 2]
    dx = xs.view(1, 1, 1, -1) - centre[..., 0].view(b, t, 1, 1)  # [B, T, 1, W*a]
    dy = ys.view(1, 1, -1, 1) - centre[..., 1].view(b, t, 1, 1)  # [B, T, H*a, 1]
    inside = _coverage(labels[:, 0], dx, dy, size / 2)  # [B, T, H*a, W*a]
    cover = inside.view(b, t, h, a, w, a).mean(dim=(3, 5))  # [B, T, H, W]
    colour = PALETTE.to(dev)[labels[:, 1]].view(b, 3, 1, 1, 1)
    return cfg.background + cover[:, None] * (colour - cfg.background)


class MovingShapes:
    """Virtual data set of moving-shapes clips; clip ``index`` is a pure function of (seed, index).

    ``sample(i)`` -> :class:`Clip`; ``batch(indices)`` -> (videos [B, 3, T, H, W], prompts,
    labels [B, 3] long).
    """

    def __init__(self, cfg: ShapesConfig | None = None, seed: int = 0, length: int = 2**31) -> None:
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.cfg = cfg or ShapesConfig()
        self.seed = seed
        self.length = length

    def __len__(self) -> int:
        return self.length

    def params(self, index: int) -> tuple[list[int], list[float], float, float]:
        """Draw (labels, start (x, y), speed, size) of clip ``index``."""
        if not 0 <= index < self.length:
            raise ValueError(f"index {index} out of range [0, {self.length})")
        cfg = self.cfg
        rng = np.random.default_rng([self.seed, int(index)])
        labels = [int(rng.integers(len(SHAPES))), int(rng.integers(len(COLOURS))),
                  int(rng.integers(len(DIRECTIONS)))]
        size = float(rng.uniform(cfg.size_min, cfg.size_max))
        speed = float(rng.uniform(cfg.speed_min, cfg.speed_max))
        travel = speed * (cfg.frames - 1)
        half = size / 2
        step = DIRECTION_STEPS_XY[labels[2]]
        start = []
        for axis, extent in ((0, cfg.width), (1, cfg.height)):
            lo, hi = half + MARGIN, extent - half - MARGIN  # centre range keeping the shape inside
            if step[axis] > 0:
                hi -= travel
            elif step[axis] < 0:
                lo += travel
            start.append(float(rng.uniform(lo, hi)))
        return labels, start, speed, size

    def batch(
        self, indices: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """Clips at ``indices``: videos [B, 3, T, H, W] float32, prompts list[str], labels [B, 3] long.

        ``device``: where the clips are rendered (a GPU renders a training batch in well under a
        millisecond; the CPU takes tens). The clips do not depend on it beyond rounding.
        """
        indices = [int(i) for i in indices]
        if not indices:
            raise ValueError("indices must not be empty")
        drawn = [self.params(i) for i in indices]
        labels = torch.tensor([d[0] for d in drawn], dtype=torch.long)
        start = torch.tensor([d[1] for d in drawn], dtype=torch.float32)
        speed = torch.tensor([d[2] for d in drawn], dtype=torch.float32)
        size = torch.tensor([d[3] for d in drawn], dtype=torch.float32)
        prompts = [prompt_for(d[0]) for d in drawn]
        dev = torch.device(device)
        videos = render(self.cfg, labels.to(dev), start.to(dev), speed.to(dev), size.to(dev))
        return videos, prompts, labels.to(dev)

    def sample(self, index: int) -> Clip:
        """Clip ``index``: video [3, T, H, W], prompt, labels [3]."""
        videos, prompts, labels = self.batch([index])
        return Clip(videos[0], prompts[0], labels[0])


class ShapesStream:
    """Endless, resumable stream of training batches from a :class:`MovingShapes` data set.

    Batch ``k`` holds the clips at indices drawn by ``default_rng([seed, k])``, so the stream is a
    pure function of (data set, batch_size, seed, k); ``state_dict()`` stores ``k`` and a resumed
    stream yields exactly the batches the original would have yielded next. ``part`` keeps a slice of
    each batch (a data-parallel rank's share; ``batch_size`` stays the global size).
    """

    def __init__(
        self, dataset: MovingShapes, batch_size: int, seed: int = 0, device: torch.device | str = "cpu",
        part: slice = slice(None),
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.part = part
        self.step = 0

    def indices(self, step: int) -> list[int]:
        """Data set indices of batch ``step`` (this stream's part of it)."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.dataset), size=self.batch_size).tolist()[self.part]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[str], torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        batch = self.dataset.batch(self.indices(self.step), self.device)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        """Position of the stream (plus the settings a resume must match)."""
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size,
                "dataset_seed": self.dataset.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state``; refuses a state saved with other settings."""
        for key in ("seed", "batch_size"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"state: {key}={state.get(key)!r} does not match this stream's "
                                 f"{getattr(self, key)!r}")
        if state.get("dataset_seed") != self.dataset.seed:
            raise ValueError(f"state: dataset_seed={state.get('dataset_seed')!r} does not match "
                             f"{self.dataset.seed!r}")
        if not isinstance(state.get("step"), int) or state["step"] < 0:
            raise ValueError(f"state: step must be a non-negative int, got {state.get('step')!r}")
        self.step = state["step"]
