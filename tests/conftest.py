"""Test session set-up: interpreter tests run only in their own invocation (see README)."""

import os

import torch

collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["interp"]

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
