"""`vdistill` command line: thin entry points over the library (see docs/commands.md for examples).

Every subcommand has `--help`; training commands accept `--dry-run` to print the resolved config.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import traceback
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from vdistill.methods.cli import checks, commands, quickstart, wan_commands
from vdistill.methods.cli.checks import finite_float, positive_float, positive_int
from vdistill.methods.cli.shipped import SHIPPED_TEACHER
from vdistill.methods.train import distributed
from vdistill.methods.train.trainer import TrainingDiverged

log = logging.getLogger("vdistill")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default where it has one, and epilogs (the config option lists) as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "(default" not in text:
            text += " (default: %(default)s)"
        return text


def _add_parser(sub, name: str, **kw) -> argparse.ArgumentParser:
    return sub.add_parser(name, formatter_class=_HelpFormatter, **kw)


SET_HELP = ("config option, repeatable: SECTION.KEY=VALUE (e.g. train.steps=300, train.device=cpu); a bare KEY "
            "when one section has it; listed below with the preset's values")
PRESET_NOTE = "\n\n(values of --preset shapes; --dry-run prints the resolved config of any preset)"


def _add_run_options(p, presets: list[str]) -> None:
    """Options of every training command (pretrain, distill)."""
    p.add_argument("--preset", choices=presets, default="shapes", help="run preset (methods/train/presets.py)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--init", type=Path, help="start from this exported model's weights")
    p.add_argument("--data", type=Path, help="train on the latent shards in this directory (`vdistill prepare`) "
                   "instead of the moving-shapes benchmark")
    p.add_argument("--context-parallel", type=checks.positive_int, metavar="C", help="split each clip's tokens over "
                   "groups of C ranks (torchrun; = --set train.context_parallel=C; docs/multi-gpu.md)")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: continue with settings other than the checkpoint's (recorded in "
                   "OUT/resumes.jsonl); the run's length and logging may always change")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (its checkpoints, logs and exports are deleted first)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def _settings(args) -> list[str]:
    """--set values, with --context-parallel as its train setting."""
    extra = [] if args.context_parallel is None else [f"train.context_parallel={args.context_parallel}"]
    return [*args.set, *extra]


def _add_pretrain(sub) -> None:
    from vdistill.methods.train.config import describe
    from vdistill.methods.train.presets import PRESETS

    p = _add_parser(sub, "pretrain", help="train a rectified-flow teacher on the moving-shapes benchmark",
                    epilog=describe(PRESETS["shapes"]()) + PRESET_NOTE)
    p.add_argument("--out", type=Path, default=Path("runs/teacher"), help="run directory")
    _add_run_options(p, sorted(PRESETS))


def _add_sample(sub) -> None:
    p = _add_parser(sub, "sample", help="sample clips from an exported model (GIFs + a grid PNG), or with --vae a "
                    "latent model's videos (mp4 + GIF)")
    p.add_argument("--model", type=Path, required=True, help="exported .safetensors (e.g. student_ema.safetensors)")
    p.add_argument("--prompt", action="append", help="prompt, repeatable (default: 8 benchmark prompts)")
    p.add_argument("--steps", type=positive_int, default=50, help="sampler steps")
    p.add_argument("--solver", choices=["euler", "heun"], default="euler", help="ODE solver")
    p.add_argument("--cfg", type=finite_float, help="guidance scale (default: the model's)")
    p.add_argument("--shift", type=positive_float,
                   help="time-grid shift (default: the model's; > 1 = more high-noise steps)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--format", choices=["gif", "mp4"], default="gif", help="clip file format")
    p.add_argument("--out", type=Path, default=Path("runs/samples"), help="output directory")
    wan_commands.add_decode_options(p)


def _sample(args) -> int:
    """Benchmark clips, or with --vae a latent model's decoded videos."""
    return (wan_commands.sample_latent_model if args.vae else commands.sample)(args)


