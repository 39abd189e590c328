"""scripts/device_session.py: the distillation arguments it sizes for a time budget (no GPU needed)."""

import json
from pathlib import Path

import device_session as ds
import pytest


def test_help_names_the_parts(capsys):
    with pytest.raises(SystemExit) as exc:
        ds.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(part in out for part in ("train", "bench", "finetune"))


def _settings(args: list[str]) -> dict[str, str]:
    """{key: value} of the `--set key=value` pairs in a command line."""
    return dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--set")


def test_distill_args_fit_the_budget_and_pass_the_batch():
    sets = _settings(ds.distill_args("rcm", 100, eval_points=4, batch=128))
    steps = int(sets["train.steps"])
    assert steps == int(100 / ds.STEP_S["rcm"])
    assert sets["train.batch_size"] == "128"
    assert sets["train.eval_every"] == str(steps // 4)
    assert sets["method.tangent_warmup"] == str(steps // 6)
    assert "train.batch_size" not in _settings(ds.distill_args("consistency", 100))


def test_progressive_stages_cover_the_run():
    sets = _settings(ds.distill_args("progressive", 200))
    stages = [int(n) for n in sets["method.stage_steps"].split(",")]
    assert len(stages) == len(ds.PROGRESSIVE_STAGE_SHARE)
    assert abs(sum(stages) - int(sets["train.steps"])) <= len(stages)


@pytest.mark.parametrize("argv,match", [
    (["--part", "train", "--distill-batch", "0"], "--distill-batch"),
    (["--part", "train", "--methods", "dmd"], "--methods"),
    (["--part", "finetune", "--finetune-seconds", "0"], "--finetune-seconds"),
    (["--part", "finetune", "--finetune-set", "p_mean"], "--finetune-set"),
    (["--part", "finetune", "--finetune-set", "p_men=0.0"], "no option 'p_men'"),
    (["--part", "finetune", "--finetune-set", "max_sim_steps=0"], "max_sim_steps must be >= 1"),
])
def test_bad_arguments_are_refused_by_name(argv, match, capsys, tmp_path):
    with pytest.raises(SystemExit):
        ds.main([*argv, "--out", str(tmp_path)])
    assert match in capsys.readouterr().err


def test_finetune_chains_consistency_rcm_and_tuned_evaluations(tmp_path, capsys):
    from vdistill.methods.cli.main import build_parser, main

    args = ds.build_arg_parser().parse_args(
        ["--part", "finetune", "--eval-points", "2", "--distill-batch", "64", "--num", "32",
         "--finetune-set", "p_mean=0.0", "--finetune-set", "dmd_weight=0.05"]
    )
    teacher, runs = tmp_path / "teacher.safetensors", tmp_path / "runs"
    steps = ds.finetune_steps(args, teacher, runs)
    commands = {name: cmd[3:] for name, cmd, _ in steps}  # [python, -m, vdistill.methods.cli, ...]
    for cmd in commands.values():
        build_parser().parse_args(cmd)  # every command is one the CLI accepts
    rcm = commands["distill_rcm_finetune"]
    assert rcm[rcm.index("--init") + 1] == str(runs / "consistency" / "student_ema.safetensors")
    assert _settings(rcm)["train.batch_size"] == "64"
    assert main([*rcm, "--dry-run"]) == 0
    resolved = json.loads(capsys.readouterr().out)["method"]
    assert (resolved["tangent_warmup"], resolved["max_sim_steps"]) == (0, 2)
    assert (resolved["p_mean"], resolved["dmd_weight"]) == (0.0, 0.05)
    for run in ("consistency", "rcm_finetune"):
        tune, evaluate = commands[f"tune_{run}"], commands[f"eval_{run}_tuned"]
        assert tune[tune.index("--model") + 1] == str(runs / run / "student_ema.safetensors")
        assert evaluate[evaluate.index("--model") + 1] == tune[tune.index("--out") + 1]
        report_seeds, tuning_seed = build_parser().parse_args(evaluate).seed, build_parser().parse_args(tune).seed
        assert len(report_seeds) > 1 and tuning_seed not in report_seeds
    order = [name for name, _, _ in steps]
    assert order.index("distill_consistency") < order.index("distill_rcm_finetune") < order.index("tune_rcm_finetune")


def test_bench_part_runs_the_micro_suite_with_pytest(tmp_path, monkeypatch):
    ran = {}

    def record(self, name, cmd, timeout):
        ran[name] = cmd
        return 0

    monkeypatch.setattr(ds.Session, "run", record)
    s = ds.Session(tmp_path / "out", tmp_path / "work")
    ds.part_bench(s, ["micro", "ema"], quick=True)
    micro = ran["bench_micro"]
    assert micro[1:3] == ["-m", "pytest"] and (Path(micro[3]) / "conftest.py").is_file()
    assert f"--benchmark-json={s.work / 'results' / 'micro_benchmarks.json'}" in micro
    assert f"--benchmark-max-time={ds.MICRO_SECONDS[True]}" in micro  # --quick shortens each case
    ds.part_bench(s, ["micro"], quick=False)
    assert f"--benchmark-max-time={ds.MICRO_SECONDS[False]}" in ran["bench_micro"]
    assert ran["bench_ema"][1:] == ["-m", "vdistill.bench.bench_ema", "--out", str(s.work / "results"), "--quick"]
