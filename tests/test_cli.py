"""The `vdistill` CLI end to end on the tiny preset (CPU, seconds)."""

import json

import pytest
import torch

from vdistill.methods.cli.main import main
from vdistill.methods.sampling.generate import ModelBundle, balanced_labels, generate


def test_dry_run_prints_resolved_config(capsys):
    assert main(["pretrain", "--preset", "shapes", "--set", "train.steps=7", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["train"]["steps"] == 7 and cfg["model"]["dim"] == 192


def test_pretrain_training_switches(capsys):
    assert main(["pretrain", "--preset", "tiny", "--dry-run"]) == 0
    train = json.loads(capsys.readouterr().out)["train"]
    assert not train["activation_checkpointing"] and train["profile_window"] is None
    assert main(["pretrain", "--preset", "tiny", "--set", "train.activation_checkpointing=true",
                 "--set", "train.profile_window=2,4", "--dry-run"]) == 0
    train = json.loads(capsys.readouterr().out)["train"]
    assert train["activation_checkpointing"] and train["profile_window"] == [2, 4]


def test_pretrain_set_overrides_the_flow_options(capsys):
    argv = ["pretrain", "--preset", "tiny", "--set", "logit_mean=1.5", "--set", "train.precision=bf16", "--dry-run"]
    assert main(argv) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["method"]["logit_mean"] == 1.5 and cfg["train"]["precision"] == "bf16"
    assert main(["pretrain", "--preset", "tiny", "--set", "logit_std=0", "--dry-run"]) == 2
    assert "logit_std must be > 0" in capsys.readouterr().err
    assert main(["pretrain", "--preset", "tiny", "--set", "warmup=3", "--dry-run"]) == 2
    assert "no option 'warmup'" in capsys.readouterr().err


def test_distill_dry_run_takes_the_training_overrides(capsys):
    argv = ["distill", "progressive", "--teacher", "t.safetensors", "--out", "r", "--set", "train.precision=bf16",
            "--set", "train.batch_size=8", "--set", "teacher_steps=8", "--set", "method.stage_steps=300", "--dry-run",
            "--set", "train.activation_checkpointing=true", "--set", "train.profile_window=5,7",
            "--set", "train.tensorboard=true", "--set", "train.grad_accum=4"]
    assert main(argv) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["train"]["precision"] == "bf16" and cfg["train"]["batch_size"] == 8
    assert cfg["train"]["activation_checkpointing"] and cfg["train"]["tensorboard"]
    assert cfg["train"]["profile_window"] == [5, 7] and cfg["train"]["grad_accum"] == 4
    assert main([*argv, "--set", "train.grad_accum=3"]) == 2  # does not divide the batch of 8
    assert "grad_accum 3 must divide batch_size 8" in capsys.readouterr().err
    assert cfg["method"]["teacher_steps"] == 8 and cfg["method"]["stage_steps"] == [300]


def test_unknown_preset_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):  # argparse refuses a preset outside the choices, naming them
        main(["pretrain", "--preset", "huge"])
    assert "invalid choice: 'huge'" in (err := capsys.readouterr().err) and "shapes" in err and "tiny" in err


def test_single_process_commands_refuse_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun --nproc_per_node 2 sets
    assert main(["evaluate", "--model", str(tmp_path / "none.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "vdistill evaluate: error: runs as one process, not under torchrun (2 ranks" in err
    assert "pretrain, distill, reflow-pairs" in err


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["evaluate", "--model", str(tmp_path / "none.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["pretrain", "--preset", "tiny", "--set", "train.steps=4", "--out", str(out)]) == 0
    assert (out / "config.json").exists() and (out / "metrics.jsonl").exists()
    return out / "model_ema.safetensors"


def test_sample_writes_clips_and_grids(tiny_model, tmp_path):
    out = tmp_path / "samples"
    assert (
        main(
            [
                "sample",
                "--model",
                str(tiny_model),
                "--steps",
                "2",
                "--prompt",
                "a red circle moving left",
                "--prompt",
                "a blue square moving up",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.glob("*.gif")) == [
        "000_a_red_circle_moving_left.gif",
        "001_a_blue_square_moving_up.gif",
    ]
    assert (out / "grid.png").stat().st_size > 0


def test_sample_rejects_unknown_words(tiny_model, tmp_path, capsys):
    assert (
        main(["sample", "--model", str(tiny_model), "--prompt", "a red dragon moving left", "--out", str(tmp_path)])
        == 2
    )
    assert "dragon" in capsys.readouterr().err


def test_evaluate_writes_rows(tiny_model, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(tiny_model), "--steps", "1", "2", "--num", "8", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["steps"] for r in rows] == [1, 2]
    assert all(0 <= r["acc_all"] <= 1 for r in rows)


def test_evaluate_over_several_seeds_averages_the_single_seed_runs(tiny_model, tmp_path, capsys):
    args = ["evaluate", "--model", str(tiny_model), "--steps", "1", "--num", "8"]
    singles = []
    for seed in (0, 3):
        assert main([*args, "--seed", str(seed), "--out", str(tmp_path / f"seed{seed}.json")]) == 0
        singles.append(json.loads((tmp_path / f"seed{seed}.json").read_text())["rows"][0])
    assert main([*args, "--seed", "0", "3", "--out", str(tmp_path / "both.json")]) == 0
    both = json.loads((tmp_path / "both.json").read_text())
    def metrics(row):
        return {key: value for key, value in row.items() if key not in ("wall_s", "sample_s")}  # timings

    assert both["seeds"] == [0, 3]
    assert [metrics(r[0]) for r in both["per_seed"].values()] == [metrics(r) for r in singles]
    assert both["rows"][0]["fd"] == pytest.approx((singles[0]["fd"] + singles[1]["fd"]) / 2)
    assert both["rows"][0]["fd_se"] == pytest.approx(abs(singles[0]["fd"] - singles[1]["fd"]) / 2)
    assert "mean over seeds 0 3" in capsys.readouterr().out
    assert main([*args, "--seed", "1", "1"]) == 2
    assert "--seed: each seed once" in capsys.readouterr().err


def test_shift_changes_the_sampler_grid_and_must_be_positive(tiny_model):
    bundle = ModelBundle.load(tiny_model)
    labels = balanced_labels(2)
    default = generate(bundle, labels, 3)
    assert torch.equal(generate(bundle, labels, 3, shift=1.0), default)  # the teacher exports shift 1
    assert not torch.allclose(generate(bundle, labels, 3, shift=3.0), default)
    with pytest.raises(ValueError, match="shift must be a finite number > 0"):
        generate(bundle, labels, 3, shift=0.0)


@pytest.mark.parametrize(
    "name, own_option",
    [("attention", "--dtype"), ("ema", "--tiny"), ("trigflow", "--no-compile"), ("rcm-step", "--providers"),
     ("train-step", "--runs"), ("sass-count", "--arch"),
     ("attention-regs", "--head-dims")],
)
def test_bench_forwards_args_to_the_script(name, own_option, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert own_option in out and "usage: vdistill" not in out  # the benchmark's parser answered


def test_bench_help_lists_the_benchmarks(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    names = ["attention", "ema", "trigflow", "rcm-step", "train-step", "sass-count", "attention-regs"]
    assert all(name in out for name in names)


def test_bench_unknown_name_is_a_clear_error(capsys):
    assert main(["bench", "flash"]) == 2
    assert "unknown benchmark 'flash'" in capsys.readouterr().err


@pytest.mark.parametrize("paths", [{"absolute_positions": True}, {"absolute_positions": True, "pooled_text": True}])
def test_init_grows_optional_paths_and_refuses_other_changes(tiny_model, tmp_path, paths):
    from dataclasses import replace

    import torch

    from vdistill.methods.train.checkpoint import init_from, load_dit
    from vdistill.models.dit import build_dit

    start, _ = load_dit(tiny_model)
    grown = build_dit(replace(start.cfg, **paths))
    init_from(grown, tiny_model)
    x, time, text = torch.randn(2, 3, 4, 16, 16), torch.rand(2), torch.randn(2, 8, start.cfg.text_dim)
    with torch.no_grad():
        assert torch.equal(grown(x, time, text), start(x, time, text))
    with pytest.raises(ValueError, match="--init .* differs"):
        init_from(build_dit("tiny", dim=64), tiny_model)
    # a grown model cannot start a model without its paths (their weights would be lost)
    from vdistill.methods.train.checkpoint import save_weights

    grown_file = tmp_path / "grown.safetensors"
    save_weights(grown_file, grown)
    with pytest.raises(ValueError, match="--init .* differs"):
        init_from(start, grown_file)
