"""bench/attention_regs.py compiles an attention config row offline for sm_90 and counts its registers."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from vdistill.bench import attention_regs, sass_count  # noqa: E402
from vdistill.kernels.dispatch import INTERPRET  # noqa: E402

pytestmark = pytest.mark.skipif(INTERPRET, reason="compiles real Triton kernels (not the interpreter's)")


def test_forward_row_compiles_with_counts():
    try:  # a Triton wheel without the CUDA tools cannot disassemble
        sass_count._cuda_tool("nvdisasm")
        sass_count._cuda_tool("cuobjdump")
    except RuntimeError as err:
        pytest.skip(str(err))
    kernel, rows, _, _ = attention_regs.kernels()["fwd"]
    row = attention_regs.compile_row(kernel, rows[0], 64, "bf16", 90)
    assert set(row) >= {"row", "head_dim", "dtype", "stages", "registers", "spills", "sass", "barriers",
                        "shared_bytes", "warps_per_sm"}
    assert 0 < row["registers"] <= 255 and row["spills"] >= 0 and row["sass"] > 0
    assert row["barriers"] > 0  # the tl.dot operands pass through shared memory
    assert row["warps_per_sm"] >= rows[0][2]  # at least one program fits


def test_signature_types_follow_the_launch():
    kernel, _, _, _ = attention_regs.kernels()["fwd+jvp"]
    sig, const, divisible = attention_regs.signature(kernel.fn, "bf16")
    assert sig["Q"] == "*bf16" and sig["LSE"] == "*fp32" and sig["scale"] == "fp32"
    assert sig["sqd"] == "constexpr" and const["sqd"] == 1  # the unit head-dim stride is specialised
    assert sig["N_Q"] == "i32" and "N_Q" not in divisible  # do_not_specialize
    assert "slb" not in divisible and "sqn" in divisible and "Q" in divisible
    assert const["PIPELINE"] is False  # a constexpr default
