"""bench/device_session.py: the distillation arguments it sizes for a time budget (no GPU needed)."""

import pytest

from bench import device_session as ds


def test_distill_args_fit_the_budget_and_pass_the_batch():
    args = ds.distill_args("rcm", 100, eval_points=4, batch=128)
    steps = int(args[args.index("--steps") + 1])
    assert steps == int(100 / ds.STEP_S["rcm"])
    assert args[args.index("--batch-size") + 1] == "128"
    assert args[args.index("--eval-every") + 1] == str(steps // 4)
    assert "tangent_warmup=" + str(steps // 6) in args
    assert "--batch-size" not in ds.distill_args("consistency", 100)


def test_progressive_stages_cover_the_run():
    args = ds.distill_args("progressive", 200)
    stages = [int(n) for n in args[args.index("--set") + 1].removeprefix("stage_steps=").split(",")]
    assert len(stages) == len(ds.PROGRESSIVE_STAGE_SHARE)
    assert abs(sum(stages) - int(args[args.index("--steps") + 1])) <= len(stages)


@pytest.mark.parametrize("argv,match", [
    (["--part", "train", "--distill-batch", "0"], "--distill-batch"),
    (["--part", "train", "--methods", "dmd"], "--methods"),
])
def test_bad_arguments_are_refused_by_name(argv, match, capsys, tmp_path):
    with pytest.raises(SystemExit):
        ds.main([*argv, "--out", str(tmp_path)])
    assert match in capsys.readouterr().err
