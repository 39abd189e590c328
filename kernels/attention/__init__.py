"""Flash attention with backward and forward-mode JVP: the public op (`op.py`), its Triton kernels
(`fwd.py`, `fwd_jvp.py`, `bwd.py`), their `torch.library` wiring (`ops.py`), the CUDA backward choice
(`bwd_select.py`) and tile configs (`tuning.py`)."""

from vdistill.kernels.attention.op import attention, attention_jvp, attention_ref

__all__ = ["attention", "attention_jvp", "attention_ref"]
