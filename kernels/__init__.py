"""Triton kernels with PyTorch references and autograd / forward-AD wiring."""

from kernels._dispatch import reference_kernels
from kernels.attention import attention, attention_jvp, attention_ref
from kernels.ema import EMA, EMAProfile, ema_update_ref
from kernels.scm_tangent import scm_tangent, scm_tangent_ref
from kernels.trigflow import trigflow_eps, trigflow_noise, trigflow_noise_ref

__all__ = [
    "EMA",
    "EMAProfile",
    "attention",
    "attention_jvp",
    "attention_ref",
    "ema_update_ref",
    "reference_kernels",
    "scm_tangent",
    "scm_tangent_ref",
    "trigflow_eps",
    "trigflow_noise",
    "trigflow_noise_ref",
]
