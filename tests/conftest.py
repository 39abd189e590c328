"""Test session set-up: interpreter tests run only in their own invocation (see README)."""

import os
import sys
from pathlib import Path

import torch

# scripts/ (GPU-session orchestration, diagnostic probes) is run as files, not installed: its tests import it by name
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["interp"]

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
