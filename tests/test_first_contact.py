"""What a newcomer sees: the demo says what it does and writes valid JSON and labelled GIFs; commands name the
files they wrote; a long CPU run warns with an estimate."""

import json
import logging

import pytest
from distill_helpers import one_thread  # noqa: F401
from PIL import Image

from vdistill.methods.cli.main import main
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


def test_demo_explains_itself_and_writes_valid_json_and_labelled_gifs(model, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(model), "--num", "6", "--steps", "1", "2", "--device", "cpu",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("vdistill demo: sampling") and "key: acc_all" in printed
    report = _strict_json((out / "metrics.json").read_text())  # diversity is NaN with one clip per prompt
    assert [r["steps"] for r in report["rows"]] == [1, 2] and report["rows"][0]["diversity"] is None
    assert all(r["s_per_clip"] > 0 for r in report["rows"]) and "acc_all" in report["key"]
    for name in ("grid_1steps.png", "grid_2steps.png", "clips_1steps.gif", "clips_2steps.gif", "metrics.json"):
        assert str(out / name) in printed, name
    gif = Image.open(out / "clips_2steps.gif")
    assert gif.size[0] == 4 * (16 * 4 + 4) + 4 and gif.size[1] > 2 * (16 * 4 + 4) + 4  # 6 clips, 4 a row, titles
    assert gif.n_frames >= 2
    rgb = gif.convert("RGB")
    assert rgb.getpixel((1, 1)) == (96, 96, 96) and rgb.getpixel((6, 6)) == (255, 255, 255)  # gap, title strip


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
    assert f"wrote {tmp_path / 'comparison.png'}" in printed and (tmp_path / "comparison.png").exists()
    assert main(args) == 0  # a second quickstart replaces its student
    assert [r["step"] for r in read_metrics(tmp_path / "student")] == [2]  # one run's log, not two
