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
from vdistill.methods.data.shapes import prompt_for
from vdistill.methods.eval.evaluate import METRIC_KEY, evaluate_model, to_json
from vdistill.methods.recipes.consistency import ConsistencyConfig
from vdistill.methods.sampling.generate import ModelBundle, spread_labels
from vdistill.methods.sampling.media import save_comparison
from vdistill.methods.train import distributed
from vdistill.methods.train.config import apply_overrides
from vdistill.methods.train.presets import DistillRun
from vdistill.methods.train.runs import Start, distill
from vdistill.methods.train.trainer import TrainConfig

COMPARED_STEPS = (1, 2, 4)
SHOWN = 8  # prompts in the figure


def quickstart_run(minutes: float, device: str) -> DistillRun:
    """The quickstart's distillation: up to 60 steps of batch 16, as many as `minutes` allow (26 on a 2-core CPU)."""
    train = TrainConfig(steps=60, batch_size=16, lr=1e-4, warmup_steps=20, log_every=5, ckpt_every=25,
                        time_limit_s=minutes * 60, device=device)
    return DistillRun(train, ConsistencyConfig(target_decay=0.95))


def compare(models: dict[str, ModelBundle], steps: tuple[int, ...], num: int, out: Path) -> list[dict]:
    """Sample every model at every step count from the same noise and prompts; score `num` clips each and
    draw the first SHOWN side by side (OUT/comparison.png); returns the table rows."""
    labels = spread_labels(num)
    columns = {}
    rows = []
    for name, bundle in models.items():
        def keep(n: int, clips: torch.Tensor, name: str = name) -> None:
            columns[f"{name}, {n} step{'s' if n > 1 else ''}"] = clips[:SHOWN]

        rows += [{"model": name, **row, "s_per_clip": row["wall_s"] / num}  # sampling and scoring
                 for row in evaluate_model(bundle, list(steps), num, labels=labels, on_clips=keep)]
    save_comparison(columns, [prompt_for(lab) for lab in labels[:SHOWN].tolist()], out / "comparison.png")
    return rows


def _table(rows: list[dict]) -> str:
    lines = [f"{'model':>8} | {'steps':>5} | {'acc_all':>7} | {'fd':>6} | {'s/clip':>6}"]
    lines += [f"{r['model']:>8} | {r['steps']:>5} | {r['acc_all']:>7.3f} | {r['fd']:>6.2f} | {r['s_per_clip']:>6.3f}"
              for r in rows]
    return "\n".join(lines)


def quickstart(args) -> int:
    checks.output_dir(args.out)
    run = apply_overrides(quickstart_run(args.minutes, args.device), args.set)
    student_dir = args.out / "student"
    print(f"vdistill quickstart: distilling {args.teacher} into a consistency student in {student_dir} for up to "
          f"{run.train.time_limit_s / 60:.1f} min (batch {run.train.batch_size}), then sampling teacher and "
          f"student at {', '.join(map(str, COMPARED_STEPS))} steps from the same noise ({args.num} clips each)")
    paths = distill("consistency", args.teacher, student_dir, run, Start(overwrite=True))
    device = distributed.resolve_device(args.device)
    models = {"teacher": ModelBundle.load(args.teacher, device), "student": ModelBundle.load(paths["ema"], device)}
    with torch.no_grad():
        rows = compare(models, COMPARED_STEPS, args.num, args.out)
    report = args.out / "metrics.json"
    report.write_text(to_json({"teacher": str(args.teacher), "student": str(paths["ema"]), "rows": rows,
                               "key": METRIC_KEY}))
    print(_table(rows))
    print(f"key: {METRIC_KEY}; s/clip: seconds per clip, sampling and scoring")
    print(f"wrote {args.out / 'comparison.png'}, {report} and the student {paths['ema']}")
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