def _add_evaluate(sub) -> None:
    p = _add_parser(sub, "evaluate",
                    help="benchmark a model: prompt accuracy, smoothness, diversity, FD per step count")
    p.add_argument("--model", type=Path, required=True, help="exported .safetensors")
    p.add_argument("--steps", type=positive_int, nargs="+", default=[1, 2, 4, 8, 16, 50],
                   help="step counts to evaluate")
    p.add_argument("--num", type=positive_int, default=256,
                   help="clips per step count, cycling through the 72 prompts (a multiple of 72 weighs them equally)")
    p.add_argument("--solver", choices=["euler", "heun"], default="euler", help="ODE solver")
    p.add_argument("--cfg", type=finite_float, help="guidance scale (default: the model's)")
    p.add_argument("--shift", type=positive_float,
                   help="time-grid shift (default: the model's; > 1 = more high-noise steps)")
    p.add_argument("--seed", type=int, nargs="+", default=[0],
                   help="noise seed(s); several: rows per seed, then their mean with standard errors")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--out", type=Path, help="write the results as JSON here")


def _add_tune_times(sub) -> None:
    from vdistill.methods.eval.tune_times import DEFAULT_SHIFTS, TUNING_SEED

    p = _add_parser(sub, "tune-times",
                    help="choose a consistency student's intermediate sampling times on a tuning seed")
    p.add_argument("--model", type=Path, required=True, help="exported consistency/rCM student (.safetensors)")
    p.add_argument("--out", type=Path, required=True, help="tuned copy to write (.safetensors; plus .tuning.json/.png)")
    p.add_argument("--steps", type=positive_int, nargs="+", default=[2], help="step counts to tune (>= 2)")
    p.add_argument("--shifts", type=positive_float, nargs="+", default=list(DEFAULT_SHIFTS),
                   help="grid shifts to try (2 steps: middle RF time shift/(1+shift))")
    p.add_argument("--num", type=positive_int, default=256,
                   help="clips per point, cycling through the 72 prompts (a multiple of 72 weighs them equally)")
    p.add_argument("--seed", type=int, default=TUNING_SEED, help="tuning noise seed (report on another one)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")


def _add_demo(sub) -> None:
    p = _add_parser(sub, "demo", help="the default job: the shipped teacher at many and few steps beside the shipped "
                    "students at few, from the same noise, in one figure and table")
    p.add_argument("--model", type=Path, help="teacher .safetensors (default: the shipped teacher)")
    p.add_argument("--student", type=Path, action="append", default=[],
                   help="a student .safetensors to show too (repeatable; e.g. runs/quickstart/student/student_ema."
                   "safetensors)")
    p.add_argument("--no-shipped", action="store_true", help="leave out the students shipped in models/weights/")
    p.add_argument("--num", type=positive_int, default=8, help="clips per model and step count (the figure shows 8)")
    p.add_argument("--teacher-steps", type=positive_int, nargs="+", default=[50, 4, 2], help="teacher step counts")
    p.add_argument("--student-steps", type=positive_int, nargs="+", default=[1, 2, 4], help="student step counts")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")


def _add_quickstart(sub) -> None:
    quickstart.add_parser(sub, _add_parser, SHIPPED_TEACHER)


def _add_distill(sub) -> None:
    from vdistill.methods.recipes.registry import RECIPES
    from vdistill.methods.train.config import describe
    from vdistill.methods.train.presets import DISTILL_PRESETS, shapes_distill

    p = _add_parser(sub, "distill", help="distil a teacher into a few-step student",
                    description="Distil a teacher into a few-step student. `vdistill distill METHOD --help` lists "
                    "the method's options and the trainer's, with their defaults.")
    methods = p.add_subparsers(dest="method", required=True, metavar="METHOD", help=" | ".join(RECIPES))
    for name, recipe in RECIPES.items():
        m = _add_parser(methods, name, help=(recipe.__doc__ or name).strip().splitlines()[0],
                        epilog=describe(shapes_distill(name)) + PRESET_NOTE)
        m.add_argument("--teacher", type=Path, required=True, help="teacher .safetensors (e.g. the shipped one)")
        m.add_argument("--out", type=Path, required=True, help="run directory")
        m.add_argument("--teacher-cfg", type=positive_float,
                       help="guidance scale of the teacher, baked into the student (default: the teacher's own)")
        _add_run_options(m, sorted(DISTILL_PRESETS))


def _add_plot_evals(sub) -> None:
    p = _add_parser(sub, "plot-evals", help="plot the in-training evaluations of runs against the training step")
    p.add_argument("runs", type=Path, nargs="+", help="run directories trained with --set train.eval_every=N")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--reference", type=finite_float,
                   help="accuracy drawn as a dashed line (e.g. the teacher's 50-step)")
    p.add_argument("--title", help="figure title")


