"""Per-GPU memory of rCM distillation of Wan2.1 (1.3B, 14B) at 480p and 720p under several parallel layouts.

An estimate from the configs (`models/dit.py`) and the layer shapes (`models/layers.py`), printed as markdown
tables (docs/multi-gpu.md, "Memory per GPU"); `--json PATH` also writes the numbers. GPU measurement pending:
`--measured PATH` (a JSON list of {"model", "resolution", "layout", "checkpointing", "peak_gib"}) prints measured
peaks next to the estimates.

    python scripts/memory_table.py [--gpus 8] [--json PATH] [--measured PATH]

Assumptions (GiB = 2^30 bytes):
- Clips: 81 frames, 480x832 or 720x1280; latents [16, 1 + 80/4, H/8, W/8], patch (1, 2, 2): 32,760 or 75,600
  tokens; 512 text tokens (Wan pads every prompt to 512). One clip per context-parallel group.
- bf16 autocast with float32 master weights. Student: weights and gradients 4 B/param each, AdamW 8 B/param,
  each power-EMA profile 4 B/param (`train.ema_sigma_rels`: 2 profiles by default). Frozen teacher in bf16
  (2 B/param). Critic: float32 weights and gradients, AdamW: 16 B/param.
- bf16 casts: autocast caches the bf16 copy of every float32 weight that requires grad until the loss's autocast
  region ends: a whole bf16 student (JVP pass and forward) and critic (DMD forward) per GPU. FSDP2's all-gathered
  weights would be cached too (a one-off check on 2 gloo ranks), so sharded runs (`train.fsdp`) autocast without
  the cache (`trainer.autocast`): their casts live with the gathered block (counted in "FSDP gather").
- Layouts over G GPUs: DP replicates everything; FSDP shards the student's weights, gradients, AdamW and EMA
  1/G (teacher and critic replicated); "+ T&C" also shards the teacher, the critic and its AdamW 1/G; "x CPc"
  adds context parallelism over c of the G GPUs (`train.context_parallel`, Ulysses: each holds N/c video tokens,
  so activations and the JVP pass / c, plus one exchanged copy per block; the text tokens on every GPU; c must
  divide the heads: Wan-1.3B's 12 exclude CP8), states still sharded over all G.
  A sharded layout adds two blocks all-gathered at once (the running one and the prefetched next), float32 and
  their bf16 casts.
- Activations: rCM with DMD runs the student on x_t and on the generated sample in one batch: 2 clips with
  gradients (`--grad-clips`). Checkpointing keeps each block's bf16 input, plus one block recomputed.
- JVP pass (no_grad, one clip): one block's activations twice (primal and tangent), a proxy for its peak.
- Total: every state at once plus the larger of activations and the JVP pass (it ends before the student's
  forward). Not counted: CUDA context and allocator slack, NCCL and CP K/V exchange buffers, text encoder and
  VAE (precomputed).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from vdistill.methods.train.trainer import TrainConfig
from vdistill.models.dit import DiTConfig, build_dit, count_params, dit_config

GIB = 2**30
FP32, BF16 = 4, 2
ADAMW = 2 * FP32  # two float32 moments
MODELS = {"wan-1.3b": "Wan-1.3B", "wan-14b": "Wan-14B"}
RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280)}
FRAMES = 81
TEXT_TOKENS = 512
VAE_STRIDE = (4, 8, 8)  # Wan2.1 VAE: frames (after the first), rows, columns
CP_SIZES = (2, 4, 8)
COLUMNS = {
    "weights": "weights", "grads": "grads", "optimiser": "AdamW", "ema": "EMA", "teacher": "teacher",
    "critic": "critic + AdamW", "casts": "bf16 casts", "gather": "FSDP gather", "activations": "act.",
    "activations_ckpt": "act. (AC)", "jvp": "JVP pass", "total": "total", "total_ckpt": "total (AC)",
}


@dataclass(frozen=True)
class Layout:
    name: str
    student_shards: int  # GPUs the student's weights, gradients, AdamW and EMA are sharded over
    aux_shards: int  # the same for the teacher, the critic and its AdamW
    cp: int = 1  # GPUs sharing one clip's tokens


def layouts(gpus: int, heads: int) -> list[Layout]:
    """The layouts over `gpus` GPUs; context parallelism over C only where C divides the GPUs and (Ulysses) the
    heads."""
    fsdp = f"FSDP/{gpus}"
    cp = [Layout(f"{fsdp} x CP{c}", gpus, gpus, c) for c in CP_SIZES if gpus % c == 0 and heads % c == 0]
    return [Layout("DP", 1, 1), Layout(fsdp, gpus, 1), Layout(f"{fsdp} + T&C", gpus, gpus), *cp]


def tokens_per_clip(cfg: DiTConfig, frames: int, height: int, width: int) -> int:
    """Video tokens of one clip: VAE latents [C, 1 + (frames - 1)/4, H/8, W/8], then the patch."""
    latent = (1 + (frames - 1) // VAE_STRIDE[0], height // VAE_STRIDE[1], width // VAE_STRIDE[2])
    t, h, w = (d // p for d, p in zip(latent, cfg.patch))
    return t * h * w


def block_bytes_per_token(
    cfg: DiTConfig, act_bytes: int = BF16, context_parallel: bool = False
) -> tuple[float, float]:
    """Bytes one DiTBlock's forward saves for backward, (per video token on this GPU, per text token).

    Counted from `models/layers.py` (d = dim, F = ffn_dim, a = act_bytes: 2 under bf16 autocast, 4 in float32;
    norms compute in float32, 4 B, whose input is an upcast copy under autocast, x itself in float32):
    - self-attention: layer_norm's float32 input 4d + mean and rstd 8; the modulated LN output a·d; the
      q/k/v linears' shared input a·d; RMS q- and k-norm: float32 input 4d, rsqrt 4, normalised 4d, each;
      RoPE: the [N, head_dim] cos and sin tables cast to a for q and for k, 4·head_dim·a (none in float32);
      flash attention: q, k, v, O (a·d each; the o projection reads a view of O) and LSE 4·heads; the
      gate's product saves the o projection's output a·d. Context parallelism (Ulysses): the same bytes per
      local token (all tokens of heads/C), plus the o projection's input, a copy exchanged back: a·d.
    - cross-attention: nn.LayerNorm (autocast runs it in float32 on CUDA): float32 input 4d + 8, its output cast
      for the q linear a·d; q-norm 8d + 4; attention q and O 2·a·d, LSE 4·heads. No gate: nothing more.
    - FFN: layer_norm 4d + 8, modulated output a·d, fc1 input a·d, fc1 output (GELU input) a·F, GELU output
      (fc2 input) a·F, the gate's product saves fc2's output a·d.
    In all (9·4 + 13·a)·d + 2·a·F + 36 + 8·heads (+ RoPE, + a·d with CP) per video token: 22 tensors of d and
    2 of F in float32. Per text token (cross-attention's k/v side): k-norm 8d + 4, k and v 2·a·d; the context itself
    is shared by all blocks. Per-sample tensors (modulation) and weight casts do not scale with tokens.
    """
    d, f, a = cfg.dim, FP32, act_bytes
    rope = 4 * cfg.head_dim * a if a != FP32 else 0
    self_attn = (f + a + a + 2 * 2 * f + 4 * a + a + a * context_parallel) * d + 2 * f + 2 * f + rope + f * cfg.heads
    cross_attn = (f + a + 2 * f + 2 * a) * d + 2 * f + f + f * cfg.heads
    ffn = (f + 3 * a) * d + 2 * f + 2 * a * cfg.ffn_dim
    return self_attn + cross_attn + ffn, (2 * f + 2 * a) * d + f


def head_bytes_per_token(cfg: DiTConfig, act_bytes: int = BF16) -> float:
    """The output head's saved bytes per token: layer_norm's float32 input, the LN output and the modulated input."""
    return (FP32 + 2 * act_bytes) * cfg.dim


def activation_bytes(
    cfg: DiTConfig, tokens: float, text_tokens: float, *, act_bytes: int = BF16, checkpointing: bool = False,
    context_parallel: bool = False,
) -> float:
    """Bytes saved for backward by one clip's forward through the whole DiT on one GPU holding `tokens` of its
    video tokens (with activation checkpointing: each block's input, plus one block's activations while it is
    recomputed)."""
    video, text = block_bytes_per_token(cfg, act_bytes, context_parallel)
    block = tokens * video + text_tokens * text
    head = tokens * head_bytes_per_token(cfg, act_bytes)
    if checkpointing:
        return cfg.layers * tokens * act_bytes * cfg.dim + block + head
    return cfg.layers * block + head


def jvp_peak_bytes(
    cfg: DiTConfig, tokens: float, text_tokens: float, act_bytes: int = BF16, context_parallel: bool = False
) -> float:
    """Peak of the no_grad JVP pass, estimated as one block's activations for the primal and its tangent."""
    video, text = block_bytes_per_token(cfg, act_bytes, context_parallel)
    return 2 * (tokens * video + text_tokens * text)


@cache
def model_params(name: str) -> tuple[int, int]:
    """(parameters of the whole DiT, of one block), from a model built on the meta device."""
    model = build_dit(name, device="meta")
    return count_params(model), count_params(model.blocks[0])


def estimate(name: str, resolution: str, layout: Layout, *, ema_profiles: int, grad_clips: int) -> dict:
    """One row: per-GPU GiB of each column, with the model, resolution, layout, tokens and parameters."""
    cfg = dit_config(name)
    params, block_params = model_params(name)
    tokens = tokens_per_clip(cfg, FRAMES, *RESOLUTIONS[resolution])
    local, split = tokens / layout.cp, layout.cp > 1
    s, t = layout.student_shards, layout.aux_shards
    row = {
        "weights": FP32 * params / s,
        "grads": FP32 * params / s,
        "optimiser": ADAMW * params / s,
        "ema": FP32 * ema_profiles * params / s,
        "teacher": BF16 * params / t,
        "critic": (2 * FP32 + ADAMW) * params / t,
        "casts": 2 * BF16 * params if s == 1 else 0.0,  # student and critic (see the module docstring)
        "gather": 2 * (FP32 + BF16) * block_params if s > 1 else 0.0,
        "activations": grad_clips * activation_bytes(cfg, local, TEXT_TOKENS, context_parallel=split),
        "activations_ckpt": grad_clips * activation_bytes(
            cfg, local, TEXT_TOKENS, checkpointing=True, context_parallel=split
        ),
        "jvp": jvp_peak_bytes(cfg, local, TEXT_TOKENS, context_parallel=split),
    }
    states = sum(row[k] for k in ("weights", "grads", "optimiser", "ema", "teacher", "critic", "casts", "gather"))
    row["total"] = states + max(row["activations"], row["jvp"])
    row["total_ckpt"] = states + max(row["activations_ckpt"], row["jvp"])
    row = {k: v / GIB for k, v in row.items()}
    return {"model": name, "resolution": resolution, "layout": layout.name, "gpus_per_clip": layout.cp,
            "tokens": tokens, "params": params, **row}


def table(rows: list[dict]) -> str:
    """Markdown: one table per (model, resolution), one line per layout, GiB per GPU."""
    out = []
    for name, label in MODELS.items():
        for resolution in RESOLUTIONS:
            group = [r for r in rows if r["model"] == name and r["resolution"] == resolution]
            if not group:
                continue
            first = group[0]
            out += [f"{label} ({first['params'] / 1e9:.2f} B params), {resolution} x {FRAMES} frames: "
                    f"{first['tokens']:,} tokens, GiB per GPU", "",
                    "| layout | " + " | ".join(COLUMNS.values()) + " |",
                    "|---|" + "---:|" * len(COLUMNS)]
            out += ["| " + r["layout"] + " | " + " | ".join(f"{r[k]:.1f}" for k in COLUMNS) + " |" for r in group]
            out.append("")
    return "\n".join(out)


def compare(rows: list[dict], measured: list[dict]) -> list[str]:
    """Lines 'model resolution layout: measured X GiB, estimate Y GiB' for the measured peaks."""
    lines = []
    for m in measured:
        key = "total_ckpt" if m["checkpointing"] else "total"
        match = [r for r in rows if (r["model"], r["resolution"], r["layout"]) ==
                 (m["model"], m["resolution"], m["layout"])]
        if not match:
            raise SystemExit(f"--measured: no estimate for {m['model']} {m['resolution']} {m['layout']!r}")
        est = match[0][key]
        lines.append(f"{m['model']} {m['resolution']} {m['layout']} ({'AC' if m['checkpointing'] else 'no AC'}): "
                     f"measured {m['peak_gib']:.1f} GiB, estimate {est:.1f} GiB ({m['peak_gib'] / est:.2f}x)")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, default=8, help="GPUs G the sharded layouts use")
    p.add_argument("--ema-profiles", type=int, default=len(TrainConfig().ema_sigma_rels),
                   help="power-EMA profiles (default: train.ema_sigma_rels's)")
    p.add_argument("--grad-clips", type=int, default=2,
                   help="clips in the student's forward with gradients (rCM with DMD: 2)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--measured", type=Path, help="JSON list of measured peaks to compare")
    args = p.parse_args(argv)
    if min(args.gpus, args.ema_profiles, args.grad_clips) < 1:
        raise SystemExit("--gpus, --ema-profiles and --grad-clips must be >= 1")
    rows = [estimate(name, res, layout, ema_profiles=args.ema_profiles, grad_clips=args.grad_clips)
            for name in MODELS for res in RESOLUTIONS for layout in layouts(args.gpus, dit_config(name).heads)]
    print(table(rows))
    measured = json.loads(args.measured.read_text()) if args.measured else []
    print("\n".join(compare(rows, measured)) if measured else "Measured peaks: GPU measurement pending.")
    if args.json:
        args.json.write_text(json.dumps({"gpus": args.gpus, "ema_profiles": args.ema_profiles,
                                         "grad_clips": args.grad_clips, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
