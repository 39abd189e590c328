"""Fused multi-tensor EMA of model parameters, several profiles in one pass.

Update for each profile k with decay β_k (see `kernels/ema_schedule.py` for the power-EMA rule
β_n = (1 − 1/(n+1))^(γ+1) of EDM2 and for constant decay):

    e_k ← lerp(e_k, p, 1 − β_k) = β_k·e_k + (1 − β_k)·p

computed with the same two-branch formula as `torch.lerp` (e + w·(p − e) for w < 0.5, else
p − (p − e)·(1 − w)), so the first power-EMA update (β_0 = 0) copies p exactly.

Layout: the fp32 EMA weights of one profile live in one flat buffer (each parameter's segment
starts at a multiple of 32 elements); `tensors(k)` and `state_dict()` expose per-parameter views.
One Triton launch per parameter dtype updates ALL parameters and ALL (≤ 4) profiles, reading
each parameter once: per-program device tables hold the address of the program's block of
parameter elements (int64, cast to a typed pointer in the kernel), the matching offset in the
flat EMA buffers and the element count (a block never spans two tensors). bf16/fp16 parameters
are converted in registers, never copied. Each update compares every parameter's (data_ptr,
shape, stride, dtype, device) with the last update's: a new storage or dtype rebuilds the tables; a
new shape or layout (non-contiguous, e.g. channels_last: the kernel reads memory order), an
unsupported dtype or another device raises, naming the parameter (the EMA buffers are sized once).

Dispatch (`kernels/dispatch.py`): CUDA parameters run the Triton kernel; CPU parameters run
`ema_update_ref` (`torch._foreach_lerp_`) unless TRITON_INTERPRET=1, where the same kernel runs
in Triton's interpreter (parameter addresses are host addresses there).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Sequence

import torch

from vdistill.kernels.dispatch import HAS_TRITON, use_triton
from vdistill.kernels.ema_schedule import EMAProfile

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support: no sharded parameters
    DTensor = ()

__all__ = ["EMA", "EMAProfile", "ema_update_ref"]

MAX_PROFILES = 4
BLOCK = 4096  # parameter elements per program
NUM_WARPS = 8
_SEGMENT_ALIGN = 32  # EMA segments start at multiples of 32 fp32 elements (128 bytes)
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _ema_lerp(e_ptr, p, offs, mask, w, MASKED: tl.constexpr):
        # torch.lerp's formula: exact endpoint at w = 1, small rounding error for small w.
        if MASKED:  # noqa: SIM108 (a plain constexpr branch reads clearer in a kernel)
            e = tl.load(e_ptr + offs, mask=mask, other=0.0)
        else:
            e = tl.load(e_ptr + offs)
        d = p - e
        out = tl.where(w < 0.5, e + w * d, p - d * (1.0 - w))
        if MASKED:
            tl.store(e_ptr + offs, out, mask=mask)
        else:
            tl.store(e_ptr + offs, out)

    @triton.jit
    def _ema_block(p_ptr, e0, e1, e2, e3, offs, mask, w0, w1, w2, w3, K: tl.constexpr, MASKED: tl.constexpr):
        if MASKED:
            p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            p = tl.load(p_ptr + offs).to(tl.float32)
        _ema_lerp(e0, p, offs, mask, w0, MASKED)
        if K > 1:
            _ema_lerp(e1, p, offs, mask, w1, MASKED)
        if K > 2:
            _ema_lerp(e2, p, offs, mask, w2, MASKED)
        if K > 3:
            _ema_lerp(e3, p, offs, mask, w3, MASKED)

    @triton.jit
    def _ema_update_kernel(
        prog_addr,  # int64 [n_programs]: address of the program's first parameter element
        prog_seg,  # int64 [n_programs]: matching element offset in the flat EMA buffers
        prog_count,  # int32 [n_programs]: elements to update (BLOCK except at a tensor's end)
        ema0, ema1, ema2, ema3,  # fp32 flat EMA buffers (unused ones alias ema0)
        w0, w1, w2, w3,  # lerp weights 1 − β_k
        PARAM_DTYPE: tl.constexpr,  # 0 fp32, 1 bf16, 2 fp16
        PARAM_BYTES: tl.constexpr,  # 4 or 2
        K: tl.constexpr,
        BLOCK: tl.constexpr,
        ALIGNED: tl.constexpr,  # every address is 16-byte aligned: allow vector loads
    ):
        pid = tl.program_id(0)
        addr = tl.load(prog_addr + pid)
        seg = tl.load(prog_seg + pid)
        count = tl.load(prog_count + pid)
        if PARAM_DTYPE == 0:
            p_ptr = addr.to(tl.pointer_type(tl.float32))
        elif PARAM_DTYPE == 1:
            p_ptr = addr.to(tl.pointer_type(tl.bfloat16))
        else:
            p_ptr = addr.to(tl.pointer_type(tl.float16))
        if ALIGNED:
            # 4 elements per vector access for every dtype (16 B fp32, 8 B half): params and fp32 EMA then
            # share one register layout, so no shared-memory layout conversion is needed.
            p_ptr = tl.multiple_of(p_ptr, 4 * PARAM_BYTES)
            seg = tl.multiple_of(seg, 32)
        offs = tl.arange(0, BLOCK)
        mask = offs < count
        if count == BLOCK:  # full block: unmasked, vectorizable
            _ema_block(p_ptr, ema0 + seg, ema1 + seg, ema2 + seg, ema3 + seg, offs, mask,
                       w0, w1, w2, w3, K, False)
        else:
            _ema_block(p_ptr, ema0 + seg, ema1 + seg, ema2 + seg, ema3 + seg, offs, mask,
                       w0, w1, w2, w3, K, True)


def ema_update_ref(ema_tensors: Sequence[torch.Tensor], params: Sequence[torch.Tensor], beta: float) -> None:
    """Reference EMA step, in place: e ← lerp(e, p, 1 − β) for each pair, by `torch._foreach_lerp_`.

    ema_tensors: fp32 (or any float) tensors; params: same shapes, any float dtype — parameters of
    another dtype are first copied to the EMA dtype (the upcast the fused kernel avoids).
    """
    if len(ema_tensors) != len(params):
        raise ValueError(f"ema_update_ref: {len(ema_tensors)} ema_tensors but {len(params)} params")
    src = []
    for i, (e, p) in enumerate(zip(ema_tensors, params)):
        if e.shape != p.shape:
            raise ValueError(f"ema_update_ref: ema_tensors[{i}] {tuple(e.shape)} vs params[{i}] {tuple(p.shape)}")
        src.append(p.detach() if p.dtype == e.dtype else p.detach().to(e.dtype))
    with torch.no_grad():
        torch._foreach_lerp_(list(ema_tensors), src, 1.0 - float(beta))


@dataclasses.dataclass
class _LaunchPlan:
    """Per-program device tables for one launch over all parameters of one dtype."""

    dtype_code: int
    addr: torch.Tensor
    seg: torch.Tensor
    count: torch.Tensor
    n_programs: int
    aligned: bool


def _local(p: torch.Tensor) -> torch.Tensor:
    """A parameter's own storage: the local shard of an FSDP2 (DTensor) parameter, else the tensor itself."""
    return p.to_local() if isinstance(p, DTensor) else p