def _plot_evals(args) -> int:
    from vdistill.methods.eval.curves import plot_curves

    checks.output_file(args.out)
    print(plot_curves(args.runs, args.out, reference=args.reference, title=args.title))
    return 0


def _add_export(sub) -> None:
    p = _add_parser(sub, "export", help="write a checkpoint's raw weights or any EMA profile as a model file, or a "
                    "model as a diffusers WanTransformer3DModel directory")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="RUN/checkpoints/step_N.pt (step_N/ of a train.fsdp run)")
    source.add_argument("--model", type=Path, help="a model file (or Wan2.1 directory), with --format diffusers")
    p.add_argument("--format", choices=["vdistill", "diffusers"], default="vdistill",
                   help="vdistill: one .safetensors (from --checkpoint); diffusers: a WanTransformer3DModel directory")
    p.add_argument("--out", type=Path, required=True, help=".safetensors or directory to write (atomically)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--ema-profile", type=int, default=0,
                       help="index into the run's train.ema_sigma_rels (config.json); 0 is what the run exports")
    which.add_argument("--raw", action="store_true", help="the raw student weights instead of an EMA")


def _export(args) -> int:
    from vdistill.methods.train.export import export_checkpoint

    if args.format == "diffusers":
        if args.model is None:
            raise ValueError("--format diffusers exports a --model file; for a checkpoint first run `vdistill export "
                             "--checkpoint CKPT --out MODEL.safetensors`")
        return wan_commands.export_diffusers(args)
    if args.model is not None:
        raise ValueError("--model is exported with --format diffusers (a model file is already a vdistill export)")
    checks.output_file(args.out, suffix=".safetensors")
    meta = export_checkpoint(args.checkpoint, args.out, None if args.raw else args.ema_profile)
    ema = ", ".join(f"{k} {v}" for k, v in meta.items() if k.startswith("ema_"))
    print(f"{args.out}: {meta['recipe']} step {meta['step']}, {'raw weights' if args.raw else ema}")
    return 0


def _add_import_wan(sub) -> None:
    wan_commands.add_import_parser(sub, _add_parser)


def _add_prepare(sub) -> None:
    wan_commands.add_prepare_parser(sub, _add_parser)


def _add_reflow_pairs(sub) -> None:
    p = _add_parser(sub, "reflow-pairs", help="write teacher ODE (noise, sample) pairs to shards for offline ReFlow")
    p.add_argument("--teacher", type=Path, required=True, help="teacher .safetensors")
    p.add_argument("--out", type=Path, required=True, help="shard directory (a rerun keeps existing shards)")
    p.add_argument("--num", "--num-pairs", dest="num", type=positive_int, required=True,
                   help="number of pairs (under torchrun spell it --num-pairs: torchrun reads --num as --numa-binding)")
    p.add_argument("--shard-size", type=positive_int, default=256, help="pairs per shard")
    p.add_argument("--steps", type=positive_int, default=16, help="teacher ODE steps per pair")
    p.add_argument("--solver", choices=["euler", "heun"], default="heun", help="ODE solver")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--batch-size", type=positive_int, default=64, help="clips per teacher batch")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="teacher forward precision (bf16 autocast: faster on CPUs with AMX, slow on AVX2-only ones)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")


def _reflow_pairs(args) -> int:
    from vdistill.methods.data.reflow_pairs import write_pairs
    from vdistill.methods.sampling.generate import ModelBundle

    if not args.teacher.exists():
        raise FileNotFoundError(f"--teacher {args.teacher} does not exist")
    checks.output_dir(args.out)
    teacher = ModelBundle.load(args.teacher, distributed.resolve_device(args.device))
    paths = write_pairs(
        teacher,
        args.out,
        args.num,
        shard_size=args.shard_size,
        steps=args.steps,
        solver=args.solver,
        seed=args.seed,
        batch_size=args.batch_size,
        precision=args.precision,
        source=str(args.teacher),
    )
    print(f"{len(paths)} pair shards in {args.out}; train with: vdistill distill reflow --set method.pairs={args.out}")
    return 0


BENCHMARKS = {  # `vdistill bench NAME`: module whose main(argv) runs it
    "attention": "vdistill.bench.bench_attention",
    "ema": "vdistill.bench.bench_ema",
    "trigflow": "vdistill.bench.bench_trigflow",
    "rcm-step": "vdistill.bench.bench_rcm_step",
    "train-step": "vdistill.bench.bench_train_step",
    "sass-count": "vdistill.bench.sass_count",
    "attention-regs": "vdistill.bench.attention_regs",
    "prepare": "vdistill.bench.bench_prepare",
}


