"""One prepared GPU session: correctness, the moving-shapes teacher and students, and kernel benchmarks.

The lent GPU comes in short leases, so everything that needs it runs from this one script, in
parts that fit one call each (`--part train`, `--part bench`, `--part finetune`). Every step runs
as a subprocess with its own time limit; a failing step is logged and the session goes on.
Outputs land in `--out` ($OUT on the device machine), packed into a few files because only 8
come back:

    summary.txt                 one line per step: status, seconds, log file
    teacher.safetensors         the teacher trained here (part train or finetune without --teacher)
    *_tuned.safetensors         part finetune's students with their tuned sampling times
    train_results.tar.gz        run configs, metrics.jsonl, evaluation JSONs, sample grids, logs
    bench_results.tar.gz        benchmark JSONs (bench/micro's as micro_benchmarks.json) and logs (part bench)
    finetune_results.tar.gz     as train_results, for part finetune

    T=models/weights/shapes-teacher/model.safetensors
    python scripts/device_session.py --part train --out $OUT --teacher $T
    python scripts/device_session.py --part bench --out $OUT --commit <hash>
    python scripts/device_session.py --part finetune --out $OUT --teacher $T

On a machine where vdistill is not installed (the lent GPU has no network for `pip install`), make the
checkout importable as `vdistill` first: `mkdir -p /tmp/vd && ln -sfn $PWD /tmp/vd/vdistill &&
export PYTHONPATH=/tmp/vd` (the repository root is the package; every step's subprocess inherits it).

`--part finetune`: a consistency student (`--distill-seconds`), then rCM started from its export
(`--finetune-seconds`; no tangent warm-up, 2-step backward simulation; `--finetune-set KEY=VALUE`
adds rCM options), then `vdistill tune-times` on both exports (tuning seed 1) and evaluations of the
tuned copies (seeds 0, 2, 3: per seed and the mean); one recipe at a time, each with the whole GPU.

`--eval-points N` adds N in-training evaluations to every distillation run (budget curves in each
run's metrics.jsonl); `--benches attention trigflow` runs a subset of the benchmarks; `--methods rcm
--distill-batch 128` gives one recipe the whole GPU with a larger batch.

The device machine gets the tree without `.git`: pass `--commit $(git rev-parse --short HEAD)` from
the machine that has git (or set `VDISTILL_COMMIT`); every step's subprocess gets it as
`VDISTILL_COMMIT`, which `bench/harness.py` records in the result JSONs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

METHODS = ("reflow", "progressive", "consistency", "rcm")
# Seconds per training step of each recipe with four runs sharing one H200 (measured, clips rendered on
# the CPU; default batch sizes). Used to size each run so that its schedule (progressive stages, rCM
# warm-up) completes inside the time budget.
STEP_S = {"reflow": 1.0, "progressive": 0.27, "consistency": 0.34, "rcm": 0.33}
PROGRESSIVE_STAGE_SHARE = (0.125, 0.125, 0.125, 0.125, 0.2, 0.3)  # 64->32->...->1


class Session:
    def __init__(self, out: Path, work: Path):
        self.out, self.work = out, work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.summary: list[str] = []
        self.env = {"OMP_NUM_THREADS": "4"}  # several runs share 16 cores

    def _record(self, name: str, rc: int | str, seconds: float) -> None:
        line = f"{name:<28} {str(rc):>8} {seconds:7.1f}s  logs/{name}.log"
        self.summary.append(line)
        print(line, flush=True)
        (self.out / "summary.txt").write_text("\n".join(self.summary) + "\n")

    def start(self, name: str, cmd: list[str], env: dict | None = None) -> tuple[str, subprocess.Popen, float]:
        log = (self.logs / f"{name}.log").open("w")
        print(f"[start] {name}: {' '.join(cmd)}", flush=True)
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env, **(env or {})}
        )
        return name, proc, time.perf_counter()

    def wait(self, job: tuple[str, subprocess.Popen, float], timeout: float) -> int | str:
        name, proc, t0 = job
        try:
            rc: int | str = proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = "timeout"
        self._record(name, rc, time.perf_counter() - t0)
        return rc

    def run(self, name: str, cmd: list[str], timeout: float, env: dict | None = None) -> int | str:
        return self.wait(self.start(name, cmd, env), timeout)

    def pack(self, archive: str) -> None:
        with tarfile.open(self.out / archive, "w:gz") as tar:
            for path in sorted(self.work.rglob("*")):
                if path.is_file() and path.suffix not in (".pt", ".safetensors"):
                    tar.add(path, arcname=str(path.relative_to(self.work)))


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vdistill.methods.cli", *args]


def distill_args(
    method: str, distill_s: float, eval_points: int = 0, batch: int | None = None, rcm_warmup: bool = True
) -> list[str]:
    """--steps (and schedule options) so that `method` fits `distill_s` seconds; with eval_points, that
    many in-training evaluations of the EMA student (128 clips at 1/2/4 steps) spread over the run.
    rCM ramps its tangent over the first sixth of the run unless `rcm_warmup` is False.
    `batch` replaces the recipe's default batch size; the step count still assumes STEP_S (right while
    a step is host-bound, as the `shapes` model's are on an H200; train.time_limit_s cuts a slower run)."""
    steps = max(8, int(distill_s / STEP_S[method]))
    args = ["--set", f"train.steps={steps}", "--set", f"train.time_limit_s={distill_s}"]
    if batch is not None:
        args += ["--set", f"train.batch_size={batch}"]
    if eval_points:
        args += ["--set", f"train.eval_every={max(1, steps // eval_points)}", "--set", "train.eval_num=128"]
    if method == "progressive":
        stages = [max(1, round(f * steps)) for f in PROGRESSIVE_STAGE_SHARE]
        args += ["--set", "method.stage_steps=" + ",".join(map(str, stages))]
    if method == "rcm" and rcm_warmup:
        args += ["--set", f"method.tangent_warmup={max(1, steps // 6)}"]
    if method == "reflow":
        args += ["--set", "method.pair_steps=4"]
    return args


