"""What the `vdistill` subcommands do (the CLI module only parses arguments)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from vdistill.methods.data.batches import Prefetched, ShapesBatches
from vdistill.methods.data.shapes import parse_prompt, prompt_for
from vdistill.methods.data.text import WordTextEncoder
from vdistill.methods.eval.evaluate import evaluate_clips, mean_over_seeds, reference_features
from vdistill.methods.recipes.pretrain import FlowMatching
from vdistill.methods.sampling.generate import ModelBundle, balanced_labels, generate, spread_labels
from vdistill.methods.sampling.media import save_annotated_grid, save_gif, save_grid_png, save_mp4
from vdistill.methods.train import distributed
from vdistill.methods.train.checkpoint import load_dit
from vdistill.methods.train.presets import RunConfig
from vdistill.methods.train.trainer import Trainer
from vdistill.models.dit import VideoDiT

log = logging.getLogger("vdistill")

SHIPPED_TEACHER = Path(__file__).resolve().parents[1] / "models" / "weights" / "shapes-teacher" / "model.safetensors"


def pretrain(run: RunConfig, out: Path, resume: bool = False, init: Path | None = None) -> dict[str, Path]:
    """Flow-matching pretraining of `run.model` on moving shapes; returns the exported weight files.

    `init`: start from an exported model's weights (continued training; its config must match).
    """
    torch.manual_seed(run.train.seed)
    text = WordTextEncoder(dim=run.model.text_dim, max_len=run.text_max_len)
    device = str(run.train.resolved_device())
    data = Prefetched(ShapesBatches(run.data, text, run.train.batch_size, seed=run.train.seed, device=device))
    model = VideoDiT(run.model)
    if init is not None:
        init_from(model, init)
    recipe = FlowMatching(model, run.flow)
    trainer = Trainer(recipe, data, run.train, out, run_config=run.to_dict())
    try:
        trainer.fit(resume=resume)
    finally:
        data.close()
    paths = trainer.export()
    if distributed.is_main():
        log.info("exported %s", ", ".join(str(p) for p in paths.values()))
    return paths


GROWABLE = ("absolute_positions", "pooled_text")  # zero-initialised paths --init may add


def init_from(model: VideoDiT, path: Path) -> None:
    """Copy an exported model's weights into `model`; the configs must match, except that `model`
    may add the zero-initialised paths in GROWABLE (the function is unchanged at step 0)."""
    start, _ = load_dit(path)
    added = {name: True for name in GROWABLE if getattr(model.cfg, name) and not getattr(start.cfg, name)}
    if replace(start.cfg, **added) != model.cfg:
        raise ValueError(f"--init {path}: its model config {start.cfg} differs from the preset's {model.cfg}")
    model.load_state_dict(start.state_dict(), strict=not added)


def sample(args) -> int:
    bundle = ModelBundle.load(args.model, distributed.resolve_device(args.device))
    prompts = args.prompt or [prompt_for(lab) for lab in spread_labels(8).tolist()]
    labels = torch.tensor([parse_prompt(p) for p in prompts])
    clips = generate(bundle, labels, args.steps, cfg_scale=args.cfg, solver=args.solver, seed=args.seed,
                     shift=args.shift)
    args.out.mkdir(parents=True, exist_ok=True)
    save = save_gif if args.format == "gif" else save_mp4
    for i, (clip, prompt) in enumerate(zip(clips, prompts)):
        save(clip, args.out / f"{i:03d}_{prompt.replace(' ', '_')}.{args.format}")
    save_grid_png(clips, args.out / "grid.png")
    save_annotated_grid(clips, prompts, args.out / "grid_annotated.png")
    print(f"wrote {len(clips)} clips and grid.png to {args.out}")
    return 0


def evaluate_model(
    bundle: ModelBundle,
    steps: list[int],
    num: int,
    solver: str = "euler",
    cfg_scale: float | None = None,
    seed: int = 0,
    labels: torch.Tensor | None = None,
    shift: float | None = None,
) -> list[dict]:
    """One metrics row per step count (`num` clips balanced over the prompts, or `labels` [num, 3])."""
    labels = balanced_labels(num) if labels is None else labels
    reference = reference_features(cfg=bundle.data)
    rows = []
    # progress in clip-steps (a 50-step clip costs 50 one-step ones), so the ETA holds across step counts
    with tqdm(total=sum(steps) * len(labels), desc="evaluate", unit="clip-step", dynamic_ncols=True) as bar:
        for n in steps:
            start = time.perf_counter()
            clips = generate(bundle, labels, n, cfg_scale=cfg_scale, solver=solver, seed=seed, shift=shift,
                             progress=lambda k, n=n: bar.update(k * n))
            metrics = evaluate_clips(clips, labels, reference=reference, cfg=bundle.data)
            rows.append({"steps": n, "num": num, "solver": solver, **metrics, "wall_s": time.perf_counter() - start})
            log.info("steps=%d acc_all=%.3f fd=%.3f", n, metrics["acc_all"], metrics["fd"])
    return rows


def format_table(rows: list[dict]) -> str:
    cols = ["steps", "acc_all", "acc_shape", "acc_square", "square_fill", "acc_colour", "acc_direction", "fd",
            "smoothness", "diversity"]
    cols += [c for c in ("acc_all_se", "acc_all_binomial_se", "fd_se") if c in rows[0]]  # rows over seeds
    lines = [" | ".join(f"{c:>13}" for c in cols)]
    for r in rows:
        lines.append(" | ".join(f"{r[c]:>13.4g}" if isinstance(r[c], float) else f"{r[c]:>13}" for c in cols))
    return "\n".join(lines)


def evaluate(args) -> int:
    if len(set(args.seed)) != len(args.seed):
        raise ValueError(f"--seed: each seed once, got {args.seed}")
    device = distributed.resolve_device(args.device)
    bundle = ModelBundle.load(args.model, device)
    result = {"model": str(args.model), "device": str(device), "cfg_scale": args.cfg or bundle.cfg_scale,
              "shift": args.shift, "seeds": args.seed}
    per_seed = {}
    for seed in args.seed:
        per_seed[seed] = evaluate_model(bundle, args.steps, args.num, args.solver, args.cfg, seed, shift=args.shift)
        if len(args.seed) > 1:
            print(f"seed {seed}")
        print(format_table(per_seed[seed]))
    if len(args.seed) > 1:
        result["per_seed"] = per_seed
        rows = mean_over_seeds(list(per_seed.values()))
        print(f"mean over seeds {' '.join(map(str, args.seed))} (_se: standard error)\n{format_table(rows)}")
    else:
        rows = per_seed[args.seed[0]]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**result, "rows": rows}, indent=2))
    return 0


def demo(args) -> int:
    path = args.model or SHIPPED_TEACHER
    device = distributed.resolve_device(args.device)
    bundle = ModelBundle.load(path, device)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = evaluate_model(bundle, args.steps, args.num, labels=spread_labels(args.num))
    labels = spread_labels(8)
    prompts = [prompt_for(lab) for lab in labels.tolist()]
    for n in args.steps:
        clips = generate(bundle, labels, n)
        save_annotated_grid(clips, prompts, args.out / f"grid_{n}steps.png")
        save_gif(_tile(clips), args.out / f"clips_{n}steps.gif")
    (args.out / "metrics.json").write_text(json.dumps({"model": str(path), "rows": rows}, indent=2))
    print(format_table(rows))
    print(f"grids, GIFs and metrics.json written to {args.out}")
    return 0


def _tile(clips: torch.Tensor) -> torch.Tensor:
    """[n, 3, T, H, W] -> one [3, T, H, n·W] clip, side by side."""
    return torch.cat(list(clips), dim=-1)
