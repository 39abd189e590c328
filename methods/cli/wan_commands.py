"""`vdistill import-wan` and `vdistill export --model ... --format diffusers`: Wan2.1 checkpoints in and out."""

from __future__ import annotations

from pathlib import Path

import torch

from vdistill.methods.cli import checks

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def import_wan(args) -> int:
    from vdistill.methods.train.checkpoint import save_weights
    from vdistill.models.loading import load_model, model_format

    checks.output_file(args.out, suffix=".safetensors")
    layout = model_format(args.model)
    if layout == "vdistill":
        raise ValueError(f"{args.model} is already a vdistill model file")
    model = load_model(args.model, DTYPES.get(args.dtype))
    save_weights(args.out, model, {"source": {"path": str(args.model), "layout": layout}}, dtype=None)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    print(f"wrote {args.out}: a {model.cfg.layers}-layer, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
          f"parameter Wan2.1 transformer ({layout} layout, {'/'.join(dtypes)}); text padded to {model.cfg.text_len} "
          "tokens as Wan does")
    return 0


def export_diffusers(args) -> int:
    """A vdistill model (or Wan directory) -> a diffusers WanTransformer3DModel directory with the sampling the
    model needs in vdistill_sampling.json (docs/wan.md)."""
    from vdistill.methods.train.checkpoint import load_dit
    from vdistill.models.wan_io import write_diffusers

    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file; --format diffusers writes a directory")
    model, meta = load_dit(args.model)
    sampler = meta.get("sampler", {"kind": "ode"})
    consistency = sampler["kind"] == "consistency"
    sampling = {
        "sampler": sampler,
        "cfg_scale": meta.get("run_config", {}).get("cfg_scale", 1.0),
        "scheduler": {"class": "FlowMatchEulerDiscreteScheduler", "shift": sampler.get("shift", 1.0),
                      "stochastic_sampling": consistency},
        "note": ("the transformer takes timestep 1000·s (RF time s = sigma); a consistency student samples at the "
                 "sigmas in sampler.times[steps], an ODE model with Euler steps on the shifted grid"),
    }
    out = write_diffusers(model, args.out, extra={"vdistill_sampling.json": sampling})
    print(f"wrote {out} (config.json, safetensors, vdistill_sampling.json): load it with "
          f"WanTransformer3DModel.from_pretrained({str(out)!r}); sampling: docs/wan.md")
    return 0


def add_import_parser(sub, add_parser_fn) -> None:
    p = add_parser_fn(sub, "import-wan", help="convert a Wan2.1 transformer directory (diffusers or original layout) "
                      "into a vdistill model file")
    p.add_argument("model", type=Path, help="Wan2.1 directory: diffusers WanTransformer3DModel (or its pipeline) or "
                   "the original Wan-AI release")
    p.add_argument("--out", type=Path, required=True, help=".safetensors to write (atomically)")
    p.add_argument("--dtype", choices=[*DTYPES, "keep"], default="keep", help="weights dtype (default: the "
                   "checkpoint's)")


def prepare(args) -> int:
    from vdistill.methods.data.prepare import Encoders, PrepareConfig
    from vdistill.methods.data.prepare import prepare as run_prepare
    from vdistill.methods.train import distributed

    cfg = PrepareConfig(height=args.height, width=args.width, frames=args.frames, fps=args.fps,
                        text_len=args.text_len, shard_size=args.shard_size, dtype=args.dtype)
    if (args.folder is None) == (args.prompts is None):
        raise ValueError("give a FOLDER of videos or --prompts FILE (prompts only), not both or neither")
    if args.prompts is not None:
        return _prepare_prompts(args, cfg)
    if args.vae is None:
        raise ValueError("--vae is required with a FOLDER of videos (only --prompts needs no VAE)")
    for name in ("folder", "vae", "text_encoder"):
        if not getattr(args, name).is_dir():
            raise FileNotFoundError(f"--{name.replace('_', '-')} {getattr(args, name)} is not a directory")
    checks.output_dir(args.out)
    encoders = Encoders(args.vae, args.text_encoder, distributed.resolve_device(args.device), cfg.text_len)
    counts = run_prepare(args.folder, args.out, encoders, cfg, args.captions, distributed.rank(),
                         distributed.world_size(), args.negative_prompt)
    print(f"rank {distributed.rank()}: {counts['clips']} clips in {counts['written']} new shards in {args.out} "
          f"({counts['skipped_shards']} shards already there, {counts['bad']} videos skipped: "
          f"{args.out}/skipped-rank{distributed.rank()}.jsonl)")
    return 0


def _prepare_prompts(args, cfg) -> int:
    """`vdistill prepare --prompts FILE`: umT5 embeddings of captions alone, in OUT/prompts/."""
    from vdistill.methods.data.prepare import Encoders, write_null_text
    from vdistill.methods.data.prompts import PROMPTS, prepare_prompts, read_prompts
    from vdistill.methods.train import distributed

    if not args.prompts.is_file():
        raise FileNotFoundError(f"--prompts {args.prompts} is not a file")
    if not args.text_encoder.is_dir():
        raise FileNotFoundError(f"--text-encoder {args.text_encoder} is not a directory")
    prompts = read_prompts(args.prompts)
    checks.output_dir(args.out)
    encoders = Encoders(None, args.text_encoder, distributed.resolve_device(args.device), cfg.text_len)
    if distributed.rank() == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        write_null_text(args.out, encoders, args.negative_prompt)
    counts = prepare_prompts(prompts, args.out, encoders, cfg.text_len, cfg.shard_size, getattr(torch, cfg.dtype),
                             distributed.rank(), distributed.world_size())
    print(f"rank {distributed.rank()}: {counts['prompts']} prompts in {counts['written']} new files in "
          f"{args.out / PROMPTS} ({counts['skipped_shards']} already there)")
    return 0


