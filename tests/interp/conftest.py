"""Kernel tests under Triton's CPU interpreter: `TRITON_INTERPRET=1 python -m pytest tests/interp`.

Without the variable the Triton kernels would not be interpreted, so nothing here is collected.
"""

import os

collect_ignore_glob = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["test_*.py"]
