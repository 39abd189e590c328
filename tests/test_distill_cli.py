"""`vdistill distill` and `vdistill reflow-pairs` end to end on a tiny teacher (CPU), and bad input:
clear errors and no partial files."""

import hashlib
import json

import pytest
import torch
from distill_helpers import one_thread  # noqa: F401
from safetensors.torch import load_file

from vdistill.methods.cli.main import main
from vdistill.methods.data.shards import read_shard, write_shard
from vdistill.methods.recipes.registry import recipe_class
from vdistill.methods.train.checkpoint import (
    checksum_path,
    list_checkpoints,
    read_weights_meta,
)
from vdistill.methods.train.logs import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

def _distill(method, teacher, out, *extra):
    """The tiny preset: 3 steps of batch 2 on the CPU, each recipe's cheapest schedule (seconds)."""
    return main(["distill", method, "--teacher", str(teacher), "--out", str(out), "--preset", "tiny", *extra])


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    assert main(["pretrain", "--preset", "tiny", "--set", "train.steps=2", "--set", "train.batch_size=2",
                 "--out", str(out)]) == 0
    return out / "model_ema.safetensors"


@pytest.mark.parametrize("method", ["reflow", "progressive", "consistency"])
def test_distill_then_evaluate(method, teacher, tmp_path):
    out = tmp_path / method
    assert _distill(method, teacher, out) == 0
    meta = read_weights_meta(out / "student_ema.safetensors")
    assert meta["recipe"] == method and meta["step"] == 3 and meta["run_config"]["cfg_scale"] == 1.0
    assert meta["sampler"]["kind"] == ("consistency" if method == "consistency" else "ode")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and torch.isfinite(torch.tensor(rows[-1]["loss"]))
    result = tmp_path / "eval.json"
    args = ["evaluate", "--model", str(out / "student_ema.safetensors"), "--steps", "1", "2", "--num", "8"]
    assert main([*args, "--device", "cpu", "--out", str(result)]) == 0
    assert [r["steps"] for r in json.loads(result.read_text())["rows"]] == [1, 2]


def test_repeated_rectification_and_resume(teacher, tmp_path):
    first = tmp_path / "reflow1"
    assert _distill("reflow", teacher, first) == 0
    second = tmp_path / "reflow2"  # 2-rectified flow: the 1-rectified student is the teacher
    assert _distill("reflow", first / "student_ema.safetensors", second) == 0
    assert read_weights_meta(second / "student_ema.safetensors")["run_config"]["teacher_cfg_scale"] == 1.0
    assert _distill("reflow", teacher, first, "--set", "train.steps=4", "--resume") == 0
    steps = [json.loads(line)["step"] for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the tiny preset logs every step; the resumed call adds step 4 only


def test_offline_pairs(teacher, tmp_path):
    pairs = tmp_path / "pairs"
    args = ["reflow-pairs", "--teacher", str(teacher), "--out", str(pairs), "--num", "5", "--shard-size", "2"]
    assert main([*args, "--steps", "2", "--device", "cpu"]) == 0
    shards = sorted(p.name for p in pairs.iterdir())
    assert shards == ["pairs_00000.safetensors", "pairs_00001.safetensors", "pairs_00002.safetensors"]
    last = read_shard(pairs / shards[2])
    (pairs / shards[2]).unlink()  # an interrupted run: a rerun writes the missing shard again, identically
    assert main([*args, "--steps", "2", "--device", "cpu"]) == 0
    assert sorted(p.name for p in pairs.iterdir()) == shards
    again = read_shard(pairs / shards[2])
    assert torch.equal(again[0], last[0]) and torch.equal(again[1], last[1]) and again[3] == last[3]
    assert last[0].shape[:2] == (1, 6)  # 5 pairs in shards of 2; [noise, data] along the 3 channels
    out = tmp_path / "student"
    assert _distill("reflow", teacher, out, "--set", f"pairs={pairs}") == 0
    assert (out / "student_ema.safetensors").is_file()


def test_bf16_pairs_are_close_to_fp32_and_say_so(teacher, tmp_path):
    args = ["reflow-pairs", "--teacher", str(teacher), "--num", "4", "--steps", "2", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "fp32")]) == 0
    assert main([*args, "--out", str(tmp_path / "bf16"), "--precision", "bf16"]) == 0
    full, *_, full_meta = read_shard(tmp_path / "fp32" / "pairs_00000.safetensors")
    half, *_, half_meta = read_shard(tmp_path / "bf16" / "pairs_00000.safetensors")
    assert (full_meta["extra"]["precision"], half_meta["extra"]["precision"]) == ("fp32", "bf16")
    assert half.dtype == torch.float32 and torch.equal(half[:, :3], full[:, :3])  # same noise
    err = (half[:, 3:] - full[:, 3:]).abs().max().item()
    assert 0 < err < 0.1  # bf16 forwards: not bit-identical, but the same samples up to rounding