def _add_bench(sub) -> None:
    names = "\n".join(f"  {name:<14} python -m {module}" for name, module in BENCHMARKS.items())
    p = _add_parser(
        sub,
        "bench",
        help="run a benchmark script (attention | ema | trigflow | rcm-step | train-step | sass-count | attention-regs"
        " | prepare)",
        description=f"Run a benchmark; the remaining arguments go to its main(argv).\n\nbenchmarks:\n{names}",
        epilog="e.g. vdistill bench attention --quick --out bench/results; vdistill bench ema --help",
    )
    p.add_argument("name", help="benchmark name: " + " | ".join(BENCHMARKS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark (see NAME --help)")


def _bench(args) -> int:
    if args.name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {args.name!r} (choose from {', '.join(BENCHMARKS)})")
    result = importlib.import_module(BENCHMARKS[args.name]).main(args.args)
    return result if isinstance(result, int) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vdistill", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_pretrain, _add_distill, _add_quickstart, _add_sample, _add_evaluate, _add_tune_times, _add_demo,
                _add_reflow_pairs, _add_bench, _add_plot_evals, _add_export, _add_import_wan, _add_prepare):
        add(sub)
    return parser


def _start(args):
    from vdistill.methods.train.runs import Start

    return Start(resume=args.resume, overwrite=args.overwrite, allow_changes=args.allow_changes)


def _pretrain(args) -> int:
    from vdistill.methods.train.config import apply_overrides
    from vdistill.methods.train.presets import preset
    from vdistill.methods.train.runs import pretrain

    run = apply_overrides(preset(args.preset), _settings(args))
    if args.dry_run:
        print(json.dumps(run.to_dict(), indent=2, default=str))
        return 0
    checks.output_dir(args.out)
    if args.data is not None and not args.data.is_dir():
        raise FileNotFoundError(f"--data {args.data} is not a directory")
    pretrain(run, args.out, _start(args), init=args.init, data_dir=args.data)
    return 0


def _distill(args) -> int:
    from vdistill.methods.train.config import apply_overrides
    from vdistill.methods.train.presets import distill_preset
    from vdistill.methods.train.runs import distill

    run = apply_overrides(distill_preset(args.preset, args.method), _settings(args))
    if args.dry_run:
        print(json.dumps({"method": args.method, **run.to_dict()}, indent=2, default=str))
        return 0
    if not args.teacher.exists():
        raise FileNotFoundError(f"--teacher {args.teacher} does not exist")
    if args.init is not None and not args.init.exists():
        raise FileNotFoundError(f"--init {args.init} does not exist")
    if args.data is not None and not args.data.is_dir():
        raise FileNotFoundError(f"--data {args.data} is not a directory")
    checks.output_dir(args.out)
    distill(args.method, args.teacher, args.out, run, _start(args), init=args.init, teacher_cfg=args.teacher_cfg,
            data_dir=args.data)
    return 0


# the commands that share their work under torchrun
PARALLEL_COMMANDS = ("pretrain", "distill", "reflow-pairs", "prepare")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    handlers = {
        "pretrain": _pretrain,
        "distill": _distill,
        "quickstart": quickstart.quickstart,
        "sample": _sample,
        "evaluate": commands.evaluate,
        "tune-times": commands.tune_times,
        "demo": commands.demo,
        "reflow-pairs": _reflow_pairs,
        "bench": _bench,
        "plot-evals": _plot_evals,
        "export": _export,
        "import-wan": wan_commands.import_wan,
        "prepare": wan_commands.prepare,
    }
    try:
        ranks = distributed.launched_ranks()
        if ranks > 1 and args.command not in PARALLEL_COMMANDS:
            raise ValueError(f"runs as one process, not under torchrun ({ranks} ranks: they would all do the same "
                             f"work and write the same files); under torchrun run {', '.join(PARALLEL_COMMANDS)}")
        # torchrun (WORLD_SIZE > 1): one process group for the command; log lines print above the progress bars
        with distributed.process_group_from_env(), logging_redirect_tqdm():
            return handlers[args.command](args)
    except (ValueError, OSError, TrainingDiverged) as e:  # OSError: files and folders (permissions, full disk)
        if args.verbose:
            traceback.print_exc()
        print(f"vdistill {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
