"""DiT blocks through torch.compile (`VideoDiT.compile_blocks`, `train.compile`): the same function as eager
(forward, gradients, no-grad forward); forward-mode JVP passes bypass the compiled program."""

import copy

import pytest
import torch
from distill_helpers import tiny_dit_trainer

from vdistill.methods.recipes.rcm import RCM, RCMConfig
from vdistill.methods.train.logs import host_values
from vdistill.methods.train.trainer import _compile_dit_blocks
from vdistill.models import layers
from vdistill.models.dit import build_dit
from vdistill.models.jvp import jvp


@pytest.fixture
def compiled_calls(monkeypatch):
    """Counts calls of the compiled block program."""
    calls = []
    program = layers._compiled_block_forward()

    def counted(*args):
        calls.append(1)
        return program(*args)

    monkeypatch.setattr(layers, "_compiled_block_forward", lambda: counted)
    return calls


def test_compiled_blocks_compute_what_eager_ones_do(compiled_calls):
    torch.manual_seed(0)
    eager = build_dit("tiny")
    torch.nn.init.normal_(eager.head.weight, std=0.02)
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks = True
    assert compiled.compile_blocks and not eager.compile_blocks
    x, t, text = torch.randn(2, 3, 2, 8, 8), torch.rand(2), torch.randn(2, 5, 16)
    for model in (eager, compiled):
        model(x, t, text).square().mean().backward()
    assert len(compiled_calls) == len(compiled.blocks)
    torch.testing.assert_close(compiled(x, t, text), eager(x, t, text), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)

    recomputed = copy.deepcopy(compiled)  # activation checkpointing recomputes the compiled blocks in the backward
    recomputed.checkpoint_blocks = True
    recomputed.zero_grad(set_to_none=True)
    recomputed(x, t, text).square().mean().backward()
    for (name, p), q in zip(eager.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)

    calls = len(compiled_calls)
    tangents = (torch.randn_like(x), torch.rand(2))
    for backend in ("forward_ad", "func"):  # Dynamo cannot trace these: the blocks run eagerly, bit for bit
        got, want = jvp(compiled, (x, t, text), tangents, backend=backend), jvp(eager, (x, t, text), tangents,
                                                                               backend=backend)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), backend
    assert len(compiled_calls) == calls


def test_train_compile_compiles_every_dit_of_the_recipe_and_not_with_context_parallel(tmp_path):
    trainer = tiny_dit_trainer(RCM, RCMConfig(), tmp_path, steps=1)
    recipe = trainer.recipe
    with pytest.raises(ValueError, match="train.compile with train.context_parallel=2"):
        _compile_dit_blocks(recipe, context_parallel_size=2)
    _compile_dit_blocks(recipe, context_parallel_size=1)
    assert recipe.student.compile_blocks and recipe.teacher.compile_blocks and recipe.critic.compile_blocks


def test_an_rcm_run_with_compiled_blocks_follows_the_eager_one(tmp_path):
    """Three rCM steps with DMD and critic updates (compiled: teacher, student, critic; eager: the JVP pass)."""
    cfg = RCMConfig(tangent_warmup=0, dmd_start=0, max_sim_steps=2)
    rows = {}
    for compiled in (False, True):
        trainer = tiny_dit_trainer(RCM, cfg, tmp_path / str(compiled), steps=3)
        if compiled:
            _compile_dit_blocks(trainer.recipe, context_parallel_size=1)
        rows[compiled] = [host_values(trainer.train_step(step)) for step in range(3)]
    for eager_row, compiled_row in zip(rows[False], rows[True]):
        for key in ("loss", "grad_norm", "scm_loss", "dmd_loss", "critic_loss"):
            assert compiled_row[key] == pytest.approx(eager_row[key], rel=1e-4, abs=1e-9), key
