"""The Wan2.1 path at full size, on one GPU: a random-initialised Wan-1.3B (30 layers) written as a diffusers
directory and loaded back through `load_model` (time, host memory), then at 480p x 81 frames (latents
16x21x60x104, 32,760 tokens; 512 text tokens) in bf16: forward, the fused forward+JVP, and one rCM step per
provider of `bench_rcm_step` (`--model`: Triton kernels, with and without activation checkpointing).

    python scripts/wan_gpu_check.py --out bench/results        # H200 budget: ~5 min
    python scripts/wan_gpu_check.py --tiny --device cpu        # the logic at a tiny size, on a CPU

Writes wan-check_<gpu>_<stamp>.json (bench/results/README.md's scheme); docs/wan.md quotes it.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from vdistill.bench import bench_rcm_step
from vdistill.bench.harness import cpu_bench_ms, device_label, do_bench_ms, result_name, run_meta, write_json
from vdistill.models.dit import VideoDiT, dit_config
from vdistill.models.jvp import jvp
from vdistill.models.loading import load_model
from vdistill.models.wan_io import write_diffusers

# name: (config overrides of wan-1.3b, latent [C, T, H, W], prompt tokens before padding)
SIZES = {"wan-1.3b": ({}, (16, 21, 60, 104), 226),
         "tiny": (dict(dim=64, heads=2, layers=1, ffn_dim=128, text_dim=32, freq_dim=32), (16, 3, 8, 8), 5)}


def write_random(size: str, directory: Path) -> float:
    """A random bf16 model of `size` (weights ~N(0, 0.02²)) as a diffusers directory; returns its GiB."""
    overrides, _, _ = SIZES[size]
    with torch.device("meta"):
        model = VideoDiT(dit_config("wan-1.3b", text_len=512 if size != "tiny" else 16, **overrides))
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    write_diffusers(model, directory)
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30


def timed(device: torch.device, fn) -> dict:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        med, p20, p80 = do_bench_ms(fn, warmup_ms=200, rep_ms=2000)
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    med, low, high = cpu_bench_ms(fn, runs=2)
    return {"median_ms": med, "min_ms": low, "max_ms": high}


def forward_and_jvp(model: VideoDiT, size: str, device: torch.device) -> dict:
    """Timings of the forward and of the fused forward+JVP (tangents in x and s) at the size's latent."""
    _, latent, tokens = SIZES[size]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, *latent, device=device, generator=g, dtype=torch.bfloat16)
    text = torch.randn(1, tokens, model.cfg.text_dim, device=device, generator=g, dtype=torch.bfloat16)
    s, dx, ds = torch.tensor([0.7], device=device), torch.randn_like(x), torch.ones(1, device=device)
    out = {"tokens": latent[1] * latent[2] * latent[3] // 4}  # patch (1, 2, 2)
    with torch.no_grad():
        out["forward"] = timed(device, lambda: model(x, s, text))
        out["forward_jvp"] = timed(device, lambda: jvp(model, (x, s, text), (dx, ds)))
    for row in ("forward", "forward_jvp"):
        out[row]["tokens_per_s"] = out["tokens"] / (out[row]["median_ms"] / 1e3)
    return out


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny model and latent (CPU smoke test)")
    p.add_argument("--out", type=Path, help="directory for the JSON result")
    args = p.parse_args(argv)
    device, size = torch.device(args.device), "tiny" if args.tiny else "wan-1.3b"
    result = {"bench": "wan_check", **run_meta(device, argv), "size": size}
    with tempfile.TemporaryDirectory(prefix="wan-check-") as tmp:
        directory = Path(tmp) / "transformer"
        result["weights_gib"] = write_random(size, directory)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        model = load_model(directory, dtype=torch.bfloat16, device=device)
        result["load"] = {"s": time.perf_counter() - start,
                          "host_peak_growth_gib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 2**20}
        result.update(forward_and_jvp(model, size, device))
        del model  # the rCM step loads its own float32 copies
        bench = ["--model", str(directory), "--iters", "2", "--warmup", "1", "--device", args.device,
                 "--providers", "triton", "triton-recompute"] + (["--tiny"] if args.tiny else [])
        result["rcm_step"] = bench_rcm_step.main(bench)["rows"]
    for key in ("load", "forward", "forward_jvp"):
        print(f"{key}: {result[key]}")
    if args.out:
        write_json(args.out, result_name("wan-check", device_label(device)), result)
    return result


if __name__ == "__main__":
    main()