def add_prepare_parser(sub, add_parser_fn) -> None:
    from vdistill.methods.data.prepare import WAN_NEGATIVE_PROMPT, PrepareConfig

    d = PrepareConfig()
    p = add_parser_fn(sub, "prepare", help="videos + captions -> shards of Wan-VAE latents and umT5 embeddings "
                      "(resumable; split over torchrun ranks)")
    p.add_argument("folder", type=Path, nargs="?", help="folder of videos (mp4, webm, mov, mkv, gif), each with a "
                   "sidecar .txt caption unless --captions")
    p.add_argument("--prompts", type=Path, help="prompts only, no videos: captions (.txt one per line, or CSV/JSONL "
                   "with a caption field) -> umT5 embeddings in OUT/prompts/ (no --vae needed)")
    p.add_argument("--out", type=Path, required=True, help="shard directory (a rerun skips finished shards)")
    p.add_argument("--vae", type=Path, help="diffusers AutoencoderKLWan directory (e.g. a Wan2.1 "
                   "pipeline's vae/)")
    p.add_argument("--text-encoder", type=Path, required=True, help="directory with a UMT5EncoderModel and its "
                   "tokenizer")
    p.add_argument("--captions", type=Path, help="CSV (path,caption) or JSONL with those keys; paths relative to "
                   "FOLDER")
    p.add_argument("--height", type=checks.positive_int, default=d.height, help="frame height (multiple of 16)")
    p.add_argument("--width", type=checks.positive_int, default=d.width, help="frame width (multiple of 16)")
    p.add_argument("--frames", type=checks.positive_int, default=d.frames, help="frames per clip (1 + 4k)")
    p.add_argument("--fps", type=checks.positive_float, default=d.fps, help="frames per second sampled")
    p.add_argument("--text-len", type=checks.positive_int, default=d.text_len, help="tokens per caption (Wan: 512)")
    p.add_argument("--shard-size", type=checks.positive_int, default=d.shard_size, help="clips per shard")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=d.dtype, help="stored dtype")
    p.add_argument("--negative-prompt", default=WAN_NEGATIVE_PROMPT, help="CFG's unconditional prompt, embedded to "
                   "OUT/null_text.safetensors (default: Wan2.1's own negative prompt)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")


def sample_latent_model(args) -> int:
    """`vdistill sample --vae DIR --text-encoder DIR`: prompts -> latents -> decoded mp4 and GIF per prompt."""
    from vdistill.methods.data.prepare import Encoders
    from vdistill.methods.sampling.decode import sample_videos, save_mp4_av
    from vdistill.methods.sampling.media import save_gif
    from vdistill.methods.train import distributed

    if not args.prompt:
        raise ValueError("--prompt is required with --vae (the benchmark's prompts are not captions)")
    if args.text_encoder is None:
        raise ValueError("--vae needs --text-encoder (the umT5 directory the data was prepared with)")
    checks.output_dir(args.out)
    encoders = Encoders(args.vae, args.text_encoder, distributed.resolve_device(args.device), args.text_len)
    clips, used = sample_videos(args.model, encoders, args.prompt, args.steps, args.frames, args.height, args.width,
                                args.seed, args.cfg, args.shift)
    written = []
    for i, (clip, prompt) in enumerate(zip(clips, args.prompt)):
        stem = f"{i:03d}_{'_'.join(prompt.split())[:60]}"
        written.append(save_mp4_av(clip, args.out / f"{stem}.mp4", args.fps).name)
        written.append(save_gif(clip, args.out / f"{stem}.gif", fps=round(args.fps), scale=1).name)
    print(f"wrote {', '.join(written)} to {args.out} ({used['sampler']} sampler, {used['steps']} steps, guidance "
          f"{used['cfg_scale']}, shift {used['shift']}, seed {used['seed']})")
    return 0


def add_decode_options(p) -> None:
    """`sample`'s options for latent models (Wan2.1 and students distilled on prepared data)."""
    g = p.add_argument_group("latent models (Wan2.1; students of --data runs): decode to video")
    g.add_argument("--vae", type=Path, help="diffusers AutoencoderKLWan directory: sample latents and decode them")
    g.add_argument("--text-encoder", type=Path, help="UMT5EncoderModel + tokenizer directory (with --vae)")
    g.add_argument("--frames", type=checks.positive_int, default=81, help="frames (1 + 4k)")
    g.add_argument("--height", type=checks.positive_int, default=480, help="height (multiple of 16)")
    g.add_argument("--width", type=checks.positive_int, default=832, help="width (multiple of 16)")
    g.add_argument("--fps", type=checks.positive_float, default=16.0, help="frame rate of the written videos")
    g.add_argument("--text-len", type=checks.positive_int, default=512, help="prompt tokens (Wan: 512)")
