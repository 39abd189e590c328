"""Run folders and checkpoints: one run per folder, resumes that say what changed, checksummed checkpoints with
a fallback to the newest valid one, no stale temporaries, exports that respect the umask."""

import json
import logging
import os
import stat

import pytest
import torch
from distill_helpers import one_thread  # noqa: F401
from safetensors.torch import load_file

from vdistill.methods.cli.main import main
from vdistill.methods.train import checkpoint as ckpt
from vdistill.methods.train.logs import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def _pretrain(out, steps, *extra):
    """The tiny preset for `steps` steps, a checkpoint every 2 (seconds on a CPU)."""
    args = ["pretrain", "--preset", "tiny", "--out", str(out), "--set", f"train.steps={steps}",
            "--set", "train.ckpt_every=2"]
    return main([*args, *extra])


def _contents(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _flip_byte(path, at=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


# ---- a new run in a used folder ----------------------------------------------------------------------------
def test_new_run_in_a_used_folder_is_refused_and_overwrite_replaces_it(tmp_path, capsys):
    """The issue's reproduction: a 6-step run, then a 2-step run in the same folder (was: metrics wiped, the new
    checkpoints pruned as older), then a resume (was: the old step 6)."""
    out = tmp_path / "run"
    assert _pretrain(out, 6) == 0
    before = _contents(out)
    assert _pretrain(out, 2) == 2
    err = capsys.readouterr().err
    assert "already holds a run (checkpoints up to step 6)" in err and "--overwrite" in err
    assert _contents(out) == before
    (out / "notes.txt").write_text("mine")
    assert _pretrain(out, 2, "--overwrite") == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000002.pt"]
    assert (out / "notes.txt").read_text() == "mine"  # not the run's: kept
    assert _pretrain(out, 4, "--resume") == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]


def test_resume_needs_a_checkpoint_and_excludes_overwrite(tmp_path, capsys):
    assert _pretrain(tmp_path / "none", 2, "--resume") == 2
    assert "no checkpoint in" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    assert _pretrain(tmp_path / "x", 2, "--resume", "--overwrite") == 2
    assert "exclude each other" in capsys.readouterr().err
    assert _pretrain(tmp_path / "y", 2, "--allow-changes") == 2
    assert "--resume only" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert _pretrain(tmp_path / "file", 2) == 2
    assert "is a file" in capsys.readouterr().err


def test_resume_with_changed_settings_is_refused_unless_allowed_and_recorded(tmp_path, capsys):
    out = tmp_path / "run"
    assert _pretrain(out, 2) == 0
    before = _contents(out)
    assert _pretrain(out, 4, "--resume", "--set", "train.lr=5e-4") == 2
    err = capsys.readouterr().err
    assert "train.lr: 0.001 -> 0.0005" in err and "--allow-changes" in err
    assert _pretrain(out, 4, "--resume", "--set", "model.layers=3", "--allow-changes") == 2
    assert "another network" in capsys.readouterr().err
    assert _contents(out) == before
    assert _pretrain(out, 4, "--resume", "--set", "train.lr=5e-4", "--allow-changes") == 0
    assert _pretrain(out, 6, "--resume", "--set", "train.lr=5e-4") == 0  # the length may always change
    records = [json.loads(line) for line in (out / "resumes.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert records[0]["changed"] == {"train.lr": [0.001, 0.0005], "train.steps": [2, 4]}
    assert records[1]["changed"] == {"train.steps": [4, 6]}
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == 0.0005


def test_resume_past_the_configured_steps_is_refused(tmp_path, capsys):
    assert _pretrain(tmp_path, 4) == 0
    assert _pretrain(tmp_path, 2, "--resume") == 2
    assert "at step 4, past train.steps=2" in capsys.readouterr().err


# ---- checksums, fallback, stale temporaries -------------------------------------------------------------
def test_damaged_newest_checkpoint_falls_back_to_the_newest_valid_one(tmp_path, caplog):
    """A flipped byte in the step-4 checkpoint (was: resumed silently, the EMA exported at 1e37): the checksum
    fails, the run resumes from step 2 with a warning, and ends where an undisturbed run ends."""
    assert _pretrain(tmp_path / "full", 6) == 0
    out = tmp_path / "cut"
    assert _pretrain(out, 4) == 0
    newest = ckpt.checkpoint_path(out, 4)
    _flip_byte(newest)
    with pytest.raises(ValueError, match="fails its checksum"):
        ckpt.load_checkpoint(newest)
    with caplog.at_level(logging.WARNING, logger="vdistill"):
        assert _pretrain(out, 6, "--resume") == 0
    assert "skipped the damaged checkpoint" in caplog.text and "step_00000004.pt" in caplog.text
    assert (out / "checkpoints" / "step_00000004.pt.bad").exists()
    assert json.loads((out / "resumes.jsonl").read_text())["checkpoint"] == "step_00000002.pt"
    for name in ("model.safetensors", "model_ema.safetensors"):
        full, resumed = load_file(tmp_path / "full" / name), load_file(out / name)
        assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_no_valid_checkpoint_is_a_clear_error_that_changes_nothing(tmp_path, capsys):
    assert _pretrain(tmp_path, 4) == 0
    for path in ckpt.list_checkpoints(tmp_path):
        _flip_byte(path, at=0.9)
    before = _contents(tmp_path)
    assert _pretrain(tmp_path, 6, "--resume") == 2
    err = capsys.readouterr().err
    assert "no valid checkpoint" in err and err.count("fails its checksum") == 2
    assert _contents(tmp_path) == before
    assert main(["export", "--checkpoint", str(ckpt.checkpoint_path(tmp_path, 4)), "--out",
                 str(tmp_path / "x.safetensors")]) == 2
    assert "fails its checksum" in capsys.readouterr().err


def test_checkpoint_checksum_is_sha256sum_format_and_missing_one_warns(tmp_path, caplog):
    path = tmp_path / "step_00000001.pt"
    ckpt.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    digest, name = ckpt.checksum_path(path).read_text().split()
    assert name == path.name and len(digest) == 64
    ckpt.checksum_path(path).unlink()
    with caplog.at_level(logging.WARNING, logger="vdistill"):
        assert ckpt.load_checkpoint(path)["step"] == 1
    assert "no checksum file" in caplog.text


def test_stale_temporaries_of_killed_writes_are_removed(tmp_path, caplog):
    assert _pretrain(tmp_path, 2) == 0
    stale = [tmp_path / "checkpoints" / ".step_00000009.pt.k3j2.tmp", tmp_path / ".model.safetensors.a1.tmp",
             tmp_path / "checkpoints" / "step_00000009.pt.sha256"]  # a checksum whose checkpoint never arrived
    for path in stale:
        path.write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="vdistill"):
        assert _pretrain(tmp_path, 4, "--resume") == 0
    assert not any(p.exists() for p in stale)
    assert "removed 3 stale temporary file(s)" in caplog.text


def test_exports_and_checkpoints_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert _pretrain(tmp_path, 2) == 0
    finally:
        os.umask(old)
    for path in (tmp_path / "model_ema.safetensors", ckpt.checkpoint_path(tmp_path, 2)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
