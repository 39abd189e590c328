"""bench/bench_attention.py's CPU-testable parts: flash-attn providers (skipped when absent, layout and scale through
fakes), the interleaved-rounds aggregation, the per-config sweep's config lists and pinning, the new options."""

import importlib
import sys
import types

import pytest
import torch

from vdistill.bench import attention_tuning as at
from vdistill.bench import bench_attention as ba
from vdistill.kernels.attention import attention_ref


def _fake_flash(module: str, returns_lse: bool) -> tuple[types.ModuleType, list[dict]]:
    """A flash-attn module whose flash_attn_func takes and returns [B, N, H, D] (attention computed with torch);
    records each call's shapes and keyword arguments."""
    calls = []

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
        calls.append({"shapes": (q.shape, k.shape, v.shape), "scale": softmax_scale, "causal": causal})
        out = attention_ref(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale)
        out = out.transpose(1, 2)
        return (out, torch.zeros(q.shape[0], q.shape[2], q.shape[1])) if returns_lse else out

    mod = types.ModuleType(module)
    mod.flash_attn_func = flash_attn_func
    return mod, calls


def test_flash_providers_are_skipped_with_a_reason_when_not_importable(monkeypatch):
    for module in ba.FLASH.values():
        monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    providers = ba.flash_providers(torch.bfloat16, 128)
    assert set(providers) == {"flash-attn2", "flash-attn3"}
    for reason in providers.values():
        assert isinstance(reason, str) and "not importable" in reason
    rows = ba.Runner(torch.device("cpu"), rep_ms=1, rounds=2).op("s", (1, 1, 4, 4, 8), "fwd", providers)
    assert [r["skipped"] for r in rows] == list(providers.values())
    assert not any("error" in r or "ms" in r for r in rows)


@pytest.mark.parametrize("name, module, returns_lse",
                         [("flash-attn2", "flash_attn", False), ("flash-attn3", "flash_attn_interface", True)])
def test_flash_provider_passes_bnhd_and_the_scale_and_returns_bhnd(monkeypatch, name, module, returns_lse):
    fake, calls = _fake_flash(module, returns_lse)
    monkeypatch.setitem(sys.modules, module, fake)
    attend = ba.flash_providers(torch.bfloat16, 32)[name]
    assert callable(attend)
    B, H, Nq, Nk, D, scale = 2, 3, 7, 5, 32, 0.3  # not D**-0.5: the scale must be passed through
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, H, D, generator=g).transpose(1, 2) for n in (Nq, Nk, Nk))  # the bench's layout
    out = attend(q, k, v, scale)
    assert calls == [{"shapes": ((B, Nq, H, D), (B, Nk, H, D), (B, Nk, H, D)), "scale": scale, "causal": False}]
    assert out.shape == (B, H, Nq, D)
    torch.testing.assert_close(out, attention_ref(q, k, v, scale=scale))


def test_flash_providers_skip_other_dtypes_and_wide_heads(monkeypatch):
    for module in ba.FLASH.values():
        monkeypatch.setitem(sys.modules, module, _fake_flash(module, False)[0])
    assert all("fp16/bf16 only" in r for r in ba.flash_providers(torch.float32, 64).values())
    assert all("head dim <= 256" in r for r in ba.flash_providers(torch.float16, 512).values())


def test_aggregate_rounds_takes_medians_over_rounds():
    samples = [(3.0, 2.0, 4.0), (1.0, 0.5, 1.5), (2.0, 1.0, 9.0), (10.0, 9.0, 11.0), (2.5, 2.0, 3.0)]
    assert ba.aggregate_rounds(samples) == {"ms": 2.5, "p20_ms": 2.0, "p80_ms": 4.0,
                                            "round_ms": [3.0, 1.0, 2.0, 10.0, 2.5]}


def test_interleave_alternates_providers_and_drops_one_that_fails():
    order = []

    def unit(name, ms, fail_on=None):
        def time_one():
            order.append(name)
            if len([n for n in order if n == name]) == fail_on:
                raise RuntimeError("boom")
            return ms, ms, ms
        return time_one

    res = ba.interleave({"a": unit("a", 1.0), "b": unit("b", 2.0), "c": unit("c", 3.0, fail_on=2)}, rounds=3)
    assert order == ["a", "b", "c", "b", "c", "a", "a", "b"]  # each round starts one provider later
    assert res["a"]["ms"] == 1.0 and res["a"]["round_ms"] == [1.0, 1.0, 1.0]
    assert res["b"]["ms"] == 2.0 and len(res["b"]["round_ms"]) == 3
    assert res["c"] == {"error": "RuntimeError: boom"}


