"""What the `vdistill` subcommands do (the CLI module only parses arguments)."""

from __future__ import annotations

from pathlib import Path

import torch

from vdistill.methods.cli import checks
from vdistill.methods.data.shapes import parse_prompt, prompt_for
from vdistill.methods.eval.evaluate import METRIC_KEY, evaluate_model, format_table, mean_over_seeds, to_json
from vdistill.methods.eval.tune_times import plot_sweep, sweep, write_tuned
from vdistill.methods.sampling.generate import ModelBundle, generate, spread_labels
from vdistill.methods.sampling.media import (
    save_annotated_grid,
    save_gif,
    save_grid_png,
    save_labelled_gif,
    save_mp4,
)
from vdistill.methods.train import distributed

SHIPPED_TEACHER = Path(__file__).resolve().parents[2] / "models" / "weights" / "shapes-teacher" / "model.safetensors"


def sample(args) -> int:
    checks.output_dir(args.out)
    labels = torch.tensor([parse_prompt(p) for p in args.prompt]) if args.prompt else spread_labels(8)
    prompts = [prompt_for(lab) for lab in labels.tolist()]  # canonical: no tabs or odd spacing in file names
    bundle = ModelBundle.load(args.model, distributed.resolve_device(args.device))
    clips = generate(bundle, labels, args.steps, cfg_scale=args.cfg, solver=args.solver, seed=args.seed,
                     shift=args.shift)
    args.out.mkdir(parents=True, exist_ok=True)
    save = save_gif if args.format == "gif" else save_mp4
    files = [save(clip, args.out / f"{i:03d}_{prompt.replace(' ', '_')}.{args.format}")
             for i, (clip, prompt) in enumerate(zip(clips, prompts))]
    save_grid_png(clips, args.out / "grid.png")
    save_annotated_grid(clips, prompts, args.out / "grid_annotated.png")
    clip_files = files[0].name + (f" ... {files[-1].name}" if len(files) > 1 else "")
    print(f"wrote {len(clips)} clip{'s' if len(clips) > 1 else ''} ({clip_files}), grid.png and grid_annotated.png "
          f"to {args.out}")
    return 0


def evaluate(args) -> int:
    if len(set(args.seed)) != len(args.seed):
        raise ValueError(f"--seed: each seed once, got {args.seed}")
    if args.out is not None:
        checks.output_file(args.out)
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
        args.out.write_text(to_json({**result, "rows": rows}))
        print(f"wrote {args.out}")
    return 0


def demo(args) -> int:
    path = args.model or SHIPPED_TEACHER
    checks.output_dir(args.out)
    device = distributed.resolve_device(args.device)
    bundle = ModelBundle.load(path, device)
    shown = min(8, args.num)
    what = "the shipped moving-shapes teacher" if args.model is None else str(path)
    print(f"vdistill demo: sampling {what} at {' and '.join(map(str, args.steps))} Euler steps, {args.num} clips "
          f"per step count from the same noise and prompts, scored by the benchmark's exact evaluator; the first "
          f"{shown} as labelled grids and GIFs in {args.out}/")
    labels = spread_labels(args.num)
    prompts = [prompt_for(lab) for lab in labels.tolist()][:shown]
    written = []

    def draw(n: int, clips: torch.Tensor) -> None:
        written.append(save_annotated_grid(clips[:shown], prompts, args.out / f"grid_{n}steps.png"))
        written.append(save_labelled_gif(clips[:shown], prompts, args.out / f"clips_{n}steps.gif"))

    rows = [{**row, "s_per_clip": row["wall_s"] / args.num}  # sampling and scoring
            for row in evaluate_model(bundle, args.steps, args.num, labels=labels, on_clips=draw)]
    report = args.out / "metrics.json"
    report.write_text(to_json({"model": str(path), "rows": rows, "key": METRIC_KEY}))
    print(format_table(rows))
    print(f"key: {METRIC_KEY}")
    print("wrote " + ", ".join(str(p) for p in [*written, report]))
    return 0


def tune_times(args) -> int:
    """The `vdistill tune-times` command."""
    if args.out.resolve() == args.model.resolve():
        raise ValueError("--out must differ from --model (the untuned export is kept)")
    checks.output_file(args.out, suffix=".safetensors")
    bundle = ModelBundle.load(args.model, distributed.resolve_device(args.device))
    rows = sweep(bundle, args.steps, args.shifts, args.num, args.seed)
    chosen = write_tuned(bundle, args.model, args.out, rows)
    report = args.out.with_suffix(".tuning.json")
    report.write_text(to_json({"model": str(args.model), "chosen": chosen, "rows": rows}, indent=1))
    plot_sweep(rows, args.out.with_suffix(".tuning.png"))
    for n, times in chosen.items():
        print(f"{n} steps: times {', '.join(f'{t:.3f}' for t in times)}")
    print(f"wrote {args.out}, {report.name} and the plot; report it with: vdistill evaluate --model {args.out}")
    return 0
