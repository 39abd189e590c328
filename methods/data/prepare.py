"""`vdistill prepare`: a folder of videos with captions -> shards of Wan-VAE latents and umT5 text embeddings.

Each clip is read at the target frame rate and size (`video.read_clip`), encoded by diffusers' `AutoencoderKLWan`
(the latent distribution's mode, normalised per channel by the VAE config's latents_mean / latents_std, as Wan's
pipeline expects: latents = (z - mean) / std) and its caption by transformers' `UMT5EncoderModel` (Wan's text
handling: `text_len` tokens, embeddings zeroed past each caption's length). Shards of `shard_size` clips are written
atomically with their sources listed in the metadata; a rerun skips finished shards; under torchrun each rank takes
every world-th shard; rank 0 writes the negative prompt's embedding (Wan's default) to OUT/null_text.safetensors
for CFG. A video that cannot be read (or is too short) is skipped, logged to
OUT/skipped-rank<R>.jsonl and counted; it never stops the job. Prompts without videos: `methods/data/prompts.py`.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from vdistill.methods.data.shards import SUFFIX, shard_meta, write_shard
from vdistill.methods.data.streaming import NULL_TEXT
from vdistill.methods.data.video import VIDEO_SUFFIXES, UnreadableVideo, read_clip

log = logging.getLogger("vdistill")
# Wan2.1's default negative prompt (wan/configs/shared_config.py): CFG's unconditional branch, not an empty prompt
WAN_NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，"
                       "画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑"
                       "陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸"
                       "形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱"
                       "的背景，三条腿，背景人很多，倒着走")


@dataclass
class PrepareConfig:
    height: int = 480
    width: int = 832
    frames: int = 81  # 1 + 4k: Wan's VAE compresses time 4x after the first frame
    fps: float = 16.0
    text_len: int = 512
    shard_size: int = 32
    dtype: str = "bfloat16"  # of the stored latents and embeddings

    def __post_init__(self) -> None:
        if (self.frames - 1) % 4:
            raise ValueError(f"frames must be 1 + 4k (Wan's VAE), got {self.frames}")
        if self.height % 16 or self.width % 16:
            raise ValueError(f"height and width must be multiples of 16 (VAE x8, patch x2), got {self.height}x"
                             f"{self.width}")
        if min(self.fps, self.text_len, self.shard_size) <= 0:
            raise ValueError("fps, text_len and shard_size must be > 0")


def find_clips(folder: Path, captions: Path | None = None) -> list[tuple[Path, str]]:
    """(video, caption) pairs, sorted by path: from `captions` (CSV with columns path,caption or JSONL with those
    keys; paths relative to `folder`) or from each video's sidecar .txt. ValueError naming videos without one."""
    if captions is not None:
        rows = _caption_rows(captions)
        pairs = [(folder / row["path"], str(row["caption"]).strip()) for row in rows]
    else:
        videos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
        missing = [v.name for v in videos if not v.with_suffix(".txt").is_file()]
        if missing:
            raise ValueError(f"videos without a caption file beside them (e.g. {missing[0]} -> "
                             f"{Path(missing[0]).with_suffix('.txt')}): {len(missing)}; or pass --captions")
        pairs = [(v, v.with_suffix(".txt").read_text().strip()) for v in videos]
    if not pairs:
        raise ValueError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) in {folder}")
    return sorted(pairs)


def _caption_rows(captions: Path) -> list[dict]:
    if captions.suffix == ".jsonl":
        rows = [json.loads(line) for line in captions.read_text().splitlines() if line.strip()]
    else:
        with open(captions, newline="") as f:
            rows = list(csv.DictReader(f))
    bad = [i for i, row in enumerate(rows, 1) if not isinstance(row, dict) or not {"path", "caption"} <= set(row)]
    if bad:
        raise ValueError(f"{captions}: rows {bad[:5]} lack a path or caption field")
    return rows


def tokenizer_dir(text_dir: Path) -> Path:
    """The tokenizer beside a text encoder: in its directory, or a diffusers pipeline's sibling tokenizer/."""
    sibling = text_dir.parent / "tokenizer"
    return sibling if not (text_dir / "tokenizer_config.json").is_file() and sibling.is_dir() else text_dir


