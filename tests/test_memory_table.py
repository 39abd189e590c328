"""scripts/memory_table.py: parameter counts from the models, how the layouts scale, and the per-token activation
formula against the bytes torch saves in one DiTBlock's forward on CPU."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed_workers import free_port
from memory_table import (
    MODELS,
    RESOLUTIONS,
    activation_bytes,
    block_bytes_per_token,
    estimate,
    jvp_peak_bytes,
    layouts,
    main,
    model_params,
    tokens_per_clip,
)

from vdistill.kernels.attention.ops import AttentionFunction
from vdistill.models import layers
from vdistill.models.context_parallel import TokenShard
from vdistill.models.dit import build_dit, count_params, dit_config
from vdistill.models.rope import rope_tables

GPUS = 8


def _layouts(name):
    return layouts(GPUS, dit_config(name).heads)


@pytest.fixture(scope="module")
def rows():
    return [estimate(name, res, layout, ema_profiles=2, grad_clips=2)
            for name in MODELS for res in RESOLUTIONS for layout in _layouts(name)]


def test_parameter_counts_come_from_the_models(rows):
    for name in MODELS:
        model = build_dit(name, device="meta")
        assert model_params(name) == (count_params(model), count_params(model.blocks[0]))
        assert {r["params"] for r in rows if r["model"] == name} == {count_params(model)}


def test_tokens_per_clip():
    cfg = dit_config("wan-14b")
    assert tokens_per_clip(cfg, 81, *RESOLUTIONS["480p"]) == 21 * 30 * 52
    assert tokens_per_clip(cfg, 81, *RESOLUTIONS["720p"]) == 21 * 45 * 80


def test_context_parallel_layouts_divide_the_heads():
    assert [layout.cp for layout in _layouts("wan-14b")] == [1, 1, 1, 2, 4, 8]  # 40 heads
    assert [layout.cp for layout in _layouts("wan-1.3b")] == [1, 1, 1, 2, 4]  # 12 heads: no CP8 (Ulysses)


def test_totals_shrink_with_sharding_and_context_parallelism(rows):
    for name in MODELS:
        names = [layout.name for layout in _layouts(name)]
        for res in RESOLUTIONS:
            group = {r["layout"]: r for r in rows if r["model"] == name and r["resolution"] == res}
            for key in ("total", "total_ckpt"):
                totals = [group[n][key] for n in names]  # DP, FSDP, + teacher & critic, x CP2, CP4(, CP8)
                assert all(a > b for a, b in zip(totals, totals[1:])), (name, res, key, totals)
            for n in names:
                assert group[n]["activations_ckpt"] < group[n]["activations"]


def test_fsdp_shards_the_student_states_over_g(rows):
    for name in MODELS:
        for res in RESOLUTIONS:
            dp, fsdp, both = (next(r for r in rows if r["model"] == name and r["resolution"] == res
                                   and r["layout"] == n) for n in ("DP", f"FSDP/{GPUS}", f"FSDP/{GPUS} + T&C"))
            for key in ("weights", "grads", "optimiser", "ema"):
                assert fsdp[key] == pytest.approx(dp[key] / GPUS, rel=1e-12)
            assert fsdp["teacher"] == dp["teacher"] and fsdp["critic"] == dp["critic"]
            assert both["teacher"] == pytest.approx(dp["teacher"] / GPUS, rel=1e-12)
            assert both["critic"] == pytest.approx(dp["critic"] / GPUS, rel=1e-12)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_is_linear_in_tokens(checkpointing):
    cfg = dit_config("wan-1.3b")
    for n, length in ((32760, 512), (1000, 7)):
        one = activation_bytes(cfg, n, length, checkpointing=checkpointing)
        assert activation_bytes(cfg, 2 * n, 2 * length, checkpointing=checkpointing) == pytest.approx(2 * one)
        assert jvp_peak_bytes(cfg, 3 * n, 3 * length) == pytest.approx(3 * jvp_peak_bytes(cfg, n, length))


def test_autocast_keeps_bf16_casts_of_trainable_weights_under_no_grad():
    """The "bf16 casts" column: a cast made in a no_grad pass (rCM's JVP pass) is reused, so kept, until autocast
    ends (a cached cast ignores a later change of the weight)."""
    linear, x = torch.nn.Linear(8, 8), torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            before = linear(x)
            linear.weight.mul_(2)
        assert torch.equal(linear(x), before)


def test_sharded_training_autocasts_without_keeping_the_casts():
    """The trainer's autocast for a sharded run (`train.fsdp`) casts the weights at each use, keeping none: the
    same pass as above sees the changed weight."""
    from vdistill.methods.train.trainer import autocast

    linear, x = torch.nn.Linear(8, 8), torch.randn(2, 8)
    for sharded in (False, True):
        with autocast(torch.device("cpu"), "bf16", sharded=sharded):
            with torch.no_grad():
                before = linear(x)
                linear.weight.mul_(2)
            assert torch.equal(linear(x), before) != sharded


def _flash(q, k, v, *, scale=None):
    # what CUDA runs: AttentionFunction saves q, k, v, O and LSE (the CPU reference would save the N×N probabilities)
    return AttentionFunction.apply(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)[0]


def _saved_bytes(block, cfg, grid, text_len, bf16, group=None):
    """Bytes of the distinct storages one block's forward saves for backward: parameters and the inputs all blocks
    share (time modulation, text context, RoPE tables) left out, the block's own input kept. With a process
    `group`, this rank's share of the tokens (context parallelism)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    n = grid[0] * grid[1] * grid[2]
    shard = None if group is None else TokenShard.of(group, n)
    x = torch.randn(1, n if shard is None else shard.local, cfg.dim, dtype=dtype, requires_grad=True)
    time_mod = torch.randn(1, 6, cfg.dim, dtype=dtype)
    context = torch.randn(1, text_len, cfg.dim, dtype=dtype)
    rope = rope_tables(grid, cfg.head_dim, cfg.rope_theta)
    if shard is not None:
        rope = tuple(shard.split(table, dim=0) for table in rope)
    shared = {t.untyped_storage().data_ptr() for t in (*block.parameters(), time_mod, context, *rope)}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in shared:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, time_mod, context, rope, shard)
    return sum(saved.values())


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16-autocast"])
def test_per_token_estimate_matches_what_torch_saves(monkeypatch, bf16):
    monkeypatch.setattr(layers, "attention", _flash)
    torch.manual_seed(0)
    cfg = dit_config("tiny")
    block = layers.DiTBlock(cfg.dim, cfg.heads, cfg.ffn_dim, cfg.eps)
    # slopes: per-sample tensors and weight casts do not grow with the tokens and cancel
    small, large = (2, 4, 4), (4, 4, 8)
    per_video = (_saved_bytes(block, cfg, large, 8, bf16) - _saved_bytes(block, cfg, small, 8, bf16)) / 96
    per_text = (_saved_bytes(block, cfg, small, 40, bf16) - _saved_bytes(block, cfg, small, 8, bf16)) / 32
    video, text = block_bytes_per_token(cfg, act_bytes=2 if bf16 else 4)
    # float32: exact; CPU autocast keeps nn.LayerNorm in bf16 (CUDA: float32), 2·dim bytes fewer. The reference
    # attention (N×N probabilities saved) is 16-33% over, outside these bounds.
    assert 0.95 < per_video / video < 1.05, (per_video, video)
    assert 0.95 < per_text / text < 1.05, (per_text, text)


