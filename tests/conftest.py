"""Test session set-up: interpreter tests run only in their own invocation (see README); a shared tiny teacher."""

import os
import sys
from pathlib import Path

import pytest
import torch

# scripts/ (GPU-session orchestration, diagnostic probes) is run as files, not installed: its tests import it by name
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["interp"]

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def tiny_teacher_file(tmp_path_factory) -> Path:
    """The EMA export of a tiny-preset teacher trained for 2 steps through the CLI."""
    from vdistill.methods.cli.main import main

    out = tmp_path_factory.mktemp("run")
    assert main(["pretrain", "--preset", "tiny", "--set", "train.steps=2", "--out", str(out)]) == 0
    return out / "model_ema.safetensors"
