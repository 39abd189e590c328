"""Throughput of `vdistill prepare`: clips per second through decoding, the Wan VAE and umT5, and each part alone.

Random-weight models, no downloads: `--size tiny` (a 70k-parameter VAE, a 2-layer umT5, 9 frames of 32x48: the CPU
smoke size of the tests) or `--size 480p` (the Wan2.1 VAE architecture at its default config and a umT5 encoder of
umT5-XXL's width (4096) with 2 of its 24 layers, 81 frames of 480x832, 512 tokens: the GPU figures; the text
time of the real encoder is ~12x this one's). Synthetic mp4 clips
(PyAV, H.264) are written first; each phase is timed over `--clips` clips after one warm-up clip. Peak memory is
CUDA's max_memory_allocated on a GPU.

    python -m vdistill.bench.bench_prepare --size tiny --device cpu --out bench/results
    python -m vdistill.bench.bench_prepare --size 480p --device cuda --out bench/results
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vdistill.bench.harness import device_label, result_name, run_meta, write_json

SIZES = {  # VAE config, umT5 config, (frames, height, width), text tokens, source video (frames, fps, h, w)
    "tiny": (dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
             dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4), (9, 32, 48), 12, (24, 24, 40, 64)),
    "480p": ({}, dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64), (81, 480, 832), 512,
             (130, 24, 540, 960)),
}


def write_clip(path: Path, frames: int, fps: int, height: int, width: int) -> None:
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def build_encoders(size: str, directory: Path, device: torch.device):
    """Random-weight VAE and umT5 saved to `directory`, loaded back through `Encoders` as prepare loads them."""
    from diffusers import AutoencoderKLWan
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    from vdistill.methods.data.prepare import Encoders

    vae_cfg, text_cfg, _, tokens, _ = SIZES[size]
    AutoencoderKLWan(**vae_cfg).save_pretrained(directory / "vae")
    words = ["<pad>", "</s>", "<unk>", *(f"w{i}" for i in range(1000))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(directory / "text")
    UMT5EncoderModel(UMT5Config(vocab_size=len(words), **text_cfg)).save_pretrained(directory / "text")
    return Encoders(directory / "vae", directory / "text", device, tokens)


def timed(device: torch.device, fn, *args):
    """(seconds, fn(*args)), synchronising a GPU before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=list(SIZES), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clips", type=int, default=4, help="timed clips (after one warm-up clip)")
    p.add_argument("--out", type=Path, help="directory for the JSON result")
    args = p.parse_args(argv)
    from vdistill.methods.data.video import read_clip

    device = torch.device(args.device)
    _, _, (frames, height, width), _, source = SIZES[args.size]
    result = {"bench": "prepare", **run_meta(device, argv), "size": args.size, "clips": args.clips,
              "clip": {"frames": frames, "height": height, "width": width, "fps": 16}}
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        root = Path(tmp)
        encoders = build_encoders(args.size, root, device)
        videos = [root / f"clip{i}.mp4" for i in range(args.clips + 1)]
        for video in videos:
            write_clip(video, *source)
        captions = [" ".join(f"w{(i * 7 + k) % 1000}" for k in range(40)) for i in range(len(videos))]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = {"decode": 0.0, "vae": 0.0, "text": 0.0}
        for i, (video, caption) in enumerate(zip(videos, captions)):
            took = {}
            took["decode"], clip = timed(device, read_clip, video, frames, 16, height, width)
            took["vae"], _ = timed(device, encoders.encode_video, clip)
            took["text"], _ = timed(device, encoders.encode_text, [caption])
            if i > 0:  # the first clip warms up (allocations, kernels)
                seconds = {k: seconds[k] + took[k] for k in seconds}
    result["s_per_clip"] = {k: v / args.clips for k, v in seconds.items()}
    result["clips_per_s"] = args.clips / sum(seconds.values())
    result["vae_clips_per_s"] = args.clips / seconds["vae"]
    result["text_prompts_per_s"] = args.clips / seconds["text"]
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print({k: result[k] for k in ("s_per_clip", "clips_per_s", "vae_clips_per_s", "text_prompts_per_s")})
    if args.out:
        write_json(args.out, result_name("prepare", device_label(device)), result)
    return result


if __name__ == "__main__":
    main()
