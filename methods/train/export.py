"""`vdistill export`: write a training checkpoint's raw weights or any of its EMA profiles as an exported
model, with the metadata the run's own export carries (so `sample`, `evaluate` and `tune-times` take it).

A run exports EMA profile 0 of its last step; this exports the other profiles (e.g. σ_rel 0.1, a longer
average) and the kept earlier checkpoints without training again."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vdistill.methods.train.checkpoint import load_checkpoint, save_weights
from vdistill.methods.train.sharded_checkpoint import read_whole
from vdistill.models.dit import DiTConfig, VideoDiT


def _sampler_meta(run_config: dict) -> dict:
    """A distillation's sampler, rebuilt from its method config as `distill` writes it; {} for a teacher."""
    if not _distilled(run_config):
        return {}
    from vdistill.methods.recipes.registry import recipe_class

    recipe = recipe_class(run_config["method"])
    fields = {f.name for f in dataclasses.fields(recipe.Config)}
    unknown = sorted(set(run_config["method_config"]) - fields)
    if unknown:
        raise ValueError(f"checkpoint: method config fields {unknown} are unknown to this version's "
                         f"{run_config['method']} recipe")
    return {"sampler": recipe.sampler_meta(recipe.Config(**run_config["method_config"]))}


def _distilled(run_config: dict) -> bool:
    """A distillation names its recipe in "method"; a pretraining run keeps its loss settings there."""
    return isinstance(run_config.get("method"), str)


def export_checkpoint(checkpoint: str | Path, out: str | Path, ema_profile: int | None = 0) -> dict:
    """Write `checkpoint`'s EMA profile `ema_profile` (None: the raw student) to `out`; returns the metadata."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"--checkpoint {checkpoint} does not exist")
    state = load_checkpoint(checkpoint)
    if "sharded" in state:  # a distributed checkpoint (train.fsdp): read the whole tensors this export needs
        wanted = ("student/",) if ema_profile is None else ("student/", f"ema/ema/{ema_profile}/")
        state.update(read_whole(state["sharded"], wanted))
    run_config = state["config"]
    weights = dict(state["student"])
    recipe = run_config["method"] if _distilled(run_config) else "pretrain"
    meta = {"recipe": recipe, "step": state["step"], "run_config": run_config}
    if ema_profile is not None:
        profiles = state["ema"]["profiles"]
        if not 0 <= ema_profile < len(profiles):
            raise ValueError(f"--ema-profile must be in [0, {len(profiles)}) for this checkpoint "
                             f"(profiles {profiles}), got {ema_profile}")
        weights.update(state["ema"]["ema"][ema_profile])
        meta["ema_sigma_rel"] = profiles[ema_profile]["sigma_rel"]  # the trainer's profiles are σ_rel ones
    meta.update(_sampler_meta(run_config))
    model = VideoDiT(DiTConfig(**run_config["model"]))
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"--checkpoint {checkpoint}: its weights do not match its model config: {e}") from e
    save_weights(out, model, meta, state=weights)
    return meta
