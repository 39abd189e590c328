"""`vdistill tune-times` on a tiny consistency student (CPU): the tuned copy stores the sweep's best
times, sampling uses them by default, and bad input is refused before anything is written."""

import json

import pytest
import torch
from distill_helpers import one_thread  # noqa: F401
from safetensors.torch import load_file

from vdistill.methods.cli.main import main
from vdistill.methods.eval.tune_times import best_rows
from vdistill.methods.sampling.generate import ModelBundle, balanced_labels, generate
from vdistill.methods.sampling.samplers import consistency_times
from vdistill.methods.train.checkpoint import read_weights_meta

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    tiny = ["--preset", "tiny", "--set", "train.steps=2", "--set", "train.batch_size=2"]
    assert main(["pretrain", *tiny, "--out", str(root / "t")]) == 0
    teacher = root / "t" / "model_ema.safetensors"
    assert main(["distill", "consistency", "--teacher", str(teacher), "--out", str(root / "cd"), *tiny]) == 0
    return teacher, root / "cd" / "student_ema.safetensors"


def _tune(model, out, *extra):
    return main(["tune-times", "--model", str(model), "--out", str(out), "--num", "6", "--device", "cpu", *extra])


def test_tuned_copy_stores_the_best_times_and_sampling_uses_them(models, tmp_path):
    _, student = models
    out = tmp_path / "tuned.safetensors"
    assert _tune(student, out, "--steps", "2", "3", "--shifts", "0.5", "2", "3") == 0
    report = json.loads(out.with_suffix(".tuning.json").read_text())
    assert [(r["steps"], r["shift"]) for r in report["rows"]] == [(n, s) for n in (2, 3) for s in (0.5, 2, 3)]
    best = best_rows(report["rows"])
    times = read_weights_meta(out)["sampler"]["times"]
    for n in (2, 3):
        assert times[str(n)] == pytest.approx(consistency_times(n, best[n]["shift"]))
    assert times["1"] == read_weights_meta(student)["sampler"]["times"]["1"]  # untuned counts are kept
    assert out.with_suffix(".tuning.png").stat().st_size > 0
    source, tuned = load_file(student), load_file(out)
    assert all(torch.equal(source[k], tuned[k]) for k in source)
    labels = balanced_labels(4)
    cpu = torch.device("cpu")
    by_default = generate(ModelBundle.load(out, cpu), labels, 2, seed=5)
    by_shift = generate(ModelBundle.load(student, cpu), labels, 2, seed=5, shift=best[2]["shift"])
    assert torch.equal(by_default, by_shift)


def test_best_row_is_the_most_accurate_then_the_lowest_fd():
    rows = [
        {"steps": 2, "shift": 0.5, "acc_all": 0.70, "fd": 1.0},
        {"steps": 2, "shift": 1.0, "acc_all": 0.80, "fd": 3.0},
        {"steps": 2, "shift": 2.0, "acc_all": 0.80, "fd": 2.0},
        {"steps": 4, "shift": 1.0, "acc_all": 0.90, "fd": 2.0},
    ]
    assert {n: r["shift"] for n, r in best_rows(rows).items()} == {2: 2.0, 4: 1.0}


@pytest.mark.parametrize(
    ("which", "extra", "message"),
    [
        ("teacher", [], "samples with the 'ode' sampler"),
        ("student", ["--steps", "1"], "--steps must be step counts >= 2"),
        ("student", ["--shifts", "1", "0"], "argument --shifts: expected a number > 0, got '0'"),
        ("student", ["--num", "0"], "argument --num: expected an integer >= 1, got '0'"),
    ],
)
def test_bad_input_is_refused_and_writes_nothing(models, tmp_path, capsys, which, extra, message):
    teacher, student = models
    out = tmp_path / "tuned.safetensors"
    try:
        code = _tune(teacher if which == "teacher" else student, out, *extra)
    except SystemExit as e:  # refused by the argument parser
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_out_must_not_overwrite_the_model(models, capsys):
    _, student = models
    before = student.read_bytes()
    assert _tune(student, student) == 2
    assert "--out must differ from --model" in capsys.readouterr().err
    assert student.read_bytes() == before
