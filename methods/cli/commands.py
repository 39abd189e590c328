"""What the `vdistill` subcommands do (the CLI module only parses arguments)."""

from __future__ import annotations

from pathlib import Path

import torch

from vdistill.methods.cli import checks
from vdistill.methods.cli.shipped import SHIPPED_TEACHER, shipped_students, stored_evaluation
from vdistill.methods.data.shapes import parse_prompt, prompt_for
from vdistill.methods.eval.compare import SPEED_KEY, compare, format_comparison, save_figures
from vdistill.methods.eval.evaluate import METRIC_KEY, evaluate_model, format_table, mean_over_seeds, to_json
from vdistill.methods.eval.tune_times import plot_sweep, sweep, write_tuned
from vdistill.methods.sampling.generate import ModelBundle, generate, spread_labels
from vdistill.methods.sampling.media import (
    save_annotated_grid,
    save_gif,
    save_grid_png,
    save_mp4,
)
from vdistill.methods.train import distributed


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
    teacher = args.model or SHIPPED_TEACHER
    checks.output_dir(args.out)
    device = distributed.resolve_device(args.device)
    shipped = {} if args.no_shipped else shipped_students()
    students = shipped | named_paths(args.student, taken=("teacher", *shipped))
    models = {"teacher": (ModelBundle.load(teacher, device), args.teacher_steps)}
    models |= {name: (ModelBundle.load(path, device), args.student_steps) for name, path in students.items()}
    what = "the shipped moving-shapes teacher" if args.model is None else f"the teacher {teacher}"
    with_students = (f" and {len(students)} student{'s' if len(students) > 1 else ''} ({', '.join(students)}) at "
                     f"{'/'.join(map(str, args.student_steps))}" if students else
                     " (no students: pass --student, e.g. the one `vdistill quickstart` writes)")
    print(f"vdistill demo: sampling {what} at {'/'.join(map(str, args.teacher_steps))} Euler steps{with_students}, "
          f"{args.num} clips each from the same noise and prompts, scored by the benchmark's exact evaluator; "
          f"side by side in {args.out}/")
    with torch.no_grad():
        rows, columns, prompts = compare(models, args.num)
    written = save_figures(columns, prompts, args.out)
    shown = {"teacher": (teacher, args.teacher_steps), **{n: (p, args.student_steps) for n, p in students.items()}}
    stored = {name: [r for r in rows_ if r["steps"] in steps] for name, (path, steps) in shown.items()
              if (rows_ := stored_evaluation(path))}
    report = args.out / "metrics.json"
    report.write_text(to_json({"teacher": str(teacher), "students": {k: str(v) for k, v in students.items()},
                               "rows": rows, "stored_evaluations_256_clips": stored,
                               "key": f"{METRIC_KEY}; {SPEED_KEY}"}))
    print(format_comparison(rows))
    if stored:  # a few clips are a picture, not a measurement: say what the shipped models score at 256
        print(stored_summary(stored, args.num))
    print(f"key: {METRIC_KEY}; {SPEED_KEY}")
    print("wrote " + ", ".join(str(p) for p in [*written, report]))
    return 0


def stored_summary(stored: dict[str, list[dict]], num: int) -> str:
    """One line: the sampling error of `num` clips, and the stored 256-clip scores of the shipped models."""
    def scores(rows: list[dict]) -> str:
        return ", ".join(f"{r['steps']} step{'s' * (r['steps'] > 1)} {r['acc_all']:.3f} / {r['fd']:.2f}" for r in rows)

    return (f"{num} clips are ±{0.5 / num ** 0.5:.2f} in accuracy; the shipped models' stored evaluations (256 clips, "
            "seed 0), acc_all / fd: " + "; ".join(f"{name} {scores(rows)}" for name, rows in stored.items()))


def named_paths(paths: list[Path], taken: tuple[str, ...] = ()) -> dict[str, Path]:
    """{name: path} for models given on the command line: the file stem, with its folder where the stem repeats or
    is one of the `taken` names."""
    stems = [p.stem for p in paths]
    return {(stem if stems.count(stem) == 1 and stem not in taken else f"{p.parent.name}/{stem}"): p
            for stem, p in zip(stems, paths)}


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
