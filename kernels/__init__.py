"""Triton kernels with PyTorch references and autograd / forward-AD wiring."""

from kernels.attention import attention, attention_jvp, attention_ref

__all__ = ["attention", "attention_jvp", "attention_ref"]