def _context_parallel_rank(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        layers.attention = _flash  # a fresh process: nothing to restore
        torch.manual_seed(0)
        cfg = dit_config("tiny")
        block = layers.DiTBlock(cfg.dim, cfg.heads, cfg.ffn_dim, cfg.eps)
        saved = [_saved_bytes(block, cfg, grid, 8, False, dist.group.WORLD) for grid in ((2, 4, 4), (4, 4, 8))]
        if rank == 0:  # 96 more tokens, 48 on each rank
            out.write_text(json.dumps((saved[1] - saved[0]) / 48))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_context_parallel_estimate_matches_two_ranks(tmp_path):
    """float32, each clip's tokens over 2 gloo ranks: the per-local-token bytes include the exchanged copy."""
    out = tmp_path / "per_local_token.json"
    mp.spawn(_context_parallel_rank, args=(free_port(), out), nprocs=2, join=True)
    video, _ = block_bytes_per_token(dit_config("tiny"), act_bytes=4, context_parallel=True)
    assert json.loads(out.read_text()) == pytest.approx(video, rel=0.05)


def test_main_prints_tables_and_writes_json(tmp_path, capsys):
    out = tmp_path / "memory.json"
    main(["--json", str(out)])
    text = capsys.readouterr().out
    assert "GPU measurement pending" in text and text.count("| DP |") == len(MODELS) * len(RESOLUTIONS)
    data = json.loads(out.read_text())
    assert len(data["rows"]) == len(RESOLUTIONS) * sum(len(_layouts(name)) for name in MODELS)

    row = data["rows"][-1]
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps([{"model": row["model"], "resolution": row["resolution"], "layout": row["layout"],
                                     "checkpointing": True, "peak_gib": row["total_ckpt"] / 2}]))
    main(["--measured", str(measured)])
    assert "(0.50x)" in capsys.readouterr().out