def test_pairs_of_another_geometry_are_refused(teacher, tmp_path, capsys):
    write_shard(tmp_path / "pairs" / "p.safetensors", torch.zeros(4, 6, 2, 8, 8), torch.zeros(4, 8, 32))
    out = tmp_path / "student"
    assert _distill("reflow", teacher, out, "--set", f"pairs={tmp_path / 'pairs'}") == 2
    assert "holds latents_shape [6, 2, 8, 8]" in capsys.readouterr().err
    assert not out.exists()  # refused before the run directory is made
    write_shard(tmp_path / "pairs" / "p.safetensors", torch.zeros(4, 6, 4, 16, 16), torch.zeros(4, 8, 32))
    assert _distill("reflow", teacher, out, "--set", f"pairs={tmp_path / 'pairs'}") == 2
    assert "holds text_shape [8, 32]" in capsys.readouterr().err
    assert not out.exists()


def test_unknown_method_missing_and_corrupt_teacher(teacher, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:  # argparse: the methods are subcommands
        main(["distill", "dmd9", "--teacher", str(teacher), "--out", str(out)])
    assert exc.value.code == 2
    assert "invalid choice: 'dmd9'" in (err := capsys.readouterr().err) and "'rcm'" in err
    with pytest.raises(ValueError, match="unknown distillation method 'dmd9'"):  # the Python entry point
        recipe_class("dmd9")
    assert _distill("reflow", tmp_path / "none.safetensors", out) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage")
    assert _distill("consistency", bad, out) == 2
    assert "corrupt" in capsys.readouterr().err
    assert _distill("progressive", teacher, out, "--set", "teacher_steps=12") == 2
    assert "power of two" in capsys.readouterr().err
    assert not out.exists()


def test_consistency_student_is_not_a_teacher(teacher, tmp_path, capsys):
    cd = tmp_path / "cd"
    assert _distill("consistency", teacher, cd) == 0
    assert _distill("progressive", cd / "student_ema.safetensors", tmp_path / "pd") == 2
    assert "must be a flow (ODE) model" in capsys.readouterr().err
    assert not (tmp_path / "pd").exists()


def test_resume_refuses_corrupt_checkpoint_and_other_setup(teacher, tmp_path, capsys):
    out = tmp_path / "run"
    assert _distill("consistency", teacher, out) == 0
    before = _files(out)
    assert _distill("consistency", teacher, out, "--set", "train.steps=5", "--set", "intervals=8", "--resume") == 2
    assert "method_config.intervals: 4 -> 8" in capsys.readouterr().err
    assert _distill("progressive", teacher, out, "--set", "train.steps=5", "--resume", "--allow-changes") == 2
    assert "another network, data geometry or recipe (method: 'consistency' -> 'progressive'" in capsys.readouterr().err
    for path in list_checkpoints(out):  # garbage with a matching checksum: loading reaches the unpickler
        path.write_bytes(b"\x00truncated")
        checksum_path(path).write_text(hashlib.sha256(path.read_bytes()).hexdigest())
    assert _distill("consistency", teacher, out, "--set", "train.steps=5", "--resume") == 2
    assert "corrupt" in capsys.readouterr().err
    assert _files(out) == before  # nothing new, nothing half-written


@pytest.mark.parametrize("method", ["reflow", "consistency"])
def test_in_training_evaluation_is_logged_and_changes_nothing(method, teacher, tmp_path):
    assert _distill(method, teacher, tmp_path / "plain") == 0
    scored = ("--set", "train.eval_every=2", "--set", "train.eval_num=4")
    assert _distill(method, teacher, tmp_path / "scored", *scored) == 0
    rows = read_metrics(tmp_path / "scored")
    scored = [r for r in rows if "eval_acc_all_2" in r]
    assert [r["step"] for r in scored] == [2]
    assert set(scored[0]) == {"step"} | {f"eval_{k}_{n}" for k in ("acc_all", "fd") for n in (1, 2, 4)}
    assert 0 <= scored[0]["eval_acc_all_2"] <= 1 and scored[0]["eval_fd_2"] > 0
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert losses == [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "plain")]
    for name in ("student.safetensors", "student_ema.safetensors"):  # evaluation draws no training randomness
        plain, with_eval = load_file(tmp_path / "plain" / name), load_file(tmp_path / "scored" / name)
        assert all(torch.equal(plain[k], with_eval[k]) for k in plain)