def evaluate_cmd(model: Path, steps: list[int], num: int, out: Path, seeds: tuple[int, ...] = (0,)) -> list[str]:
    return cli("evaluate", "--model", str(model), "--steps", *map(str, steps), "--num", str(num), "--out", str(out),
               "--seed", *map(str, seeds))


def evaluate(s: Session, name: str, model: Path, steps: list[int], num: int, out: Path):
    return s.start(name, evaluate_cmd(model, steps, num, out))


def pretrain_teacher(s: Session, args: argparse.Namespace, teacher_dir: Path) -> Path | None:
    """Train the teacher for `--teacher-seconds` (from `--init` if given); its exported EMA weights."""
    cmd = cli("pretrain", "--preset", args.preset, "--out", str(teacher_dir),
              "--set", f"train.time_limit_s={args.teacher_seconds}")
    cmd += ["--init", str(args.init)] if args.init else []
    cmd += [arg for item in args.set for arg in ("--set", item)]
    if s.run("pretrain_teacher", cmd, timeout=args.teacher_seconds + 120) != 0:
        # Keep the session useful if a kernel fails on this GPU: the references are exact, only slower.
        s.env["VDISTILL_KERNELS"] = "reference"
        s.run("pretrain_teacher_reference", cmd, timeout=args.teacher_seconds + 120)
    teacher = teacher_dir / "model_ema.safetensors"
    if not teacher.exists():
        return None
    (s.out / "teacher.safetensors").write_bytes(teacher.read_bytes())
    return teacher


