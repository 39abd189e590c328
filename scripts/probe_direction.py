"""Does a model use the direction word? Drift of its high-noise clean-clip estimate, vs real data.

At RF time s near 1 the best estimate of the clean clip is close to the prompt's mean clip, and for
"... moving left" that mean drifts left frame by frame (starts are drawn so the shape stays inside).
A model that ignores the direction word predicts the same, drift-free mean for every direction.

For each direction this prints the drift (px/frame, along the direction's axis, positive = the
named way) of the centroid of the mean x̂0 = x_s − s·v(x_s, s) over `--num` noises, next to the
drift of the mean of real clips of that direction; the share of cross-attention each prompt word
receives (a starved word gets ~0 in every head); and how much the velocity changes when one word
is swapped (shape, colour, direction). No sampling: seconds on a CPU.

    python scripts/probe_direction.py --model models/weights/shapes-teacher/model.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vdistill.methods.data.shapes import COLOURS, DIRECTION_STEPS, DIRECTIONS, SHAPES, MovingShapes, prompt_for
from vdistill.methods.sampling.generate import ModelBundle


def track_drift(clips: torch.Tensor, direction: int) -> float:
    """px/frame along `direction` of the intensity centroid of the mean of clips [B, 3, T, H, W]."""
    weight = (clips.mean(0).amax(0) + 1).clamp_min(0)  # [T, H, W]: foreground above the -1 background
    t, h, w = weight.shape
    total = weight.sum((1, 2))
    cx = (weight.sum(1) * torch.arange(w, dtype=weight.dtype)).sum(-1) / total
    cy = (weight.sum(2) * torch.arange(h, dtype=weight.dtype)).sum(-1) / total
    frames = torch.arange(t, dtype=weight.dtype) - (t - 1) / 2
    slope = torch.stack([(frames * cx).sum(), (frames * cy).sum()]) / frames.square().sum()
    return float(slope @ DIRECTION_STEPS[direction].to(weight.dtype))


@torch.no_grad()
def probe(bundle: ModelBundle, num: int = 64, s: float = 0.99, seed: int = 0) -> list[dict]:
    real = MovingShapes(bundle.data, seed=seed + 1)
    videos, _, labels = real.batch(range(4000))
    rows = []
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(num, *bundle.data.clip_shape, generator=gen)
    time = torch.full((num,), s)
    for d, name in enumerate(DIRECTIONS):
        prompts = [prompt_for((i % 3, i % 6, d)) for i in range(num)]
        v = bundle.model(noise, time, bundle.text.encode(prompts)).float()
        x0 = noise - s * v  # x_s = noise: the clean-clip share (1 - s) of x_s is ignored
        rows.append({"direction": name, "model_px_per_frame": round(track_drift(x0, d), 3),
                     "data_px_per_frame": round(track_drift(videos[labels[:, 2] == d], d), 3)})
    return rows


def _real_clips_and_noise(bundle: ModelBundle, num: int, data_seed: int, seed: int):
    """`num` real clips [num, 3, T, H, W], their prompts and labels, and one fixed noise of their shape."""
    videos, prompts, labels = MovingShapes(bundle.data, seed=data_seed).batch(range(num))
    noise = torch.randn(videos.shape, generator=torch.Generator().manual_seed(seed))
    return videos, prompts, labels, noise


@torch.no_grad()
def word_sensitivity(bundle: ModelBundle, times=(0.5, 0.85, 0.99), num: int = 16, seed: int = 0) -> dict:
    """Relative change ‖v(c') − v(c)‖² / ‖v(c)‖² of the velocity on real clips noised to each RF
    time when one attribute word of the prompt c is swapped for the next one of its kind, and
    (`opposite direction`) the direction for its reverse (left <-> right, up <-> down: same axis,
    other sign). A word the model ignores scores ~1e-5 (rounding); a word it uses, ~1e-2."""
    videos, _, labels, noise = _real_clips_and_noise(bundle, num, seed + 2, seed)
    swaps = {"shape": (0, lambda a: (a + 1) % len(SHAPES)), "colour": (1, lambda a: (a + 1) % len(COLOURS)),
             "direction": (2, lambda a: (a + 1) % len(DIRECTIONS)), "opposite direction": (2, lambda a: a ^ 1)}
    out = {}
    for s in times:
        x_s, time = (1 - s) * videos + s * noise, torch.full((num,), s)
        base = bundle.model(x_s, time, bundle.text.encode([prompt_for(row) for row in labels.tolist()]))
        row = {}
        for word, (k, swap) in swaps.items():
            swapped = labels.clone()
            swapped[:, k] = swap(swapped[:, k])
            v = bundle.model(x_s, time, bundle.text.encode([prompt_for(r) for r in swapped.tolist()]))
            row[word] = float((v - base).square().mean() / base.square().mean())
        out[str(s)] = row
    return out


PROMPT_SLOTS = ("a", "colour", "shape", "moving", "direction")  # word order of methods/data/shapes.prompt_for


@torch.no_grad()
def word_attention(bundle: ModelBundle, num: int = 16, s: float = 0.95, seed: int = 0) -> dict:
    """Share of cross-attention each prompt word receives, on real clips noised to RF time s.

    `mean`: averaged over blocks, heads, video tokens and clips (padding = all slots after the
    prompt); `max_head`: the largest per-(block, head) share, i.e. whether any head reads the word.
    A word near 0 in both is starved: its softmax weight, and with it its gradient, is ~0.
    """
    videos, prompts, _, noise = _real_clips_and_noise(bundle, num, seed + 1, seed)
    x_s = (1 - s) * videos + s * noise
    shares = []  # per block: [H, L] mean probability per text slot

    def record(module, args, kwargs):
        shares.append(module.cross_weights(args[0], kwargs["context"]).mean((0, 2)))

    hooks = [block.cross_attn.register_forward_pre_hook(record, with_kwargs=True) for block in bundle.model.blocks]
    try:
        bundle.model(x_s, torch.full((num,), s), bundle.text.encode(prompts))
    finally:
        for hook in hooks:
            hook.remove()
    per_head = torch.stack(shares)  # [blocks, H, L]
    slots = len(PROMPT_SLOTS)
    mean, max_head = per_head.mean((0, 1)), per_head.flatten(0, 1).amax(0)
    out = {w: {"mean": round(float(mean[i]), 4), "max_head": round(float(max_head[i]), 4)}
           for i, w in enumerate(PROMPT_SLOTS)}
    padding = per_head[..., slots:].sum(-1)
    out["padding"] = {"mean": round(float(padding.mean()), 4), "max_head": round(float(padding.max()), 4)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="exported model (.safetensors)")
    p.add_argument("--num", type=int, default=64, help="noises per direction")
    p.add_argument("--s", type=float, default=0.99, help="RF time of the probe (1 = pure noise)")
    args = p.parse_args()
    if not args.model.is_file():
        raise SystemExit(f"--model {args.model} does not exist")
    if args.num < 1:
        raise SystemExit(f"--num must be >= 1, got {args.num}")
    if not 0 < args.s <= 1:
        raise SystemExit(f"--s must be in (0, 1], got {args.s}")
    bundle = ModelBundle.load(args.model)
    rows = probe(bundle, args.num, args.s)
    result = {"model": str(args.model), "s": args.s, "rows": rows, "word_attention_s0.95": word_attention(bundle),
              "word_sensitivity": word_sensitivity(bundle)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