def test_bad_evaluation_options(teacher, tmp_path, capsys):
    assert _distill("reflow", teacher, tmp_path / "a", "--set", "train.eval_every=-1") == 2
    assert "eval_every must be >= 0" in capsys.readouterr().err
    assert _distill("reflow", teacher, tmp_path / "b", "--set", "train.eval_every=2", "--set", "train.eval_num=0") == 2
    assert "eval_num must be >= 1" in capsys.readouterr().err


def test_init_starts_the_student_from_another_student(teacher, tmp_path, capsys):
    from vdistill.methods.train.checkpoint import load_dit, save_weights

    other, _ = load_dit(teacher)  # another student: the teacher's weights moved by noise
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    start = tmp_path / "other.safetensors"
    save_weights(start, other)
    out = tmp_path / "reflow_from_cd"
    assert _distill("reflow", teacher, out, "--init", str(start), "--set", "train.lr=1e-12") == 0
    init, trained, base = load_file(start), load_file(out / "student.safetensors"), load_file(teacher)
    assert all(torch.allclose(trained[k], init[k], rtol=0, atol=1e-8) for k in init)
    assert max((init[k] - base[k]).abs().max() for k in init) > 1e-3  # not the teacher's weights
    assert read_weights_meta(out / "student_ema.safetensors")["run_config"]["init"] == str(start)
    assert _distill("reflow", teacher, out, "--set", "train.steps=5", "--resume") == 2  # resume keeps the same start
    assert f"init: {str(start)!r} -> None" in capsys.readouterr().err


def test_missing_or_mismatched_init_is_refused(teacher, tmp_path, capsys):
    from vdistill.methods.train.checkpoint import save_weights
    from vdistill.models.dit import build_dit

    out = tmp_path / "out"
    assert _distill("reflow", teacher, out, "--init", str(tmp_path / "none.safetensors")) == 2
    assert "--init" in capsys.readouterr().err
    wider = tmp_path / "wider.safetensors"
    save_weights(wider, build_dit("tiny", dim=64))
    assert _distill("reflow", teacher, out, "--init", str(wider)) == 2
    err = capsys.readouterr().err
    assert "--init" in err and "differs" in err
    assert not out.exists()


