"""Host synchronisations of a training step (`methods/train/op_counter.py`): a step of any recipe reads one
device value on the host (the gradient norm's finiteness); logged values are read only at logged steps."""

import json
from pathlib import Path

import pytest
import torch
from distill_helpers import tiny_dit_trainer

from vdistill.methods.recipes.consistency import Consistency, ConsistencyConfig
from vdistill.methods.recipes.progressive import Progressive, ProgressiveConfig
from vdistill.methods.recipes.rcm import RCM, RCMConfig
from vdistill.methods.recipes.reflow import ReFlow, ReFlowConfig
from vdistill.methods.train.logs import host_values
from vdistill.methods.train.op_counter import OpCounter
from vdistill.methods.train.profiling import nvtx_range


def test_counter_sees_each_kind_of_host_read_in_its_phase():
    x = torch.arange(4.0)
    with OpCounter() as c:
        with nvtx_range("reads"):
            x.sum().item(), float(x[0]), int(x[1]), bool(x[2] > 1), x.tolist()
        with nvtx_range("shapes"):
            x.nonzero(), x[x > 1]
        with nvtx_range("quiet"):
            (x * 2 + 1).exp().sum()
        with nvtx_range("views"):
            x.view(2, 2).t().unsqueeze(0)
    assert c.syncs["reads"] == 5 and c.syncs["shapes"] == 2 and c.syncs["quiet"] == 0
    assert c.ops["quiet"] == c.launches["quiet"] == 4 and c.ops["views"] == 3 and c.launches["views"] == 0
    assert c.total() == (sum(c.ops.values()), sum(c.launches.values()), 7)
    assert all(s.site.startswith("tests/test_host_syncs.py:") for s in c.sync_sites)
    assert torch.Tensor.tolist(x) == [0.0, 1.0, 2.0, 3.0] and "tolist" not in vars(torch.Tensor)  # unpatched


RECIPES = {  # every recipe, rCM with a DMD step and a critic update, consistency with Heun teacher steps
    "reflow": (ReFlow, ReFlowConfig()),
    "progressive": (Progressive, ProgressiveConfig()),
    "consistency": (Consistency, ConsistencyConfig(solver="heun")),
    "rcm": (RCM, RCMConfig(tangent_warmup=0, dmd_start=0, max_sim_steps=2, critic_every=1)),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_a_training_step_reads_the_device_once(recipe, tmp_path):
    """The only device value the host waits for is the gradient norm (it decides whether the step is
    skipped). AdamW's step counters live on the host (foreach AdamW on this CPU; the fused AdamW used on
    GPUs has none), so reads of them wait for nothing and are set aside."""
    cls, cfg = RECIPES[recipe]
    trainer = tiny_dit_trainer(cls, cfg, tmp_path, steps=4)
    trainer.train_step(0)  # lazily built state (optimisers of the critic, target) out of the way
    with OpCounter() as counter:
        metrics = trainer.train_step(1)
    syncs = [s for s in counter.sync_sites if s.via != "torch/optim/optimizer.py"]
    assert [(s.phase, s.site.split(":")[0]) for s in syncs] == [("optimizer", "methods/train/trainer.py")], syncs
    assert counter.ops["student_backward"] > 0  # backward's operators are seen and attributed too
    row = host_values(metrics)
    assert all(type(v) is float for v in row.values()) and list(row) == list(metrics)
    if recipe == "rcm":
        for phase in ("teacher", "jvp", "simulate", "student", "dmd", "ema", "critic"):
            assert counter.ops[phase] > 0, phase
        assert isinstance(metrics["loss"], torch.Tensor) and isinstance(metrics["critic_loss"], torch.Tensor)
        assert row["loss"] == pytest.approx(float(metrics["loss"]))


def test_logged_rows_do_not_depend_on_how_often_one_logs(tmp_path):
    cfg = RCMConfig(tangent_warmup=0, dmd_start=0, max_sim_steps=2)
    rows = {}
    for every in (1, 2):
        trainer = tiny_dit_trainer(RCM, cfg, tmp_path / str(every), steps=4)
        trainer.cfg.log_every = every
        trainer.fit()
        lines = Path(tmp_path / str(every) / "metrics.jsonl").read_text().splitlines()
        rows[every] = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows[2]] == [2, 4]
    for row in rows[2]:
        same = rows[1][row["step"] - 1]
        assert {k: v for k, v in row.items() if k != "wall_s"} == {k: v for k, v in same.items() if k != "wall_s"}