def test_runner_checks_before_timing_and_records_each_outcome():
    runner = ba.Runner(torch.device("cpu"), rep_ms=1, rounds=3)
    rows = runner.op("s", (1, 2, 4, 4, 8), "fwd", {
        "good": (lambda: sum(range(100)), lambda: 1e-3),
        "wrong": (lambda: None, lambda: 0.5),  # fails its check: never timed
        "absent": "not installed",
        "broken": ValueError("no such shape"),
    })
    good, wrong, absent, broken = rows
    assert len(good["round_ms"]) == 3 and good["timing"] == "wall-clock" and good["tflops"] > 0
    assert "relative error" in wrong["error"] and "ms" not in wrong
    assert absent["skipped"] == "not installed"
    assert broken["error"] == "ValueError: no such shape"
    assert runner.rows == rows


def test_sweep_enumerates_every_row_of_the_kernels_config_lists():
    mod = lambda name: importlib.import_module(f"vdistill.kernels.attention.{name}")
    lists = {"fwd": mod("fwd").FWD_CONFIGS, "fwd_jvp": mod("fwd_jvp").JVP_CONFIGS,
             "bwd_dkdv": mod("bwd").DKDV_CONFIGS, "bwd_dq": mod("bwd").DQ_CONFIGS,
             "bwd_dkdv_dq": mod("bwd").DKDV_DQ_CONFIGS}
    configs = at.sweep_configs()
    assert {name: len(c) for name, c in configs.items()} == {name: len(rows) for name, rows in lists.items()}
    for name, rows in lists.items():
        for row, c in zip(rows, configs[name]):
            assert (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) == row[:4]
        labels = [at.config_label(c) for c in configs[name]]
        assert all(label.startswith(f"{row[0]}x{row[1]} w{row[2]} s{row[3]}") for label, row in zip(labels, rows))


def test_pinned_state_shows_the_pruner_one_config_and_restores_the_kernel():
    tuning = importlib.import_module("vdistill.kernels.attention.tuning")
    kernel = at.kernel_autotuner("fwd_jvp")
    config = at.sweep_configs()["fwd_jvp"][-1]
    before = (kernel.configs, kernel.cache, kernel.early_config_prune, set(tuning._pinned))
    state = at.pinned_state(kernel, config)
    with state.active():
        assert len(kernel.configs) == 2 and kernel.cache is state.cache
        q = torch.zeros(1, 1, 4, 16)  # a CPU Q: the kernel's own pruner keeps the first config it is shown
        assert kernel.early_config_prune(kernel.configs, {"Q": q}, HEAD_DIM=16) == [config]
        tuning._pinned.add("_attn_fwd_jvp_kernel")  # as launch() would after a failed compile
    assert (kernel.configs, kernel.cache, kernel.early_config_prune, set(tuning._pinned)) == before


def test_autotune_rep_sets_the_autotuners_benchmark_and_restores_it():
    kernels = [at.kernel_autotuner(name) for name in at.KERNELS]
    before = [vars(k).get("do_bench") for k in kernels]
    with at.autotune_rep(250.0):
        assert all(callable(vars(k)["do_bench"]) for k in kernels)
    assert [vars(k).get("do_bench") for k in kernels] == before
    with at.autotune_rep(None):
        assert [vars(k).get("do_bench") for k in kernels] == before


def test_help_lists_the_new_options(capsys):
    with pytest.raises(SystemExit) as exc:
        ba.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--rounds", "--cuda-graphs", "--autotune-rep", "--sweep"):
        assert option in out


@pytest.mark.slow
def test_tiny_interpreter_run_with_rounds_and_sweep(tmp_path):
    """The script end to end on the CPU (Triton interpreter): every one of our rows and sweep rows is timed."""
    import json
    import os
    import subprocess
    from pathlib import Path

    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "vdistill.bench.bench_attention", "--device", "cpu", "--tiny",
                           "--rounds", "2", "--sweep", "--out", str(tmp_path)],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(next(tmp_path.glob("attention_cpu_*.json")).read_text())
    assert result["rounds"] == 2 and result["cuda_graphs"] == "auto" and result["graph_shapes"] == []
    ours = [r for r in result["rows"] if r["provider"].startswith("ours")]
    assert ours and all(len(r["round_ms"]) == 2 for r in ours)
    assert {r["provider"]: r.get("skipped") for r in result["rows"]}["flash-attn2"]
    counts = {name: len(c) for name, c in at.sweep_configs().items()}
    assert len(result["sweep"]) == len(ba.TINY) * sum(counts.values())
    assert all("ms" in r and r["config_used"] for r in result["sweep"]), [r for r in result["sweep"] if "ms" not in r]
