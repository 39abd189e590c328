"""Budget curves (`vdistill plot-evals`): in-training evaluation rows read back and plotted."""

from __future__ import annotations

import json

from vdistill.methods.cli.main import main
from vdistill.methods.eval.curves import load_curves


def _run(path, rows):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_curves_are_read_per_sampling_step_and_plotted(tmp_path):
    run = _run(tmp_path / "rcm", [
        {"step": 10, "loss": 0.5},
        {"step": 10, "eval_acc_all_1": 0.3, "eval_fd_1": 9.0, "eval_acc_all_2": 0.6, "eval_fd_2": 5.0},
        {"step": 20, "loss": 0.4},
        {"step": 20, "eval_acc_all_1": 0.4, "eval_fd_1": 8.0, "eval_acc_all_2": 0.7, "eval_fd_2": 4.0},
    ])
    curves = load_curves(run)
    assert list(curves) == [1, 2]
    assert curves[2] == {"acc_all": [(10, 0.6), (20, 0.7)], "fd": [(10, 5.0), (20, 4.0)]}
    other = _run(tmp_path / "consistency", [{"step": 5, "eval_acc_all_4": 0.8, "eval_fd_4": 2.0}])
    png = tmp_path / "fig" / "curves.png"
    assert main(["plot-evals", str(run), str(other), "--out", str(png), "--reference", "0.93"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_runs_without_evaluations_are_refused_by_name(tmp_path, capsys):
    plain = _run(tmp_path / "plain", [{"step": 1, "loss": 0.5}])
    assert main(["plot-evals", str(plain), "--out", str(tmp_path / "x.png")]) == 2
    assert "plain" in (err := capsys.readouterr().err) and "train.eval_every" in err
    assert main(["plot-evals", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    broken = _run(tmp_path / "broken", [])
    (broken / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "eval_acc_all_1"\n')
    assert main(["plot-evals", str(broken), "--out", str(tmp_path / "x.png")]) == 2
    assert "line 2: not JSON" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_runs_with_the_same_name_keep_their_own_lines(tmp_path, monkeypatch):
    from vdistill.methods.eval import curves as eval_curves

    rows = [{"step": 1, "eval_acc_all_2": 0.5, "eval_fd_2": 3.0}]
    a, b = _run(tmp_path / "a", []), _run(tmp_path / "b", [])
    runs = [_run(a / "rcm", rows), _run(b / "rcm", rows)]
    labels = []
    real_save = eval_curves.save_figure

    def record(fig, out):
        labels.extend(line.get_label() for ax in fig.axes for line in ax.get_lines())
        return real_save(fig, out)

    monkeypatch.setattr(eval_curves, "save_figure", record)
    eval_curves.plot_curves(runs, tmp_path / "c.png")
    assert {str(runs[0]), str(runs[1])} <= set(labels)
