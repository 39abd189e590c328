"""What a newcomer sees: the demo says what it does and writes valid JSON and labelled GIFs; commands name the
files they wrote; a long CPU run warns with an estimate."""

import json
import logging
from pathlib import Path

import pytest
from distill_helpers import one_thread  # noqa: F401
from PIL import Image

from vdistill.methods.cli.commands import named_paths
from vdistill.methods.cli.main import main
from vdistill.methods.cli.shipped import shipped_students
from vdistill.methods.eval.evaluate import to_json
from vdistill.methods.train import trainer as trainer_module
from vdistill.methods.train.logs import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny_teacher_file):
    return tiny_teacher_file


def _strict_json(text):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_to_json_writes_non_finite_numbers_as_null():
    assert _strict_json(to_json({"a": float("nan"), "b": [1.0, float("inf")], "c": (2, "x")})) == {
        "a": None, "b": [1.0, None], "c": [2, "x"]}


def test_demo_compares_teacher_and_students_with_valid_json_and_a_labelled_gif(model, tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--model", str(model), "--student", str(model), "--no-shipped", "--num", "3", "--teacher-steps",
            "2", "1", "--student-steps", "1", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("vdistill demo: sampling the teacher") and "1 student (model_ema) at 1" in printed
    assert "key: acc_all" in printed and "speed-up" in printed
    report = _strict_json((out / "metrics.json").read_text())  # diversity is NaN with one clip per prompt
    assert [(r["model"], r["steps"]) for r in report["rows"]] == [("teacher", 2), ("teacher", 1), ("model_ema", 1)]
    assert report["students"] == {"model_ema": str(model)} and report["rows"][0]["diversity"] is None
    assert report["rows"][0]["speedup"] == 1.0 and all(0 < r["sample_s"] < r["wall_s"] for r in report["rows"])
    assert all(r["s_per_clip"] == r["sample_s"] / 3 for r in report["rows"]) and "speed-up" in report["key"]
    for name in ("comparison.png", "comparison.gif", "metrics.json"):
        assert str(out / name) in printed, name
    gif = Image.open(out / "comparison.gif")
    assert gif.size[0] == 3 * (16 * 4 + 4) + 4 and gif.size[1] > 3 * (16 * 4 + 4) + 4  # 3 columns, 3 prompts
    assert gif.n_frames >= 2
    rgb = gif.convert("RGB")
    assert rgb.getpixel((1, 1)) == (96, 96, 96) and rgb.getpixel((6, 6)) == (255, 255, 255)  # gap, title strip


def test_demo_without_students_says_how_to_get_one(model, tmp_path, capsys):
    assert main(["demo", "--model", str(model), "--no-shipped", "--num", "2", "--teacher-steps", "1", "--device",
                 "cpu", "--out", str(tmp_path)]) == 0
    assert "(no students: pass --student" in capsys.readouterr().out


def test_students_from_the_command_line_are_named_by_file():
    paths = [Path("a/student_ema.safetensors"), Path("b/student_ema.safetensors"), Path("c/tuned.safetensors"),
             Path("d/teacher.safetensors")]
    assert named_paths(paths, taken=("teacher",)) == {
        "a/student_ema": paths[0], "b/student_ema": paths[1], "tuned": paths[2], "d/teacher": paths[3]}


def test_shipped_students_are_the_folders_with_a_student_lineage(tmp_path):
    for name, role in (("shapes-teacher", "teacher"), ("shapes-cd", "student"), ("shapes-rcm", "student")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "lineage.json").write_text(json.dumps({"role": role}))
        (tmp_path / name / "model.safetensors").write_bytes(b"")
    assert shipped_students(tmp_path) == {n: tmp_path / f"shapes-{n}" / "model.safetensors" for n in ("cd", "rcm")}
    (tmp_path / "shapes-rcm" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="shapes-rcm/model.safetensors is missing"):
        shipped_students(tmp_path)
    (tmp_path / "shapes-rcm" / "lineage.json").write_text("{")
    with pytest.raises(ValueError, match="shapes-rcm/lineage.json: not a valid lineage file"):
        shipped_students(tmp_path)


def test_sample_names_the_files_it_wrote(model, tmp_path, capsys):
    assert main(["sample", "--model", str(model), "--steps", "1", "--device", "cpu", "--out", str(tmp_path),
                 "--prompt", "a red circle moving left"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 1 clip (000_a_red_circle_moving_left.gif), grid.png and grid_annotated.png" in printed
    assert (tmp_path / "grid_annotated.png").exists()


def test_a_long_cpu_run_warns_with_an_estimate(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(trainer_module, "LONG_RUN_S", 0.0)
    args = ["pretrain", "--preset", "tiny", "--set", "train.steps=6"]
    with caplog.at_level(logging.WARNING, logger="vdistill"):
        assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "per step on this CPU the remaining 2 steps take about" in caplog.text
    assert "train.time_limit_s" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vdistill"):
        assert main([*args, "--set", "train.time_limit_s=600", "--out", str(tmp_path / "b")]) == 0
    assert "per step on this CPU" not in caplog.text


def test_quickstart_distils_and_compares_at_tiny_size(model, tmp_path, capsys):
    args = ["quickstart", "--teacher", str(model), "--set", "train.steps=2", "--set", "train.batch_size=2",
            "--num", "4", "--device", "cpu", "--out", str(tmp_path)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = _strict_json((tmp_path / "metrics.json").read_text())
    assert [(r["model"], r["steps"]) for r in report["rows"]] == [
        (m, n) for m in ("teacher", "student") for n in (1, 2, 4)]
    assert report["student"] == str(tmp_path / "student" / "student_ema.safetensors")
    assert f"wrote {tmp_path / 'comparison.png'}, {tmp_path / 'comparison.gif'}" in printed
    assert (tmp_path / "comparison.png").exists() and "vdistill demo --student" in printed
    assert main(args) == 0  # a second quickstart replaces its student
    assert [r["step"] for r in read_metrics(tmp_path / "student")] == [2]  # one run's log, not two


def test_every_shipped_student_loads_and_says_where_it_came_from():
    """Each models/weights student: loads with its sampler, names the shipped teacher by path and hash, the
    commands that made it, and a 256-clip evaluation that the demo quotes."""
    import hashlib

    from vdistill.methods.cli.shipped import SHIPPED_TEACHER, stored_evaluation
    from vdistill.methods.sampling.generate import ModelBundle

    students = shipped_students()
    assert students, "no student is shipped in models/weights/"
    teacher_hash = hashlib.sha256(SHIPPED_TEACHER.read_bytes()).hexdigest()
    for name, path in students.items():
        lineage = json.loads((path.parent / "lineage.json").read_text())
        assert lineage["teacher_sha256"] == teacher_hash and lineage["commands"], name
        bundle = ModelBundle.load(path)
        assert bundle.meta["sampler"] == lineage["sampler"] and bundle.cfg_scale == 1.0  # guidance baked in
        rows = stored_evaluation(path)
        assert [r["steps"] for r in rows] == [1, 2, 4] and all(r["num"] == 256 for r in rows), name
    assert [r["steps"] for r in stored_evaluation(SHIPPED_TEACHER)][-1] == 50
    assert stored_evaluation(Path("runs/x/student_ema.safetensors")) is None
