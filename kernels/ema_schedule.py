"""EMA decay rules: EDM2 power-function EMA and constant decay.

Power EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
Sec. 3.1 and Appendix C): after the update with step index n = 0, 1, 2, ... the decay is

    β_n = (1 − 1/(n+1))^(γ+1),

so the first update copies the parameters (β_0 = 0). The exponent γ is set through the relative
standard deviation of the averaging profile,

    σ_rel = sqrt((γ+1) / ((γ+2)² (γ+3))),          (EDM2, Sec. 3.1)

On γ > −1 this rises from 0 to its maximum σ_max ≈ 0.3003 at γ* = (√5 − 3)/2 (the root of
γ² + 3γ + 1 = 0, where its log-derivative vanishes) and then decreases to 0. Like EDM2 (largest
real root of the cubic) we take the branch γ ≥ γ*, so every 0 < σ_rel ≤ σ_max has one γ, found
by bisection in float64; larger σ_rel are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property


def gamma_to_sigma_rel(gamma: float) -> float:
    """σ_rel of the power EMA with exponent γ > −1 (EDM2, Sec. 3.1)."""
    if not gamma > -1.0:
        raise ValueError(f"gamma must be > -1, got {gamma}")
    g = float(gamma)
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


GAMMA_AT_MAX = (math.sqrt(5.0) - 3.0) / 2.0
SIGMA_REL_MAX = gamma_to_sigma_rel(GAMMA_AT_MAX)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Exponent γ > −1 whose power EMA has relative standard deviation σ_rel > 0 (inverse of the relation above)."""
    if not (isinstance(sigma_rel, (int, float)) and math.isfinite(sigma_rel) and sigma_rel > 0):
        raise ValueError(f"sigma_rel must be a finite number > 0, got {sigma_rel!r}")
    if sigma_rel > SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must be <= {SIGMA_REL_MAX:.6f} (the power EMA's maximum), got {sigma_rel}")
    lo, hi = GAMMA_AT_MAX, 1.0
    while gamma_to_sigma_rel(hi) > sigma_rel:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if gamma_to_sigma_rel(mid) > sigma_rel:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def power_beta(n: int, gamma: float) -> float:
    """β_n = (1 − 1/(n+1))^(γ+1): the decay of the update with step index n ≥ 0."""
    if n < 0:
        raise ValueError(f"step index n must be >= 0, got {n}")
    return (1.0 - 1.0 / (n + 1)) ** (gamma + 1.0)


@dataclass(frozen=True)
class EMAProfile:
    """One EMA profile: power EMA (`sigma_rel`, EDM2) or constant decay (`beta`); set exactly one.

    `sigma_rel` is EDM2's relative standard deviation (e.g. 0.05 or 0.10); `beta` in [0, 1) is a
    fixed decay per update.
    """

    sigma_rel: float | None = None
    beta: float | None = None

    def __post_init__(self) -> None:
        if (self.sigma_rel is None) == (self.beta is None):
            raise ValueError("EMAProfile: set exactly one of sigma_rel (power EMA) or beta (constant decay)")
        if self.beta is not None and not (isinstance(self.beta, (int, float)) and 0.0 <= self.beta < 1.0):
            raise ValueError(f"EMAProfile: beta must be a number in [0, 1), got {self.beta!r}")
        if self.sigma_rel is not None:
            sigma_rel_to_gamma(self.sigma_rel)

    @cached_property
    def gamma(self) -> float | None:
        """Power-EMA exponent γ, or None for a constant profile."""
        return None if self.sigma_rel is None else sigma_rel_to_gamma(self.sigma_rel)

    def beta_at(self, n: int) -> float:
        """Decay of the update with step index n (0 for the first update)."""
        if self.beta is not None:
            if n < 0:
                raise ValueError(f"step index n must be >= 0, got {n}")
            return float(self.beta)
        return power_beta(n, self.gamma)
