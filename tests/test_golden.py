"""Golden loss curves: the tiny flow-matching pretrain and a tiny rCM distillation, step by step, against the
curves in tests/assets/losses/ (CPU, fp32, fixed seeds).

A change that moves these curves changes what training computes (data, noise, loss, optimiser, EMA target);
if that is intended, rewrite the files with `VDISTILL_WRITE_GOLDEN=1 python -m pytest tests/test_golden.py`
and say why in the commit. Tolerance: relative 1e-4 per step. Reruns on one machine agree bit for bit;
1 instead of 2 intra-op threads (another reduction order) moved the curves by at most 1e-7 relative.
"""

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from vdistill.methods.data.batches import ShapesBatches
from vdistill.methods.data.text import WordTextEncoder
from vdistill.methods.recipes.rcm import RCM, RCMConfig
from vdistill.methods.sampling.generate import ModelBundle
from vdistill.methods.train.presets import tiny, tiny_distill
from vdistill.methods.train.runs import pretrain
from vdistill.methods.train.trainer import Trainer
from vdistill.models.dit import VideoDiT

ASSETS = Path(__file__).parent / "assets" / "losses"
RTOL = 1e-4


def _check(name: str, rows: list[dict]) -> None:
    curve = {"step": [r["step"] for r in rows], "loss": [r["loss"] for r in rows]}
    path = ASSETS / f"{name}.json"
    if os.environ.get("VDISTILL_WRITE_GOLDEN") == "1":
        path.write_text(json.dumps({"torch": torch.__version__, **curve}, indent=1) + "\n")
        pytest.skip(f"wrote {path}")
    golden = json.loads(path.read_text())
    assert curve["step"] == golden["step"]
    worst = max(abs(a - b) / abs(b) for a, b in zip(curve["loss"], golden["loss"], strict=True))
    assert worst <= RTOL, f"{name}: loss curve moved by {worst:.2e} relative (tolerance {RTOL:.0e})"


def test_tiny_pretrain_follows_its_golden_curve(tmp_path):
    run = tiny()
    run = replace(run, train=replace(run.train, log_every=1, ckpt_every=run.train.steps))
    pretrain(run, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    _check("pretrain_tiny", rows)


@pytest.mark.slow
def test_tiny_rcm_follows_its_golden_curve(tmp_path):
    """rCM from a random tiny teacher with every weight drawn (its zero-initialised head would make every
    velocity 0): sCM alone for two steps, then with DMD and the critic."""
    run = tiny()
    torch.manual_seed(0)
    teacher = VideoDiT(run.model).eval()
    for p in teacher.parameters():
        p.data.normal_(0, 0.2)
    text = WordTextEncoder(dim=run.model.text_dim, max_len=run.text_max_len)
    bundle = ModelBundle(teacher, text, run.data, 2.0, {})
    recipe = RCM.from_teacher(bundle, RCMConfig(tangent_warmup=2, dmd_start=2, max_sim_steps=2))
    train = replace(tiny_distill("rcm").train, steps=6, ckpt_every=6)
    trainer = Trainer(recipe, ShapesBatches(run.data, text, train.batch_size, seed=0), train, tmp_path)
    _check("rcm_tiny", trainer.fit())