def test_teacher_cfg_is_baked_in_recorded_and_checked(teacher, tmp_path, capsys):
    own = read_weights_meta(teacher)["run_config"].get("cfg_scale", 3.0)
    assert _distill("consistency", teacher, tmp_path / "own") == 0
    assert _distill("consistency", teacher, tmp_path / "strong", "--teacher-cfg", str(own + 2)) == 0
    meta = read_weights_meta(tmp_path / "strong" / "student_ema.safetensors")["run_config"]
    assert (meta["teacher_cfg_scale"], meta["cfg_scale"]) == (own + 2, 1.0)
    assert read_metrics(tmp_path / "strong")[-1]["loss"] != read_metrics(tmp_path / "own")[-1]["loss"]
    changed = ("--set", "train.steps=5", "--resume", "--teacher-cfg", "9")
    assert _distill("consistency", teacher, tmp_path / "own", *changed) == 2
    assert f"teacher_cfg_scale: {own} -> 9.0" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        _distill("consistency", teacher, tmp_path / "bad", "--teacher-cfg", "0")
    assert "argument --teacher-cfg: expected a number > 0, got '0'" in capsys.readouterr().err
    pairs = tmp_path / "pairs"  # pairs made at the teacher's own guidance do not fit another one
    assert main(["reflow-pairs", "--teacher", str(teacher), "--out", str(pairs), "--num", "2", "--steps", "1",
                 "--device", "cpu"]) == 0
    assert _distill("reflow", teacher, tmp_path / "rf", "--set", f"pairs={pairs}", "--teacher-cfg", str(own + 2)) == 2
    assert "generated with guidance" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and _files(tmp_path / "rf") == []


def test_reflow_pairs_warn_about_emulated_cpu_bf16(teacher, tmp_path, monkeypatch, caplog):
    from vdistill.methods.train import trainer

    monkeypatch.setattr(trainer, "cpu_bf16_is_native", lambda: False)
    for precision in ("fp32", "bf16"):
        args = ["reflow-pairs", "--teacher", str(teacher), "--out", str(tmp_path / precision), "--num", "1"]
        with caplog.at_level("WARNING", logger="vdistill"):
            assert main([*args, "--steps", "1", "--device", "cpu", "--precision", precision]) == 0
        warned = any("emulated" in r.getMessage() for r in caplog.records)
        assert warned == (precision == "bf16")
        caplog.clear()


@pytest.fixture(scope="module")
def consistency_run(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "cd"
    assert _distill("consistency", teacher, out) == 0
    return out


def test_export_writes_any_ema_profile_or_the_raw_weights_of_a_checkpoint(consistency_run, tmp_path, capsys):
    out = consistency_run
    ckpt = out / "checkpoints" / "step_00000003.pt"
    exported = {}
    for name, which in (("ema0", ["--ema-profile", "0"]), ("ema1", ["--ema-profile", "1"]), ("raw", ["--raw"])):
        exported[name] = tmp_path / f"{name}.safetensors"
        assert main(["export", "--checkpoint", str(ckpt), "--out", str(exported[name]), *which]) == 0
    # profile 0 and the raw weights are what the run itself exported, bit for bit and with the same metadata
    for name, own in (("ema0", "student_ema"), ("raw", "student")):
        mine, theirs = load_file(exported[name]), load_file(out / f"{own}.safetensors")
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
        assert read_weights_meta(exported[name]) == read_weights_meta(out / f"{own}.safetensors")
    # profile 1 is the checkpoint's longer average, recorded as such, and samples like the run's export
    ema = torch.load(ckpt, weights_only=False)["ema"]
    longer = load_file(exported["ema1"])
    assert all(torch.equal(longer[k], v.float()) for k, v in ema["ema"][1].items())
    assert any(not torch.equal(longer[k], v) for k, v in load_file(exported["ema0"]).items())
    meta = read_weights_meta(exported["ema1"])
    assert meta["ema_sigma_rel"] == ema["profiles"][1]["sigma_rel"] != ema["profiles"][0]["sigma_rel"]
    assert meta["sampler"] == read_weights_meta(out / "student_ema.safetensors")["sampler"]
    result = tmp_path / "eval.json"
    args = ["evaluate", "--model", str(exported["ema1"]), "--steps", "2", "--num", "4", "--device", "cpu"]
    assert main([*args, "--out", str(result)]) == 0


def test_export_refuses_bad_profiles_and_missing_checkpoints(consistency_run, tmp_path, capsys):
    out = consistency_run
    ckpt, target = out / "checkpoints" / "step_00000003.pt", tmp_path / "x.safetensors"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(target), "--ema-profile", "2"]) == 2
    assert "--ema-profile must be in [0, 2)" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(target)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not target.exists()