class Encoders:
    """The Wan VAE and umT5 encoder (with its tokenizer, see `tokenizer_dir`) from local directories."""

    def __init__(self, vae_dir: Path | None, text_dir: Path, device: torch.device, text_len: int):
        from transformers import AutoTokenizer, UMT5EncoderModel

        self.device, self.text_len = device, text_len
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(text_dir))
        self.text = UMT5EncoderModel.from_pretrained(text_dir).to(device).eval()
        self.vae = None
        if vae_dir is not None:
            from diffusers import AutoencoderKLWan

            self.vae = AutoencoderKLWan.from_pretrained(vae_dir).to(device).eval()
            self.vae.enable_tiling()  # tiles only frames larger than its tile size: a 480p clip in modest memory
            cfg = self.vae.config
            self.mean = torch.tensor(cfg.latents_mean, device=device).view(1, -1, 1, 1, 1)
            self.std = torch.tensor(cfg.latents_std, device=device).view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """([N, text_len, D] embeddings, zero past each caption's tokens; [N, text_len] bool mask)."""
        tokens = self.tokenizer(captions, padding="max_length", max_length=self.text_len, truncation=True,
                                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        out = self.text(tokens.input_ids.to(self.device), mask).last_hidden_state
        return out * mask[..., None], mask.bool()

    @torch.no_grad()
    def encode_video(self, clip: torch.Tensor) -> torch.Tensor:
        """[3, F, H, W] in [-1, 1] -> normalised latents [16, 1 + (F-1)/4, H/8, W/8]."""
        z = self.vae.encode(clip[None].to(self.device)).latent_dist.mode()
        return ((z - self.mean) / self.std)[0]


def write_null_text(out: Path, encoders: Encoders, negative_prompt: str) -> Path:
    """OUT/null_text.safetensors: the embedding [1, text_len, D] of the negative prompt (rewritten if it differs)."""
    path = out / NULL_TEXT
    if path.is_file() and safe_metadata(path).get("prompt") == negative_prompt:
        return path
    text, mask = encoders.encode_text([negative_prompt])
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"text": text.float().cpu().contiguous(), "text_mask": mask.cpu()}, str(tmp),
              metadata={"prompt": negative_prompt})
    tmp.replace(path)
    return path


def prepare(folder: Path, out: Path, encoders: Encoders, cfg: PrepareConfig, captions: Path | None = None,
            rank: int = 0, world: int = 1, negative_prompt: str = WAN_NEGATIVE_PROMPT) -> dict:
    """Write this rank's shards of `folder` to `out` (rank 0 also the negative prompt's embedding); returns counts
    {written, skipped_shards, clips, bad}."""
    pairs = find_clips(folder, captions)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        write_null_text(out, encoders, negative_prompt)
    groups = [pairs[i:i + cfg.shard_size] for i in range(0, len(pairs), cfg.shard_size)]
    mine = list(range(rank, len(groups), world))
    counts = {"written": 0, "skipped_shards": 0, "clips": 0, "bad": 0}
    skipped_log = out / f"skipped-rank{rank}.jsonl"
    dtype = getattr(torch, cfg.dtype)
    with tqdm(total=sum(len(groups[i]) for i in mine), desc=f"prepare (rank {rank})", unit="clip") as bar:
        for index in mine:
            path = out / f"shard-{index:06d}{SUFFIX}"
            sources = [str(p) for p, _ in groups[index]]
            if _finished(path, sources, asdict(cfg)):
                counts["skipped_shards"] += 1
                bar.update(len(groups[index]))
                continue
            latents, kept = [], []
            for video, caption in groups[index]:
                try:
                    clip = read_clip(video, cfg.frames, cfg.fps, cfg.height, cfg.width)
                except UnreadableVideo as e:
                    counts["bad"] += 1
                    log.warning("skipped %s", e)
                    with open(skipped_log, "a") as f:
                        f.write(json.dumps({"path": str(video), "why": str(e)}) + "\n")
                else:
                    latents.append(encoders.encode_video(clip).to(dtype).cpu())
                    kept.append((str(video), caption))
                bar.update(1)
            if kept:
                text, mask = encoders.encode_text([c for _, c in kept])
                write_shard(path, torch.stack(latents), text.to(dtype).cpu(), mask.cpu(), extra={
                    "sources": sources, "kept": [v for v, _ in kept], "captions": [c for _, c in kept],
                    "prepare": asdict(cfg), "latent_norm": {"mean": encoders.mean.flatten().tolist(),
                                                            "std": encoders.std.flatten().tolist()}})
                counts["written"] += 1
                counts["clips"] += len(kept)
    return counts


def _finished(path: Path, sources: list[str], settings: dict) -> bool:
    """True when `path` is a complete shard made from exactly `sources` (a rerun skips it); ValueError when it was
    made with other settings (mixing clip geometries in one directory would only fail later, in training)."""
    if not path.is_file():
        return False
    try:
        extra = shard_meta(path)["extra"]
    except (ValueError, KeyError):
        return False  # torn or foreign: written again
    if extra.get("prepare") != settings:
        raise ValueError(f"{path} was prepared with {extra.get('prepare')}, not {settings}: use another --out")
    return extra.get("sources") == sources


def safe_metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}