def _named_tensors(params: Iterable[torch.Tensor] | torch.nn.Module, arg: str) -> tuple[list[str], list[torch.Tensor]]:
    if isinstance(params, torch.nn.Module):
        named = list(params.named_parameters())
        return [n for n, _ in named], [_local(p) for _, p in named]
    if isinstance(params, torch.Tensor):
        raise TypeError(f"{arg} must be a Module or an iterable of tensors, got a single Tensor")
    tensors = list(params)
    for i, p in enumerate(tensors):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{arg}[{i}] must be a torch.Tensor, got {type(p).__name__}")
    return [str(i) for i in range(len(tensors))], tensors


class EMA:
    """fp32 EMA copies of a model's parameters under K ≤ 4 profiles, updated by one fused pass.

    params: a Module (its named parameters) or an iterable of float tensors (fp32/bf16/fp16, all on
    one device, contiguous; of a Module sharded by FSDP2, each rank averages its local shards). profiles:
    `EMAProfile`s. The EMA weights start as fp32 copies of the
    parameters; `update()` applies one step with β_k = profiles[k].beta_at(step) and increments
    `step`. Keep the parameter objects (in-place optimizer updates and `p.data = ...` are both
    followed while they keep their shape, device, a supported dtype and contiguity; other changes
    raise); create the EMA after moving the model to its device.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | torch.nn.Module,
        profiles: Sequence[EMAProfile],
        *,
        block: int = BLOCK,
    ) -> None:
        self.names, self._params = _named_tensors(params, "params")
        if not self._params:
            raise ValueError("params: no tensors to average")
        profiles = list(profiles)
        if not 1 <= len(profiles) <= MAX_PROFILES:
            raise ValueError(f"profiles: need 1 to {MAX_PROFILES} EMAProfile, got {len(profiles)}")
        for i, prof in enumerate(profiles):
            if not isinstance(prof, EMAProfile):
                raise TypeError(f"profiles[{i}] must be an EMAProfile, got {type(prof).__name__}")
        if block <= 0 or block & (block - 1):
            raise ValueError(f"block must be a power of two, got {block}")
        self.profiles = profiles
        self.block = block
        self.step = 0
        self.device = self._params[0].device
        self._shapes = [p.shape for p in self._params]
        self._check_params()
        numels = [p.numel() for p in self._params]
        self._segments: list[int] = []
        total = 0
        for n in numels:
            self._segments.append(total)
            total += -(-n // _SEGMENT_ALIGN) * _SEGMENT_ALIGN
        self._flat = [torch.zeros(total, dtype=torch.float32, device=self.device) for _ in profiles]
        self._views = [
            [flat[s : s + p.numel()].view(p.shape) for s, p in zip(self._segments, self._params)] for flat in self._flat
        ]
        with torch.no_grad():
            for views in self._views:
                for v, p in zip(views, self._params):
                    v.copy_(p.detach())
        self._plans: list[_LaunchPlan] = []
        self._plan_key: list[tuple] | None = None
        self._checked_key = self._key()

    def betas(self, n: int | None = None) -> list[float]:
        """The K decays of the update with step index n (default: the next update, `self.step`)."""
        n = self.step if n is None else n
        return [prof.beta_at(n) for prof in self.profiles]

    def tensors(self, profile: int = 0) -> list[torch.Tensor]:
        """fp32 EMA weights of one profile, one view per parameter (in `names` order)."""
        return list(self._views[self._check_profile(profile)])

    def update(self) -> None:
        """One EMA step of all parameters under all profiles; then `step += 1`."""
        key = self._key()
        if key != self._checked_key:
            self._check_params()
            self._checked_key = key
        betas = self.betas()
        if use_triton(*self._params):
            self._update_triton(betas)
        else:
            for views, beta in zip(self._views, betas):
                ema_update_ref(views, self._params, beta)
        self.step += 1

    def _key(self) -> list[tuple]:
        """What the launch tables and the checks depend on."""
        return [(p.data_ptr(), p.shape, p.stride(), p.dtype, p.device) for p in self._params]

    def _check_params(self) -> None:
        """Raise, naming the parameter, on what the fixed-size fp32 EMA buffers cannot follow."""
        for name, p, shape in zip(self.names, self._params, self._shapes):
            if p.dtype not in _DTYPE_CODE:
                raise TypeError(f"params[{name}]: dtype {p.dtype} not supported (float32, bfloat16, float16)")
            if p.device != self.device:
                raise ValueError(f"params[{name}] is on {p.device}; the EMA lives on {self.device}")
            if p.shape != shape:
                raise ValueError(f"params[{name}] has shape {tuple(p.shape)}; the EMA was built for {tuple(shape)}")
            if not p.is_contiguous():
                raise ValueError(f"params[{name}] is not contiguous (shape {tuple(p.shape)}, stride {p.stride()})")

    def _update_triton(self, betas: list[float]) -> None:
        if self._checked_key != self._plan_key:
            self._plans = self._build_plans()
            self._plan_key = self._checked_key
        k = len(self._flat)
        emas = self._flat + [self._flat[0]] * (MAX_PROFILES - k)
        weights = [1.0 - b for b in betas] + [0.0] * (MAX_PROFILES - k)
        for plan in self._plans:
            _ema_update_kernel[(plan.n_programs,)](
                plan.addr, plan.seg, plan.count,
                *emas, *weights,
                PARAM_DTYPE=plan.dtype_code, PARAM_BYTES=4 if plan.dtype_code == 0 else 2, K=k, BLOCK=self.block, ALIGNED=plan.aligned,
                num_warps=NUM_WARPS,
            )

    def _build_plans(self) -> list[_LaunchPlan]:
        flat_aligned = all(f.data_ptr() % 16 == 0 for f in self._flat)
        plans = []
        for dtype, code in _DTYPE_CODE.items():
            idx = [i for i, p in enumerate(self._params) if p.dtype == dtype and p.numel() > 0]
            if not idx:
                continue
            numel = torch.tensor([self._params[i].numel() for i in idx], dtype=torch.int64)
            addr = torch.tensor([self._params[i].data_ptr() for i in idx], dtype=torch.int64)
            seg = torch.tensor([self._segments[i] for i in idx], dtype=torch.int64)
            n_blocks = (numel + self.block - 1) // self.block
            owner = torch.repeat_interleave(torch.arange(len(idx)), n_blocks)  # program -> tensor
            first = torch.cumsum(n_blocks, 0) - n_blocks
            start = (torch.arange(len(owner)) - first[owner]) * self.block  # program's first element
            plans.append(
                _LaunchPlan(
                    dtype_code=code,
                    addr=(addr[owner] + start * self._params[idx[0]].element_size()).to(self.device),
                    seg=(seg[owner] + start).to(self.device),
                    count=torch.clamp(numel[owner] - start, max=self.block).to(torch.int32).to(self.device),
                    n_programs=len(owner),
                    aligned=flat_aligned and all(a % 16 == 0 for a in addr.tolist()),
                )
            )
        return plans

    def _check_profile(self, profile: int) -> int:
        if not isinstance(profile, int) or not 0 <= profile < len(self.profiles):
            raise ValueError(f"profile must be an int in [0, {len(self.profiles)}), got {profile!r}")
        return profile

    def state_dict(self) -> dict:
        """{'step', 'profiles', 'ema': [{name: fp32 tensor}] per profile}. The tensors alias the live EMA
        weights (like `Module.state_dict`); `torch.save` stores each profile's buffer once."""
        return {
            "step": self.step,
            "profiles": [dataclasses.asdict(p) for p in self.profiles],
            "ema": [dict(zip(self.names, views)) for views in self._views],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the EMA weights and the step counter from `state_dict()` output (exact copy)."""
        for key in ("step", "profiles", "ema"):
            if key not in state:
                raise ValueError(f"state: missing key {key!r}")
        mine = [dataclasses.asdict(p) for p in self.profiles]
        if list(state["profiles"]) != mine:
            raise ValueError(f"state['profiles'] {state['profiles']} do not match this EMA's {mine}")
        if len(state["ema"]) != len(self._views):
            raise ValueError(f"state['ema']: {len(state['ema'])} profiles, expected {len(self._views)}")
        for k, (saved, views) in enumerate(zip(state["ema"], self._views)):
            if set(saved) != set(self.names):
                raise ValueError(f"state['ema'][{k}]: parameter names differ from this EMA's")
            for name, v in zip(self.names, views):
                if saved[name].shape != v.shape:
                    raise ValueError(f"state['ema'][{k}][{name}]: shape {tuple(saved[name].shape)} vs {tuple(v.shape)}")
        with torch.no_grad():
            for saved, views in zip(state["ema"], self._views):
                for name, v in zip(self.names, views):
                    v.copy_(saved[name])
        self.step = int(state["step"])

    def copy_to(self, target: Iterable[torch.Tensor] | torch.nn.Module, profile: int = 0) -> None:
        """Write one profile's EMA weights into `target` (a Module or tensors like `params`), cast to
        each target tensor's dtype."""
        _, tensors = _named_tensors(target, "target")
        views = self._views[self._check_profile(profile)]
        if len(tensors) != len(views):
            raise ValueError(f"target: {len(tensors)} tensors, the EMA has {len(views)}")
        for name, t, v in zip(self.names, tensors, views):
            if t.shape != v.shape:
                raise ValueError(f"target[{name}]: shape {tuple(t.shape)} vs EMA {tuple(v.shape)}")
        with torch.no_grad():
            for t, v in zip(tensors, views):
                t.copy_(v)

    @contextlib.contextmanager
    def swapped(self, module: torch.nn.Module, profile: int = 0) -> Iterator[torch.nn.Module]:
        """Context manager: `module` holds the EMA weights of `profile` inside, its own weights after
        (restored bit-exactly from a copy, also when the body raises). Do not call `update()` inside:
        it would average the EMA weights into themselves."""
        params = [_local(p) for p in module.parameters()]
        backup = [p.detach().clone() for p in params]
        self.copy_to(params, profile)
        try:
            yield module
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)
