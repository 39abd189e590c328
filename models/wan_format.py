"""Wan2.1 T2V checkpoints in VideoDiT terms: config fields and parameter names of the two public layouts.

- "diffusers": a `WanTransformer3DModel` directory (config.json with `_class_name` WanTransformer3DModel).
- "wan": the original Wan-AI release (config.json with `_class_name` WanModel; Wan-Video/Wan2.1's model.py).

VideoDiT is the same network: the mapping is a renaming, plus the head's output rows, which both layouts order
(pt, ph, pw, C) when unpatchifying and VideoDiT orders (C, pt, ph, pw). What does not map (image conditioning,
windowed attention, no q/k-norm) is refused by name.
"""

from __future__ import annotations

import re

import torch

from vdistill.models.dit import DiTConfig, VideoDiT

LAYOUTS = ("diffusers", "wan")
CLASS_NAMES = {"WanTransformer3DModel": "diffusers", "WanModel": "wan"}
WAN_GUIDANCE = 5.0  # Wan2.1 T2V's default guidance scale
WAN_SHIFT = {480: 3.0, 720: 5.0}  # its flow shift by resolution (480p and 720p settings)
WAN_TEXT_LEN = 512  # umT5 tokens; Wan pads every prompt's embeddings to this with zeros (original config: text_len)

# VideoDiT module -> (diffusers name, original Wan name); each module's .weight / .bias follow it
_GLOBAL = {
    "patch_embed": ("patch_embedding", "patch_embedding"),
    "text_embed.0": ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    "text_embed.2": ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    "time_embed.0": ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    "time_embed.2": ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    "time_proj.1": ("condition_embedder.time_proj", "time_projection.1"),
    "head_modulation": ("scale_shift_table", "head.modulation"),
    "head": ("proj_out", "head.head"),
}
_BLOCK = {
    **{f"{ours}.{p}": (f"{theirs}.{q}", f"{ours}.{p}")
       for ours, theirs in (("self_attn", "attn1"), ("cross_attn", "attn2"))
       for p, q in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("norm_q", "norm_q"),
                    ("norm_k", "norm_k"))},
    "norm_cross": ("norm2", "norm3"),  # the affine LayerNorm before cross-attention
    "ffn.fc1": ("ffn.net.0.proj", "ffn.0"),
    "ffn.fc2": ("ffn.net.2", "ffn.2"),
    "modulation": ("scale_shift_table", "modulation"),
}
# names that say why a checkpoint cannot be a VideoDiT (Wan2.1 I2V / FLF2V image conditioning)
_IMAGE_CONDITIONING = re.compile(r"img_emb|image_embedder|k_img|v_img|norm_k_img|add_k_proj|add_v_proj|norm_added")


def their_name(ours: str, layout: str) -> str:
    """The name in `layout` of VideoDiT parameter `ours` (e.g. blocks.3.ffn.fc1.weight -> blocks.3.ffn.0.weight)."""
    column = LAYOUTS.index(layout)
    block = re.fullmatch(r"(blocks\.\d+\.)(.+)", ours)
    prefix, rest, table = (block[1], block[2], _BLOCK) if block else ("", ours, _GLOBAL)
    for mine, theirs in table.items():
        if rest == mine or rest.startswith(mine + "."):
            return prefix + theirs[column] + rest[len(mine):]
    raise KeyError(f"VideoDiT parameter {ours!r} has no counterpart in Wan2.1 ({layout} layout)")


def name_map(cfg: DiTConfig, layout: str) -> dict[str, str]:
    """{their name: VideoDiT name} for every parameter of a VideoDiT with `cfg` (a Wan-compatible config)."""
    if cfg.absolute_positions or cfg.pooled_text:
        raise ValueError("the model has absolute_positions / pooled_text paths, which Wan2.1 has not: it cannot be "
                         "written in a Wan layout")
    with torch.device("meta"):
        names = list(VideoDiT(cfg).state_dict())
    return {their_name(n, layout): n for n in names}


def head_rows(tensor: torch.Tensor, cfg: DiTConfig, to_videodit: bool) -> torch.Tensor:
    """The head's weight [C·pt·ph·pw, dim] or bias with its rows reordered between Wan's (pt, ph, pw, C) and
    VideoDiT's (C, pt, ph, pw)."""
    c, patch = cfg.in_channels, tuple(cfg.patch)
    if to_videodit:
        return tensor.unflatten(0, (*patch, c)).movedim(3, 0).flatten(0, 3)
    return tensor.unflatten(0, (c, *patch)).movedim(0, 3).flatten(0, 3)


def is_head(ours: str) -> bool:
    return ours in ("head.weight", "head.bias")