def part_train(s: Session, args: argparse.Namespace) -> None:
    runs = s.work / "runs"
    # GPU tests share the GPU with the teacher run (or its evaluation): they check correctness, they
    # are not timed. The distillation runs are budgeted in seconds, so they start after the tests.
    tests = (
        None
        if args.skip_tests
        else s.start("gpu_tests", [sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "-rs"])
    )
    teacher = args.teacher or pretrain_teacher(s, args, runs / "teacher")
    evals = [] if teacher is None else [
        evaluate(s, "eval_teacher", teacher, [1, 2, 4, 8, 16, 50], args.num, runs / "eval_teacher.json")
    ]
    if tests is not None:
        s.wait(tests, timeout=args.teacher_seconds + 240)  # counted from the tests' start
    if teacher is None:
        return
    jobs = [
        s.start(
            f"distill_{m}",
            cli("distill", m, "--teacher", str(teacher), "--out", str(runs / m),
                *distill_args(m, args.distill_seconds, args.eval_points, args.distill_batch)),
        )
        for m in args.methods
    ]
    for job in jobs:
        s.wait(job, timeout=args.distill_seconds + 150)
    for m in args.methods:
        student = runs / m / "student_ema.safetensors"
        if student.exists():
            evals.append(evaluate(s, f"eval_{m}", student, [1, 2, 4], args.num, runs / f"eval_{m}.json"))
            evals.append(
                s.start(
                    f"sample_{m}",
                    cli("sample", "--model", str(student), "--steps", "2", "--out", str(runs / "samples" / m)),
                )
            )
    evals.append(
        s.start(
            "sample_teacher",
            cli("sample", "--model", str(teacher), "--steps", "50", "--out", str(runs / "samples" / "teacher")),
        )
    )
    for job in evals:
        s.wait(job, timeout=240)


# rCM from a consistency student
FINETUNE_OPTIONS = ("--set", "method.tangent_warmup=0", "--set", "method.max_sim_steps=2")
REPORT_SEEDS = (0, 2, 3)  # tuned students are reported on these; tune-times chooses on its own seed (1)


def finetune_steps(args: argparse.Namespace, teacher: Path, runs: Path) -> list[tuple[str, list[str], float]]:
    """(name, command, timeout) of part finetune, in order; each step reads the previous one's files."""
    consistency, rcm = runs / "consistency", runs / "rcm_finetune"
    steps = [
        ("distill_consistency",
         cli("distill", "consistency", "--teacher", str(teacher), "--out", str(consistency),
             *distill_args("consistency", args.distill_seconds, args.eval_points, args.distill_batch)),
         args.distill_seconds + 150),
        ("distill_rcm_finetune",
         cli("distill", "rcm", "--teacher", str(teacher), "--out", str(rcm),
             "--init", str(consistency / "student_ema.safetensors"), *FINETUNE_OPTIONS,
             *(opt for kv in args.finetune_set for opt in ("--set", kv)),
             *distill_args("rcm", args.finetune_seconds, args.eval_points, args.distill_batch, rcm_warmup=False)),
         args.finetune_seconds + 150),
    ]
    for run in (consistency, rcm):
        tuned = run / "student_tuned.safetensors"
        steps += [
            (f"tune_{run.name}",
             cli("tune-times", "--model", str(run / "student_ema.safetensors"), "--out", str(tuned),
                 "--steps", "2", "4", "--num", str(args.num)),
             240),
            (f"eval_{run.name}_tuned",
             evaluate_cmd(tuned, [1, 2, 4], args.num, runs / f"eval_{run.name}_tuned.json", REPORT_SEEDS),
             240),
        ]
    return steps


def part_finetune(s: Session, args: argparse.Namespace) -> None:
    runs = s.work / "runs"
    teacher = args.teacher or pretrain_teacher(s, args, runs / "teacher")
    if teacher is None:
        return
    for name, cmd, timeout in finetune_steps(args, teacher, runs):
        if s.run(name, cmd, timeout) != 0 and name == "distill_consistency":
            return  # everything after reads its export
    for run in ("consistency", "rcm_finetune"):
        tuned = runs / run / "student_tuned.safetensors"
        if tuned.exists():  # the students come back too (pack leaves weights out)
            (s.out / f"{run}_tuned.safetensors").write_bytes(tuned.read_bytes())


# bench/bench_<name>.py (micro: the pytest-benchmark suite bench/micro) and its time limit
BENCHES = {"attention": 240, "ema": 75, "trigflow": 75, "rcm_step": 420, "micro": 180}
# pytest-benchmark's time per micro case (--quick: a tenth; every case still runs its output check first)
MICRO_SECONDS = {False: 0.25, True: 0.025}


MICRO_SUITE = Path(__file__).resolve().parents[1] / "bench" / "micro"


