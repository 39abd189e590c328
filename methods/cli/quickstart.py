"""`vdistill quickstart`: distil the shipped teacher into a few-step consistency student on this machine (7
minutes by default; a 2-core CPU is enough), then sample teacher and student from the same noise and prompts at
1, 2 and 4 steps and show them side by side: one labelled figure, a table and `metrics.json`.

The recipe is consistency distillation at batch 16 with a short warm-up and an EMA target of decay 0.95: on a
2-core CPU its 26 steps in 7 min beat the teacher at every step count (README;
bench/results/quickstart_cpu_20261204.json).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vdistill.methods.cli import checks
from vdistill.methods.eval.compare import SPEED_KEY, compare, format_comparison, save_figures
from vdistill.methods.eval.evaluate import METRIC_KEY, to_json
from vdistill.methods.recipes.consistency import ConsistencyConfig
from vdistill.methods.sampling.generate import ModelBundle
from vdistill.methods.train import distributed
from vdistill.methods.train.config import apply_overrides
from vdistill.methods.train.presets import DistillRun
from vdistill.methods.train.runs import Start, distill
from vdistill.methods.train.trainer import TrainConfig

COMPARED_STEPS = (1, 2, 4)


def quickstart_run(minutes: float, device: str) -> DistillRun:
    """The quickstart's distillation: up to 60 steps of batch 16, as many as `minutes` allow (26 on a 2-core CPU)."""
    train = TrainConfig(steps=60, batch_size=16, lr=1e-4, warmup_steps=20, log_every=5, ckpt_every=25,
                        time_limit_s=minutes * 60, device=device)
    return DistillRun(train, ConsistencyConfig(target_decay=0.95))


def quickstart(args) -> int:
    checks.output_dir(args.out)
    run = apply_overrides(quickstart_run(args.minutes, args.device), args.set)
    student_dir = args.out / "student"
    print(f"vdistill quickstart: distilling {args.teacher} into a consistency student in {student_dir} for up to "
          f"{run.train.time_limit_s / 60:.1f} min (batch {run.train.batch_size}), then sampling teacher and "
          f"student at {', '.join(map(str, COMPARED_STEPS))} steps from the same noise ({args.num} clips each)")
    paths = distill("consistency", args.teacher, student_dir, run, Start(overwrite=True))
    device = distributed.resolve_device(args.device)
    models = {name: (ModelBundle.load(path, device), COMPARED_STEPS)
              for name, path in (("teacher", args.teacher), ("student", paths["ema"]))}
    with torch.no_grad():
        rows, columns, prompts = compare(models, args.num)
    written = save_figures(columns, prompts, args.out)
    report = args.out / "metrics.json"
    report.write_text(to_json({"teacher": str(args.teacher), "student": str(paths["ema"]), "rows": rows,
                               "key": f"{METRIC_KEY}; {SPEED_KEY}"}))
    print(format_comparison(rows))
    print(f"key: {METRIC_KEY}; {SPEED_KEY}")
    print(f"wrote {', '.join(map(str, written))}, {report} and the student {paths['ema']}; show it beside the teacher "
          f"at 50 steps: vdistill demo --student {paths['ema']}")
    return 0


def add_parser(sub, add_parser_fn, shipped_teacher: Path) -> None:
    """The `quickstart` subcommand (`add_parser_fn`: the CLI's parser factory)."""
    p = add_parser_fn(sub, "quickstart", help="distil a student from the shipped teacher in minutes and compare them")
    p.add_argument("--teacher", type=Path, default=shipped_teacher, help="teacher .safetensors")
    p.add_argument("--minutes", type=checks.positive_float, default=7.0, help="distillation time limit")
    p.add_argument("--num", type=checks.positive_int, default=64, help="clips per model and step count")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the distillation's config (e.g. train.batch_size=32)")
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"),
                   help="output directory (its student/ is replaced on each run)")