def unmapped(names: list[str]) -> str:
    """A message naming checkpoint tensors with no VideoDiT counterpart, and why where known."""
    image = [n for n in names if _IMAGE_CONDITIONING.search(n)]
    why = (f"; {len(image)} of them are image conditioning (an I2V/FLF2V model: only text-to-video Wan2.1 loads)"
           if image else "")
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    return f"tensors with no VideoDiT counterpart: {shown}{why}"


def config_from(wan: dict, layout: str) -> DiTConfig:
    """The VideoDiT config of a Wan2.1 config.json (either layout); ValueError naming each field that does not map."""
    if layout == "diffusers":
        fields = dict(patch=wan.get("patch_size", (1, 2, 2)), heads=wan["num_attention_heads"],
                      head_dim=wan["attention_head_dim"], in_channels=wan.get("in_channels", 16),
                      out_channels=wan.get("out_channels") or wan.get("in_channels", 16),
                      text_dim=wan.get("text_dim", 4096), freq_dim=wan.get("freq_dim", 256), ffn_dim=wan["ffn_dim"],
                      layers=wan["num_layers"], eps=wan.get("eps", 1e-6))
        refused = {"cross_attn_norm": (wan.get("cross_attn_norm", True), True),
                   "qk_norm": (wan.get("qk_norm", "rms_norm_across_heads"), "rms_norm_across_heads"),
                   "image_dim": (wan.get("image_dim"), None), "added_kv_proj_dim": (wan.get("added_kv_proj_dim"), None),
                   "pos_embed_seq_len": (wan.get("pos_embed_seq_len"), None)}
    else:
        heads = wan["num_heads"]
        if wan["dim"] % heads:
            raise ValueError(f"Wan config: dim {wan['dim']} is not divisible by num_heads {heads}")
        fields = dict(patch=wan.get("patch_size", (1, 2, 2)), heads=heads, head_dim=wan["dim"] // heads,
                      in_channels=wan.get("in_dim", 16), out_channels=wan.get("out_dim", 16),
                      text_dim=wan.get("text_dim", 4096), freq_dim=wan.get("freq_dim", 256), ffn_dim=wan["ffn_dim"],
                      layers=wan["num_layers"], eps=wan.get("eps", 1e-6))
        refused = {"model_type": (wan.get("model_type", "t2v"), "t2v"),
                   "window_size": (list(wan.get("window_size", (-1, -1))), [-1, -1]),
                   "qk_norm": (wan.get("qk_norm", True), True),
                   "cross_attn_norm": (wan.get("cross_attn_norm", True), True)}
    bad = [f"{k}={got!r} (supported: {want!r})" for k, (got, want) in refused.items() if got != want]
    if fields["out_channels"] != fields["in_channels"]:
        bad.append(f"output channels {fields['out_channels']} != input channels {fields['in_channels']}")
    if bad:
        raise ValueError("not a Wan2.1 text-to-video transformer VideoDiT can hold: " + "; ".join(bad))
    return DiTConfig(in_channels=fields["in_channels"], patch=tuple(fields["patch"]),
                     dim=fields["heads"] * fields["head_dim"], heads=fields["heads"], layers=fields["layers"],
                     ffn_dim=fields["ffn_dim"], text_dim=fields["text_dim"], freq_dim=fields["freq_dim"],
                     time_scale=1000.0, rope_theta=10000.0, eps=fields["eps"],
                     text_len=wan.get("text_len", WAN_TEXT_LEN))


def diffusers_config(cfg: DiTConfig) -> dict:
    """config.json of the `WanTransformer3DModel` equal to a VideoDiT with `cfg` (refused where none is)."""
    wan_like = (cfg.time_scale == 1000.0 and cfg.rope_theta == 10000.0 and not cfg.absolute_positions
                and not cfg.pooled_text)
    if not wan_like:
        raise ValueError(f"the model config {cfg} is not expressible as a diffusers WanTransformer3DModel (it needs "
                         "time_scale 1000, rope_theta 10000 and neither absolute_positions nor pooled_text)")
    return {"_class_name": "WanTransformer3DModel", "patch_size": list(cfg.patch),
            "num_attention_heads": cfg.heads, "attention_head_dim": cfg.head_dim, "in_channels": cfg.in_channels,
            "out_channels": cfg.in_channels, "text_dim": cfg.text_dim, "freq_dim": cfg.freq_dim,
            "ffn_dim": cfg.ffn_dim, "num_layers": cfg.layers, "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads", "eps": cfg.eps, "image_dim": None, "added_kv_proj_dim": None,
            "rope_max_seq_len": 1024}