def part_bench(s: Session, names: list[str], quick: bool) -> None:
    res = s.work / "results"
    res.mkdir(parents=True, exist_ok=True)
    q = ["--quick"] if quick else []
    for name in names:
        if name == "micro":
            cmd = [sys.executable, "-m", "pytest", str(MICRO_SUITE), "-q", "-p", "no:cacheprovider",
                   f"--benchmark-max-time={MICRO_SECONDS[quick]}", f"--benchmark-json={res / 'micro_benchmarks.json'}"]
        else:
            cmd = [sys.executable, "-m", f"vdistill.bench.bench_{name}", "--out", str(res), *q]
        s.run(f"bench_{name}", cmd, timeout=BENCHES[name])


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["train", "bench", "finetune"], required=True,
                   help="which part of the session to run")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "device_out")), help="returned files")
    p.add_argument("--work", type=Path, default=Path("/tmp/vdistill_session"), help="scratch directory")
    p.add_argument("--preset", default="shapes", help="teacher preset (tiny: a CPU dry run of this script)")
    p.add_argument("--teacher", type=Path,
                   help="distil from these exported teacher weights as they are (no teacher training)")
    p.add_argument("--init", type=Path, help="continue the teacher from these exported weights")
    p.add_argument("--skip-tests", action="store_true", help="do not run the GPU tests beside the teacher")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="flow-matching option of the teacher run (vdistill pretrain --set), repeatable")
    p.add_argument("--teacher-seconds", type=float, default=150, help="teacher training time limit")
    p.add_argument("--distill-seconds", type=float, default=100, help="time limit of each distillation run")
    p.add_argument("--finetune-seconds", type=float, default=240,
                   help="time limit of part finetune's rCM run (from the consistency student)")
    p.add_argument("--finetune-set", action="append", default=[], metavar="KEY=VALUE",
                   help="rCM option of part finetune's rCM run (vdistill distill rcm --set), repeatable; "
                   "e.g. p_mean=0.0 moves the sCM time proposal to the 2-step sampler's middle time")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="distillation recipes to run side by side (default: all four)")
    p.add_argument("--distill-batch", type=int, help="batch size of every distillation run (default: each recipe's)")
    p.add_argument("--eval-points", type=int, default=0,
                   help="in-training evaluations per distillation run (budget curves in metrics.jsonl)")
    p.add_argument("--num", type=int, default=256, help="clips per evaluation")
    p.add_argument("--quick", action="store_true",
                   help="benchmarks in their --quick mode (micro: a tenth of the time per case)")
    p.add_argument("--benches", nargs="+", choices=list(BENCHES), default=list(BENCHES),
                   help="benchmarks of part bench (default: all)")
    p.add_argument("--commit", help="commit recorded in the results (default: git, else $VDISTILL_COMMIT)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_arg_parser()
    args = p.parse_args(argv)
    if args.finetune_seconds <= 0:
        p.error(f"--finetune-seconds must be > 0, got {args.finetune_seconds}")
    if args.distill_batch is not None and args.distill_batch < 1:
        p.error(f"--distill-batch must be >= 1, got {args.distill_batch}")
    if args.teacher is not None and not args.teacher.is_file():
        p.error(f"--teacher {args.teacher} does not exist")
    if args.teacher is not None and (args.init or args.set):
        p.error("--teacher is used as it is: --init and --set apply to a teacher trained here")
    if args.finetune_set:  # refused here, not after the consistency run has spent GPU time
        from vdistill.methods.train.config import apply_overrides
        from vdistill.methods.train.presets import distill_preset

        try:
            apply_overrides(distill_preset("shapes", "rcm"), args.finetune_set)
        except ValueError as e:
            p.error(f"--finetune-set: {e}")
    args.out.mkdir(parents=True, exist_ok=True)
    s = Session(args.out, args.work / args.part)
    import torch

    from vdistill.bench.harness import git_commit

    commit = args.commit or git_commit()
    if commit != "unknown":
        s.env["VDISTILL_COMMIT"] = commit
    info = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "torch": torch.__version__,
            "commit": commit}
    s.summary.append(json.dumps(info))
    try:
        if args.part == "train":
            part_train(s, args)
        elif args.part == "finetune":
            part_finetune(s, args)
        else:
            part_bench(s, args.benches, args.quick)
    finally:
        s.pack(f"{args.part}_results.tar.gz")
    print("\n".join(s.summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
