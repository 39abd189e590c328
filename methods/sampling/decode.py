"""Sample a latent-space model (a Wan2.1 teacher, or a student distilled on `vdistill prepare` data) from prompts and
decode the latents to video with the Wan VAE: `vdistill sample --vae DIR --text-encoder DIR`.

Prompts are encoded as `prepare` encodes captions (umT5, zero past each prompt); CFG's unconditional branch is the
negative prompt (Wan's default). Latents [16, 1 + (F-1)/4, H/8, W/8] from noise are integrated by the sampler the
model's export names (an ODE on the shifted grid, or multistep consistency), un-normalised with the VAE's
latents_mean / latents_std and decoded to [3, F, H, W].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vdistill.methods.data.prepare import WAN_NEGATIVE_PROMPT, Encoders
from vdistill.methods.sampling.generate import NonFiniteOutput, check_sampler, run_sampler
from vdistill.methods.train.checkpoint import load_dit
from vdistill.models.parameterization import guided
from vdistill.models.wan_format import WAN_GUIDANCE, WAN_SHIFT


@torch.no_grad()
def sample_videos(model_path: Path, encoders: Encoders, prompts: list[str], steps: int, frames: int, height: int,
                  width: int, seed: int = 0, cfg: float | None = None, shift: float | None = None,
                  negative_prompt: str = WAN_NEGATIVE_PROMPT) -> tuple[torch.Tensor, dict]:
    """Clips [B, 3, frames, height, width] in [-1, 1] for `prompts`, and what was used (sampler, guidance, shift)."""
    if (frames - 1) % 4 or height % 16 or width % 16:
        raise ValueError(f"frames must be 1 + 4k and height, width multiples of 16, got {frames}, {height}x{width}")
    device = encoders.device
    model, meta = load_dit(model_path, device)
    model = model.float()
    sampler = meta.get("sampler", {"kind": "ode"})
    check_sampler(sampler)
    scale = cfg if cfg is not None else meta.get("run_config", {}).get("cfg_scale", WAN_GUIDANCE)
    if shift is None and "shift" not in sampler:  # a Wan release: its flow shift for the resolution
        shift = WAN_SHIFT[720 if height >= 720 else 480]
    text, _ = encoders.encode_text(prompts)
    null, _ = encoders.encode_text([negative_prompt])
    velocity = guided(model, text.float(), null.float(), scale)
    shape = (len(prompts), encoders.vae.config.z_dim, 1 + (frames - 1) // 4, height // 8, width // 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    latents = run_sampler(sampler, velocity, noise, steps, "euler", seed, shift)
    if not torch.isfinite(latents).all():
        raise NonFiniteOutput(f"the model's latents have NaN/inf values ({steps} steps, guidance {scale}); nothing "
                              "was decoded or written")
    z = latents * encoders.std + encoders.mean
    clips = encoders.vae.decode(z).sample.float().clamp(-1, 1)
    used = {"sampler": sampler["kind"], "steps": steps, "cfg_scale": scale,
            "shift": sampler.get("shift", 1.0) if shift is None else shift, "seed": seed}
    return clips[:, :, :frames].cpu(), used


def save_mp4_av(video: torch.Tensor, path: Path, fps: float) -> Path:
    """Write [3, F, H, W] in [-1, 1] as H.264 MP4 with PyAV (even sizes: the VAE's multiples of 8 are)."""
    import av

    frames = ((video.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
